"""Evaluation metrics of SigRL: NUS-WIDE ZSL/GZSL (paper Table I) and single-positive (SPML) VOC/COCO.

Shape legend: N images, C classes, K predictions kept per image.

Two families, with deliberately different conventions (MKT's utils/misc.py compute_AP / compute_F1, from
BiAM and LESA, for NUS-WIDE; sklearn's average_precision_score as Cole et al.'s SPML code calls it):

NUS-WIDE (MKT/BiAM/LESA protocol), labels +1 / -1 / 0 (0 = not annotated), raw scores, float32:
  * ``nus_ap``: per class, drop the 0 entries, sort by score in a STABLE descending order (ties keep the
    row order) and take the plain non-interpolated AP = mean over positives of precision@rank.
    A class without a positive has AP 0 and stays in the mean (mAP over all 81 / 1006 classes).
  * ``nus_topk``: micro ("overall") precision/recall/F1 of the K best classes of every image; every
    image adds K predictions, labels 0 and -1 both count as "not positive"; 0/0 gives NaN.
SPML (Cole et al. / Zhou et al. protocol), clean labels 0/1, probabilities, float64:
  * ``spml_ap``: sklearn-style AP, where tied scores form ONE cut-off point (one block).
  * ``spml_metrics``: mAP x 100, and precision/recall/hit@k per image averaged over all images.

Where the reference code differs from the paper or is arbitrary:
  * GZSL mAP averages over all 1006 classes; classes without a test positive count as AP 0.
  * Top-K F1 is micro-averaged over the whole test set, not per class or per image.
  * ZSL scores come from their own 81-class forward pass, not a column slice of GZSL (the
    caller's job, these functions only see a score matrix).
  * The reference sorts with a non-stable sort; we use a stable one, so ties are reproducible.
  * The SPML code computes no F1; ``f1@k`` here is DERIVED as 2PR/(P+R) of the averaged P and R.
  * The code logs fractions; the paper's tables (and the ``*_metrics`` dicts here) are in percent.
  * MKT's top-K needs K <= C; for C < K the top-K list here holds all C classes and P = TP / (N K),
    as SPML's P@k is defined for k > C, so any C >= 1 can be evaluated.
"""

import numpy as np

# Columns (AP) or rows (top-K) are processed in chunks of about this many matrix entries, so the
# temporaries (int64 sort order, cumulative sums) stay at a few hundred MB even for the full
# NUS-WIDE test set (107,859 x 1006 = 108M entries). Read at call time, so tests can shrink it.
CHUNK_ENTRIES = 1 << 23


def _check(scores, labels, allowed, dtype, name):
    """Validate a (score, label) pair at the module boundary; return them as arrays."""
    scores = np.asarray(scores, dtype=dtype)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"{name}: scores and labels must both be (N, C), got "
                         f"{scores.shape} and {labels.shape}")
    valid = np.zeros(labels.shape, dtype=bool)
    for value in allowed:  # a few == passes: much faster than np.isin on 108M entries
        valid |= labels == value
    if not valid.all():
        raise ValueError(f"{name}: labels must take values in {allowed}, got {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name}: scores contain NaN or inf")
    return scores, labels


def _chunks(total, width):
    """Yield slices that cover range(total) in steps of about CHUNK_ENTRIES / width."""
    step = max(1, CHUNK_ENTRIES // max(width, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _average_precision(scores, signed, group_ties, dtype):
    """AP of every column of `scores` (N, C) against `signed` labels (+1 pos, -1 neg, 0 dropped).

    Fast path, explained: instead of a Python loop over C classes, each chunk of columns is sorted
    once (one argsort per column, stable, so ties keep the row order) and every quantity is a
    cumulative sum along the sorted axis:
        tp[j]   = number of positives among the first j+1 ranked entries
        rank[j] = number of kept (non-0) entries among them (the 0 entries take no rank)
        AP      = (1/n_pos) * sum over positive j of tp[e(j)] / rank[e(j)]
    where e(j) = j (NUS-WIDE: every list position is its own cut-off) or, with `group_ties`, the last
    position of j's block of equal scores (sklearn: a block of ties is one cut-off, so every positive
    in it sees the precision at the block's end; sum_blocks dRecall * P is the same sum regrouped).
    """
    n, c = scores.shape
    ap = np.zeros(c, dtype=dtype)
    for cols in _chunks(c, n):
        neg = -np.ascontiguousarray(scores[:, cols].T)                  # (c', N), rows = classes
        order = np.argsort(neg, axis=1, kind="stable")                  # (c', N) descending score
        y = np.take_along_axis(np.ascontiguousarray(signed[:, cols].T), order, axis=1)  # (c', N)
        pos = y == 1                                                    # (c', N)
        tp = np.cumsum(pos, axis=1, dtype=dtype)                        # (c', N) exact below 2^24
        rank = np.cumsum(y != 0, axis=1, dtype=dtype)                   # (c', N)
        n_pos = tp[:, -1]                                               # (c',)
        if group_ties:
            s = np.take_along_axis(neg, order, axis=1)                  # (c', N) sorted -scores
            is_end = np.ones_like(pos)                                  # (c', N)
            is_end[:, :-1] = s[:, 1:] != s[:, :-1]
            # e(j): first block end at or after j = reversed running minimum of the end positions
            ends = np.where(is_end, np.arange(n), n - 1)                # (c', N)
            ends = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]  # (c', N)
            tp, rank = np.take_along_axis(tp, ends, 1), np.take_along_axis(rank, ends, 1)
        prec = np.divide(tp, rank, out=np.zeros_like(tp), where=pos)    # (c', N) 0 off positives
        ap[cols] = np.where(n_pos > 0, prec.sum(axis=1) / np.maximum(n_pos, 1), 0)
    return ap


# ----------------------------------------------------------------------------- NUS-WIDE (ZSL / GZSL)

def nus_ap(scores, labels):
    """Per-class AP (C,) float32 of raw scores (N, C) against labels (N, C) in {+1, -1, 0}.

    Stable descending order, 0 entries dropped, AP 0 for a class without a +1 (MKT's compute_AP skips it).
    Equals sklearn's average_precision_score on the kept entries when no scores are tied.
    """
    scores, labels = _check(scores, labels, (-1, 0, 1), np.float32, "nus_ap")
    return _average_precision(scores, labels.astype(np.int8), False, np.float32)


def nus_topk(scores, labels, k):
    """Micro ("overall") top-k precision, recall, F1 as Python floats (fractions), float32 maths.

    Every image contributes exactly k predictions; TP counts labels exactly +1 among them.
    P = TP / (N k), R = TP / #(+1 labels), F1 = 2PR / (P + R); a 0/0 stays NaN as in the reference.
    The reference requires k <= C; for C < k the list holds all C classes and P still divides by N k, the
    convention the SPML reference uses for its P@k (so a 4-label dataset has a P@5, at most 80 %).
    Which of several classes tied at the k-th place is taken is implementation-defined (as there).
    """
    return _nus_topk(*_check(scores, labels, (-1, 0, 1), np.float32, "nus_topk"), k)


def _nus_topk(scores, labels, k):
    n, c = scores.shape
    if k < 1:
        raise ValueError(f"nus_topk: need k >= 1, got k = {k}")
    kept = min(k, c)  # with C < k the list holds all C classes; precision still divides by k (as SPML's P@k)
    tp = 0
    for rows in _chunks(n, c):
        top = np.argpartition(scores[rows], c - kept, axis=1)[:, c - kept:]  # (n', min(k, C)) unordered top-k
        tp += int((np.take_along_axis(labels[rows], top, axis=1) == 1).sum())
    tp, n_pred, n_pos = np.float32(tp), np.float32(n * k), np.float32((labels == 1).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        p = tp / n_pred
        r = tp / n_pos
        f1 = np.float32(2) * p * r / (p + r)
    return float(p), float(r), float(f1)


def nus_metrics(scores, labels):
    """Table I metrics in PERCENT: dict with map, p@3, r@3, f1@3, p@5, r@5, f1@5.

    Validates once, then reuses the arrays (the full test matrix is 108M entries).
    """
    scores, labels = _check(scores, labels, (-1, 0, 1), np.float32, "nus_metrics")
    ap = _average_precision(scores, labels.astype(np.int8), False, np.float32)
    out = {"map": 100.0 * float(ap.mean(dtype=np.float32))}
    for k in (3, 5):
        p, r, f1 = _nus_topk(scores, labels, k)
        out.update({f"p@{k}": 100.0 * p, f"r@{k}": 100.0 * r, f"f1@{k}": 100.0 * f1})
    return out


# ----------------------------------------------------------------------------- SPML (VOC / COCO)

def spml_ap(probs, labels):
    """Per-class AP (C,) float64, sklearn-style: tied scores form one cut-off (sklearn average_precision_score).

    labels are the clean 0/1 labels; a class without a positive has AP 0.
    """
    probs, labels = _check(probs, labels, (0, 1), np.float64, "spml_ap")
    signed = np.where(labels == 1, 1, -1).astype(np.int8)               # (N, C) every entry kept
    return _average_precision(probs, signed, True, np.float64)


def spml_topk(probs, labels, k):
    """Image-averaged (precision@k, recall@k, hit@k) as fractions, as the SPML code logs them.

    Per image: h = positives among its k most probable classes (all C if k > C); P = h / k (divisor k
    even when k > C), R = h / #positives, hit = [h > 0]; an image without positives scores 0 on all
    three and still counts in the mean over all N images.
    """
    probs, labels = _check(probs, labels, (0, 1), np.float64, "spml_topk")
    if k < 1:
        raise ValueError(f"spml_topk: need k >= 1, got {k}")
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]            # (N, min(k, C))
    hits = (np.take_along_axis(labels, order, axis=1) == 1).sum(axis=1)  # (N,)
    n_pos = (labels == 1).sum(axis=1)                                   # (N,)
    recall = np.where(n_pos > 0, hits / np.maximum(n_pos, 1), 0.0)      # (N,)
    return float(np.mean(hits / k)), float(np.mean(recall)), float(np.mean(hits > 0))


def spml_metrics(probs, labels):
    """SPML metrics in PERCENT: map, p@k, r@k, hit@k for k = 1, 3, 5, and f1@3, f1@5.

    f1@k is DERIVED (the SPML reference computes no F1): 2 P R / (P + R) of the image-averaged
    P@k and R@k; NaN when both are 0, like the NUS-WIDE F1.
    """
    out = {"map": 100.0 * float(spml_ap(probs, labels).mean())}
    for k in (1, 3, 5):
        p, r, hit = spml_topk(probs, labels, k)
        out.update({f"p@{k}": 100.0 * p, f"r@{k}": 100.0 * r, f"hit@{k}": 100.0 * hit})
        if k > 1:
            out[f"f1@{k}"] = 2 * p * r / (p + r) * 100.0 if p + r > 0 else float("nan")  # derived
    return out


if __name__ == "__main__":
    # Where the two conventions part: ranked labels + - + - - +, the first four tied, the last two tied.
    s = np.array([[0.9], [0.9], [0.9], [0.9], [0.1], [0.1]], dtype=np.float32)  # (N=6, C=1)
    y = np.array([[1], [-1], [1], [-1], [-1], [1]])                          # (6, 1)
    print("stable-order AP (NUS-WIDE):", nus_ap(s, y)[0], " tie-grouped AP (SPML):", spml_ap(s, y > 0)[0])
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 81)).astype(np.float32)               # (N, C)
    labels = np.where(rng.random((200, 81)) < 0.05, 1, -1)                   # (N, C)
    print("NUS-WIDE, random scores:", {k: round(v, 2) for k, v in nus_metrics(scores, labels).items()})
    probs = 1 / (1 + np.exp(-scores[:, :20]))                                # (N, 20)
    print("SPML, random probs:", {k: round(v, 2) for k, v in spml_metrics(probs, labels[:, :20] > 0).items()})
