"""The paper's Fig. 3 for a run checkpoint (`python eval.py --ckpt RUN/last.pt --figure fig3.png`): test images,
each with its ground truth and its top-k predictions, blue when right and red when wrong; `--figure-html DIR`
writes the same images as a gallery page (tools/gallery.py)."""
import os

import numpy as np

import eval as evaluation
from data import build_transform, read_image, view_transform
from support import checkpoints, parallel, tasks
from support.paths import check_outputs
from support.runs import UsageError
from tools import draw, gallery


def choose_images(paths, labels, n, seed=0, wanted=None):
    """Test-image indices for a figure: `wanted` (paths, or their last parts such as a file name) in that
    order, else n drawn with `seed` among the images with a positive in `labels` (N, C), in test order."""
    if wanted:
        chosen = []
        for w in wanted:
            hits = [i for i, p in enumerate(paths) if p == w or p.endswith(os.sep + w.lstrip(os.sep))]
            if len(hits) != 1:
                raise UsageError(f"--figure-images {w}: matches {len(hits)} test images, expected one "
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
    check_outputs([("--figure", args.figure)] + (gallery.outputs("--figure-html", args.figure_html, len(paths))
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
