"""The analogue of the paper's Table IV: SigRL's modules switched on and off, each setting over several seeds.

    python -m tools.ablation                       # the toy world (offline), 3 seeds per setting
    python -m tools.ablation --seeds 42 43 44 --task zsl --data nuswide --data-root DIR --clip ViT-B-16.pt
    torchrun --nproc_per_node 4 -m tools.ablation ...   # each run on 4 GPUs

Every setting trains a fresh run with train.run (any train.py flag after the ablation's own flags is passed
through) and reports, as mean ± std over the seeds, its ZSL / GZSL (or SPML test) figures before the first
step (epoch 0) and after the last epoch, with the mAP of each branch; above them, the zero-shot CLIP scored
by cosine and through SigRL's global branch (the untrained backbone: the same in every run).
What "off" means (sigrl.py): without GMC the label embeddings H stand in for the graph output G; without SDA
H stands in for the decoupled features T; without VFR the local score is MKT's top-k over the raw patch
tokens (then GMC and SDA have nothing to act on, so that row is the baseline).
"""
import os
import sys

import numpy as np

import eval as evaluation
from support import cli, parallel
from support import runs
from support import tables
from support import tasks
import train
from support.clip_files import load_clip
from support.errors import CheckpointError, DataError, WriteError, error_line
from support.paths import FOLDER, check_outputs

SETTINGS = {  # Table IV rows: name -> flags
    "baseline (no GMC, SDA, VFR)": ["--no-gmc", "--no-sda", "--no-vfr"],
    "VFR": ["--no-gmc", "--no-sda"],
    "GMC + VFR": ["--no-sda"],
    "SDA + VFR": ["--no-gmc"],
    "GMC + SDA + VFR (SigRL)": [],
}


def mean_std(results):
    """Mean and (population) standard deviation over the seeds' result dicts, leaf by leaf (None stays None)."""
    first = results[0]
    if isinstance(first, dict):
        pairs = {k: mean_std([r[k] for r in results]) for k in first}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
    if first is None:
        return None, None
    return float(np.mean(results)), float(np.std(results))


@cli.command  # Ctrl-C (while the toy world is written, say) is one line too
def main(argv=None):
    parallel.quiet_unless_main()  # under torchrun, rank 0 alone prints
    p = cli.parser(prog="python -m tools.ablation", description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    p.add_argument("--seeds", type=cli.at_least(0), nargs="+", default=[1, 2, 3], help="training seeds per setting")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="one run directory per setting/seed")
    p.add_argument("--only", nargs="+", choices=range(len(SETTINGS)), type=int, help="row indices to run")
    means, stds = {}, {}
    try:
        args, train_flags = p.parse_known_args(argv)
        check_outputs([("--out", args.out, FOLDER)])
        cfg = runs.parse_args(train_flags)
        device = runs.pick_device(cfg.device)
        parallel.start(device)
        parallel.in_turn(lambda: tasks.make_toy_world(cfg))  # --data toy (the default) only
        clip, data = load_clip(cfg.clip), parallel.in_turn(lambda: tasks.load_dataset(cfg))
        means[tables.COSINE] = evaluation.clip_baseline(clip, cfg, data, device)  # None on other processes
        for i, (name, flags) in enumerate(SETTINGS.items()):
            if args.only is not None and i not in args.only:
                continue
            results = []
            for seed in args.seeds:
                out = os.path.join(args.out, f"row{i}-seed{seed}")
                cfg = runs.parse_args(train_flags + flags + ["--seed", str(seed), "--out", out, "--overwrite"])
                print(f"== {name}, seed {seed} -> {out}", flush=True)
                rows = train.run(cfg, baseline=False)  # global scoring, epoch 0, trained; None on other processes
                results.append(list(rows.values()) if rows is not None else None)
            if parallel.is_main():
                means.setdefault(tables.GLOBAL_SCORING, results[0][0])  # the untrained backbone: the same in every run
                means[f"{name}, epoch 0"], stds[f"{name}, epoch 0"] = mean_std([r[1] for r in results])
                means[f"{name}, trained"], stds[f"{name}, trained"] = mean_std([r[2] for r in results])
    except (CheckpointError, DataError, runs.UsageError, WriteError, parallel.Stopped) as err:
        parallel.report(err, error_line(err))
        return 2
    finally:
        parallel.finish()
    if not parallel.is_main():
        return 0
    print(tables.format_comparison(means, spread=stds, title=f"\nAblation (Table IV analogue), percent, "
                                                                 f"mean ± std over seeds {args.seeds}:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
