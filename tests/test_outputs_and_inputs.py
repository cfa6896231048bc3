"""No command overwrites one of its own inputs or another of its outputs (support/paths.py), a 4-label dataset is
evaluated as the reference protocol defines top-5 for C < 5, and odd things in folders and label lists (a named
pipe, a BOM, a single label) are handled with a line instead of a hang or a wrong label.

The run checkpoint is SigRL on the committed tiny CLIP at its initial weights, saved without training."""
import json
import os
import re
import signal
import types

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
import fixtures_run
import predict
from support import image_folders, paths, runs
from support.data_formats import read_names


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGRL_CACHE", str(d / "cache"))
        yield fixtures_run.with_photos(d, nested=True)


def one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tag(run, *flags):
    return predict.main(["--ckpt", str(run["ckpt"]), str(run["photos"]), "--workers", "0", *map(str, flags)])


# ----------------------------------------------------------------------------- outputs never clobber inputs
def test_eval_json_onto_its_own_checkpoint(run, capsys):
    before = run["ckpt"].read_bytes()
    code = eval_cli.main(["--ckpt", str(run["ckpt"]), "--json", str(run["ckpt"]), "--workers", "0"])
    one_line(capsys, code, "--json", "the checkpoint", "input")
    assert run["ckpt"].read_bytes() == before


def test_eval_json_onto_its_score_or_label_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "s.npy", rng.standard_normal((6, 7)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.where(rng.random((6, 7)) < 0.4, 1, -1).astype(np.int8))
    os.link(tmp_path / "y.npy", tmp_path / "hard.npy")  # the same file under a second name
    os.symlink(tmp_path / "s.npy", tmp_path / "soft.npy")
    for target, what in (("s.npy", "the score file"), ("y.npy", "the label file"), ("hard.npy", "the label file"),
                         ("soft.npy", "the score file")):
        before = (tmp_path / target).read_bytes()
        code = eval_cli.main(["--scores", str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy"),
                              "--protocol", "nuswide", "--json", str(tmp_path / target)])
        one_line(capsys, code, "--json", what)
        assert (tmp_path / target).read_bytes() == before


def test_predict_outputs_onto_a_photo_or_each_other(run, tmp_path, capsys):
    photo = run["photos"] / "img0.jpg"
    before = photo.read_bytes()
    one_line(capsys, tag(run, "--json", photo), "--json", "an image", "img0.jpg")
    one_line(capsys, tag(run, "--save-scores", run["photos"] / "sub" / "img2.jpg"), "--save-scores", "img2.jpg")
    assert photo.read_bytes() == before
    out = tmp_path / "out.txt"
    one_line(capsys, tag(run, "--json", out, "--csv", out), "--csv", "also given to --json")
    one_line(capsys, tag(run, "--json", tmp_path / "s.images.txt", "--save-scores", tmp_path / "s.npy"),
             "s.images.txt", "also given")
    one_line(capsys, tag(run, "--labels-file", run["ckpt"], "--csv", run["ckpt"]), "the checkpoint")
    assert not out.exists() and not (tmp_path / "s.npy").exists()


def test_predict_explain_must_be_a_new_or_existing_folder_outside_the_images(run, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    one_line(capsys, tag(run, "--explain", tmp_path / "file"), "--explain", "an existing file", "folder")
    assert (tmp_path / "file").read_text() == "keep me"
    one_line(capsys, tag(run, "--explain", run["photos"] / "maps"), "--explain", "inside", "photos")
    one_line(capsys, tag(run, "--explain", tmp_path / "maps", "--json", tmp_path / "maps" / "0000_img0.png"),
             "also given to --json")
    assert not (run["photos"] / "maps").exists() and not (tmp_path / "maps").exists()


def test_the_rule_itself(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "dir").mkdir()
    ok = [("--a", tmp_path / "new.json"), ("--b", tmp_path / "dir" / "x.csv"), ("--c", tmp_path / "d2" / "e", "folder")]
    paths.check_outputs(ok, [("the input", tmp_path / "in.txt")])
    for outputs, needle in [([("--a", tmp_path / "in.txt")], "the input"),
                            ([("--a", tmp_path / "dir")], "a folder; expected a file"),
                            ([("--a", tmp_path / "in.txt", paths.FOLDER)], "an existing file; expected a folder"),
                            ([("--a", tmp_path / "x"), ("--b", tmp_path / "dir" / ".." / "x")], "also given to --a"),
                            ([("--a", tmp_path / "nowhere" / "x.json")], "does not exist"),
                            ([("--a", tmp_path / "in.txt" / "x.json")], "is a file, expected a folder")]:
        with pytest.raises(runs.UsageError, match=needle):
            paths.check_outputs(outputs, [("the input", tmp_path / "in.txt")])


# ----------------------------------------------------------------------------- evaluation for any C >= 1
def test_eval_scores_with_four_columns(tmp_path, capsys):
    """P@k = hits / k and R@k = hits / positives with all C = 4 classes in the top-5 list, computed here by hand."""
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6], [0.7, 0.6, 0.1, 0.9]], np.float32)  # (3, 4)
    clean = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], np.int8)  # (3, 4)
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y01.npy", clean)
    np.save(tmp_path / "ypm.npy", np.where(clean == 1, 1, -1).astype(np.int8))
    # SPML, per image: top-1 hits 1, 0, 0 (image 3's best is class 4); top-3 hits 2, 1, 2; top-5 = all 4: 2, 1, 2
    assert eval_cli.main(["--scores", str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y01.npy"),
                          "--protocol", "spml", "--json", str(tmp_path / "spml.json")]) == 0
    got = json.loads((tmp_path / "spml.json").read_text())["test"]
    want = {"p@1": (1 + 0 + 0) / 3, "r@1": (1 / 2 + 0 + 0) / 3, "p@3": (2 + 1 + 2) / 9, "r@3": (1 + 1 + 1) / 3,
            "p@5": (2 + 1 + 2) / 15, "r@5": 1.0}
    for k, v in want.items():
        assert got[k] == pytest.approx(100 * v, abs=1e-6), k
    # NUS-WIDE micro top-K: 5 positives; top-3 holds 5 of them, top-5 (all 4 classes) too: P = TP / (N K)
    assert eval_cli.main(["--scores", str(tmp_path / "s.npy"), "--labels", str(tmp_path / "ypm.npy"),
                          "--protocol", "nuswide", "--json", str(tmp_path / "nus.json")]) == 0
    got = json.loads((tmp_path / "nus.json").read_text())["test"]
    for k, v in {"p@3": 5 / 9, "r@3": 1.0, "p@5": 5 / 15, "r@5": 1.0, "f1@5": 2 * (1 / 3) / (1 / 3 + 1)}.items():
        assert got[k] == pytest.approx(100 * v, abs=1e-4), k
    capsys.readouterr()


def test_eval_scores_with_one_column(tmp_path):
    np.save(tmp_path / "s.npy", np.array([[0.3], [0.9], [0.1]], np.float32))
    np.save(tmp_path / "y.npy", np.array([[0], [1], [1]], np.int8))
    assert eval_cli.main(["--scores", str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy"),
                          "--protocol", "spml", "--json", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())["test"]
    # sklearn AP of [0.3, 0.9, 0.1] against [0, 1, 1]: precision 1 at recall 1/2, 2/3 at recall 1 -> 5/6
    assert got["map"] == pytest.approx(100 * 5 / 6) and got["p@5"] == pytest.approx(100 * 2 / 15)


# ----------------------------------------------------------------------------- folders and label lists
def test_a_named_pipe_in_a_folder_is_skipped(tmp_path, capsys):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    os.mkfifo(tmp_path / "pipe.jpg")  # an image's name: only its kind says it is no file to open
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("find_images opened the pipe and blocked"))
    signal.alarm(30)
    try:
        found = image_folders.find_images([str(tmp_path)])
        with pytest.raises(runs.UsageError, match="not a regular file"):
            image_folders.find_images([str(tmp_path / "pipe.jpg")])
    finally:
        signal.alarm(0)
    assert found == [str(tmp_path / "red.png")]
    assert f"skipped {tmp_path / 'pipe.jpg'}: not a regular file" in capsys.readouterr().err


def test_a_bom_is_not_part_of_the_first_label(tmp_path):
    (tmp_path / "names.txt").write_bytes("\ufefffish\r\nsky\r\n".encode("utf-8"))
    args = types.SimpleNamespace(labels=None, labels_file=str(tmp_path / "names.txt"))
    assert predict.read_labels(args)[0] == ["fish", "sky"]
    assert read_names(tmp_path / "names.txt") == ["fish", "sky"]


def test_a_single_label_warns_that_every_score_is_plus_or_minus_one_or_zero(run, capsys):
    assert tag(run, "--labels", "sky") == 0
    out, err = capsys.readouterr()
    assert "warning:" in err and "+1, 0 or -1" in err
    scores = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.endswith(tuple("0123456789"))]
    assert scores and all(s in (-1.0, 0.0, 1.0) for s in scores)  # what the warning says, seen


# ----------------------------------------------------------------------------- images as people see them
def test_exif_orientation_and_16_bit_greyscale_are_scored_and_drawn_as_seen(run, tmp_path, monkeypatch, capsys):
    """A JPEG stored sideways with EXIF Orientation = 6 is scored as its upright picture; a 16-bit greyscale PNG
    as its 8-bit version; the explain picture shows those pixels and its headings' halves average to the score."""
    from data import read_image
    from support import draw
    rng = np.random.default_rng(0)
    upright = (rng.random((48, 64, 3)) * 255).astype(np.uint8)  # (H, W, 3), wider than tall: turning shows
    upright[:, :16] = (255, 0, 0)  # a red band on the left
    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright
    Image.fromarray(np.rot90(upright, k=1).copy()).save(photos / "phone.jpg", quality=100, exif=exif)
    with Image.open(photos / "phone.jpg") as im:  # the stored pixels, as decoded, not turned
        stored = np.asarray(im.convert("RGB"))
    seen = np.rot90(stored, k=-1)  # (48, 64, 3) turned clockwise by hand
    assert seen.shape == upright.shape and np.array_equal(np.asarray(read_image(photos / "phone.jpg")), seen)
    Image.fromarray(seen.copy()).save(tmp_path / "phone_upright.png")
    grey8 = (rng.random((40, 40)) * 255).astype(np.uint8)  # (40, 40)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(photos / "deep.png")  # 16-bit: v * 257 maps 255 to 65535
    assert Image.open(photos / "deep.png").mode.startswith("I")
    Image.fromarray(grey8).save(tmp_path / "deep8.png")
    panels = {}
    real_panel = draw.explain_panel
    monkeypatch.setattr(draw, "explain_panel", lambda image, grid, columns, title, legend: panels.setdefault(
        title, (np.asarray(image), [c[0] for c in columns])) and real_panel(image, grid, columns, title, legend))
    flags = ["--workers", "0", "--top-k", "3"]
    assert predict.main(["--ckpt", str(run["ckpt"]), str(photos), "--json", str(tmp_path / "a.json"),
                         "--explain", str(tmp_path / "maps"), *flags]) == 0
    assert predict.main(["--ckpt", str(run["ckpt"]), str(tmp_path / "phone_upright.png"), str(tmp_path / "deep8.png"),
                         "--json", str(tmp_path / "b.json"), "--explain", str(tmp_path / "maps8"), *flags]) == 0
    capsys.readouterr()
    got = {os.path.basename(r["image"]): r["labels"] for r in json.loads((tmp_path / "a.json").read_text())}
    want = {os.path.basename(r["image"]): r["labels"] for r in json.loads((tmp_path / "b.json").read_text())}
    for mine, theirs in (("phone.jpg", "phone_upright.png"), ("deep.png", "deep8.png")):
        assert [n for n, _ in got[mine]] == [n for n, _ in want[theirs]], mine
        np.testing.assert_allclose([s for _, s in got[mine]], [s for _, s in want[theirs]], atol=1e-5)
        np.testing.assert_array_equal(panels[mine][0], panels[theirs][0])  # the picture shows what was scored
        for heading in panels[mine][1]:  # "name 0.368 (local 0.177, global 0.559)"
            score, local, glob = map(float, re.findall(r"-?\d+\.\d+", heading)[-3:])
            assert abs((local + glob) / 2 - score) <= 1e-3 + 1e-9, heading
    assert panels["deep.png"][0].mean() < 250  # not the pure white of a clipped 16-bit image
