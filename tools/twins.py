"""Each unseen twin beside the seen label it is another word for, at epoch 0 and trained:

    python -m tools.twins --ckpt RUN/last.pt [--json twins.json] [--clip CLIP]

The ZSL twins row averages a few labels; this report shows where its number comes from. A twin label and its
seen word ("auto" and car on the toy world, "dogs" and dog on NUS-WIDE) have near-identical text embeddings,
so whatever the local branch learns on the seen word should reach the twin. Per label, it gives the AP of the
fused score and of each branch of Eq. 13 alone, in two passes over the test images:
- the GZSL pass (all labels scored together): the twin and its seen word are scored by the same model against
  the same label set, so a twin's gain can be read against its seen word's;
- the ZSL pass (the unseen labels alone, the protocol's): the twins' means here are the ZSL twins row of
  `eval.py --ckpt` and of train.py's log.

The reference code normalises each image's scores over the scored labels (the paper's Eq. 13 adds the raw
scores), and VFR sums its attention over them (Eq. 12 as the reference code computes it), so a label's score
depends on the set it is scored in: the two passes differ.

Epoch 0 is the run's own: train.initial_model rebuilt from the run's config and its CLIP file (the same seed,
so the same initial heads), checked against log.jsonl's epoch-0 record when the run directory has one.
"""
import argparse
import os
import sys

import numpy as np

import eval as evaluation
import train
from protocol.metrics import nus_ap
from support import checkpoints, cli, parallel, runs, tasks
from support.errors import CheckpointError, UsageError
from support import curves

BRANCHES = ("fused", "local", "global")  # the three score columns of eval.zsl_scores


def label_ap(scores, labels):
    """{branch: (C,) AP in percent} of (N, C, 3) scores against (N, C) +1/-1/0 labels."""
    return {b: 100.0 * nus_ap(scores[..., i], labels) for i, b in enumerate(BRANCHES)}


def twin_report(ap, names, n_train, pairs):
    """The report as a dict, from ap[model][pass][branch]: (C,) or (U,) per-label APs (model "epoch0" / "trained",
    pass "gzsl" over the C labels `names`, "zsl" over the unseen ones names[n_train:]); pairs {twin: seen}.
    "labels": each pair's two labels; "means": over the seen words and over the twins (the ZSL pass's twin means
    are the ZSL twins row); "every_label": every label's AP in both passes, for --json."""
    unseen = names[n_train:]

    def one(name, passes):
        return {p: {m: {b: float(ap[m][p][b][(names if p == "gzsl" else unseen).index(name)]) for b in BRANCHES}
                    for m in ap} for p in passes}

    labels = {}
    for twin, seen in pairs.items():
        labels[seen] = {"role": "seen", "twin": twin, **one(seen, ["gzsl"])}
        labels[twin] = {"role": "twin", "of": seen, **one(twin, ["gzsl", "zsl"])}
    means = {}
    for role, passes in (("seen", ["gzsl"]), ("twin", ["gzsl", "zsl"])):
        rows = [v for v in labels.values() if v["role"] == role]
        means[role] = {p: {m: {b: float(np.mean([r[p][m][b] for r in rows], dtype=np.float64)) for b in BRANCHES}
                           for m in ap} for p in passes}
    every = {p: {"names": names if p == "gzsl" else unseen,
                 **{m: {b: [float(x) for x in ap[m][p][b]] for b in BRANCHES} for m in ap}} for p in ap["trained"]}
    return {"pairs": dict(pairs), "labels": labels, "means": means, "every_label": every}


def format_report(report, title):
    """The report as a markdown table: one row per label, pairs together; each cell 'epoch 0 -> trained'."""
    head = ["label", "role"] + [f"{p} {b}" for p in ("GZSL pass", "ZSL pass") for b in BRANCHES]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(entry):
        out = []
        for p in ("gzsl", "zsl"):
            for b in BRANCHES:
                out.append(f"{entry[p]['epoch0'][b]:.2f} -> {entry[p]['trained'][b]:.2f}" if p in entry else "-")
        return out

    for name, entry in report["labels"].items():
        role = f"twin of {entry['of']}" if entry["role"] == "twin" else "seen"
        lines.append("| " + " | ".join([name, role] + cells(entry)) + " |")
    lines.append("| " + " | ".join(["mean", "seen words"] + cells(report["means"]["seen"])) + " |")
    lines.append("| " + " | ".join(["mean", "twins"] + cells(report["means"]["twin"])) + " |")
    return "\n".join(lines)


def epoch0_record(run_dir):
    """log.jsonl's epoch-0 record in the checkpoint's folder (support/curves.py's read_log), or None when there is none."""
    try:
        first = curves.read_log(run_dir)[0]
    except UsageError:  # no log beside the checkpoint, or not a readable one: the check is skipped
        return None
    return first if first["epoch"] == 0 and "zsl_twins" in first else None


def report(args):
    """The report for args.ckpt, printed (and its dict returned, for --json)."""
    ckpt, cfg, data, device = evaluation.checkpoint_and_data(args)
    if cfg.task != "zsl":
        raise UsageError(f"{args.ckpt}: tools.twins reads a zero-shot run (--task zsl), this one is --task {cfg.task}")
    if cfg.global_only:
        raise UsageError(f"{args.ckpt}: tools.twins sets Eq. 13's two branches side by side; a --global-only run has one")
    if cfg.prompt != "fixed":
        raise UsageError(f"{args.ckpt}: tools.twins needs a run with fixed prompts; a --prompt {cfg.prompt} run "
                         f"learned its label embeddings, so its epoch 0 scored other ones")
    names, n_train = tasks.label_names(cfg, data)
    pairs = tasks.zsl_twin_pairs(cfg, data)
    if not pairs:
        raise UsageError(f"{args.ckpt}: none of the {len(names) - n_train} unseen labels has a seen twin "
                         f"(its exact singular or plural among the seen labels)")
    cfg.clip = args.clip or cfg.clip  # the run's own CLIP file, unless it has moved
    clip, start = train.initial_model(cfg)
    if clip.sha256 != ckpt["clip_sha256"]:
        raise CheckpointError(f"{cfg.clip}: not the CLIP file the run {args.ckpt} started from (sha256 differs), "
                              f"so its epoch 0 cannot be rebuilt; give the run's own with --clip")
    del clip
    R, emb, ap = ckpt["resolution"], ckpt["label_emb"], {}
    labels = {"zsl": data.test_labels[:, n_train:], "gzsl": data.test_labels}
    for name, model in (("epoch0", start), ("trained", checkpoints.model_from_checkpoint(ckpt))):
        scores = evaluation.zsl_scores(model.to(device).eval(), cfg, data, emb, R, device)
        if scores is None:  # another torchrun process: rank 0 has every score and reports
            return None
        ap[name] = {p: label_ap(s, labels[p]) for p, s in scores.items()}
    out = twin_report(ap, names, n_train, pairs)
    print(format_report(out, f"{args.ckpt}: each unseen twin beside its seen word, per-label AP (percent), "
                             f"epoch 0 -> epoch {ckpt['state']['epoch']}"))
    zsl = out["means"]["twin"]["zsl"]["epoch0"]
    first = epoch0_record(os.path.dirname(os.path.abspath(args.ckpt)))
    if first is not None:
        logged = {"fused": first["zsl_twins"]["map"], **first["branch_map"]["zsl_twins"]}
        worst = max(abs(zsl[b] - logged[b]) for b in BRANCHES if logged.get(b) is not None)
        print(f"epoch 0 rebuilt: ZSL pass twins fused {zsl['fused']:.2f}, local {zsl['local']:.2f}, global "
              f"{zsl['global']:.2f}; log.jsonl's epoch-0 record " + ("agrees" if worst < 0.01 else
              f"differs by up to {worst:.2f} (another torch version or thread count rounds differently)"))
    return out


def parser():
    p = cli.Parser(prog="python -m tools.twins", description=__doc__.split("\n\n")[0],
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a ZSL run checkpoint written by train.py (RUN_DIR/last.pt)")
    p.add_argument("--json", help="also write the report (every label's AP in both passes) to this JSON file")
    p.add_argument("--clip", default="", help="the run's own CLIP file, if it is no longer where it was")
    evaluation.checkpoint_flags(p)
    return p


@parallel.command
def main(argv=None):
    args = parser().parse_args(argv)
    evaluation.check_outputs(args)
    out = report(args)
    if args.json and parallel.is_main():
        runs.write_json(out, args.json)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
