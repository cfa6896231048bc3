"""Nothing lost: interruption, the run directory, damaged and hand-edited checkpoints, divergence, a resume on
changed data.

Each test is one way a careful user with bad luck meets the commands: a kill or Ctrl-C at a chosen write
(the test-only hook SIGRL_TEST_SIGNAL="<file>#<n>:<SIGNAL>" sends the signal just before the n-th rename onto
<file>), a second run on the same directory, a full disk, damaged checkpoints, a run that diverges. Everything
runs in-process (train.main / eval.main, as the command line calls them) except what needs a real process:
SIGKILL, and the lock held by another process. The bad-input half is tests/test_bad_inputs.py.
"""
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import checkpoints
from support import divergence
import data
import eval as eval_cli
from toy import world as toyworld
import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fixtures_robustness import (IMPROVES, REPO, call, ckpt, cli, leftovers, log_of, one_line,  # noqa: F401 (fixtures)
                                 reference, same_weights, spml, without_seconds, world, zsl)


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
        divergence.check_weights({"step": 7, "epoch": 0}, ["a.jpg"], torch.optim.AdamW([weight]))


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
