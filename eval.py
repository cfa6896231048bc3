"""Evaluation under the paper's protocols, from a run checkpoint, from saved scores, or for zero-shot CLIP.

    python eval.py --ckpt RUN_DIR/last.pt [--json PATH]          # beside zero-shot CLIP, from the run's CLIP file
    python eval.py --ckpt RUN_DIR/best.pt --calibrate T.json     # + per-class thresholds for predict.py
    python eval.py --scores S.npy --labels Y.npy --protocol nuswide|spml [--json PATH]
    python eval.py --baseline clip --clip ViT-B-16.pt --data nuswide --data-root DIR

NUS-WIDE (Table I): ZSL = a separate forward pass with the 81 unseen labels only, GZSL = a pass with all
1006 labels (the per-image normalisation and the label graph depend on the label set, so ZSL scores are
not a column slice of GZSL scores); mAP over all classes (AP 0 for classes without a test positive) and
micro top-3 / top-5 precision, recall, F1. SPML (Tables II-III): mAP of sigmoid(score) on the clean test
labels, precision / recall @1, @3, @5 averaged over images, and a derived F1. All figures in percent.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from support import checkpoints
from support import cli
from support import finite
from support import parallel
from support import precision
from support.progress import progress
from support import runs
from support import tasks
from support import thresholds
from support.clip_files import load_clip
from support.errors import CheckpointError, UsageError
from clip_text import CLIP_MEAN, CLIP_STD, encode_labels
from data import ImageList, build_transform, spml_resize
from protocol import zsl_groups
from protocol.metrics import nus_metrics, spml_metrics
from support.paths import FOLDER, check_outputs as check_paths
from support.score_files import read_scores
from support import tables
from support.tables import BRANCHES, format_comparison, format_table

@torch.no_grad()
def predict(paths, transform, encode, scorers, device, batch_size, workers, desc, key=None, out=None):
    """Scores of every image against each label set: {name: (N, C_name) float32}. Each batch is loaded and
    encoded once (`encode(images)`), then scored by every `scorers[name](features) -> (B, C)`, under the device's
    precision policy (support/precision.py). key: see ImageList (for a random transform). Under torchrun each
    process scores a contiguous run of whole batches; rank 0 gets all the scores in order, the others None.
    out: where progress lines go when not on a terminal (default stdout; predict.py: stderr, its stdout is results)."""
    dataset = ImageList(paths, np.zeros((len(paths), 1), dtype=np.float32), transform, key)
    mine = torch.utils.data.Subset(dataset, parallel.batch_share(len(paths), batch_size))  # all of them without torchrun
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")  # pinned: the copy below is asynchronous
    scores, done = {name: None for name in scorers}, 0  # each (n, C_name, ...) float32, allocated at the first batch
    for images, _, index in progress(loader, desc, unit="batch", out=out):
        with precision.autocast(device):
            features = encode(images.to(device, non_blocking=True))
            for name, score in scorers.items():
                s = score(features).float().cpu().numpy()  # (B, C_name, ...)
                finite.check_scores(s, paths, index)  # a NaN score is one line, never a table of nan
                if scores[name] is None:  # filled in place: no list of batches and its concatenated copy at once
                    scores[name] = np.empty((len(mine), *s.shape[1:]), dtype=np.float32)
                scores[name][done:done + len(s)] = s
        done += len(images)
    return parallel.gather_rows(scores)


def sigrl_scorers(model, label_sets, resolution, spml, branches=False):
    """encode / scorers for `predict`: the backbone runs once per batch, GMC once per label set. With
    `branches`, each scorer returns (B, C, 3): the fused score, the local branch (NaN when global_only) and
    the global branch (SigRLOutput.scores, .local, .glob)."""
    def encode(images):
        return model.encode(spml_resize(images, resolution) if spml else images)

    def scorer(H, G):
        if not branches:
            return lambda features: model.score(*features, H, G=G).scores

        def three(features):
            out = model.score(*features, H, G=G)
            local = out.local if out.local is not None else torch.full_like(out.scores, float("nan"))
            return torch.stack([out.scores, local, out.glob], dim=-1)  # (B, C, 3)
        return three

    with torch.no_grad():
        return encode, {name: scorer(H, model.label_graph(H)) for name, H in label_sets.items()}




def evaluate_model(model, cfg, data, label_emb, resolution, device, splits=None, branch_metrics=False,
                   keep_scores=False):
    """Run the model over the evaluation split(s) and compute the protocol's metrics (percent).
    label_emb (C_all, D) holds every label in score-column order; ZSL uses its last U rows.
    Under torchrun every process scores its share; rank 0 returns the metrics, the others None.

    Returns {split: metrics of the fused score, "branch_map": {split: {"local": mAP, "global": mAP}}}, the
    mAP of each branch of Eq. 13 scored alone (local is None for --global-only). `branch_metrics` adds
    "branches": {split: {"local": metrics, "global": metrics}}, every figure of each branch; `keep_scores`
    adds "scores": {split: (N, C) fused scores}."""
    model.eval()
    n_train = tasks.n_train_classes(cfg, data)
    scores, labels = {}, {}
    if cfg.task == "zsl":
        scores = zsl_scores(model, cfg, data, label_emb, resolution, device)
        labels = {"zsl": data.test_labels[:, n_train:], "gzsl": data.test_labels}
        metric = nus_metrics
    else:
        transform = build_transform(cfg.task, False, resolution)
        encode, scorers = sigrl_scorers(model, {"all": label_emb.to(device)}, resolution, spml=True,
                                        branches=True)
        for split in splits or ("val", "test"):
            paths, labels[split] = getattr(data, f"{split}_paths"), getattr(data, f"{split}_labels")
            s = predict(paths, transform, encode, scorers, device, cfg.eval_batch_size, cfg.workers, split)
            scores = None if s is None else {**(scores or {}), split: s["all"]}
        metric = lambda s, y: spml_metrics(sigmoid(s), y)  # noqa: E731
    model.train()
    if not parallel.is_main() or scores is None:
        return None
    results = {split: metric(s[..., 0], labels[split]) for split, s in scores.items()}
    branches = {split: {b: None if np.isnan(s[..., i]).any() else metric(s[..., i], labels[split])
                        for i, b in enumerate(BRANCHES, start=1)} for split, s in scores.items()}
    if cfg.task == "zsl":  # and on the unseen set's two groups: twins of seen labels, novel labels
        results, branches = zsl_groups.add_groups(results, branches, scores["zsl"], labels["zsl"],
                                                  tasks.zsl_group_columns(cfg, data))
    results["branch_map"] = {split: {b: None if m is None else m["map"] for b, m in per.items()}
                             for split, per in branches.items()}
    if branch_metrics:
        results["branches"] = branches
    if keep_scores:
        results["scores"] = {split: s[..., 0] for split, s in scores.items()}
    return results


def zsl_scores(model, cfg, data, label_emb, resolution, device):
    """The two ZSL passes over the test images in the paper's sense, sharing each batch's backbone features:
    {"zsl": (N, U, 3) against the U unseen labels alone, "gzsl": (N, C, 3) against all C}, each the fused score,
    the local and the global branch (sigrl_scorers). label_emb (C, D) in score-column order; rank 0 only."""
    emb, n_train = label_emb.to(device), tasks.n_train_classes(cfg, data)
    encode, scorers = sigrl_scorers(model, {"zsl": emb[n_train:], "gzsl": emb}, resolution, spml=False,
                                    branches=True)
    return predict(data.test_paths, build_transform("zsl", False, resolution), encode, scorers, device,
                   cfg.eval_batch_size, cfg.workers, "test")


def sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def check_outputs(args, data=None):
    """support/paths.py's rule for the outputs (--json, --calibrate; tools.figure3's --out and --html), before any
    work (with `data`: its test images too). `args` is any of these commands' flags; a flag it lacks is unset."""
    flag = lambda name: getattr(args, name, None)  # noqa: E731
    given = [("the checkpoint", flag("ckpt")), ("the score file", flag("scores")), ("the label file", flag("labels")),
             ("the CLIP file", flag("clip")), ("the thresholds file", flag("thresholds"))]
    if data is not None:
        given += [("a test label file", f) for f in data.files.values()]
        given += [("a test image", p) for p in data.test_paths]
    check_paths([("--json", flag("json")), ("--out", flag("figure")), ("--calibrate", flag("calibrate")),
                 ("--html", flag("figure_html"), FOLDER)], given)


# ----------------------------------------------------------------------------- the three modes
def checkpoint_and_data(args):
    """The run checkpoint of --ckpt, its config (with this invocation's --data-root / --workers), the dataset it
    names (its labels checked against the checkpoint's) and the device."""
    ckpt = checkpoints.load_run_checkpoint(args.ckpt)
    cfg = runs.Config(**ckpt["config"])
    cfg.data_root = args.data_root or cfg.data_root
    cfg.workers = args.workers if args.workers is not None else cfg.workers
    device = runs.pick_device(args.device)  # under torchrun: cuda:LOCAL_RANK, or the CPU
    parallel.start(device)
    parallel.in_turn(lambda: tasks.make_toy_world(cfg))  # a toy run's world, written again if it was removed
    # only the images this command reads are checked: the test split, and for --calibrate the split it fits on
    check = None if getattr(args, "calibrate", None) else ("test",)
    data = parallel.in_turn(lambda: tasks.load_dataset(cfg, check=check))  # one process at a time may write files
    tasks.check_labels_match(ckpt, cfg, data, args.ckpt)
    tasks.report_changed_test(ckpt, cfg, data, args.ckpt)
    check_outputs(args, data)
    return ckpt, cfg, data, device


def run_clip(args, cfg, ckpt):
    """The run's own CLIP file (--clip where it has moved), for the zero-shot row beside the trained one; None, said in
    one warning line, when it is not there or --no-zero-shot. Another CLIP file is refused: the row would not be the
    run's baseline."""
    path = args.clip or cfg.clip
    if args.no_zero_shot or not os.path.isfile(path):
        if not args.no_zero_shot:
            print(f"warning: {path}: the run's CLIP file is not there, so the zero-shot CLIP row is left out (give "
                  f"it with --clip)", file=sys.stderr)
        return None
    clip = load_clip(path)
    if clip.sha256 != ckpt["clip_sha256"]:
        raise CheckpointError(f"{path}: not the CLIP file the run {args.ckpt} started from (sha256 differs); give "
                              f"the run's own with --clip, or --no-zero-shot")
    return clip


def eval_checkpoint(args):
    ckpt, cfg, data, device = checkpoint_and_data(args)
    model = checkpoints.model_from_checkpoint(ckpt).to(device)
    model = model.compile_heads() if args.compile else model
    clip = run_clip(args, cfg, ckpt)  # read before any image is scored: a wrong file stops here
    parallel.ready()
    names, n_train = tasks.label_names(cfg, data)
    if args.calibrate:  # per-class thresholds on a split that is not the test split (support/thresholds.py)
        R = ckpt["resolution"]
        encode, scorers = sigrl_scorers(model, {"all": ckpt["label_emb"].to(device)}, R, spml=cfg.task == "spml")

        def score(paths):
            s = predict(paths, build_transform(cfg.task, False, R), encode, scorers, device, cfg.eval_batch_size,
                        cfg.workers, "calibrate")
            return None if s is None else s["all"]  # (N, C)
        thresholds.calibrate(args.calibrate, cfg, data, names, score,
                             thresholds.checkpoint_entry(args.ckpt, ckpt["state"]["epoch"]), args.calibrate_n, args.seed)
    results = evaluate_model(model, cfg, data, ckpt["label_emb"], ckpt["resolution"], device,
                             splits=("test",) if cfg.task == "spml" else None, keep_scores=True)
    # zero-shot CLIP, scored as open_clip scores it, on the same test images: what training is read against
    zero_shot = None if clip is None else clip_baseline(clip, cfg, data, device)
    if results is not None:  # rank 0 (the other torchrun processes scored their share)
        scores = results.pop("scores")
        epoch = ckpt["state"]["epoch"]
        print(format_table(results, f"{args.ckpt}: {cfg.task} / {cfg.data}, epoch {epoch}"))
        rows = {tables.COSINE: zero_shot} if zero_shot is not None else {}
        print(format_comparison({**rows, f"SigRL, epoch {epoch}": results},
                                title="\nThe same test images, the same protocol (percent):"))
        if zero_shot is not None:
            results["zero_shot_clip"] = zero_shot
        if args.calibrate or args.thresholds:  # the label set the thresholds are for: GZSL's (ZSL), all (SPML)
            results["thresholds"] = thresholds.report(args.calibrate or args.thresholds, cfg.task,
                                                      scores["gzsl" if cfg.task == "zsl" else "test"],
                                                      data.test_labels, names, n_train)
    return results


def eval_scores(args):
    scores, labels = read_scores(args)
    if args.protocol == "nuswide":
        results = {"test": nus_metrics(scores.astype(np.float32), labels)}
    else:
        results = {"test": spml_metrics(scores.astype(np.float64), labels)}
    print(format_table(results))
    return results


def clip_zero_shot(clip, names, template, device):
    """(transform, encode, score) for `predict`: zero-shot CLIP as open_clip users score it, the cosine of the
    image and each label's prompt, with CLIP's own preprocessing and normalisation."""
    from torchvision import transforms
    R = clip.visual.resolution
    transform = transforms.Compose([
        transforms.Resize(R, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(R),
        transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    text = F.normalize(encode_labels(clip, names, template=template), dim=-1).to(device)  # (C, D)
    clip.to(device).eval()
    encode = lambda images: F.normalize(clip.encode_image(images), dim=-1)  # noqa: E731, (B, D)
    return transform, encode, lambda features: features @ text.T  # (B, D) @ (D, C) -> (B, C)


def clip_baseline(clip, cfg, data, device):
    """Zero-shot CLIP under the same protocol (clip_zero_shot's cosine scores)."""
    names, n_train = tasks.label_names(cfg, data)
    tasks.check_prompts(clip.tokenizer, names, cfg)  # a --template too long is one line, not a tokenizer error
    transform, encode, score = clip_zero_shot(clip, tasks.prompt_names(names), cfg.template, device)
    s = predict(data.test_paths, transform, encode, {"all": score}, device, cfg.eval_batch_size,
                cfg.workers, "clip")
    if s is None:  # another process than rank 0: it scored its share
        return None
    s = s["all"]  # (N, C) cosine similarities
    if cfg.task == "zsl":
        # cosine scores do not depend on the label set, so ZSL is the unseen columns of the same pass
        unseen, truth = s[:, n_train:], data.test_labels[:, n_train:]  # (N, U)
        results = {"zsl": nus_metrics(unseen, truth), "gzsl": nus_metrics(s, data.test_labels)}
        return zsl_groups.add_groups(results, None, unseen[..., None], truth, tasks.zsl_group_columns(cfg, data))[0]
    return {"test": spml_metrics(sigmoid(s), data.test_labels)}


def eval_baseline(args):
    argv = ["--task", args.task, "--data", args.data] + (["--data-root", args.data_root] if args.data_root else []) \
        + (["--clip", args.clip] if args.clip else [])
    cfg = runs.parse_args(argv)
    if args.workers is not None:
        cfg.workers = args.workers
    device = runs.pick_device(args.device)
    parallel.start(device)
    tasks.check_inputs(cfg)  # --clip and --data-root are there, before either is read
    clip = load_clip(cfg.clip)
    parallel.in_turn(lambda: tasks.make_toy_world(cfg))  # --data toy only
    data = parallel.in_turn(lambda: tasks.load_dataset(cfg))
    parallel.ready()
    results = clip_baseline(clip, cfg, data, device)
    if results is not None:
        print(format_table(results, f"zero-shot CLIP ({cfg.clip}) on {cfg.data}"))
    return results


def checkpoint_flags(p):
    """--data-root, --device, --workers: of every command that scores a run checkpoint (eval.py, tools.figure3,
    tools.twins)."""
    p.add_argument("--data-root", default="", help="dataset folder (default: the one the run recorded; --baseline: "
                                                   "the dataset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the run's)")


def parser():
    p = cli.Parser(description=__doc__.split("\n\n")[0] + "\n" + __doc__.split("\n\n")[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ckpt", help="a run checkpoint written by train.py (RUN_DIR/last.pt or best.pt)")
    mode.add_argument("--scores", help="(N, C) .npy of any model's scores (with --labels and --protocol)")
    mode.add_argument("--baseline", choices=["clip"], help="zero-shot CLIP under the same protocol")
    p.add_argument("--labels", help="(N, C) .npy labels: +1/-1/0 for nuswide, 1/0 for spml")
    p.add_argument("--protocol", choices=["nuswide", "spml"], help="metric protocol for --scores")
    p.add_argument("--task", default="zsl", choices=["zsl", "spml"], help="--baseline: task")
    p.add_argument("--data", default="toy", choices=["toy", "nuswide", "coco", "voc"], help="--baseline: dataset")
    p.add_argument("--clip", default="", help="--baseline: the CLIP file (default for toy: toy/toyclip.pt); --ckpt: "
                                              "the run's own, for the zero-shot row, if it has moved (default: the "
                                              "one the run recorded)")
    p.add_argument("--no-zero-shot", action="store_true", help="--ckpt: leave out the zero-shot CLIP row (it scores "
                                                               "the test images a second time, with the CLIP alone)")
    checkpoint_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="--ckpt: run SDA/VFR's per-chunk work through torch.compile (as train.py --compile)")
    p.add_argument("--json", help="also write the figures (percent) to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="--calibrate (ZSL): which training images")
    p.add_argument("--calibrate", metavar="THRESHOLDS.json", help="--ckpt: fit one threshold per label (its F1 "
                   "maximiser) on SPML's validation split or, for ZSL, a slice of the training images; write them "
                   "here for predict.py --thresholds, and report them on the test split")
    p.add_argument("--calibrate-n", type=int, default=5000, help="--calibrate, ZSL: training images used (default 5000)")
    p.add_argument("--thresholds", metavar="FILE", help="--ckpt: also report tagging with these thresholds")
    return p


@parallel.command  # under torchrun (--ckpt, --baseline), rank 0 alone prints; an error is one line, exit code 2
def main(argv=None):
    args = parser().parse_args(argv)
    if args.scores and not (args.labels and args.protocol):
        raise UsageError("--scores needs --labels and --protocol")
    if (args.calibrate or args.thresholds) and not (args.ckpt and not (args.calibrate and args.thresholds)
                                                     and args.calibrate_n >= 1):
        raise UsageError("--calibrate (or --thresholds, not both) goes with --ckpt; --calibrate-n must be >= 1")
    check_outputs(args)
    if args.thresholds:
        thresholds.read(args.thresholds)  # a bad file stops here, before any image is scored
    results = eval_checkpoint(args) if args.ckpt else eval_scores(args) if args.scores else eval_baseline(args)
    if args.json and parallel.is_main():
        runs.write_json(results, args.json)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
