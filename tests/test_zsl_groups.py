"""ZSL by group (protocol/zsl_groups.py): NUS-WIDE's twin group from its label files, pinned to the 30 labels
listed by hand from labels/nuswide_81.txt and labels/nuswide_925.txt; the toy world's from its definition; and a
group's figures, checked against the per-class APs computed here."""
import os

import numpy as np

from protocol import zsl_groups
from protocol.metrics import nus_metrics
from support import runs, tables, tasks
from toy import world as toyworld

LABELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "labels")
# (unseen, seen) pairs, read off the two label files by eye
NUS_TWINS = [("animal", "animals"), ("bear", "bears"), ("birds", "bird"), ("boats", "boat"), ("bridge", "bridges"),
             ("buildings", "building"), ("cars", "car"), ("cat", "cats"), ("clouds", "cloud"), ("cow", "cows"),
             ("dog", "dogs"), ("flags", "flag"), ("flowers", "flower"), ("garden", "gardens"), ("horses", "horse"),
             ("house", "houses"), ("lake", "lakes"), ("map", "maps"), ("mountain", "mountains"),
             ("plants", "plant"), ("reflection", "reflections"), ("rocks", "rock"), ("sign", "signs"),
             ("sports", "sport"), ("street", "streets"), ("toy", "toys"), ("tree", "trees"), ("valley", "valleys"),
             ("waterfall", "waterfalls"), ("window", "windows")]


def names(fname):
    with open(os.path.join(LABELS, fname), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def test_nuswide_twins_are_the_thirty_listed():
    unseen, seen = names("nuswide_81.txt"), names("nuswide_925.txt")
    twins = zsl_groups.plural_twins(unseen, seen)
    assert sorted(twins.items()) == NUS_TWINS
    cols = zsl_groups.group_columns(unseen, twins)
    assert [unseen[i] for i in cols["twins"]] == sorted(u for u, _ in NUS_TWINS)  # (the list is alphabetical)
    assert len(cols["novel"]) == 51 and "plane" in [unseen[i] for i in cols["novel"]]  # airplane: not a plural


def test_plural_forms():
    assert zsl_groups.plural_forms("dog") >= {"dogs"} and "dog" in zsl_groups.plural_forms("dogs")
    assert "city" in zsl_groups.plural_forms("cities") and "buses" in zsl_groups.plural_forms("bus")
    assert zsl_groups.plural_twins(["glass", "cat", "sky"], ["glasses", "dog", "skies"]) == \
        {"glass": "glasses", "sky": "skies"}


def test_no_groups_when_one_is_empty():
    assert zsl_groups.group_columns(["a", "b"], {}) == {}
    assert zsl_groups.group_columns(["a", "b"], {"a": "x", "b": "y"}) == {}


def test_toy_world_groups_are_its_definition(tmp_path):
    cfg = runs.parse_args(["--data-root", str(tmp_path)])  # the default: ZSL on the toy world
    data = type("Data", (), {"seen": toyworld.SEEN, "unseen": toyworld.UNSEEN})()
    cols = tasks.zsl_group_columns(cfg, data)
    assert sorted(toyworld.UNSEEN[i] for i in cols["twins"]) == ["auto", "mug", "mushrooms"]
    assert sorted(toyworld.UNSEEN[i] for i in cols["novel"]) == sorted(toyworld.NOVEL)
    # read as NUS-WIDE (no synonyms listed), only the plural twin is found
    nus = runs.parse_args(["--data", "nuswide", "--data-root", str(tmp_path)])
    assert [toyworld.UNSEEN[i] for i in tasks.zsl_group_columns(nus, data)["twins"]] == ["mushrooms"]


def average_precision(score, truth):
    """AP of one class, written out: the mean over positives of the precision at each positive's rank."""
    order = np.argsort(-score, kind="stable")
    hits = truth[order] > 0
    if not hits.any():
        return 0.0
    return float(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))


def test_group_figures_split_the_whole_sets():
    rng = np.random.default_rng(0)
    N, U = 60, 6
    scores = rng.normal(size=(N, U, 3)).astype(np.float32)                 # (N, U, fused/local/global)
    labels = np.where(rng.uniform(size=(N, U)) < 0.3, 1, -1).astype(np.int8)  # (N, U)
    whole = {"zsl": nus_metrics(scores[..., 0], labels), "gzsl": {"map": 1.0}}
    branches = {"zsl": {"local": None, "global": nus_metrics(scores[..., 2], labels)}, "gzsl": {}}
    cols = zsl_groups.group_columns(list("abcdef"), {"b": "x", "e": "y"})
    results, per_branch = zsl_groups.add_groups(whole, branches, scores, labels, cols)
    assert list(results) == ["zsl", "zsl_twins", "zsl_novel", "gzsl"] and per_branch["zsl_twins"]["local"] is None
    aps = [average_precision(scores[:, c, 0], labels[:, c]) for c in range(U)]
    np.testing.assert_allclose(results["zsl_twins"]["map"], 100 * np.mean([aps[1], aps[4]]), atol=1e-3)
    np.testing.assert_allclose(results["zsl_novel"]["map"], 100 * np.mean([aps[i] for i in (0, 2, 3, 5)]), atol=1e-3)
    global_aps = [average_precision(scores[:, c, 2], labels[:, c]) for c in (1, 4)]
    np.testing.assert_allclose(per_branch["zsl_twins"]["global"]["map"], 100 * np.mean(global_aps), atol=1e-3)
    for k in (3, 5):  # each image's top-k over all 6 labels, counted by hand in each group
        top = [np.argsort(-row)[:k] for row in scores[..., 0]]
        for group, members in (("zsl_twins", {1, 4}), ("zsl_novel", {0, 2, 3, 5})):
            picked = sum(int(c in members) for t in top for c in t)
            hits = sum(int(c in members and labels[i, c] == 1) for i, t in enumerate(top) for c in t)
            positives = sum(int(labels[i, c] == 1) for i in range(N) for c in members)
            np.testing.assert_allclose(results[group][f"p@{k}"], 100 * hits / picked, atol=1e-3)
            np.testing.assert_allclose(results[group][f"r@{k}"], 100 * hits / positives, atol=1e-3)
        hits = sum(results[g][f"p@{k}"] / 100 * sum(int(c in m) for t in top for c in t)
                   for g, m in (("zsl_twins", {1, 4}), ("zsl_novel", {0, 2, 3, 5})))
        np.testing.assert_allclose(hits / (N * k), results["zsl"][f"p@{k}"] / 100, atol=1e-5)  # they add up


def test_tables_print_the_groups():
    m = {"map": 50.0, "p@3": 1.0, "r@3": 2.0, "f1@3": 3.0, "p@5": 4.0, "r@5": 5.0, "f1@5": 6.0}
    results = {"zsl": m, "zsl_twins": dict(m, map=60.0), "zsl_novel": dict(m, map=40.0), "gzsl": m,
               "branch_map": {s: {"local": 1.0, "global": 2.0} for s in ("zsl", "zsl_twins", "zsl_novel", "gzsl")}}
    table = tables.format_table(results)
    assert "| ZSL twins | 60.00 |" in table and "| ZSL novel | 40.00 |" in table
    printed = tables.format_comparison({"zero-shot CLIP": {"zsl": m, "gzsl": m}, "SigRL": results})
    lines = printed.splitlines()
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    assert cells(lines[0]) == ["method", "ZSL mAP", "F1@3", "twins mAP", "F1@3", "novel mAP", "F1@3", "GZSL mAP",
                               "F1@3"]  # the README's order: each setting's mAP and F1@3, the groups beside ZSL
    rows = {cells(line)[0]: cells(line)[1:] for line in lines[2:] if line.startswith("|")}
    assert rows["SigRL"] == ["50.00", "3.00", "60.00", "3.00", "40.00", "3.00", "50.00", "3.00"]
    assert rows["zero-shot CLIP"] == ["50.00", "3.00", "-", "-", "-", "-", "50.00", "3.00"]
    assert rows["SigRL, local"] == ["1.00"] * 4 and rows["SigRL, global"] == ["2.00"] * 4
    assert not any("zero-shot CLIP, " in line for line in lines)  # a row without branches has no branch rows
    assert max(map(len, lines)) <= 100  # it fits a 100-column terminal


def test_plot_draws_the_groups_apart(tmp_path, capsys):
    """The training curves leave the groups out; --zsl-groups draws them, one panel per score."""
    import json
    from support import curves as plot
    groups = ("zsl", "zsl_twins", "zsl_novel", "gzsl")
    records = [{"epoch": e, "loss": {"local": 1.0} if e else {}, **{s: {"map": 50.0 + e + i} for i, s in
                                                                    enumerate(groups)},
                "branch_map": {s: {"local": 30.0 + e, "global": 60.0 + i} for i, s in enumerate(groups)}}
               for e in range(3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, maps = plot.series(records)
    assert set(maps) == {"ZSL", "GZSL", "ZSL local (dashed)", "ZSL global (dashed)", "GZSL local (dashed)",
                         "GZSL global (dashed)"}
    panels = plot.group_series(records)
    assert list(panels) == ["fused", "local", "global"] and list(panels["local"]) == \
        ["ZSL", "ZSL twins", "ZSL novel", "GZSL"]
    assert panels["fused"]["ZSL twins"] == [(0, 51.0), (1, 52.0), (2, 53.0)]
    assert plot.main([str(tmp_path), "--zsl-groups"]) == 0 and (tmp_path / "zsl_groups.png").is_file()
    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 0, "zsl": {"map": 1.0}}) + "\n")
    assert plot.main([str(tmp_path), "--zsl-groups"]) == 2 and "no ZSL groups" in capsys.readouterr().err
