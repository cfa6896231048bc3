"""What the robustness tests share: a module-scoped world of tiny datasets in the real formats (VOC, COCO, NUS-WIDE
h5, a toy NUS-WIDE layout) and a tiny CLIP file, an uninterrupted SPML reference run, and helpers that call a
command in-process and read what it said and wrote."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fixtures_clip
from optional import World
import fixtures_data
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
    w = World({"dir": d, "clip": d / "clip.pt",
         "coco": fixtures_data.make_coco(d / "coco"), "voc": fixtures_data.make_voc(d / "voc", n_train=30),
         "nus": fixtures_data.make_nuswide_h5(d / "nus", n_train=12, n_test=8),
         # a NUS-WIDE-layout world with 27 seen / 8 unseen labels: ZSL steps cost little (925 labels do)
         "toynus": str(toyworld.make_world(d / "toynus", n_train=16, n_test=8))}, needs={"nus": "h5py"})
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
