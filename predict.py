"""Tag your own images with any list of labels, and see where SigRL's local score comes from.

    python predict.py                                              # offline demo on toy-world test images
    python predict.py --ckpt RUN/last.pt IMG... DIR...              # the run's own label set
    python predict.py --ckpt RUN/last.pt --labels "cat,dog,lake" photos/ --json tags.json --csv tags.csv
    python predict.py --ckpt RUN/last.pt --labels-file names.txt photos/ --save-scores S.npy
    python predict.py --clip ViT-B-16.pt --labels "cat,dog" photos/  # zero-shot CLIP (cosine), no SigRL
    python predict.py --ckpt RUN/last.pt photos/ --explain maps/    # one PNG per image: the maps below

SigRL's scores depend on the label list. The paper's Eq. 13 adds the raw scores, but the reference code, which
this implementation follows, divides each image's local and global score vectors by their L2 norms over the
labels being scored; GMC builds its graph over the list, and VFR sums its attention over it.
Adding or removing a label changes every other label's score and can change their order: compare scores
within one list, and do not carry a --threshold from one list to another (with C labels a score is of the
order of 1/sqrt(C)). This is why the paper scores its 81 unseen labels as one list (ZSL) and all 1006 as
another (GZSL). Zero-shot CLIP's cosine scores (--clip) do not depend on the list. A single label is scored,
with a warning rather than refused (its sign still says whether both branches call it present), but each
branch's norm over one label is its own size: every score is +1, 0 or -1.

--explain: per image, the image as the model saw it and, for each of its top labels, two maps on the patch
grid (8 x 8 for the toy CLIP, 14 x 14 for ViT-B/16): (1) the similarity <M_hat[p], H[c]> of each reconstructed
patch feature to the label, whose top-k patches (outlined) average to the local score before the reference
code's normalisation over the labels, and (2) SDA's attention over the patches for that label (its softmax
over the patches), averaged over the D channels. Both come from tools/explain.py's `maps`, which runs the same
code as the scores.

With no arguments: tags 6 toy-world test images with the default run runs/zsl-toy/last.pt (trained first with
`python train.py` when absent, a few minutes), each tag marked right or wrong against their ground truth,
writes runs/zsl-toy/explain/*.png and the gallery runs/zsl-toy/gallery/index.html, and draws the paper's
Fig. 3 for it in runs/zsl-toy/figure.png.
"""
import argparse
import csv
import io
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from support import checkpoints
from support import cli
from tools import explain as explain_maps
from tools import figure3
from tools import gallery
from toy import world as toyworld
import eval as evaluation
from support import runs
from support import tasks
from support import thresholds
from support.clip_files import load_clip
from support.errors import CheckpointError, DataError, UsageError, WriteError, error_line
from clip_text import encode_labels
from data import build_transform
from support.image_folders import find_images
from support.paths import FOLDER, check_outputs as check_paths, line_breaking, printable
from support.safe_io import atomic_write

DEMO_CKPT, DEMO_IMAGES = os.path.join("runs", "zsl-toy", "last.pt"), 6


# ----------------------------------------------------------------------------- inputs
def read_labels(args):
    """The label list of --labels "a,b" or --labels-file (one name a line), or None for the checkpoint's own."""
    if args.labels is not None:
        names, source = [n.strip() for n in args.labels.split(",")], "--labels"
    elif args.labels_file is not None:
        try:
            with open(args.labels_file, encoding="utf-8-sig") as f:  # -sig: drops the BOM Notepad writes
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.labels_file}: cannot read as a UTF-8 text file of label names ({e})") from None
        source = args.labels_file
    else:
        return None
    if not names or any(not n for n in names):
        raise UsageError(f"{source}: an empty label name (expected names separated by commas, or one a line)")
    for n in names:  # a name is one line of a table, a page and --save-scores' .label_names.txt
        if line_breaking(n):
            raise UsageError(f"{source}: label '{printable(n)}' holds a control character "
                             f"({printable(line_breaking(n))}); expected printable names")
    return names, source


def check_names(names, source, tokenizer, template):
    """Two names that CLIP's tokenizer reads as the same ids ('Cat' / 'cat': it lowercases and collapses
    spaces) would be one label scored twice: refuse them, and names too long for the text tower in the prompt."""
    tasks.check_template(tokenizer, template, names, "--template", source)
    first = {}
    for name in names:
        ids = tuple(tokenizer(name)[0].tolist())  # fits: the prompt holding it does
        if ids in first:
            same = "repeats" if first[ids] == name else "reads as the same tokens as"
            raise UsageError(f"{source}: label {name!r} {same} {first[ids]!r}; each label once")
        first[ids] = name


# ----------------------------------------------------------------------------- the two taggers
@dataclass
class Tagger:
    """What tags images: the label names, the preprocessing, evaluation's encode / score pair, and for SigRL
    the model, its label embeddings H (C, D) and graph G (C, D) (for --explain) and the task it was trained on."""
    names: list
    transform: Callable
    encode: Callable
    score: Callable
    kind: str
    model: Optional[torch.nn.Module] = None
    H: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    task: str = "zsl"
    clip_sha256: str = ""  # of the CLIP file the tagger's weights come from


def sigrl_tagger(args, labels, device):
    ckpt = checkpoints.load_run_checkpoint(args.ckpt)
    cfg, R = runs.Config(**ckpt["config"]), ckpt["resolution"]
    if labels is None:
        names, H = list(ckpt["label_names"]), ckpt["label_emb"]
    else:
        if ckpt["prompt"]["kind"] != "fixed":
            raise UsageError(f"{args.ckpt}: a CoOp run scores its own labels only (drop --labels)")
        names, source = labels
        clip_path = args.clip or cfg.clip
        if not os.path.isfile(clip_path):
            raise UsageError(f"{args.ckpt}: new labels need the text tower of the CLIP file the run was trained "
                             f"from ({clip_path or 'not recorded'} is missing): pass --clip FILE")
        clip = load_clip(clip_path)
        if clip.sha256 != ckpt["clip_sha256"]:
            raise CheckpointError(f"{clip_path}: not the CLIP file {args.ckpt} was trained from (sha256 differs); "
                                  f"its text embeddings would not match the trained model")
        check_names(names, source, clip.tokenizer, ckpt["prompt"]["template"])
        H = encode_labels(clip, names, template=ckpt["prompt"]["template"])  # (C, D)
    model = checkpoints.model_from_checkpoint(ckpt).to(device)
    H = H.to(device)
    encode, scorers = evaluation.sigrl_scorers(model, {"all": H}, R, spml=cfg.task == "spml")
    with torch.no_grad():
        G = model.label_graph(H) if model.vfr is not None else None  # (C, D), for --explain
    return Tagger(names, build_transform(cfg.task, False, R), encode, scorers["all"],
                  f"SigRL ({args.ckpt}, epoch {ckpt['state']['epoch']})", model, H, G, cfg.task, ckpt["clip_sha256"])


def clip_tagger(args, labels, device):
    if labels is None:
        raise UsageError("--clip without --ckpt needs a label list: --labels \"a,b,c\" or --labels-file FILE")
    clip = load_clip(args.clip)
    names, source = labels
    check_names(names, source, clip.tokenizer, args.template)
    transform, encode, score = evaluation.clip_zero_shot(clip, names, args.template, device)
    return Tagger(names, transform, encode, score, f"zero-shot CLIP ({args.clip}), cosine", clip_sha256=clip.sha256)


# ----------------------------------------------------------------------------- outputs
def ranked(row, names, top_k, threshold):
    """[(name, score)] best first: the top_k, or with a threshold (one, or one per label (C,)) every score >= it
    (at most top_k if given)."""
    order = np.argsort(-row, kind="stable")
    if threshold is not None:
        keep = row >= threshold  # (C,)
        order = [i for i in order if keep[i]]
    return [(names[i], float(row[i])) for i in order[:top_k]]


def write_outputs(args, paths, names, scores, picks):
    if args.json:
        rows = [{"image": p, "labels": [[n, s] for n, s in pick]} for p, pick in zip(paths, picks)]
        runs.write_json(rows, args.json)
        print(f"tags written to {args.json}", file=sys.stderr)
    if args.csv:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([["image", "rank", "label", "score"]] + [
            [p, r + 1, n, repr(s)] for p, pick in zip(paths, picks) for r, (n, s) in enumerate(pick)])
        atomic_write(args.csv, lambda f: f.write(text.getvalue().encode("utf-8")))
        print(f"tags written to {args.csv}", file=sys.stderr)
    if args.save_scores:
        rows, columns = side_files(args.save_scores)
        atomic_write(args.save_scores, lambda f: np.save(f, scores.astype(np.float32)))
        for path, lines in ((rows, paths), (columns, names)):
            atomic_write(path, lambda f, lines=lines: f.write("".join(x + "\n" for x in lines).encode("utf-8")))
        print(f"scores ({len(paths)} images x {len(names)} labels) written to {args.save_scores}, rows in "
              f"{rows}, columns in {columns}", file=sys.stderr)


def side_files(save_scores):
    """--save-scores S.npy: the files naming its rows and its columns, S.images.txt and S.label_names.txt."""
    stem = save_scores[:-4] if save_scores.endswith(".npy") else save_scores
    return stem + ".images.txt", stem + ".label_names.txt"


def check_outputs(args, images=()):
    """support/paths.py's rule, before the first image is scored: no output replaces an input (the checkpoint,
    CLIP file, labels file, an image; --explain not among the folders of images) or another output. With
    `images`, the images found and every file --explain and --html will write (the PNGs, index.html, images/)
    are checked too, and so are the names --save-scores writes one a line."""
    outputs = [("--json", args.json), ("--csv", args.csv), ("--save-scores", args.save_scores),
               ("--explain", args.explain, FOLDER)]
    outputs += [("--save-scores", side) for side in side_files(args.save_scores)] if args.save_scores else []
    outputs += [("--explain", target) for target in explain_maps.explain_targets(images, args.explain)] if args.explain else []
    if args.html:
        outputs += gallery.outputs("--html", args.html, len(images))
        html_maps = os.path.join(args.html, "explain")
        if not (args.explain and os.path.realpath(args.explain) == os.path.realpath(html_maps)):  # else: listed
            outputs += [("--html", html_maps, FOLDER)] + [("--html", target) for target in
                                                          explain_maps.explain_targets(images, html_maps)]
    for path in images if args.save_scores else ():  # .images.txt holds one path a line
        if line_breaking(path):
            raise UsageError(f"--save-scores: image '{printable(path)}' has a control character "
                             f"({printable(line_breaking(path))}) in its path, which would shift the rows of "
                             f"{side_files(args.save_scores)[0]}: rename it, or leave out --save-scores")
    given = [("the checkpoint", args.ckpt), ("the CLIP file", args.clip), ("the labels file", args.labels_file),
             ("the thresholds file", args.thresholds)]
    given += [("images" if os.path.isdir(i) else "an image", i) for i in args.inputs]
    check_paths(outputs, given + [("an image", i) for i in images])


# ----------------------------------------------------------------------------- the offline demo
def demo(args):
    """No arguments: the default run's checkpoint on a few toy-world test images (see the docstring)."""
    import train
    if not os.path.isfile(DEMO_CKPT):
        print(f"note: {DEMO_CKPT} not found: training the default run first (python train.py, a few minutes)",
              file=sys.stderr)
        if train.main([]) != 0:
            return 2
    ckpt = checkpoints.load_run_checkpoint(DEMO_CKPT)
    cfg = runs.Config(**ckpt["config"])
    tasks.make_toy_world(cfg)  # written again if it was removed since the run
    data = tasks.load_dataset(cfg)
    names, n_train = tasks.label_names(cfg, data)
    chosen = figure3.choose_images(data.test_paths, data.test_labels[:, n_train:], DEMO_IMAGES, seed=0)
    run_dir = os.path.dirname(DEMO_CKPT)
    args.ckpt, args.explain, args.html = DEMO_CKPT, os.path.join(run_dir, "explain"), os.path.join(run_dir, "gallery")
    args.inputs = [data.test_paths[i] for i in chosen]
    truth = {data.test_paths[i]: {names[c] for c in np.flatnonzero(data.test_labels[i] == 1)} for i in chosen}
    print("note: toy-world test images, so each tag is marked [right] or [wrong] against their ground truth",
          file=sys.stderr)
    return tag(args, truth) or figure3.main(["--ckpt", DEMO_CKPT, "--out", os.path.join(run_dir, "figure.png"),
                                             "--workers", "0"])


def tag_line(path, pick, truth):
    """An image's printed tags; with ground truth (the demo), each says right or wrong, then what was missed."""
    if truth is None:
        return printable(f"{path}: " + (", ".join(f"{n} {s:.4f}" for n, s in pick)
                                        or "(no label at or above its threshold)"))
    missed = [n for n in sorted(truth) if n not in {m for m, _ in pick}]
    return printable(f"{path}: " + ", ".join(f"{n} {s:.4f} [{'right' if n in truth else 'wrong'}]" for n, s in pick)
                     + f" | ground truth not tagged: {', '.join(missed) or 'none'}")


# ----------------------------------------------------------------------------- command line
def tag(args, truth=None):
    """Tag args.inputs; truth (the demo): {path: set of ground-truth labels} marks each tag right or wrong."""
    check_outputs(args)
    if args.thresholds:
        thresholds.read(args.thresholds)  # a bad file stops here; its label set is checked once labels are known
    labels = read_labels(args)
    missing = [item for item in args.inputs if not os.path.exists(item)]
    if missing:  # found before the checkpoint or the CLIP is read (the images are decoded once both are)
        raise UsageError(f"{missing[0]}: no such file or folder (expected images or folders of images)")
    device = runs.pick_device(args.device)
    tagger = sigrl_tagger(args, labels, device) if args.ckpt else clip_tagger(args, labels, device)
    if args.explain and (tagger.model is None or tagger.model.config.global_only):
        raise UsageError("--explain needs a SigRL checkpoint with a local branch (--ckpt, not --clip; not a "
                         "--global-only run)")
    if args.thresholds and tagger.model is None:
        raise UsageError("--thresholds go with --ckpt: they were fitted on a SigRL run's scores, not CLIP's cosine")
    if args.thresholds:  # (C,) in the tagger's label order; another label set is refused
        args.threshold = thresholds.for_checkpoint(args.thresholds, tagger.names, args.ckpt)
    paths = find_images(args.inputs)
    check_outputs(args, paths)
    warning = toyworld.foreign_images_warning(tagger.clip_sha256, tagger.kind, paths)
    if warning:
        print(warning, file=sys.stderr)
    bad = [n for n in tagger.names if line_breaking(n)] if args.save_scores else []
    if bad:  # the checkpoint's own names (a --labels list is checked as it is read)
        raise UsageError(f"--save-scores: label '{printable(bad[0])}' holds a control character, which would shift "
                         f"the columns of {side_files(args.save_scores)[1]}: leave out --save-scores")
    if tagger.model is not None and len(tagger.names) < 2:
        print(f"warning: {tagger.kind}: one label: the reference code divides each branch's score by its norm over "
              f"the labels (the paper's Eq. 13 adds raw scores), here its own size, so every score is +1, 0 or -1 (the signs of the two branches); give two labels "
              f"or more to rank them, or --clip for cosine scores (see --help)", file=sys.stderr)
    elif tagger.model is not None:
        print(f"note: {tagger.kind}: scores are normalised over these {len(tagger.names)} labels per image "
              f"(as the reference code normalises them); they change when the label list changes (see --help)", file=sys.stderr)
    scores = evaluation.predict(paths, tagger.transform, tagger.encode, {"all": tagger.score}, device,
                                args.batch_size, args.workers, "tagging", out=sys.stderr)["all"]  # (N, C)
    picks = [ranked(row, tagger.names, args.top_k, args.threshold) for row in scores]
    known = [truth[p] for p in paths] if truth else None
    for path, pick, t in zip(paths, picks, known or [None] * len(paths)):
        print(tag_line(path, pick, t))
    write_outputs(args, paths, tagger.names, scores, picks)
    written = None
    if args.explain:
        written = explain_maps.explain(tagger, paths, picks, args.explain, device)
        print(f"explain: {len(written)} PNGs written to {args.explain}", file=sys.stderr)
    if args.html:
        gallery.write_tagged(args, tagger, paths, scores, picks, known, device, written)
    return 0


def parser():
    p = cli.Parser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files and folders (walked for image files)")
    p.add_argument("--ckpt", help="a run checkpoint written by train.py (RUN_DIR/last.pt or best.pt)")
    p.add_argument("--clip", help="a CLIP file: without --ckpt, zero-shot CLIP tags (cosine); with --ckpt, the "
                                  "text tower for new --labels (default: the file the run was trained from)")
    p.add_argument("--labels", help='comma-separated label names, e.g. "cat,dog,lake" (default: the checkpoint\'s)')
    p.add_argument("--labels-file", help="a UTF-8 text file, one label name a line")
    p.add_argument("--template", default="There is a {} in the scene", help="--clip alone: the prompt")
    p.add_argument("--top-k", type=int, default=None, help="labels shown per image (default 5; with --threshold(s): all)")
    p.add_argument("--threshold", type=float, default=None, help="keep every label scoring at least this")
    p.add_argument("--thresholds", metavar="FILE", help="keep every label scoring at least its own threshold, from "
                                                       "eval.py --calibrate (for the label set it was fitted on)")
    p.add_argument("--json", help='write [{"image": PATH, "labels": [[NAME, SCORE], ...]}, ...] (best first)')
    p.add_argument("--csv", help="write the same as rows: image, rank, label, score")
    p.add_argument("--save-scores", help="write the (N, C) score matrix (.npy, for eval.py --scores) with the "
                                         "row order in <stem>.images.txt and the columns in <stem>.label_names.txt")
    p.add_argument("--explain", metavar="OUT_DIR", help="one PNG per image: where each top label's local score "
                                                        f"comes from (at most {explain_maps.EXPLAIN_COLUMNS} labels)")
    p.add_argument("--html", metavar="OUT_DIR", help="a static page OUT_DIR/index.html of the images with their "
                                                     "ranked labels, score bars and explain maps (tools/gallery.py)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return p


def main(argv=None):
    try:
        args = parser().parse_args(argv)
        if args.labels is not None and args.labels_file is not None:
            raise UsageError("give --labels or --labels-file, not both")
        if args.top_k is not None and args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
            raise UsageError("--top-k and --batch-size must be >= 1, --workers >= 0")
        if args.threshold is not None and args.thresholds:
            raise UsageError("give --threshold (one for all labels) or --thresholds FILE (one per label), not both")
        args.top_k = args.top_k or (5 if args.threshold is None and not args.thresholds else None)
        offline_demo = not (args.inputs or args.ckpt or args.clip)
        if not offline_demo and not args.inputs:
            raise UsageError("no images given (image files or folders after the flags; see --help)")
        if not offline_demo and not (args.ckpt or args.clip):
            raise UsageError("give --ckpt RUN/last.pt (SigRL) or --clip FILE (zero-shot CLIP)")
        if args.explain and not args.ckpt:  # known before any file is read (a --global-only run: once it is)
            raise UsageError("--explain needs a SigRL checkpoint with a local branch (--ckpt, not --clip)")
        if args.thresholds and not args.ckpt:
            raise UsageError("--thresholds go with --ckpt: they were fitted on a SigRL run's scores, not CLIP's cosine")
        return demo(args) if offline_demo else tag(args)
    except (CheckpointError, DataError, UsageError, WriteError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (outputs already written are whole; the others were not written)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
