"""The paper's two tasks as a run sees them: which dataset a Config names, its images checked once, the
label columns it trains on and scores, and the names the text encoder reads.

    zsl   NUS-WIDE (or the toy world's view of it): train on the S seen labels; score the test images against
          the U unseen labels (ZSL) and against all S + U (GZSL). Splits: train, test.
    spml  COCO / VOC (or the toy world's SPML view): one observed positive per training image; train and score
          on all C classes; the best epoch is chosen by clean-validation mAP. Splits: train, val, test.
"""
import hashlib
import os
import sys
from dataclasses import fields

import numpy as np

from data import check_images, load_nuswide, load_spml
from support.errors import DataError, UsageError
from protocol import zsl_groups
from support import cli
from support.clip_files import WHERE
from support.paths import printable
from support.runs import parse_args
from support.tokenizer import CONTEXT_LENGTH

SPLITS = {"zsl": ("train", "test"), "spml": ("train", "val", "test")}
# VOC's class identifiers are not words; the text encoder gets readable names (the three below).
READABLE = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


def make_toy_world(cfg):
    """--data toy only: write the offline default's synthetic world into --data-root, or reuse the one already
    there (toy/world.py). Every other dataset is read as it is on disk, so this does nothing for them."""
    if cfg.data == "toy":
        from toy import world as toyworld  # only --data toy needs the synthetic world
        toyworld.make_world(cfg.data_root, seed=cfg.world_seed, n_train=cfg.world_train, n_test=cfg.world_test)


def check_inputs(cfg):
    """What can be checked of --clip and --data-root without reading a file, before the CLIP (600 MB for
    ViT-B/16) or the dataset is loaded: each is given, and is there."""
    if not cfg.clip:
        raise UsageError(f"--data {cfg.data} needs --clip PATH; expected {WHERE}")
    if not os.path.exists(cfg.clip):
        raise UsageError(f"{cfg.clip}: file not found (--clip: expected a CLIP checkpoint: {WHERE})")
    if cfg.data != "toy":  # the toy world's folder is made on first use
        if not cfg.data_root:
            raise UsageError(f"--data {cfg.data} needs --data-root DIR (the dataset's folder: its images and "
                             f"annotations)")
        if not os.path.isdir(cfg.data_root):
            raise DataError(f"{cfg.data_root}: no such directory (--data-root)")


def load_dataset(cfg, check=None):
    """The dataset of the run, read from --data-root, with missing or unreadable images excluded once, at the
    start, in one report (never a crash hours into an epoch, never a silent black image). `check`: the splits
    whose images the command uses (default: every split of the task); the others are left unchecked (eval.py
    --ckpt scores only test)."""
    if not cfg.data_root:
        raise UsageError(f"--data {cfg.data} needs --data-root DIR (the dataset's folder: its images and annotations)")
    if not os.path.isdir(cfg.data_root):
        raise DataError(f"{cfg.data_root}: no such directory (--data-root)")
    if cfg.task == "zsl":
        data = load_nuswide(cfg.data_root, out=cfg.data_out or None)
    elif cfg.data == "toy":
        from toy import world as toyworld  # the toy world's SPML view (its ZSL view is in NUS-WIDE's layout)
        data = toyworld.load_spml_view(cfg.data_root)
    else:
        data = load_spml(cfg.data, cfg.data_root, year=cfg.voc_year, out=cfg.data_out or None)
    for split in check or SPLITS[cfg.task]:
        paths = getattr(data, f"{split}_paths")
        good, bad, why = check_images(paths, desc=f"checking {split} images")
        if bad:
            print(f"warning: {len(bad)} of {len(paths)} {split} images are missing or unreadable and are "
                  f"excluded; first: {printable('; '.join(f'{p} ({r})' for p, r in zip(bad[:3], why)))}",
                  file=sys.stderr)
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
    check_template(tokenizer, words, prompt_names(names), "--template" if cfg.prompt == "fixed" else "--n-ctx",
                   "the dataset's label list")


def check_template(tokenizer, template, names, flag, source):
    """template.format(name) fits CLIP's context for every name, else one line: the template alone first (then
    no label fits and `flag` is what to change), then the first label whose prompt does not (a label that fits
    alone may not fit inside the template; change it in `source`)."""
    n = len(tokenizer.encode(template.format(""))) + 2  # + SOT, EOT
    if n > CONTEXT_LENGTH:
        raise UsageError(f"{flag} {template!r} makes a prompt of {n} tokens before any label, more than CLIP's "
                         f"context of {CONTEXT_LENGTH}: shorten it")
    for name in names:
        n = len(tokenizer.encode(template.format(name))) + 2
        if n > CONTEXT_LENGTH:
            raise DataError(f"label {name[:60]!r}{'...' if len(name) > 60 else ''} makes a prompt of {n} tokens "
                            f"in {template!r}, more than CLIP's context of {CONTEXT_LENGTH}: shorten it in "
                            f"{source} (or {flag})")


def label_names(cfg, data):
    """(every label name in score-column order, S = number of training classes). ZSL trains on the first S
    (seen) columns and tests on the rest (unseen); SPML trains and tests on all."""
    if cfg.task == "zsl":
        return list(data.seen) + list(data.unseen), len(data.seen)
    return list(data.classes), len(data.classes)


def zsl_twin_pairs(cfg, data):
    """{unseen twin: the seen label it is another word for}. The toy world's are its definition's (toy/world.py
    TWINS); any other dataset's come from its label lists by the plural rule (NUS-WIDE: 30 of 81)."""
    if cfg.data == "toy":
        from toy import world as toyworld
        return dict(toyworld.TWINS)
    return zsl_groups.plural_twins(data.unseen, data.seen)


def zsl_group_columns(cfg, data):
    """The unseen labels' two groups, {"twins": columns, "novel": columns} into the ZSL scores ({} when one is
    empty; protocol/zsl_groups.py)."""
    return zsl_groups.group_columns(list(data.unseen), zsl_twin_pairs(cfg, data))


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


# ----------------------------------------------------------------------------- the data a run used
def data_fingerprint(cfg, data):
    """{split: {"images": N, "files": sha256, "labels": sha256}}: the ordered image list with each file's size and
    modification time (paths relative to --data-root, so a moved dataset is the same one), and the label
    matrices of the split. Cheap (one stat per image); any re-made, added, removed or relabelled image changes it
    (a copy that does not keep the times does too)."""
    out = {}
    for split in SPLITS[cfg.task]:
        paths, files, labels = getattr(data, f"{split}_paths"), hashlib.sha256(), hashlib.sha256()
        for path in paths:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            files.update(f"{os.path.relpath(path, cfg.data_root)}\t{size}\t{mtime}\n".encode())
        for f in fields(data):  # zsl: the label matrix; spml: the observed and the clean labels
            if f.name.startswith(f"{split}_") and f.name != f"{split}_paths":
                a = np.ascontiguousarray(getattr(data, f.name))  # (N, C)
                labels.update(f"{f.name}{a.dtype}{a.shape}".encode())
                labels.update(a.tobytes())
        out[split] = {"images": len(paths), "files": files.hexdigest(), "labels": labels.hexdigest()}
    return out


def data_changes(recorded, now, splits=None):
    """What differs between two data fingerprints, as one phrase ('' when nothing does)."""
    changes = []
    for split in splits or now:
        old, new = recorded.get(split), now.get(split)
        if old is None or new is None:
            continue
        if old["images"] != new["images"]:
            changes.append(f"{split}: {new['images']} images instead of {old['images']}")
        elif old["files"] != new["files"]:
            changes.append(f"{split}: the image files differ (names, sizes or modification times)")
        if old["labels"] != new["labels"]:
            changes.append(f"{split}: the label matrix differs")
    return "; ".join(changes)


def check_resumed_data(resume, cfg, data):
    """--resume: the dataset must be the run's (its labels, then its fingerprint, which the run checkpoint records
    in state["data"]); --allow-changed-data continues anyway, with a warning. Returns the fingerprint to record.
    A checkpoint from before fingerprints has none: it loads, and the data cannot be checked (a note says so)."""
    check_labels_match(resume, cfg, data, cfg.resume)
    now, recorded = data_fingerprint(cfg, data), resume["state"].get("data")
    changed = data_changes(recorded, now) if recorded else ""
    if recorded is None:
        print(f"note: {cfg.resume} records no fingerprint of its data (written before they were recorded): "
              f"the data it trained on cannot be checked", file=sys.stderr)
    elif changed and not cfg.allow_changed_data:
        raise UsageError(f"{cfg.resume}: the data in {cfg.data_root} is not what this run trained on ({changed}); "
                         f"restore it, train a new run, or pass --allow-changed-data to continue on it")
    elif changed:
        print(f"warning: {cfg.resume}: continuing on changed data ({changed}), as --allow-changed-data asks",
              file=sys.stderr)
    return now


def report_changed_test(ckpt, cfg, data, path):
    """eval.py --ckpt: say (do not refuse) when the test set is not the one the run was scored on."""
    recorded = ckpt["state"].get("data")
    changed = data_changes(recorded, data_fingerprint(cfg, data), ["test"]) if recorded else ""
    if changed:
        print(f"warning: {path}: the test set in {cfg.data_root} is not the one this run was scored on while it "
              f"trained ({changed}); the figures below are for the data as it is now", file=sys.stderr)


@cli.command
def main(argv=None):
    """The dataset a train.py command line would use: its labels and split sizes."""
    cfg = parse_args(argv)  # the same flags as train.py; default: the toy world
    make_toy_world(cfg)
    data = load_dataset(cfg)
    names, n_train = label_names(cfg, data)
    print(f"{cfg.task} / {cfg.data}: {len(names)} labels, the first {n_train} trained on; "
          + ", ".join(f"{s} {len(getattr(data, s + '_paths'))} images" for s in SPLITS[cfg.task]))
    print("text encoder reads:", prompt_names(names)[:8], "...")


if __name__ == "__main__":
    sys.exit(main())
