"""End to end through the command line, as a researcher runs it: tiny datasets in the real on-disk formats
(BiAM h5 NUS-WIDE, COCO json, VOC lists) and a small CLIP file in OpenAI's TorchScript layout, then
`train.py` for one short epoch and `eval.py --ckpt`; resuming; and every kind of bad input."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as evaluate
import fixtures_clip
from optional import World
import fixtures_data
import train
from tools import twins
from protocol.metrics import nus_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUS_KEYS = {"map", "p@3", "r@3", "f1@3", "p@5", "r@5", "f1@5"}
SPML_KEYS = NUS_KEYS | {"p@1", "r@1"}
BRANCHES = ("local", "global")
ZSL_SETTINGS = ("zsl", "zsl_twins", "zsl_novel", "gzsl")  # the unseen set, its twins and its novel labels, all


def cli(script, *args, env=None, expect_ok=True):
    """Run a command as a user would: a top-level script (train.py) by its path, a tool (tools.ablation) with -m."""
    target = [os.path.join(REPO, script)] if script.endswith(".py") else ["-m", script]
    proc = subprocess.run([sys.executable, *target, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    fixtures_clip.make_clip_checkpoint(d / "clip.pt", size="tiny", fmt="jit")
    env = dict(os.environ, SIGRL_CACHE=str(d / "cache"))
    return World({"dir": d, "clip": d / "clip.pt", "env": env,
                  "nus": fixtures_data.make_nuswide_h5(d / "nus", n_train=12, n_test=8),
                  "coco": fixtures_data.make_coco(d / "coco"), "voc": fixtures_data.make_voc(d / "voc")},
                 needs={"nus": "h5py"})


def common(world, out, **extra):
    flags = {"clip": world["clip"], "out": out, "epochs": 1, "workers": 0, "fix-layer": 1, "batch-size": 16,
             **extra}
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_zsl_train_then_eval(world, tmp_path):
    run = tmp_path / "zsl"
    proc = cli("train.py", "--task", "zsl", "--data", "nuswide", "--data-root", world["nus"], *common(world, run),
               env=dict(world["env"], SIGRL_PROGRESS_AFTER="0"))  # progress lines however short the epoch
    # stdout is a pipe here, as in `python train.py > log.txt`: the epoch's progress comes as plain lines
    assert "epoch 1/1: 1/1 steps (100%), local " in proc.stdout and " step/s" in proc.stdout, proc.stdout
    log = read_log(run)
    assert [r["epoch"] for r in log] == [0, 1] and log[0]["step"] == 0 and log[0]["loss"] == {}  # before any step
    assert not (run / ".lock").exists()  # a finished run leaves no lock file behind
    cpu = json.loads((run / "config.json").read_text())["cpu"]  # what decided the CPU's rounding
    assert cpu["threads"] >= 1 and cpu["instruction_set"] and set(cpu["pins"]) >= {"ATEN_CPU_CAPABILITY", "MKL_CBWR"}
    assert all(pin["by"] != "train.py" for pin in cpu["pins"].values())  # NUS-WIDE is not pinned, the toy world is
    assert (run / "curves.png").is_file() and (run / "rows.png").is_file()
    assert set(log[1]["loss"]) == {"local", "global"}
    for record in log:
        assert set(record) >= {*ZSL_SETTINGS, "loss", "branch_map"}
        assert {k: set(v) for k, v in record["branch_map"].items()} == {s: set(BRANCHES) for s in ZSL_SETTINGS}
    proc = cli("eval.py", "--ckpt", run / "last.pt", "--json", tmp_path / "r.json", env=world["env"])
    got = json.loads((tmp_path / "r.json").read_text())
    assert set(got) == {*ZSL_SETTINGS, "branch_map", "zero_shot_clip"}
    assert all(set(got[s]) == NUS_KEYS for s in ZSL_SETTINGS)
    # raw CLIP beside the trained model, from the run's own CLIP file: what eval.py --baseline clip gives alone
    cli("eval.py", "--baseline", "clip", "--data", "nuswide", "--data-root", world["nus"], "--clip", world["clip"],
        "--json", tmp_path / "clip.json", env=world["env"])
    assert got["zero_shot_clip"] == json.loads((tmp_path / "clip.json").read_text())
    zero_shot_row = next(line for line in proc.stdout.splitlines() if line.startswith("| zero-shot CLIP "))
    assert f"| {got['zero_shot_clip']['zsl']['map']:.2f}" in zero_shot_row
    assert any(line.startswith("| SigRL, epoch 1 ") for line in proc.stdout.splitlines())
    for setting in ZSL_SETTINGS:  # eval.py alone reproduces the end-of-epoch evaluation of train.py
        for k in NUS_KEYS:
            np.testing.assert_allclose(got[setting][k], log[1][setting][k], atol=1e-6, equal_nan=True)
        for b in BRANCHES:
            np.testing.assert_allclose(got["branch_map"][setting][b], log[1]["branch_map"][setting][b], atol=1e-6)
    assert all(f"| {row} |" in proc.stdout for row in ("ZSL", "ZSL twins", "ZSL novel", "GZSL"))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["label_emb"].shape == (1006, 64) and ckpt["n_train_classes"] == 925
    assert not any(k.startswith("teacher.") for k in ckpt["model"])


def test_compile_trains_the_same_model(world, tmp_path):
    """--compile (SDA/VFR chunk bodies through torch.compile) changes speed only: same losses, same weights."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = tmp_path / name
        proc = cli("train.py", "--task", "zsl", "--data", "nuswide", "--data-root", world["nus"], *extra,
                   *common(world, runs[name]), env=world["env"])
        assert ("SDA/VFR compiled" in proc.stdout) == (name == "compiled")
    eager, compiled = (read_log(runs[k])[-1]["loss"] for k in ("eager", "compiled"))
    for k in ("local", "global"):
        np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-4)
    weights = [torch.load(runs[k] / "last.pt", weights_only=True)["model"] for k in ("eager", "compiled")]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-3, atol=1e-5)
    cli("eval.py", "--ckpt", runs["compiled"] / "last.pt", "--compile", "--json", tmp_path / "r.json", env=world["env"])
    got, logged = json.loads((tmp_path / "r.json").read_text()), read_log(runs["compiled"])[-1]
    for setting in ("zsl", "gzsl"):  # eval.py --compile reproduces the compiled run's own evaluation
        for k in NUS_KEYS:
            np.testing.assert_allclose(got[setting][k], logged[setting][k], atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("data,loss", [("coco", "iun"), ("coco", "em"), ("coco", "em_apl"), ("voc", "em")])
def test_spml_train_then_eval(world, tmp_path, data, loss):
    run = tmp_path / "run"
    extra = {"epochs": 2, "apl-warmup": 1} if loss == "em_apl" else {}
    cli("train.py", "--task", "spml", "--data", data, "--data-root", world[data], "--loss", loss,
        *common(world, run, **extra), env=world["env"])
    log = read_log(run)
    assert set(log[-1]) >= {"val", "test"} and set(log[-1]["loss"]) == {loss}
    assert log[0]["epoch"] == 0 and {k: set(v) for k, v in log[-1]["branch_map"].items()} == \
        {"val": set(BRANCHES), "test": set(BRANCHES)}
    assert (run / "best.pt").exists()
    cli("eval.py", "--ckpt", run / "best.pt", "--json", tmp_path / "r.json", env=world["env"])
    got = json.loads((tmp_path / "r.json").read_text())
    assert set(got) == {"test", "branch_map", "zero_shot_clip"} and set(got["test"]) >= SPML_KEYS
    assert set(got["branch_map"]) == {"test"} and set(got["zero_shot_clip"]["test"]) >= SPML_KEYS
    best = torch.load(run / "best.pt", weights_only=True)["state"]["best"]
    np.testing.assert_allclose(got["test"]["map"], best["test_map"], atol=1e-9)
    if loss == "em_apl":  # after epoch 1 >= warm-up the APL round turned some unobserved entries negative
        obs = torch.load(run / "last.pt", weights_only=True)["state"]["obs"]
        assert (obs < 0).any() and ((obs == 1).sum(1) == 1).all()


def test_resume_equals_uninterrupted(world, tmp_path):
    args = ["--task", "spml", "--data", "coco", "--data-root", world["coco"], "--loss", "em_apl"]
    flags = dict(epochs=3, **{"apl-warmup": 1, "batch-size": 4})
    cli("train.py", *args, *common(world, tmp_path / "a", **flags), env=world["env"])
    cli("train.py", *args, *common(world, tmp_path / "b", **flags), "--stop-after", 1, env=world["env"])
    assert [r["epoch"] for r in read_log(tmp_path / "b")] == [0, 1]
    cli("train.py", "--resume", tmp_path / "b" / "last.pt", env=world["env"])
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["state"]["epoch"] == b["state"]["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["state"]["obs"], b["state"]["obs"])
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # noqa: E731, NaN-safe
    assert same(a["metrics"], b["metrics"])
    assert same([r["test"] for r in read_log(tmp_path / "a")], [r["test"] for r in read_log(tmp_path / "b")])


def digest(folder):
    """sha256 of each file of a run directory (its lock file holds the pid of the last process: left out)."""
    return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest() for p in os.listdir(folder)
            if p != ".lock"}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def test_bad_input_one_line_and_run_files_untouched(world, tmp_path, capsys, monkeypatch):
    """Each bad input through train.main / eval.main in this process (what `python train.py ...` calls): one
    line naming the file, exit code 2, the run directory untouched, nothing created for the failed runs."""
    monkeypatch.setenv("SIGRL_CACHE", str(world["dir"] / "cache"))

    def call(script, *args):
        rc = {"train.py": train, "eval.py": evaluate, "tools.twins": twins}[script].main([str(a) for a in args])
        out, err = capsys.readouterr()
        # what the user reads on stderr: progress bars (tqdm) left out
        return subprocess.CompletedProcess(script, rc, out, "\n".join(line for line in err.splitlines()
                                                                      if "%|" not in line))

    run = tmp_path / "run"
    spml = ["--task", "spml", "--data", "coco", "--data-root", world["coco"], "--loss", "em"]
    assert call("train.py", *spml, *common(world, run)).returncode == 0
    before = digest(run)

    # a wrong --data-root
    proc = call("train.py", "--task", "spml", "--data", "coco", "--data-root", tmp_path / "nowhere",
                *common(world, tmp_path / "other"))
    assert_one_line_error(proc, tmp_path / "nowhere")
    # a missing annotation file
    broken = tmp_path / "coco_broken"
    shutil.copytree(world["coco"], broken)
    shutil.rmtree(broken / "sigrl_spml")
    os.remove(broken / "annotations" / "instances_val2014.json")
    proc = call("train.py", "--task", "spml", "--data", "coco", "--data-root", broken,
                *common(world, tmp_path / "other"))
    assert_one_line_error(proc, "instances_val2014.json")
    # a label file with the wrong number of columns (the project's prepared NUS-WIDE layout)
    nus = tmp_path / "nus"
    shutil.copytree(world["nus"], nus)
    assert data.main(["prepare", "nuswide", "--root", str(nus)]) == 0
    labels = np.load(nus / "sigrl_nuswide" / "test_labels.npy")
    np.save(nus / "sigrl_nuswide" / "test_labels.npy", labels[:, :1000])
    proc = call("train.py", "--task", "zsl", "--data", "nuswide", "--data-root", nus,
                *common(world, tmp_path / "other"))
    assert_one_line_error(proc, "test_labels.npy", "1006")
    # a CLIP file where a run checkpoint belongs, and a run checkpoint of another task
    assert_one_line_error(call("eval.py", "--ckpt", world["clip"]), world["clip"])
    proc = call("train.py", "--task", "zsl", "--data", "nuswide", "--resume", run / "last.pt")
    assert_one_line_error(proc, "--task spml --data coco")
    # a run checkpoint where the CLIP file belongs
    proc = call("train.py", *spml, *common(world, tmp_path / "other", clip=run / "last.pt"))
    assert_one_line_error(proc, run / "last.pt")
    # a new run into a directory that holds one
    assert_one_line_error(call("train.py", *spml, *common(world, run)), "--resume")
    # the twin report of a run that is not zero-shot
    assert_one_line_error(call("tools.twins", "--ckpt", run / "last.pt"), "--task zsl")
    assert_one_line_error(call("tools.twins", "--ckpt", run / "last.pt", "--out", tmp_path / "f.png"), "--out")
    # evaluating a COCO checkpoint on VOC labels
    proc = call("eval.py", "--ckpt", run / "last.pt", "--data-root", world["voc"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert digest(run) == before
    assert not (tmp_path / "other").exists()


def test_eval_saved_scores(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 12)).astype(np.float32)
    labels = np.where(rng.random((40, 12)) < 0.3, 1, -1).astype(np.int8)
    np.save(tmp_path / "s.npy", scores)
    np.save(tmp_path / "y.npy", labels)
    cli("eval.py", "--scores", tmp_path / "s.npy", "--labels", tmp_path / "y.npy", "--protocol", "nuswide",
        "--json", tmp_path / "r.json")
    got = json.loads((tmp_path / "r.json").read_text())["test"]
    want = nus_metrics(scores, labels)
    assert got.keys() == want.keys() and all(np.isclose(got[k], want[k]) for k in got)
    np.save(tmp_path / "y2.npy", labels[:, :5])
    proc = cli("eval.py", "--scores", tmp_path / "s.npy", "--labels", tmp_path / "y2.npy", "--protocol",
               "nuswide", expect_ok=False)
    assert_one_line_error(proc, "y2.npy")


def test_help_explains():
    out = cli("train.py", "--help").stdout
    for flag in ("--task", "--data-root", "--clip", "--loss", "--prompt", "--resume", "--device"):
        assert flag in out
    assert "--ckpt" in cli("eval.py", "--help").stdout


def test_ablation_table(world, tmp_path):
    proc = cli("tools.ablation", "--seeds", 1, 2, "--only", 0, 4, "--out", tmp_path, "--task", "spml", "--data", "coco",
               "--data-root", world["coco"], "--clip", world["clip"], "--epochs", 1, "--workers", 0,
               "--fix-layer", 1, "--batch-size", 8, env=world["env"])
    table = proc.stdout[proc.stdout.index("Ablation"):]
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    for row in ("baseline (no GMC, SDA, VFR)", "GMC + SDA + VFR (SigRL)"):
        assert {f"{row}, epoch 0", f"{row}, trained", f"{row}, trained, local"} <= set(names), names
    assert {"zero-shot CLIP", "global, epoch 0"} <= set(names) and "VFR, trained" not in names
    assert "±" in table and "Each branch of the fused score alone" in table
    for row, seed in ((0, 1), (0, 2), (4, 1), (4, 2)):
        assert (tmp_path / f"row{row}-seed{seed}" / "last.pt").exists()
    baseline = torch.load(tmp_path / "row0-seed1" / "last.pt", weights_only=True)["head_config"]
    assert not (baseline["gmc"] or baseline["sda"] or baseline["vfr"])
