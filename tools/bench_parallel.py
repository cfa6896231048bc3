"""bench.py's data-parallel section: train.py's own step (train.train_one_epoch, one step) on N torchrun processes against one.

    python -m tools.bench --only parallel                  # CPU: 2 gloo processes vs 1 (correctness and overhead only)
    python -m tools.bench --only parallel --device cuda    # GPU: images/s on 1 GPU (and on all of them, if several)

Each row is its own `torchrun --standalone` job, the launcher and code path of a real run: a SigRL at full
ViT-B/16 size (the paper's freezing: blocks 1-10) takes optimiser steps on one fixed global batch of random images
and labels (ZSL losses, AdamW); rank 0 reports the median seconds of a step after a warm-up step, and the weights.
  1 process, batch B      what train.py does without torchrun: the reference
  1 process, batch B/N    one process's share of the work
  N processes, batch B    "speed-up" over the first row; "overhead" = its step time over the second row's (what
                          the gradient exchange and the waiting for the slowest process cost); "max weight diff" =
                          the largest difference from the first row's weights after the steps (the same model: ~0)
On the CPU every process gets one thread, as torchrun gives it, so N processes use N cores.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch

from support import cli, parallel
from support import runs
import train
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
SIZES = {"cpu": dict(batch=2, classes=81, steps=3, vision={}), "cuda": dict(batch=32, classes=925, steps=5, vision={})}


def worker(spec):
    """One torchrun process: build, take warm-up + timed steps, and on rank 0 print the result as JSON."""
    device = runs.pick_device(spec["device"])  # cuda:LOCAL_RANK under torchrun
    parallel.start(device)
    B, C, fix_layer = spec["batch"], spec["classes"], 10
    torch.manual_seed(0)
    vision = VisionConfig(**spec["vision"])  # {}: ViT-B/16 at 224 px
    model = SigRL(VisionTransformer(vision), SigRLConfig(embed_dim=vision.embed_dim)).to(device)
    train.freeze_early_layers(model.student, fix_layer)
    cfg = runs.Config(task="zsl", batch_size=B, fix_layer=fix_layer)  # the paper's optimiser settings
    opt = torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr)
    net = parallel.wrap(model, device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, vision.resolution, vision.resolution, generator=gen)  # (B, 3, R, R)
    labels = torch.where(torch.rand(B, C, generator=gen) < 0.05, 1, -1).index_fill(1, torch.tensor(0), 1)  # (B, C)
    H = torch.randn(C, vision.embed_dim, generator=gen).to(device)  # (C, D)
    step_plan = parallel.micro_batches(np.arange(B), 1)  # this process's share of the batch
    micro = [((images[idx], labels[idx], torch.from_numpy(idx)), share) for idx, share in step_plan]
    data = types.SimpleNamespace(train_paths=[f"random image {i}" for i in range(B)])  # named if it diverges
    state, seconds = {"step": 0, "epoch": 0, "first_loss": None}, []
    run = train.Run(cfg, model, net, opt, lambda: H, data, None, [], C, device, state, steps_per_epoch=1)
    for _ in range(1 + spec["steps"]):  # the first step pays for AdamW's state and library set-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train.train_one_epoch(run, [micro], 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    if parallel.is_main():
        torch.save(model.state_dict_trainable(), spec["weights"])
        print("RESULT " + json.dumps({"seconds": statistics.median(seconds[1:])}))
    parallel.finish()


def job(processes, batch, size, device, weights):
    """Run one configuration under torchrun; its seconds per step."""
    spec = dict(size, batch=batch, device=device.type, weights=weights)
    env = dict(os.environ, OMP_NUM_THREADS="1") if device.type == "cpu" else dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "tools.bench_parallel", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT)  # ROOT: where -m finds tools/
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"data-parallel job ({processes} x batch {batch}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])["seconds"]


def max_difference(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def bench_parallel(preset, device, dtypes, progress, compile=False):
    """The rows above (bench.py's `parallel` section). CPU: N = 2; GPU: 1, and every GPU when there are several."""
    size = SIZES[device.type]
    B = size["batch"]
    counts = [2] if device.type == "cpu" else [n for n in sorted({1, torch.cuda.device_count()}) if n > 1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [(1, B)] + [(1, B // n) for n in counts] + [(n, B) for n in counts]
        times, weights = {}, {(n, b): os.path.join(tmp, f"{n}x{b}.pt") for n, b in configs}
        for n, b in configs:
            progress(f"data-parallel step: {n} process(es), global batch {b}")
            times[n, b] = job(n, b, size, device, weights[n, b])
        for n, b in configs:
            row = {"data-parallel step": f"{n} process(es), batch {b}", "per process": b // n,
                   "s/step": times[n, b], "images/s": b / times[n, b], "speed-up": "-", "overhead": "-",
                   "max weight diff": "-"}
            if n > 1:  # against one process doing the whole batch, and one doing a process's share
                row.update({"speed-up": times[1, B] / times[n, b], "overhead": times[n, b] / times[1, B // n],
                            "max weight diff": f"{max_difference(weights[1, B], weights[n, b]):.1e}"})
            rows.append(dict(row, raw=dict(classes=size["classes"], steps=size["steps"], dtype="bf16 autocast" if
                                           device.type == "cuda" else "fp32")))
    return rows


@cli.command
def main(argv=None):
    parser = cli.parser(prog="python -m tools.bench_parallel", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", required=True, help="a job's JSON spec (bench.py starts these)")
    text = parser.parse_args(argv).worker
    try:
        spec = json.loads(text)
        spec = spec if {"device", "batch", "classes", "vision", "steps", "weights"} <= set(spec) else None
    except (ValueError, TypeError, RecursionError):
        spec = None
    if spec is None:
        raise runs.UsageError(f"--worker {text[:40]!r}: expected the JSON spec of a job, as tools.bench writes it")
    worker(spec)


if __name__ == "__main__":
    sys.exit(main())
