"""The paper's Fig. 3 for a run checkpoint: test images, each with its ground truth and its top-k predictions,
blue when right and red when wrong, missed ground truth struck through; ZSL shows the unseen labels.

    python -m tools.figure3 --ckpt RUN/last.pt --out fig3.png [--n 8] [--k 3] [--seed 0]
    python -m tools.figure3 --ckpt RUN/last.pt --out fig3.png --images a.jpg b.jpg --html OUT_DIR

--html DIR also writes the same images as a gallery page (tools/gallery.py). Under torchrun each process scores
a share of the images and rank 0 draws.
"""
import argparse
import os
import sys

import numpy as np

import eval as evaluation
from data import build_transform, read_image, view_transform
from support import checkpoints, cli, parallel, tasks
from support.errors import UsageError
from support import draw
from support.paths import check_outputs
from tools import gallery


def choose_images(paths, labels, n, seed=0, wanted=None):
    """Test-image indices for a figure: `wanted` (paths, or their last parts such as a file name) in that
    order, else n drawn with `seed` among the images with a positive in `labels` (N, C), in test order."""
    if wanted:
        chosen = []
        for w in wanted:
            hits = [i for i, p in enumerate(paths) if p == w or p.endswith(os.sep + w.lstrip(os.sep))]
            if len(hits) != 1:
                raise UsageError(f"--images {w}: matches {len(hits)} test images, expected one "
                                 f"(give its path, or a file name that only it has)")
            chosen += hits
        return chosen
    positive = np.flatnonzero((np.asarray(labels) == 1).any(axis=1))
    if len(positive) == 0:
        raise UsageError("no test image has a positive label to show")
    return sorted(np.random.default_rng(seed).choice(positive, min(n, len(positive)), replace=False).tolist())


def draw_figure(args):
    """Fig. 3 for a checkpoint: test images with their ground truth and top-k predictions. ZSL scores the
    unseen labels alone (the protocol's ZSL pass), SPML all classes."""
    ckpt, cfg, data, device = evaluation.checkpoint_and_data(args)
    model = checkpoints.model_from_checkpoint(ckpt).to(device)
    names, n_train = tasks.label_names(cfg, data)
    cols = slice(n_train, None) if cfg.task == "zsl" else slice(None)
    names, truth = names[cols], data.test_labels[:, cols] == 1  # (N, C) the scored labels' ground truth
    chosen = choose_images(data.test_paths, truth.astype(int), args.figure_n, args.seed, args.figure_images)
    paths, R = [data.test_paths[i] for i in chosen], ckpt["resolution"]
    # every file the figure and its page write (index.html, images/NNNN.png), before any image is scored
    check_outputs([("--out", args.figure)] + (gallery.outputs("--html", args.figure_html, len(paths))
                                                 if args.figure_html else []),
                  [("the checkpoint", args.ckpt)] + [("a test image", p) for p in paths])
    encode, scorers = evaluation.sigrl_scorers(model, {"fig": ckpt["label_emb"][cols].to(device)}, R, spml=cfg.task == "spml")
    parallel.ready()
    scores = evaluation.predict(paths, build_transform(cfg.task, False, R), encode, scorers, device, cfg.eval_batch_size, 0,
                     "figure")
    if scores is None:  # another torchrun process: it scored its share, rank 0 draws
        return
    scores = scores["fig"]  # (n, C)
    view, cells = view_transform(cfg.task, R), []
    for i, path, row in zip(chosen, paths, scores):
        image = view(read_image(path))  # as it was scored: upright, 16-bit scaled
        top = np.argsort(-row, kind="stable")[:args.figure_k]
        cells.append((image, os.path.basename(path), [names[c] for c in np.flatnonzero(truth[i])],
                      [names[c] for c in top]))
    setting = f"ZSL, the {len(names)} unseen labels" if cfg.task == "zsl" else f"{len(names)} classes"
    picture, _ = draw.figure_grid(cells, f"{args.ckpt} (epoch {ckpt['state']['epoch']}): top-{args.figure_k} "
                                         f"predictions, {setting}")
    draw.save(picture, args.figure)
    print(f"figure: {len(cells)} test images written to {args.figure}")
    if args.figure_html:  # the same images, ranked labels and marks as a page (tools/gallery.py)
        index = gallery.write(args.figure_html, f"{args.ckpt}: {setting}", [f"tagged: the top {args.figure_k}"],
                              paths, names, scores, [set(c[3]) for c in cells], [set(c[2]) for c in cells])
        print(f"gallery: {len(cells)} test images written to {index}")


def parser():
    p = cli.Parser(prog="python -m tools.figure3", description=__doc__.split("\n\n")[0],
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run checkpoint written by train.py (RUN_DIR/last.pt or best.pt)")
    p.add_argument("--out", dest="figure", metavar="OUT.png", required=True, help="the picture to write")
    p.add_argument("--n", dest="figure_n", type=cli.at_least(1), default=8,
                   help="how many test images, drawn with --seed among those with a positive (default: 8)")
    p.add_argument("--images", dest="figure_images", nargs="+", help="these test images instead (paths or file names)")
    p.add_argument("--k", dest="figure_k", type=cli.at_least(1), default=3, help="predictions shown per image "
                                                                                  "(default: 3)")
    p.add_argument("--html", dest="figure_html", metavar="OUT_DIR", help="also an HTML gallery of the same images")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")
    evaluation.checkpoint_flags(p)
    return p


@parallel.command
def main(argv=None):
    args = parser().parse_args(argv)
    evaluation.check_outputs(args)
    draw_figure(args)


if __name__ == "__main__":
    sys.exit(main())
