"""A saved score matrix and its labels (eval.py --scores S.npy --labels Y.npy), read and refused where they would
give wrong numbers rather than scored: a file that is not a numeric 2-D .npy array, shapes that differ, NaN or
infinite scores, labels outside the protocol's alphabet.
"""
import os

import numpy as np

from support.errors import UsageError


def _read_array(path, flag):
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        a = None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise UsageError(f"{path}: not a numeric .npy array ({flag} expects one, as np.save writes it)")
    if a.ndim != 2 or a.size == 0:
        raise UsageError(f"{path}: shape {a.shape}: {'empty' if a.size == 0 else 'not 2-D'}; expected (N, C)")
    return a


def read_scores(args):
    """Saved scores and labels, refused where they would give wrong numbers: NaN / inf scores, labels outside the
    protocol's alphabet. Under --protocol nuswide 0 means "unknown" and only -1 is a negative: 0/1 labels there
    leave no negative, and any scores get mAP 100. Any C >= 1 is scored: with C < k the top-k list holds all C
    classes and P@k = hits / k."""
    scores, labels = _read_array(args.scores, "--scores"), _read_array(args.labels, "--labels")
    if scores.shape != labels.shape:
        raise UsageError(f"{args.scores} has shape {scores.shape} but {args.labels} has {labels.shape}; "
                         f"expected the same (N, C)")
    if not np.isfinite(scores).all():
        r, c = np.argwhere(~np.isfinite(scores))[0]
        raise UsageError(f"{args.scores}: {int((~np.isfinite(scores)).sum())} NaN or infinite scores (first at row "
                         f"{r}, column {c})")
    values = set(np.unique(labels).tolist())
    if args.protocol == "nuswide" and not values <= {-1, 0, 1}:
        raise UsageError(f"{args.labels}: values {sorted(values)[:5]}; --protocol nuswide expects +1 / -1 (0 = unknown)")
    if args.protocol == "nuswide" and -1 not in values:
        raise UsageError(f"{args.labels}: 0/1 labels, but under --protocol nuswide 0 means unknown and only -1 is a "
                         f"negative (every score would rank perfectly): use +1 / -1, or --protocol spml for 0/1")
    if args.protocol == "spml" and not values <= {0, 1}:
        raise UsageError(f"{args.labels}: values {sorted(values)[:5]} (-1 is NUS-WIDE's negative); --protocol spml "
                         f"expects 1 / 0")
    return scores, labels
