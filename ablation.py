"""The analogue of the paper's Table IV: SigRL's modules switched on and off, each setting over several seeds.

    python ablation.py                       # the toy world (offline), 3 seeds per setting
    python ablation.py --seeds 42 43 44 --task zsl --data nuswide --data-root DIR --clip ViT-B-16.pt
    torchrun --nproc_per_node 4 ablation.py ...   # each run on 4 GPUs (README: "More than one GPU")

Every setting trains a fresh run with train.run (any train.py flag after the ablation's own flags is passed
through) and reports the last epoch's ZSL / GZSL (or SPML test) figures as mean ± std over the seeds.
What "off" means (sigrl.py): without GMC the label embeddings H stand in for the graph output G; without SDA
H stands in for the decoupled features T; without VFR the local score is MKT's top-k over the raw patch
tokens (then GMC and SDA have nothing to act on, so that row is the baseline).
"""
import argparse
import os
import sys

import numpy as np

import eval as evaluation
import parallel
import runs
import train
from clip_files import CheckpointError
from data import DataError

SETTINGS = {  # Table IV rows: name -> flags
    "baseline (no GMC, SDA, VFR)": ["--no-gmc", "--no-sda", "--no-vfr"],
    "VFR": ["--no-gmc", "--no-sda"],
    "GMC + VFR": ["--no-sda"],
    "SDA + VFR": ["--no-gmc"],
    "GMC + SDA + VFR (SigRL)": [],
}


def mean_std(results):
    """Per setting/metric mean and (population) standard deviation over the seeds' result dicts."""
    mean = {s: {k: float(np.mean([r[s][k] for r in results])) for k in results[0][s]} for s in results[0]}
    std = {s: {k: float(np.std([r[s][k] for r in results])) for k in results[0][s]} for s in results[0]}
    return mean, std


def main(argv=None):
    parallel.quiet_unless_main()  # under torchrun, rank 0 alone prints
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds per setting")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="one run directory per setting/seed")
    p.add_argument("--only", nargs="+", choices=range(len(SETTINGS)), type=int, help="row indices to run")
    args, train_flags = p.parse_known_args(argv)
    means, stds = {}, {}
    try:
        for i, (name, flags) in enumerate(SETTINGS.items()):
            if args.only is not None and i not in args.only:
                continue
            results = []
            for seed in args.seeds:
                out = os.path.join(args.out, f"row{i}-seed{seed}")
                cfg = runs.parse_args(train_flags + flags + ["--seed", str(seed), "--out", out, "--overwrite"])
                print(f"== {name}, seed {seed} -> {out}", flush=True)
                results.append(train.run(cfg, baseline=False))  # None on torchrun's other processes
            if parallel.is_main():
                means[name], stds[name] = mean_std(results)
    except (CheckpointError, DataError, runs.UsageError, parallel.Stopped) as err:
        parallel.report(err)
        return 2
    finally:
        parallel.finish()
    if not parallel.is_main():
        return 0
    print(evaluation.format_comparison(means, spread=stds,
                                       title=f"\nAblation (Table IV analogue), mean ± std over seeds {args.seeds}:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
