"""The unseen labels of a zero-shot run in two groups: twins, which a seen label names in another word, and
novel, which no seen label names. ZSL is reported on the whole unseen set and on each group.

Why: a local branch trained on a seen label carries its alignment to an unseen one only through a near-identical
text embedding, so the two groups ask different things of it. NUS-WIDE's lists differ from the hardest case in
exactly this way: 30 of its 81 unseen labels are the singular or plural of one of its 925 seen labels (dog and
dogs, clouds and cloud, ...), which the plural rule below finds from the two label files alone.

A group's figures come from the ZSL pass itself (all U unseen labels scored together): its mAP is the mean AP
over the group's labels (so the whole set's mAP is the label-weighted mean of the two groups'), its top-k
precision, recall and F1 count the pass's top-k predictions that fall in the group (group_metrics).
"""
import numpy as np

from protocol.metrics import nus_ap

GROUPS = ("twins", "novel")


def plural_forms(name):
    """The exact singular and plural forms of an English label word: dog <-> dogs, bus <-> buses,
    city <-> cities (a regular -s, -es or -ies ending; NUS-WIDE's twins all take -s)."""
    forms = {name + "s", name + "es"}
    if name.endswith("y"):
        forms.add(name[:-1] + "ies")
    if name.endswith("ies"):
        forms.add(name[:-3] + "y")
    if name.endswith("es"):
        forms.add(name[:-2])
    if name.endswith("s"):
        forms.add(name[:-1])
    return forms - {name, ""}


def plural_twins(unseen, seen):
    """{unseen label: its seen twin} for the unseen labels whose exact singular or plural form is a seen
    label (the rule for NUS-WIDE, which lists no synonyms)."""
    seen = set(seen)
    twins = {}
    for name in unseen:
        matches = sorted(plural_forms(name) & seen)
        if matches:
            twins[name] = matches[0]
    return twins


def group_columns(unseen, twins):
    """{"twins": column indices, "novel": column indices} into the unseen labels' columns (ZSL score order),
    or {} when one group would be empty (then the whole set is the only group worth a row)."""
    is_twin = np.array([name in twins for name in unseen], dtype=bool)  # (U,)
    if is_twin.all() or not is_twin.any():
        return {}
    return {"twins": np.flatnonzero(is_twin), "novel": np.flatnonzero(~is_twin)}


def split_name(group):
    """The results key of a group's ZSL figures (beside "zsl" and "gzsl" in tables, log.jsonl and --json)."""
    return f"zsl_{group}"


def setting_name(split):
    """A results key as tables print it: zsl -> ZSL, zsl_twins -> ZSL twins, test -> TEST."""
    head, _, group = split.partition("_")
    return f"{head.upper()} {group}".strip()


def group_metrics(scores, labels, columns, ks=(3, 5)):
    """A group's figures in percent, from the ZSL pass's scores (N, U) and labels (N, U) (+1, -1, 0): the mean AP
    over the group's columns, and the pass's own top-k over all U labels counted on the group: P = its hits in
    the group / its predictions in the group, R = its hits in the group / the group's positives (so the two
    groups' hits and predictions add up to the whole set's)."""
    out = {"map": 100.0 * float(nus_ap(scores, labels)[columns].mean(dtype=np.float32))}
    in_group = np.zeros(scores.shape[1], dtype=bool)                        # (U,)
    in_group[columns] = True
    for k in ks:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]            # (N, k)
        picked = in_group[top]                                             # (N, k) predictions in the group
        hits = (np.take_along_axis(labels, top, axis=1) == 1) & picked      # (N, k)
        n_pos = (labels[:, columns] == 1).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            p, r = np.float32(hits.sum()) / np.float32(picked.sum()), np.float32(hits.sum()) / np.float32(n_pos)
            f1 = np.float32(2) * p * r / (p + r)
        out.update({f"p@{k}": 100.0 * float(p), f"r@{k}": 100.0 * float(r), f"f1@{k}": 100.0 * float(f1)})
    return out


def add_groups(results, branches, scores, labels, columns):
    """(results, branches) with each group's figures: in results {split: metrics} right after "zsl", in
    branches {split: {branch: metrics or None}} beside it. scores (N, U, 1 + B): the ZSL pass's fused score,
    then each of the B branches (NaN where a branch is off); labels (N, U)."""
    results, branches = dict(results), dict(branches or {})
    groups = {split_name(g): group_metrics(scores[..., 0], labels, cols) for g, cols in columns.items()}
    for name, cols in zip(groups, columns.values()):
        branches[name] = {b: None if m is None else group_metrics(scores[..., i], labels, cols)
                          for i, (b, m) in enumerate(branches.get("zsl", {}).items(), start=1)}
    keys = list(results)
    at = keys.index("zsl") + 1
    order = keys[:at] + list(groups) + keys[at:]
    return {k: results.get(k, groups.get(k)) for k in order}, branches


if __name__ == "__main__":
    import os
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "labels")
    read = lambda f: [w.strip() for w in open(os.path.join(here, f)) if w.strip()]  # noqa: E731
    unseen, seen = read("nuswide_81.txt"), read("nuswide_925.txt")
    twins = plural_twins(unseen, seen)
    print(f"NUS-WIDE: {len(twins)} of {len(unseen)} unseen labels have a seen twin:")
    print(", ".join(f"{u}/{s}" for u, s in twins.items()))
