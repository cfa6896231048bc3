"""Nothing silently wrong: bad flags, damaged images, label files, stale prepared files, saved scores that would
give wrong numbers, a CLIP file with a block missing, a damaged cache: each is found before the first step and
is one line (the run-directory half is tests/test_robustness.py).
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as eval_cli
from support import tasks
import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fixtures_robustness import (world, spml, zsl, call, said, one_line)  # noqa: F401 (fixtures)


# --------------------------------------------------------------------------- validated before the first step
@pytest.mark.parametrize("flag,value", [
    ("batch-size", 0), ("class-chunk", 0), ("workers", -1), ("lr", "nan"), ("lr", 0), ("topk", 0),
    ("alpha", "nan"), ("epochs", 0), ("epochs", -1), ("eval-batch-size", 0), ("neg-proportion", 2),
    ("warmup-epochs", "inf"), ("template", "no placeholder"), ("batch-size", "eight")])
def test_flags_are_checked_first(world, tmp_path, capsys, flag, value):
    """Case 7: every flag has a range; one line naming it, nothing written."""
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "run", **{flag: value}))
    one_line(rc, err, f"--{flag}")
    assert not (tmp_path / "run").exists()


def test_bad_data_is_found_before_the_first_step(world, tmp_path, capsys):
    """Case 7: an unwritable --out, a test split whose images are all missing, NaN in a label file."""
    (tmp_path / "afile").write_text("")
    one_line(*call(train_cli.main, capsys, spml(world, tmp_path / "afile" / "run"))[::2], "afile")
    coco = tmp_path / "coco"
    shutil.copytree(world["coco"], coco)
    shutil.rmtree(coco / "val2014")
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "r1", data="coco", **{"data-root": coco}))
    assert rc == 2 and "Traceback" not in err
    assert "test" in said(err)[-1] and "no readable" in said(err)[-1], err
    voc = tmp_path / "voc"
    shutil.copytree(world["voc"], voc)
    assert data.main(["prepare", "voc", "--root", str(voc)]) == 0
    labels = voc / "sigrl_spml" / "voc2012" / "formatted_train_labels.npy"
    y = np.load(labels)
    y[3, 2] = np.nan
    np.save(labels, y)
    one_line(*call(train_cli.main, capsys, spml(world, tmp_path / "r2", **{"data-root": voc}))[::2],
             "formatted_train_labels.npy", "NaN")
    assert not any((tmp_path / r).exists() for r in ("r1", "r2"))


def test_no_training_image_with_a_seen_positive(world, tmp_path, capsys):
    """Case 8: ZSL with no usable training image would 'train' zero steps and print metrics as if trained."""
    root = tmp_path / "nus"
    shutil.copytree(world["toynus"], root)
    path = root / "sigrl_nuswide" / "train_labels.npy"
    np.save(path, -np.ones_like(np.load(path)))
    rc, _, err = call(train_cli.main, capsys, zsl(world, tmp_path / "run", **{"data-root": root}))
    one_line(rc, err, "train_labels.npy", "seen positive")
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- silently wrong numbers
def test_truncated_and_high_bit_depth_images(world, tmp_path, capsys):
    """Case 9: a JPEG cut to 10 % of its bytes is reported and excluded; a 16-bit PNG is scaled, not clipped."""
    coco = tmp_path / "coco"
    shutil.copytree(world["coco"], coco)
    victim = sorted((coco / "train2014").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 10])
    assert data.main(["show", "coco", "--root", str(coco), "--check-images"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\b1 of \d+ images missing or unreadable: " + re.escape(str(victim)), out), out
    deep = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 97)  # (24, 24) spread over 0..55,000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    from torchvision.transforms import ToTensor
    image, _, _ = data.ImageList([tmp_path / "deep.png"], np.zeros((1, 1)), ToTensor())[0]  # (3, 24, 24)
    np.testing.assert_allclose(image[0].numpy(), deep / 65535, atol=1 / 255)
    assert data.check_images([tmp_path / "deep.png"])[0].all()


def test_prepared_label_files_follow_their_sources(world, tmp_path, capsys):
    """Case 10: the prepared SPML files are rebuilt when the COCO annotations change (they were reused)."""
    coco = tmp_path / "coco"
    shutil.copytree(world["coco"], coco)
    shutil.rmtree(coco / "sigrl_spml", ignore_errors=True)
    before = data.load_spml("coco", str(coco))
    path = coco / "annotations" / "instances_train2014.json"
    ann = json.loads(path.read_text())
    ann["annotations"] = ann["annotations"][::2]
    path.write_text(json.dumps(ann))
    after = data.load_spml("coco", str(coco))
    fresh = tmp_path / "fresh"
    shutil.copytree(coco, fresh, ignore=shutil.ignore_patterns("sigrl_spml"))
    expected = data.load_spml("coco", str(fresh))
    assert not np.array_equal(before.train_true, expected.train_true)
    np.testing.assert_array_equal(after.train_true, expected.train_true)
    np.testing.assert_array_equal(after.test_labels, expected.test_labels)
    assert "instances_train2014.json" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_stale_prepared_files_in_a_read_only_root_are_refused(world, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(world["coco"], coco)
    data.load_spml("coco", str(coco))
    path = coco / "annotations" / "instances_train2014.json"
    path.write_text(path.read_text().replace('"iscrowd": 0', '"iscrowd": 0 '))
    (coco / "sigrl_spml").chmod(0o555)
    try:
        with pytest.raises(data.DataError, match="--data-out"):
            data.load_spml("coco", str(coco))
    finally:
        (coco / "sigrl_spml").chmod(0o755)


def test_eval_scores_refuses_what_would_be_wrong(tmp_path, capsys):
    """Case 12: 0/1 labels under --protocol nuswide (0 = unknown there), NaN scores, empty arrays, a file that
    is not .npy, --json into a missing folder. (Fewer than 5 columns are scored: test_outputs_and_inputs.py.)"""
    rng = np.random.default_rng(0)
    files = {"s": rng.standard_normal((40, 12)).astype(np.float32),
             "y01": (rng.random((40, 12)) < 0.3).astype(np.int8)}
    files["ypm"] = np.where(files["y01"] == 1, 1, -1).astype(np.int8)
    files["nan"] = files["s"].copy()
    files["nan"][3, 4] = np.nan
    files["empty"], files["yempty"] = np.zeros((0, 12), np.float32), np.zeros((0, 12), np.int8)
    for name, array in files.items():
        np.save(tmp_path / f"{name}.npy", array)
    (tmp_path / "text.npy").write_text("not numpy")
    p = lambda name: str(tmp_path / f"{name}.npy")  # noqa: E731
    for scores, labels, protocol, needle in [
            ("s", "y01", "nuswide", "--protocol spml"), ("nan", "ypm", "nuswide", "NaN"),
            ("empty", "yempty", "nuswide", "empty"),
            ("text", "ypm", "nuswide", "text.npy"), ("s", "ypm", "spml", "-1")]:
        rc, out, err = call(eval_cli.main, capsys, ["--scores", p(scores), "--labels", p(labels),
                                                    "--protocol", protocol])
        one_line(rc, err, needle)
        assert out == ""
    rc, out, err = call(eval_cli.main, capsys, ["--scores", p("s"), "--labels", p("ypm"), "--protocol", "nuswide",
                                                "--json", tmp_path / "nowhere" / "r.json"])
    one_line(rc, err, "nowhere")
    assert out == ""


def test_clip_file_with_a_block_missing_is_refused(world, tmp_path, capsys):
    """Case 13: a CLIP file must hold every block; it never loads as a shallower ViT."""
    sd = torch.load(world["clip"], weights_only=True)
    cases = {
        "middle": {k: v for k, v in sd.items() if not k.startswith("visual.transformer.resblocks.0.")},
        "partial": {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.1.mlp.c_fc.weight"},
        "text": {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.1.ln_2")}}
    # a ViT-B/16 image tower (width 768) with its 12th block cut off; stride-0 tensors keep the file tiny
    from vit import VisionConfig, VisionTransformer
    with torch.device("meta"):
        short = VisionTransformer(VisionConfig(width=768, layers=11, patch=16, resolution=32, embed_dim=64))
    cases["last"] = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    cases["last"].update({"visual." + k: torch.zeros(1).expand(v.shape) for k, v in short.state_dict().items()})
    for name, broken in cases.items():
        torch.save(broken, tmp_path / f"{name}.pt")
        rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "run", clip=tmp_path / f"{name}.pt"))
        line = one_line(rc, err, f"{name}.pt")
        assert "block" in line or "missing" in line, line
    assert "12" in line  # the ViT-B/16 case names the depth it expected
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- other tracebacks
def test_corrupt_label_embedding_cache_is_rebuilt(world, tmp_path, capsys, monkeypatch):
    """Case 15: a damaged cache entry is recomputed, not fatal."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIGRL_CACHE", str(cache))
    assert call(train_cli.main, capsys, spml(world, tmp_path / "a"))[0] == 0
    for f in cache.glob("labels-*.pt"):  # the label embeddings (the image check's verdicts are cached here too)
        f.write_bytes(b"garbage")
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "b"))
    assert rc == 0, err
    assert all(torch.load(f, weights_only=True)["embeddings"].shape[0] == 20 for f in cache.glob("labels-*.pt"))


def test_bad_label_files_are_one_line(world, tmp_path, capsys):
    """Case 15: a label longer than CLIP's 77-token context; a label file in Latin-1."""
    coco = tmp_path / "coco"
    shutil.copytree(world["coco"], coco, ignore=shutil.ignore_patterns("sigrl_spml"))
    for split in ("train", "val"):
        path = coco / "annotations" / f"instances_{split}2014.json"
        path.write_text(path.read_text().replace('"name": "toaster"', '"name": "' + "very " * 80 + 'toaster"'))
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "r1", data="coco", **{"data-root": coco}))
    one_line(rc, err, "very very", "77")
    nus = tmp_path / "nus"
    shutil.copytree(world["nus"], nus)
    text = (nus / "Concepts81.txt").read_text(encoding="utf-8")
    (nus / "Concepts81.txt").write_bytes(text.replace("animal", "caf\u00e9", 1).encode("latin-1"))
    rc, _, err = call(train_cli.main, capsys, zsl(world, tmp_path / "r2", **{"data-root": nus}))
    one_line(rc, err, "Concepts81.txt", "UTF-8")


def test_dataloader_worker_error_is_one_line(world, tmp_path, capsys, monkeypatch):
    """Case 15: an image that vanishes after the start-up check, read by a worker process (--workers 2)."""
    voc = tmp_path / "voc"
    shutil.copytree(world["voc"], voc)
    monkeypatch.setattr(tasks, "check_images", lambda paths, **kw: (np.ones(len(paths), bool), [], []))
    victim = sorted((voc / "VOCdevkit" / "VOC2012" / "JPEGImages").iterdir())[0]
    victim.unlink()
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "run", workers=2, **{"data-root": voc}))
    one_line(rc, err, victim.name)
