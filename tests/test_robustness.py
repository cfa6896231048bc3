"""Nothing lost, nothing silently wrong: interruption, bad data, bad flags, divergence.

Each test is one way a careful user with bad luck meets the commands: a kill or Ctrl-C at a chosen write
(the test-only hook SIGRL_TEST_SIGNAL="<file>#<n>:<SIGNAL>" sends the signal just before the n-th rename onto
<file>), a second run on the same directory, a full disk, bad flags, damaged images, label files and
checkpoints, stale prepared files, saved scores that would give wrong numbers, a CLIP file with a block
missing, a run that diverges. Everything runs in-process (train.main / eval.main, as the command line calls
them) except what needs a real process: SIGKILL, and the lock held by another process.
"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from support import checkpoints
from support import divergence
import data
import eval as eval_cli
import fixtures_clip
import fixtures_data
from support import tasks
from toy import world as toyworld
import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    env = pytest.MonkeyPatch()
    env.setenv("SIGRL_CACHE", str(d / "cache"))
    fixtures_clip.make_clip_checkpoint(d / "clip.pt", size="tiny", fmt="plain")
    w = {"dir": d, "clip": d / "clip.pt",
         "coco": fixtures_data.make_coco(d / "coco"), "voc": fixtures_data.make_voc(d / "voc", n_train=30),
         "nus": fixtures_data.make_nuswide_h5(d / "nus", n_train=12, n_test=8),
         # a NUS-WIDE-layout world with 27 seen / 8 unseen labels: ZSL steps cost little (925 labels do)
         "toynus": str(toyworld.make_world(d / "toynus", n_train=16, n_test=8))}
    yield w
    env.undo()


def spml(world, out, **flags):
    """train.py's flags for a short SPML run; a flag given as True is a switch."""
    data = flags.get("data", "voc")
    flags = {"task": "spml", "data": data, "data-root": world.get(data), "clip": world["clip"], "out": out,
             "epochs": 1, "workers": 0, "fix-layer": 1, "batch-size": 8, **flags}
    return [str(x) for k, v in flags.items() for x in ((f"--{k}",) if v is True else (f"--{k}", v))]


def zsl(world, out, **flags):
    return spml(world, out, **{"task": "zsl", "data": "nuswide", "data-root": world["toynus"], **flags})


def call(main, capsys, args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def said(err):
    """What a command printed on stderr for the user: the lines that are not progress bars."""
    return [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]


def one_line(rc, err, *needles):
    assert rc == 2 and "Traceback" not in err, err
    lines = said(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def log_of(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_seconds(records):
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in records], sort_keys=True)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(run):
    return [f for f in os.listdir(run) if ".tmp" in f]


def cli(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=600)


IMPROVES = {"epochs": 2, "lr": 5e-2, "seed": 1}  # on the VOC fixture: validation mAP 13.7 then 15.6: best.pt rewritten


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 2-epoch SPML run whose validation mAP improves at epoch 2 (so best.pt is rewritten)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_cli.main(spml(world, run, **IMPROVES)) == 0
    log = log_of(run)
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[2]["val"]["map"] > log[1]["val"]["map"]
    return run


# ----------------------------------------------------------------------------- interruption, run directory
def test_interrupt_at_each_write_leaves_a_consistent_run(world, reference, tmp_path, capsys, monkeypatch):
    """Cases 1 and 5: Ctrl-C just before each file of epoch 2 is written, then --resume: the same run as the
    uninterrupted one, log included, and best.pt holds the epoch the final line names."""
    capsys.readouterr()
    log_writes = 1 + sum(r["epoch"] < 2 for r in log_of(reference))  # the log is rewritten once per record
    for point in (f"log.jsonl#{log_writes}", "best.pt#2", "last.pt#2"):
        run = tmp_path / point.replace("#", "")
        monkeypatch.setenv("SIGRL_TEST_SIGNAL", f"{point}:INT")
        rc, _, err = call(train_cli.main, capsys, spml(world, run, **IMPROVES))
        one_line(rc, err, "interrupted during epoch 2", "holds epoch 1", f"--resume {run / 'last.pt'}")
        monkeypatch.delenv("SIGRL_TEST_SIGNAL")
        rc, out, _ = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
        assert rc == 0 and not leftovers(run)
        assert without_seconds(log_of(run)) == without_seconds(log_of(reference)), point
        assert same_weights(ckpt(run / "last.pt")["model"], ckpt(reference / "last.pt")["model"])
        best = ckpt(run / "best.pt")["state"]["best"]
        assert best == ckpt(reference / "best.pt")["state"]["best"] and best["epoch"] == 2
        assert f"best epoch by clean-validation mAP: 2 (val {best['val_map']:.2f}, test {best['test_map']:.2f})" in out
    monkeypatch.setenv("SIGRL_TEST_SIGNAL", "best.pt#1:INT")  # before anything was saved
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "early"))
    one_line(rc, err, "interrupted during epoch 1", "nothing to resume")


def test_sigkill_during_a_save_then_resume(world, reference, tmp_path, capsys):
    """Case 5: SIGKILL while last.pt is being replaced leaves a temporary file; --resume removes it and
    continues to the same run, each epoch logged once."""
    run = tmp_path / "run"
    proc = cli("train.py", *spml(world, run, **IMPROVES), env={"SIGRL_TEST_SIGNAL": "last.pt#2:KILL",
                                                               # the reference's thread count: same float sums
                                                               "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert leftovers(run) and ckpt(run / "last.pt")["state"]["epoch"] == 1
    rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
    assert rc == 0, err
    assert not leftovers(run)
    assert without_seconds(log_of(run)) == without_seconds(log_of(reference))
    assert same_weights(ckpt(run / "last.pt")["model"], ckpt(reference / "last.pt")["model"])


def test_out_naming_a_file(world, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    one_line(*call(train_cli.main, capsys, spml(world, tmp_path / "afile"))[::2], tmp_path / "afile")
    one_line(*call(train_cli.main, capsys, spml(world, tmp_path / "afile" / "run"))[::2], tmp_path / "afile")


def test_second_run_on_the_same_directory_is_refused(world, reference, tmp_path, capsys):
    """Case 4: while another process holds a run directory (as a running train.py does, from its start to its
    end), a second train.py on it is refused in one line naming that process, and writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {f: (run / f).read_bytes() for f in os.listdir(run) if f != ".lock"}
    holder = subprocess.Popen([sys.executable, "-c", "from support import safe_io\nimport sys, time\nwith safe_io.locked(sys.argv[1]):\n"
                               "    print('held', flush=True)\n    time.sleep(600)", run], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
        one_line(rc, err, run, f"pid {holder.pid}")
        rc, _, err = call(train_cli.main, capsys, spml(world, run, overwrite=True, seed=1))
        one_line(rc, err, run, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert {f: (run / f).read_bytes() for f in os.listdir(run) if f != ".lock"} == before
    assert call(train_cli.main, capsys, ["--resume", run / "last.pt"])[0] == 0  # the lock died with its holder


def test_overwrite_deletes_nothing_before_validation(world, reference, tmp_path, capsys):
    """Case 3: --overwrite with a CLIP file that does not exist: one line, every file of the old run kept."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    rc, _, err = call(train_cli.main, capsys, spml(world, run, clip=tmp_path / "nowhere.pt", overwrite=True))
    one_line(rc, err, "nowhere.pt")
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == before


def test_disk_full_while_saving(world, tmp_path, capsys):
    """Case 6: writes fail (file size limit, as a full disk would): one line, last.pt of the previous epoch
    intact, no temporary file left, and --resume continues once there is room."""
    run = tmp_path / "run"
    assert call(train_cli.main, capsys, spml(world, run, epochs=2, **{"stop-after": 1}))[0] == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # log lines fit, a checkpoint does not
    try:
        rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    one_line(rc, err, "last.pt holds epoch 1", "--resume")
    assert not leftovers(run) and ckpt(run / "last.pt")["state"]["epoch"] == 1
    rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
    assert rc == 0, err
    assert [r["epoch"] for r in log_of(run)] == [0, 1, 2] and not leftovers(run)


def test_half_written_toy_world_is_rebuilt(world, tmp_path, capsys, monkeypatch):
    """Case 2: a toy world whose writing was interrupted (before its marker, written last) is written again by
    the next call; a folder holding other data is refused in one line."""
    root = tmp_path / "toy"
    monkeypatch.setenv("SIGRL_TEST_SIGNAL", "toyworld.json#2:INT")  # the marker that says "done"
    with pytest.raises(KeyboardInterrupt):
        toyworld.make_world(root, n_train=16, n_test=8)
    monkeypatch.delenv("SIGRL_TEST_SIGNAL")
    assert (root / "Flickr").is_dir() and "writing" in (root / "toyworld.json").read_text()
    for half in (root / "sigrl_spml", root / "sigrl_nuswide" / "test_labels.npy"):  # as if killed earlier
        shutil.rmtree(half) if half.is_dir() else half.unlink()
    toyworld.make_world(root, n_train=16, n_test=8)
    d = data.load_nuswide(str(root))
    assert len(d.train_paths) == 16 and len(d.test_paths) == 8 and all(map(os.path.isfile, d.test_paths))
    assert len(toyworld.load_spml_view(root).test_paths) == 8
    foreign = tmp_path / "foreign"
    (foreign / "Flickr" / "actor").mkdir(parents=True)  # a NUS-WIDE folder, none of the toy world's scenes
    rc, _, err = call(train_cli.main, capsys, ["--data-root", foreign, "--out", tmp_path / "r"])
    one_line(rc, err, foreign, "toy")
    assert not (tmp_path / "r").exists()


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


def test_damaged_checkpoint_is_refused(world, reference, tmp_path, capsys):
    """Case 11: bytes flipped inside a tensor of last.pt (the zip still opens) fail the payload checksum."""
    import zipfile
    path = tmp_path / "last.pt"
    shutil.copy(reference / "last.pt", path)
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(raw[info.header_offset + 26:info.header_offset + 30], "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2  # inside the tensor
    raw[start:start + 64] = bytes(b ^ 0x5A for b in raw[start:start + 64])
    path.write_bytes(raw)
    one_line(*call(eval_cli.main, capsys, ["--ckpt", path])[::2], path, "checksum")
    one_line(*call(train_cli.main, capsys, ["--resume", path])[::2], path, "checksum")


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


# ------------------------------------------------------------------------------------------------ divergence
def test_divergence_stops_with_the_step_and_the_images(world, tmp_path, capsys):
    """Case 14: an exploding loss, non-finite weights, NaN weights in the CLIP file: one line each naming what
    happened, the last good checkpoint kept, nothing non-finite saved."""
    run = tmp_path / "explode"  # epoch 1 warms up from lr 0; epoch 2 at lr 10 makes the L1 loss explode
    rc, _, err = call(train_cli.main, capsys, zsl(world, run, epochs=3, lr=10, **{"warmup-epochs": 1}))
    line = one_line(rc, err, "loss", "step", ".jpg", "--lr")
    epoch = ckpt(run / "last.pt")["state"]["epoch"]
    assert f"last.pt holds epoch {epoch}" in line and [r["epoch"] for r in log_of(run)] == list(range(epoch + 1))
    assert all(torch.isfinite(v).all() for v in ckpt(run / "last.pt")["model"].values())
    rc, _, err = call(train_cli.main, capsys, spml(world, tmp_path / "inf", lr=1e10))
    one_line(rc, err, "non-finite", "step", ".jpg")
    assert not (tmp_path / "inf" / "last.pt").exists()
    sd = torch.load(world["clip"], weights_only=True)
    sd["visual.proj"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    one_line(*call(train_cli.main, capsys, spml(world, tmp_path / "nan", clip=tmp_path / "nan.pt"))[::2],
             "nan.pt", "visual.proj")
    weight = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))  # a finite loss can hide such a weight
    weight.grad = torch.zeros(2)
    with pytest.raises(divergence.Diverged, match="weights became non-finite.*a.jpg"):
        divergence.check_step({"step": 7, "epoch": 0}, ["a.jpg"], opt=torch.optim.AdamW([weight]))


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


def test_hand_edited_checkpoints_are_one_line(world, reference, tmp_path, capsys):
    """Case 15: a missing entry, a tensor of the wrong shape, an unknown config field; edited without updating
    the checksum, or with it updated (the structure is then checked)."""
    original = ckpt(reference / "last.pt")

    def edit(name, change, resign):
        c = ckpt(reference / "last.pt")
        change(c)
        if resign:
            c["sha256"] = checkpoints.payload_sha256(c)
        torch.save(c, tmp_path / name)
        return tmp_path / name

    first = next(iter(original["model"]))
    edits = {"key": (lambda c: c.pop("label_emb"), "label_emb"),
             "shape": (lambda c: c["model"].__setitem__(first, c["model"][first][:1]), first),
             "field": (lambda c: c["config"].__setitem__("bogus", 1), "bogus")}
    for name, (change, needle) in edits.items():
        path = edit(f"{name}-unsigned.pt", change, resign=False)
        one_line(*call(eval_cli.main, capsys, ["--ckpt", path])[::2], path, "checksum")
        path = edit(f"{name}.pt", change, resign=True)
        one_line(*call(eval_cli.main, capsys, ["--ckpt", path])[::2], path, needle)
        one_line(*call(train_cli.main, capsys, ["--resume", path])[::2], path, needle)


def test_resume_on_changed_data_is_refused(world, tmp_path, capsys):
    """A run stopped after epoch 1 whose --data-root is re-made in place (another seed, 24 training images for
    16): the resume is refused naming what changed, --allow-changed-data continues with a warning, eval.py --ckpt
    warns (and scores); a checkpoint from before fingerprints still resumes, with a note."""
    root, run = tmp_path / "world", tmp_path / "run"
    toyworld.make_world(root, seed=0, n_train=16, n_test=8)
    assert call(train_cli.main, capsys, zsl(world, run, **{"data-root": root, "epochs": 2, "stop-after": 1}))[0] == 0
    before = (run / "last.pt").read_bytes()
    toyworld.make_world(root, seed=1, n_train=24, n_test=8)
    rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt"])
    one_line(rc, err, run / "last.pt", "train: 24 images instead of 16", "--allow-changed-data")
    assert (run / "last.pt").read_bytes() == before and [r["epoch"] for r in log_of(run)] == [0, 1]
    rc, out, err = call(eval_cli.main, capsys, ["--ckpt", run / "last.pt", "--workers", 0])
    assert rc == 0 and "warning:" in err and "test set" in err and "the image files differ" in err, err
    old = ckpt(run / "last.pt")  # epoch 1, as a version without fingerprints wrote it
    del old["state"]["data"]
    (tmp_path / "old").mkdir()
    checkpoints.save_checkpoint(old, tmp_path / "old" / "last.pt")
    rc, _, err = call(train_cli.main, capsys, ["--resume", run / "last.pt", "--allow-changed-data"])
    assert rc == 0 and "warning:" in err and "continuing on changed data" in err, err
    assert ckpt(run / "last.pt")["state"]["data"]["train"]["images"] == 24  # the data it went on with
    rc, _, err = call(train_cli.main, capsys, ["--resume", tmp_path / "old" / "last.pt"])
    assert rc == 0 and "records no fingerprint" in err, err
