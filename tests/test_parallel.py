"""Data parallelism (parallel.py) as a researcher runs it: `torchrun --nproc_per_node 2` (gloo, CPU) trains the same
model as one process with the same global batch, `--accum 2` the same as the whole batch, the evaluation sharded over
the processes gives exactly the numbers of one process, and a distributed run resumes where it stopped, on 2
processes or on 1. Tiny real-format fixtures (the NUS-WIDE h5 layout, COCO json) and a tiny CLIP, as test_train."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import eval as evaluation
import fixtures_clip
from optional import World
import fixtures_data
from support import parallel
import train
from support.clip_files import load_clip
from clip_text import PromptLearner
from sigrl import SigRL, l1_distill, ranking_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --standalone: a free port on this machine, so concurrent test runs never meet
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    fixtures_clip.make_clip_checkpoint(d / "clip.pt", size="tiny", fmt="jit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIGRL_CACHE", str(d / "cache"))
        yield World({"dir": d, "clip": d / "clip.pt", "env": dict(os.environ),
                     # 13 training images in batches of 4: the last step has one image, so one process has nothing
                     "nus": fixtures_data.make_nuswide_h5(d / "nus", n_train=13, n_test=8),
                     "coco": fixtures_data.make_coco(d / "coco")}, needs={"nus": "h5py"})


def flags(world, task, out, **extra):
    # ZSL without GMC: its 1006-label graph is most of the time of a step here, and the SPML runs cover its dropout
    data = {"zsl": ["--data", "nuswide", "--data-root", world["nus"], "--no-gmc"],
            "spml": ["--data", "coco", "--data-root", world["coco"], "--loss", "em_apl", "--apl-warmup", 1]}[task]
    common = {"clip": world["clip"], "out": out, "epochs": 1, "workers": 0, "fix-layer": 1, "batch-size": 4,
              "eval-batch-size": 2, **extra}  # 2 images per evaluation batch: each process scores some batches
    return list(map(str, ["--task", task, *data, *(x for k, v in common.items() for x in (f"--{k}", v))]))


def torchrun(script, *args, env, expect_ok=True):
    proc = subprocess.run([*TORCHRUN, os.path.join(REPO, script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, f"torchrun {script} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def one_process(main, *args):
    """script.main(args) in this process, on one thread as each torchrun process (same kernels, same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(map(str, args))) == 0
    finally:
        torch.set_num_threads(threads)


def log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(run):
    return torch.load(os.path.join(run, "last.pt"), weights_only=True)


def assert_same_training(a, b, tol=1e-5):
    """Two runs took the same steps: the same losses and weights (tol), and SPML the same APL labels."""
    la, lb = log(a), log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"].keys() == rb["loss"].keys()
        for k in ra["loss"]:
            np.testing.assert_allclose(rb["loss"][k], ra["loss"][k], rtol=tol, atol=tol)
    wa, wb = weights(a), weights(b)
    assert wa["model"].keys() == wb["model"].keys()
    for k in wa["model"]:
        torch.testing.assert_close(wb["model"][k], wa["model"][k], rtol=tol, atol=tol, msg=k)
    if "obs" in wa["state"]:
        torch.testing.assert_close(wb["state"]["obs"], wa["state"]["obs"], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def zsl(world, tmp_path_factory):
    """The same ZSL run three ways: one process, two processes (torchrun), one process with --accum 2."""
    d = tmp_path_factory.mktemp("zsl")
    one_process(train.main, *flags(world, "zsl", d / "one"))
    proc = torchrun("train.py", *flags(world, "zsl", d / "two"), env=world["env"])
    one_process(train.main, *flags(world, "zsl", d / "accum", accum=2))
    return {"dir": d, "stdout": proc.stdout}


def test_two_processes_train_like_one(zsl):
    assert "batch 4 = 2 process(es) x 1 micro-batch(es) of 2" in zsl["stdout"]
    assert zsl["stdout"].count("epoch 1:") == 1  # rank 0 alone prints
    assert_same_training(zsl["dir"] / "one", zsl["dir"] / "two")
    assert json.loads((zsl["dir"] / "two" / "config.json").read_text())["processes"] == 2


def test_accumulation_equals_one_batch(zsl):
    assert_same_training(zsl["dir"] / "one", zsl["dir"] / "accum")


def test_sharded_evaluation_is_exact(zsl, tmp_path):
    """The two-process run evaluated its last weights in shards; one process scoring its checkpoint gets the same
    figures, each branch's mAP included, bit for bit."""
    run = zsl["dir"] / "two"
    one_process(evaluation.main, "--ckpt", run / "last.pt", "--json", tmp_path / "r.json")
    got, logged = json.loads((tmp_path / "r.json").read_text()), log(run)[-1]
    assert got.pop("zero_shot_clip")["zsl"]["map"] > 0  # eval.py --ckpt also scores the run's CLIP alone
    assert got == {k: logged[k] for k in got} and set(got) == {"zsl", "zsl_twins", "zsl_novel", "gzsl", "branch_map"}
    assert log(run)[0]["epoch"] == 0 and log(run)[0]["step"] == 0  # the epoch-0 record, scored in shards as well


def test_distributed_run_resumes_on_any_number_of_processes(world, tmp_path):
    """SPML with EM_APL (labels change after epoch 1, computed on rank 0 and shared): two processes stopped after
    epoch 1 then resumed on two, or on one, equal one uninterrupted process."""
    one_process(train.main, *flags(world, "spml", tmp_path / "whole", epochs=2))
    torchrun("train.py", *flags(world, "spml", tmp_path / "two", epochs=2), "--stop-after", 1, env=world["env"])
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    torchrun("train.py", "--resume", tmp_path / "two" / "last.pt", env=world["env"])
    one_process(train.main, "--resume", tmp_path / "one" / "last.pt", "--workers", 0)
    for resumed, processes in (("two", 2), ("one", 1)):
        assert_same_training(tmp_path / "whole", tmp_path / resumed)
        assert log(tmp_path / resumed)[-1]["epoch"] == 2
        assert json.loads((tmp_path / resumed / "config.json").read_text())["resumed"][0]["processes"] == processes


def test_bad_split_one_line_and_exit_2(world, tmp_path, capsys):
    """Flags that do not split the global batch: one line and exit 2 before anything is written."""
    for extra, needle in (({"accum": 0}, "--accum 0"), ({"accum": 3}, "multiple of 3")):
        assert train.main(flags(world, "zsl", tmp_path / "run", **extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_processes_stop_together_with_one_line_from_rank_0(world, tmp_path):
    """parallel.py's meeting points on 2 processes: whichever processes fail before the first step, all stop and
    rank 0 alone prints one line (naming the failing rank when it is not rank 0); rank 0 prepares data before the
    others; and the collectives of the evaluation (gather in rank order, shares of whole batches) and of APL."""
    proc = torchrun(os.path.join("tests", "parallel_job.py"), tmp_path / "out.json", env=world["env"])
    assert [line for line in proc.stderr.splitlines() if "error" in line] == \
        ["error: rank 1: failed here", "error: failed here", "error: failed here"], proc.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    rank0, rank1 = got["ranks"]
    assert rank0["alone"] == [2, [0]] and rank1["alone"] == [2, []]  # rank 0 took its turn, then heard of rank 1
    assert rank0["both"] == rank1["both"] == [2, []]
    assert rank0["turn"] == [2, [0]] and rank1["turn"] == [2, []]  # rank 1 never loads after rank 0 failed
    assert rank0["fine"] == [0, [0]] and rank1["fine"] == [0, [1]]
    assert got["gathered"] == {"x": [0, 1, 10, 11, 12], "none": [0, 1]}
    assert rank0["batch_share"] == [0, 1, 2, 3] and rank1["batch_share"] == [4, 5, 6]
    assert rank0["from_main"] == rank1["from_main"] == 5 and rank0["sum"] == rank1["sum"] == 3.0


@pytest.mark.parametrize("heads", [{}, {"gmc": False}, {"sda": False}, {"gmc": False, "sda": False, "vfr": False},
                                   {"global_only": True}, {"prompt": "coop"}])
def test_every_trainable_parameter_gets_a_gradient(world, heads):
    """DistributedDataParallel runs without searching for unused parameters (parallel.wrap): that is right only if
    every parameter that requires a gradient gets one in every training step, in every configuration."""
    heads = dict(heads)
    coop = heads.pop("prompt", None)
    clip = load_clip(str(world["clip"]))
    torch.manual_seed(0)
    model = SigRL.from_clip(clip, **heads).train()
    train.freeze_early_layers(model.student, 1)
    names = ["cat", "dog", "tree", "car", "sky"]
    if coop:
        model.prompt = PromptLearner(clip, names, n_ctx=4)
        H = model.prompt()  # (C, D)
    else:
        H = torch.randn(len(names), model.config.embed_dim)  # (C, D)
    R = model.student.resolution
    images = torch.randn(2, 3, R, R)  # (B, 3, R, R)
    labels = torch.tensor([[1, -1, -1, 1, -1], [-1, 1, -1, -1, 1]], dtype=torch.float32)  # (B, C)
    out = model(images, H)
    (ranking_loss(out.scores, labels) + l1_distill(out.feat, model.teacher_feat(images) + 0.1)).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("teacher.") for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None] == []


def test_epoch_plan_splits_every_step_like_one_process(monkeypatch):
    """The epoch order is DataLoader(shuffle=True)'s from the same generator (as before torchrun support). Over N
    processes and K micro-batches the plan covers each global batch's usable images exactly once, with shares that
    add up to 1, and every process has a part in every step (DDP needs each in each exchange)."""
    labels = np.ones((11, 2))  # every image has a seen positive
    cfg = types.SimpleNamespace(task="zsl", seed=42, batch_size=4, accum=1)
    shuffled = list(torch.utils.data.RandomSampler(range(11), generator=torch.Generator().manual_seed(42 * 10_007 + 3)))
    plan = train.epoch_plan(labels, cfg, 3)
    assert [idx.tolist() for step in plan for idx, _ in step] == [shuffled[i:i + 4] for i in range(0, 11, 4)]
    labels[[2, 7]] = -1  # no seen positive: dropped, as the reference does
    single = [np.concatenate([idx for idx, _ in step]) for step in train.epoch_plan(labels, cfg, 3)]
    for n, k in ((2, 1), (2, 2), (3, 1)):
        plans = []
        for r in range(n):
            monkeypatch.setattr(parallel, "size", lambda n=n: n)
            monkeypatch.setattr(parallel, "rank", lambda r=r: r)
            plans.append(train.epoch_plan(labels, types.SimpleNamespace(**{**vars(cfg), "accum": k}), 3))
        assert all(len(plan) == len(single) for plan in plans)
        for s, batch in enumerate(single):
            parts = [plan[s] for plan in plans]
            assert all(1 <= len(part) <= k for part in parts)
            real = [idx for part in parts for idx, share in part if share > 0]
            np.testing.assert_array_equal(np.concatenate(real), batch)
            assert np.isclose(sum(share for part in parts for _, share in part), 1.0)


def test_seeded_draws_depend_on_the_key_only():
    """What makes N processes draw as one: inside `seeded(key)` the draws depend on the key alone, and the stream
    outside goes on as if nothing had been drawn (a negative --seed is a key too)."""
    torch.manual_seed(0)
    plain = torch.rand(3)
    torch.manual_seed(0)
    draws = []
    for key in ((-1, 3), (5, 3), (-1, 3)):
        torch.rand(1)  # the outer stream moves between the keyed blocks: nothing inside them changes
        with parallel.seeded(key):
            draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    with parallel.seeded((1,)):
        torch.rand(100)
    assert torch.equal(torch.rand(3), plain)
