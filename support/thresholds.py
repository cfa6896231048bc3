"""Per-class thresholds: turn SigRL's scores into tags, one threshold per label, fitted on images that are
not the test split.

    python eval.py --ckpt RUN/best.pt --calibrate THRESHOLDS.json      # fit, write, then score the test split
    python predict.py --ckpt RUN/best.pt --thresholds THRESHOLDS.json photos/

Shape legend: N images, C labels.

A score is SigRL's fused value as the reference code computes it (the paper's Eq. 13 adds the raw scores): each
image's local and global score vectors are divided by their L2 norms over the labels being scored, then
averaged, so a score is not a probability, its scale is of the order of 1 / sqrt(C), and it
depends on the label set. A threshold therefore belongs to one label set: the file records the names and the
sha256 of the names in column order, and predict.py refuses any other set.

For each label c the threshold maximises that label's F1 on the calibration images (tag when score >= t).
Only a cut between two distinct scores can be chosen (images with equal scores are tagged together), and the
threshold is the midpoint of that gap, so it does not depend on the order of the images; among equal F1 the
higher threshold (fewer tags) wins. A label with fewer than MIN_POSITIVES positives there gets the global
threshold instead: the one cut that maximises the micro F1 of all calibrated labels' (image, label) pairs.

Calibration split: SPML, the clean validation split (the one that picks best.pt). ZSL, a seeded slice of the
training images, scored against the checkpoint's whole label set (seen, then unseen, as predict.py scores by
default); these images carry ground truth for the seen labels only, so every unseen label gets the global
threshold fitted on the seen labels. They are images the model trained on: its seen-label scores there are
likely higher than on new images, so its seen thresholds may be optimistic.
"""
import hashlib
import json
import math
import os
import sys

import numpy as np

from support.clip_files import file_sha256
from support.runs import write_json
from support.errors import UsageError

FORMAT, MIN_POSITIVES = "sigrl-thresholds/1", 5


def label_sha256(names):
    """The sha256 of the label names in column order, one a line (as RUN_DIR/config.json records it)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


# ----------------------------------------------------------------------------- fitting
def best_cut(scores, positive):
    """(threshold, F1) maximising the F1 of `scores >= threshold` (N,) against `positive` (N,) bool.
    With no positive, nothing tagged is best: (inf, nan)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.inf, math.nan
    order = np.argsort(-scores, kind="stable")  # (N,)
    s, y = scores[order], positive[order]  # (N,) best first
    tp, tagged = np.cumsum(y), np.arange(1, len(s) + 1)  # (N,) after tagging the first j + 1
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # the last position of each block of equal scores
    f1 = 2 * tp[ends] / (tagged[ends] + n_pos)  # (blocks,) F1 = 2 TP / (tagged + positives)
    j = ends[int(np.argmax(f1))]  # the first maximum: the highest threshold
    threshold = s[j] if j == len(s) - 1 else (s[j] + s[j + 1]) / 2
    return float(threshold), float(f1.max())


def f1_at(scores, positive, threshold):
    """F1 of `scores >= threshold` against `positive` (both (N,)); NaN without a positive."""
    positive = np.asarray(positive, bool)
    tagged = np.asarray(scores, np.float64) >= threshold
    n_pos = int(positive.sum())
    return 2 * int((tagged & positive).sum()) / (int(tagged.sum()) + n_pos) if n_pos else math.nan


def fit(scores, truth, calibrated, min_positives=MIN_POSITIVES):
    """scores (N, C), truth (N, C) bool, calibrated (C,) bool: the labels the split has ground truth for.
    Returns {"threshold": (C,), "f1": (C,) on these images, "positives": (C,), "source": ["class" | "global"],
    "global_threshold", "global_f1"}."""
    scores, truth, calibrated = np.asarray(scores, np.float64), np.asarray(truth, bool), np.asarray(calibrated, bool)
    n, c = scores.shape
    assert truth.shape == (n, c) and calibrated.shape == (c,), f"truth must be (N, C) = {(n, c)}, calibrated (C,)"
    if not calibrated.any():
        raise UsageError("no label has ground truth on the calibration images: nothing to fit thresholds on")
    cols = np.flatnonzero(calibrated)
    global_t, global_f1 = best_cut(scores[:, cols].ravel(), truth[:, cols].ravel())  # pooled (N * C',)
    positives = np.where(calibrated, truth.sum(axis=0), 0)  # (C,)
    out = {"threshold": np.full(c, global_t), "f1": np.full(c, math.nan), "positives": positives,
           "source": ["global"] * c, "global_threshold": global_t, "global_f1": global_f1}
    for k in cols:
        if positives[k] >= min_positives:
            out["threshold"][k], out["f1"][k] = best_cut(scores[:, k], truth[:, k])
            out["source"][k] = "class"
        else:
            out["f1"][k] = f1_at(scores[:, k], truth[:, k], global_t)
    return out


def calibration_split(cfg, data, n_images, seed):
    """(paths, truth (N, C) bool, calibrated (C,) bool, a description) of the split thresholds are fitted on
    (see the module docstring), in the columns of the checkpoint's label set."""
    if cfg.task == "spml":
        return (data.val_paths, data.val_labels == 1, np.ones(data.val_labels.shape[1], bool),
                f"the clean validation split ({len(data.val_paths)} images)")
    n_train, n_all = len(data.seen), len(data.seen) + len(data.unseen)
    pick = np.sort(np.random.default_rng(seed).permutation(len(data.train_paths))[:n_images])  # (N,)
    truth = np.zeros((len(pick), n_all), bool)  # (N, C): the unseen columns have no ground truth here
    truth[:, :n_train] = data.train_labels[pick] == 1
    return ([data.train_paths[i] for i in pick], truth, np.arange(n_all) < n_train,
            f"{len(pick)} training images (seed {seed}), ground truth for the {n_train} seen labels only: the "
            f"{n_all - n_train} unseen labels get the global threshold, and the model trained on these images")


# ----------------------------------------------------------------------------- the file
def record(names, fitted, checkpoint, split, min_positives=MIN_POSITIVES):
    """The JSON of a thresholds file (None for a NaN F1)."""
    def number(x):
        return None if math.isnan(x) else float(x)
    return {"format": FORMAT, "labels_sha256": label_sha256(names), "checkpoint": checkpoint, "split": split,
            "min_positives": min_positives, "global_threshold": fitted["global_threshold"],
            "global_f1": number(fitted["global_f1"]),
            "labels": [{"name": n, "threshold": float(t), "source": s, "positives": int(p), "f1": number(f)}
                       for n, t, s, p, f in zip(names, fitted["threshold"], fitted["source"], fitted["positives"],
                                                fitted["f1"])]}


def read(path):
    """A thresholds file, checked entry by entry before any image is scored: {name: threshold} and the whole
    record. Anything else is one UsageError line naming the entry."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (expected a thresholds file from eval.py --calibrate)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise UsageError(f"{path}: cannot read as a thresholds JSON file from eval.py --calibrate "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:80]})") from None

    def bad(entry, expected):
        return UsageError(f"{path}: not a thresholds file of format {FORMAT} from eval.py --calibrate, unedited: "
                          f"entry {entry} is missing or not {expected}")
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise bad('"format"', repr(FORMAT))
    if not isinstance(rec.get("labels"), list) or not rec["labels"]:
        raise bad('"labels"', "a non-empty list")
    for k, entry in enumerate(rec["labels"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
            raise bad(f'"labels"[{k}]', 'an object with a "name" string')
        t = entry.get("threshold")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
            raise bad(f'"labels"[{k}] ({entry["name"]!r}) "threshold"', "a number")
    names = [entry["name"] for entry in rec["labels"]]
    table = {entry["name"]: float(entry["threshold"]) for entry in rec["labels"]}
    if len(table) != len(names):
        raise bad('"labels"', "a list of distinct label names")
    if rec.get("labels_sha256") != label_sha256(names):
        raise bad('"labels_sha256"', "the sha256 of its label names (they were edited, or the file damaged)")
    ckpt = rec.get("checkpoint")
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("path"), str) and isinstance(ckpt.get("sha256"), str)
            and isinstance(ckpt.get("epoch"), int)):
        raise bad('"checkpoint"', 'an object with "path", "sha256" and "epoch"')
    if not (isinstance(rec.get("split"), dict) and isinstance(rec["split"].get("about"), str)):
        raise bad('"split"', 'an object with "about"')
    return table, rec


def for_labels(path, names):
    """The (C,) thresholds of `path` in the order of `names`, which must be the label set they were fitted for
    (in any order: a label's score does not depend on the order of the list, only on what is in it)."""
    table, rec = read(path)
    if set(names) != set(table) or len(names) != len(table):
        missing, extra = sorted(set(table) - set(names)), sorted(set(names) - set(table))
        raise UsageError(f"{path}: fitted for another label set ({len(table)} labels, sha256 "
                         f"{rec['labels_sha256'][:12]}; these {len(names)} lack {missing[:3]} and add {extra[:3]}): "
                         f"scores depend on the label set (the reference code normalises them over it), so its thresholds do not apply")
    return np.array([table[n] for n in names]), rec


def for_checkpoint(path, names, ckpt_path):
    """for_labels, with a warning when the thresholds were fitted for another checkpoint than `ckpt_path`."""
    cut, rec = for_labels(path, names)
    if rec["checkpoint"]["sha256"] != file_sha256(ckpt_path):
        print(f"warning: {path} was fitted for {rec['checkpoint']['path']} (epoch {rec['checkpoint']['epoch']}), "
              f"not {ckpt_path}: another model's scores may need other thresholds", file=sys.stderr)
    return cut


def checkpoint_entry(path, epoch):
    return {"path": os.path.abspath(path), "sha256": file_sha256(path), "epoch": epoch}


# ----------------------------------------------------------------------------- what a deployed tagger gets
def tag_metrics(scores, truth, thresholds):
    """Micro precision / recall / F1 (percent) of `scores >= thresholds` (N, C) >= (C,) against `truth` (N, C),
    with the mean number of tags per image and the share of images left without a tag (percent)."""
    tagged, truth = np.asarray(scores) >= np.asarray(thresholds)[None, :], np.asarray(truth, bool)  # (N, C)
    tp, n_tagged, n_pos = int((tagged & truth).sum()), int(tagged.sum()), int(truth.sum())
    p = 100 * tp / n_tagged if n_tagged else math.nan
    r = 100 * tp / n_pos if n_pos else math.nan
    f1 = 2 * p * r / (p + r) if p + r > 0 else math.nan
    return {"p": p, "r": r, "f1": f1, "tags/image": float(tagged.sum(axis=1).mean()),
            "untagged %": float(100 * (~tagged.any(axis=1)).mean())}


def rows_on_test(task, scores, labels, thresholds, n_train):
    """{row name: tag_metrics} on the test split: SPML's classes; ZSL's GZSL pass (the label set the thresholds
    were fitted for), all labels, then its seen and unseen columns."""
    truth = np.asarray(labels) == 1  # (N, C); NUS-WIDE's 0 (not annotated) and -1 are both not positive
    if task == "spml":
        return {f"TEST, {truth.shape[1]} classes": tag_metrics(scores, truth, thresholds)}
    c = truth.shape[1]
    return {f"GZSL, all {c} labels": tag_metrics(scores, truth, thresholds),
            f"GZSL, the {n_train} seen labels": tag_metrics(scores[:, :n_train], truth[:, :n_train], thresholds[:n_train]),
            f"GZSL, the {c - n_train} unseen labels": tag_metrics(scores[:, n_train:], truth[:, n_train:],
                                                                  thresholds[n_train:])}


def format_rows(rows, title):
    lines = [title, "| per-class thresholds | P | R | F1 | tags / image | images without a tag (%) |",
             "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['p']:.2f} | {m['r']:.2f} | {m['f1']:.2f} | {m['tags/image']:.2f} | "
                     f"{m['untagged %']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- eval.py --calibrate / --thresholds
def calibrate(path, cfg, data, names, score, checkpoint, n_images, seed):
    """Fit thresholds on the calibration split and write them to `path`. score(paths) -> (N, C) scores of the
    checkpoint's label set (None on the torchrun processes other than rank 0: they only score their share)."""
    paths, truth, calibrated, about = calibration_split(cfg, data, n_images, seed)
    scores = score(paths)
    if scores is None:
        return
    fitted = fit(scores, truth, calibrated)
    split = {"name": "val" if cfg.task == "spml" else "train (a seeded slice)", "images": len(paths),
             "seed": None if cfg.task == "spml" else seed, "about": about}
    write_json(record(names, fitted, checkpoint, split), path)
    n_class = fitted["source"].count("class")
    print(f"thresholds: {n_class} labels with their own, {len(names) - n_class} with the global "
          f"{fitted['global_threshold']:.4f}; fitted on {about}; written to {path}")


def report(path, task, scores, labels, names, n_train):
    """The test split tagged with the thresholds of `path`: prints the table, returns its rows."""
    t, rec = for_labels(path, names)
    rows = rows_on_test(task, scores, labels, t, n_train)
    print(format_rows(rows, f"{path} (fitted on {rec['split']['about']}), on the test split:"))
    return rows
