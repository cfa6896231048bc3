"""The paper's two tasks as a run sees them: which dataset a Config names, its images checked once, the
label columns it trains on and scores, and the names the text encoder reads.

    zsl   NUS-WIDE (or the toy world's view of it): train on the S seen labels; score the test images against
          the U unseen labels (ZSL) and against all S + U (GZSL). Splits: train, test.
    spml  COCO / VOC (or the toy world's SPML view): one observed positive per training image; train and score
          on all C classes; the best epoch is chosen by clean-validation mAP. Splits: train, val, test.
"""
import os
import sys
from dataclasses import fields

import numpy as np

from data import DataError, check_images, load_nuswide, load_spml
from support.runs import UsageError
from support.tokenizer import CONTEXT_LENGTH

SPLITS = {"zsl": ("train", "test"), "spml": ("train", "val", "test")}
# VOC's class identifiers are not words; the text encoder gets readable names (listed in the README).
READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def load_dataset(cfg, check=None):
    """The dataset of the run, with missing or unreadable images excluded once, at the start, in one report
    (never a crash hours into an epoch, never a silent black image). `check`: the splits whose images the command
    uses (default: every split of the task); the others are left unchecked (eval.py --ckpt scores only test)."""
    if cfg.data == "toy":
        from toy import world as toyworld  # only --data toy needs the synthetic world
        toyworld.make_world(cfg.data_root, seed=cfg.world_seed, n_train=cfg.world_train, n_test=cfg.world_test)
    if not cfg.data_root:
        raise UsageError(f"--data {cfg.data} needs --data-root DIR (README: 'Datasets')")
    if not os.path.isdir(cfg.data_root):
        raise DataError(f"{cfg.data_root}: no such directory (--data-root)")
    if cfg.task == "zsl":
        data = load_nuswide(cfg.data_root, out=cfg.data_out or None)
    elif cfg.data == "toy":
        data = toyworld.load_spml_view(cfg.data_root)
    else:
        data = load_spml(cfg.data, cfg.data_root, year=cfg.voc_year, out=cfg.data_out or None)
    for split in check or SPLITS[cfg.task]:
        paths = getattr(data, f"{split}_paths")
        good, bad, why = check_images(paths, desc=f"checking {split} images")
        if bad:
            print(f"warning: {len(bad)} of {len(paths)} {split} images are missing or unreadable and are "
                  f"excluded; first: {'; '.join(f'{p} ({r})' for p, r in zip(bad[:3], why))}", file=sys.stderr)
            keep = np.flatnonzero(good)
            setattr(data, f"{split}_paths", [paths[i] for i in keep])
            for f in fields(data):
                if f.name.startswith(f"{split}_") and f.name != f"{split}_paths":
                    setattr(data, f.name, getattr(data, f.name)[keep])
        if not good.any():
            raise DataError(f"no readable {split} images in {cfg.data_root}: {len(paths)} listed, all missing or "
                            f"unreadable (first: {', '.join(bad[:3]) or 'none listed'})")
    check_usable(cfg, data)
    return data


def check_usable(cfg, data):
    """Labels that would train nothing or score nothing are refused before the first step: ZSL needs a
    training image with a seen positive (the others are dropped per batch) and a test image with an unseen
    positive (else ZSL mAP is 0 whatever the model); SPML needs observed positives to learn from."""
    if cfg.task == "zsl":
        if not (data.train_labels == 1).any():
            raise DataError(f"{data.files['train']}: no training image has a seen positive (label 1), so there "
                            f"is nothing to train on")
        if not (data.test_labels[:, len(data.seen):] == 1).any():
            raise DataError(f"{data.files['test']}: no test image has an unseen positive, so ZSL mAP would be 0 "
                            f"whatever the model")
    elif not (data.train_obs == 1).any():
        raise DataError(f"{data.files['train']}: no training image has an observed positive")


def check_prompts(tokenizer, names, cfg):
    """Every label's prompt fits CLIP's 77-token context (the tokenizer would refuse it mid-setup)."""
    words = cfg.template if cfg.prompt == "fixed" else " ".join(["X"] * cfg.n_ctx) + " {}."
    for name in prompt_names(names):
        n = len(tokenizer.encode(words.format(name))) + 2  # + SOT, EOT
        if n > CONTEXT_LENGTH:
            raise DataError(f"label {name!r} makes a prompt of {n} tokens, more than CLIP's context of "
                            f"{CONTEXT_LENGTH}: shorten it in the dataset's label list (or the --template)")


def label_names(cfg, data):
    """(every label name in score-column order, S = number of training classes). ZSL trains on the first S
    (seen) columns and tests on the rest (unseen); SPML trains and tests on all."""
    if cfg.task == "zsl":
        return list(data.seen) + list(data.unseen), len(data.seen)
    return list(data.classes), len(data.classes)


def n_train_classes(cfg, data):
    return label_names(cfg, data)[1]


def prompt_names(names):
    return [READABLE.get(n, n) for n in names]


def check_labels_match(ckpt, cfg, data, path):
    """A checkpoint scores its own label set, in its own column order: the dataset must agree."""
    names, _ = label_names(cfg, data)
    if names != ckpt["label_names"]:
        first = next((i for i, (a, b) in enumerate(zip(names, ckpt["label_names"])) if a != b),
                     min(len(names), len(ckpt["label_names"])))
        raise UsageError(f"{path}: its {len(ckpt['label_names'])} labels do not match the "
                         f"{len(names)} of {cfg.data_root} (first difference at column {first})")


if __name__ == "__main__":
    from support import runs
    cfg = runs.parse_args(sys.argv[1:])  # the same flags as train.py; default: the toy world
    data = load_dataset(cfg)
    names, n_train = label_names(cfg, data)
    print(f"{cfg.task} / {cfg.data}: {len(names)} labels, the first {n_train} trained on; "
          + ", ".join(f"{s} {len(getattr(data, s + '_paths'))} images" for s in SPLITS[cfg.task]))
    print("text encoder reads:", prompt_names(names)[:8], "...")
