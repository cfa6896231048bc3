"""Tagging that people use: per-class thresholds (support/thresholds.py, eval.py --calibrate, predict.py
--thresholds) and the HTML gallery (tools/gallery.py, predict.py --html).

Thresholds: each is its label's F1 maximiser (checked by hand and by brute force over every possible cut), the
fallback is the pooled maximiser, the figures do not depend on the order of the images, and a file fitted for
one label set is refused for another. Gallery: read back with the standard library's HTML parser (every picture
it references exists, every ranked label and mark is there) and drawn by headless Chromium (Debian's
`chromium`; skipped where it is not installed), which must draw every card's photo. The end-to-end tests use
test_predict's untrained run on a small toy world."""
import contextlib
import html.parser
import io
import json
import math
import os
import shutil
import subprocess
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from PIL import Image

import eval as evaluation
import predict
from support import thresholds
from tools import figure3, gallery
from test_predict import _setup, forward_scores, one_line_error


def brute_force_cut(scores, positive):
    """(tagged set, F1) of the best rule 'score >= t' over every t that can make a difference (each score, and
    one above them all), the highest t winning ties: written from the definition of F1, nothing shared."""
    best = (frozenset(), 0.0, math.inf)
    for t in sorted(set(scores.tolist()), reverse=True):
        tagged = frozenset(np.flatnonzero(scores >= t).tolist())
        tp = sum(1 for i in tagged if positive[i])
        f1 = 2 * tp / (len(tagged) + positive.sum())
        if f1 > best[1] + 1e-12:
            best = (tagged, f1, t)
    return best[0], best[1]


def test_hand_case():
    # tagging the top 1, 2, 3, 4, 5 of five images (positives 1st and 3rd): F1 = 2/3, 1/2, 4/5, 2/3, 4/7
    scores, positive = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0], bool)
    t, f1 = thresholds.best_cut(scores, positive)
    assert t == pytest.approx(0.65) and f1 == pytest.approx(0.8)  # the midpoint between 0.7 and 0.6
    # tied scores are tagged together: with 0.8 tied to 0.7, the top 3 is a block and top 2 cannot be chosen
    t, f1 = thresholds.best_cut(np.array([0.9, 0.7, 0.7, 0.6, 0.5]), np.array([1, 0, 0, 0, 1], bool))
    assert t == pytest.approx(0.8) and f1 == pytest.approx(2 / 3)  # top 1: 2 * 1 / (1 + 2); top 5: 4/7
    assert thresholds.best_cut(scores, np.zeros(5, bool))[0] == math.inf  # no positive: tag nothing


@pytest.mark.parametrize("seed", range(20))
def test_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    scores = np.round(rng.normal(size=n), 1)  # rounded: many ties
    positive = rng.random(n) < rng.uniform(0.05, 0.7)
    positive[0] |= not positive.any()
    want_set, want_f1 = brute_force_cut(scores, positive)
    t, f1 = thresholds.best_cut(scores, positive)
    assert frozenset(np.flatnonzero(scores >= t).tolist()) == want_set and f1 == pytest.approx(want_f1)
    assert thresholds.f1_at(scores, positive, t) == pytest.approx(want_f1)


def toy_fit_case(rng, n=60, c=6):
    scores = rng.normal(size=(n, c)).astype(np.float32)  # (N, C)
    truth = rng.random((n, c)) < 0.3  # (N, C)
    truth[:, 4] = False
    truth[:2, 4] = True  # two positives: below MIN_POSITIVES
    calibrated = np.array([True, True, True, True, True, False])  # the last has no ground truth (an unseen label)
    scores[truth] += 1.0
    return scores, truth, calibrated


def test_fit_per_class_and_fallback():
    scores, truth, calibrated = toy_fit_case(np.random.default_rng(0))
    fitted = thresholds.fit(scores, truth, calibrated)
    pooled_set, pooled_f1 = brute_force_cut(scores[:, :5].ravel().astype(np.float64), truth[:, :5].ravel())
    g = fitted["global_threshold"]
    assert frozenset(np.flatnonzero(scores[:, :5].ravel() >= g).tolist()) == pooled_set
    assert fitted["global_f1"] == pytest.approx(pooled_f1)
    assert fitted["source"] == ["class"] * 4 + ["global"] * 2 and fitted["positives"][4] == 2
    for k in range(4):
        want_set, want_f1 = brute_force_cut(scores[:, k].astype(np.float64), truth[:, k])
        assert frozenset(np.flatnonzero(scores[:, k] >= fitted["threshold"][k]).tolist()) == want_set
        assert fitted["f1"][k] == pytest.approx(want_f1)
    assert fitted["threshold"][4] == fitted["threshold"][5] == g and math.isnan(fitted["f1"][5])


def test_reordering_the_images_changes_nothing():
    scores, truth, calibrated = toy_fit_case(np.random.default_rng(1))
    scores = np.round(scores, 1)  # ties across images, the case where an order could leak in
    a = thresholds.fit(scores, truth, calibrated)
    order = np.random.default_rng(2).permutation(len(scores))
    b = thresholds.fit(scores[order], truth[order], calibrated)
    assert a["source"] == b["source"] and a["global_threshold"] == b["global_threshold"]
    np.testing.assert_array_equal(a["threshold"], b["threshold"])
    np.testing.assert_array_equal(a["f1"], b["f1"])
    assert thresholds.tag_metrics(scores, truth, a["threshold"]) == thresholds.tag_metrics(
        scores[order], truth[order], a["threshold"])


def test_tag_metrics_hand_case():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.3]])
    truth = np.array([[1, 0], [1, 1], [0, 0]], bool)
    m = thresholds.tag_metrics(scores, truth, np.array([0.25, 0.5]))
    # tagged: (0, a), (1, b), (2, a): TP 2 of 3 tagged, 2 of 3 positives; image 2 gets a tag, none is untagged
    assert (m["p"], m["r"], m["f1"]) == pytest.approx((200 / 3, 200 / 3, 200 / 3))
    assert m["tags/image"] == pytest.approx(1.0) and m["untagged %"] == 0.0


def test_file_checks_the_label_set(tmp_path):
    names = ["cat", "dog", "lake"]
    fitted = thresholds.fit(np.array([[0.5, 0.1, 0.2], [0.1, 0.4, 0.3]]), np.eye(2, 3, dtype=bool),
                            np.ones(3, bool), min_positives=1)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(thresholds.record(names, fitted, {"path": "x", "sha256": "0", "epoch": 0},
                                                 {"about": "test"}, min_positives=1)))
    cut, _ = thresholds.for_labels(str(path), ["lake", "cat", "dog"])  # the same set in another order
    np.testing.assert_array_equal(cut, fitted["threshold"][[2, 0, 1]])
    for other in (["cat", "dog"], ["cat", "dog", "lake", "sky"], ["cat", "dog", "pond"]):
        with pytest.raises(thresholds.UsageError, match="another label set"):
            thresholds.for_labels(str(path), other)
    rec = json.loads(path.read_text())
    rec["labels"][0]["name"] = "kitten"  # edited by hand: no longer the set its sha256 names
    path.write_text(json.dumps(rec))
    with pytest.raises(thresholds.UsageError, match="labels_sha256"):
        thresholds.read(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("thresholds")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGRL_CACHE", str(d / "cache"))
        yield from _setup(d)


def test_calibrate_then_tag(setup, tmp_path, capsys):
    out, ckpt = tmp_path / "thr.json", str(setup["ckpt"])
    assert evaluation.main(["--ckpt", ckpt, "--calibrate", str(out), "--json", str(tmp_path / "m.json"),
                            "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"written to {out}" in printed and "| GZSL, all" in printed and f"written to {tmp_path / 'm.json'}" in printed
    rec = json.loads(out.read_text())
    names, data = setup["names"], setup["data"]
    assert [e["name"] for e in rec["labels"]] == names and rec["labels_sha256"] == thresholds.label_sha256(names)
    assert rec["split"]["images"] == len(data.train_paths) and rec["checkpoint"]["epoch"] == 0
    n_seen = len(data.seen)
    assert all(e["source"] == "global" for e in rec["labels"][n_seen:])  # unseen: no ground truth on train
    # the seen labels' thresholds are the brute-force maximisers on the training images' scores
    train_scores = forward_scores_all(setup, data.train_paths)
    pooled = train_scores[:, :n_seen].ravel().astype(np.float64)
    want_set, want_f1 = brute_force_cut(pooled, (data.train_labels == 1).ravel())
    assert frozenset(np.flatnonzero(pooled >= rec["global_threshold"]).tolist()) == want_set
    for k, e in enumerate(rec["labels"][:n_seen]):
        if e["source"] == "class":
            want_set, want_f1 = brute_force_cut(train_scores[:, k].astype(np.float64), data.train_labels[:, k] == 1)
            assert frozenset(np.flatnonzero(train_scores[:, k] >= e["threshold"]).tolist()) == want_set
    m = json.loads((tmp_path / "m.json").read_text())["thresholds"]
    test_scores = forward_scores_all(setup, data.test_paths)
    cut = np.array([e["threshold"] for e in rec["labels"]])
    want = thresholds.tag_metrics(test_scores, data.test_labels == 1, cut)
    assert m[f"GZSL, all {len(names)} labels"]["f1"] == pytest.approx(want["f1"], abs=1e-3, nan_ok=True)

    # predict.py tags with them: every label at or above its own threshold, nothing else
    assert predict.main(["--ckpt", ckpt, str(setup["photos"]), "--thresholds", str(out), "--json",
                         str(tmp_path / "t.json"), "--workers", "0"]) == 0
    assert f"written to {tmp_path / 't.json'}" in capsys.readouterr().err
    table = dict(zip(names, cut))
    for row in json.loads((tmp_path / "t.json").read_text()):
        scores = forward_scores_all(setup, [row["image"]])[0]
        want = {n for n, s in zip(names, scores) if s >= table[n]}
        assert {n for n, _ in row["labels"]} == want

    # another label set, a bad file, and --threshold beside --thresholds: one line each, exit 2
    code = predict.main(["--ckpt", ckpt, str(setup["photos"]), "--thresholds", str(out), "--labels", "cat,dog",
                         "--workers", "0"])
    one_line_error(capsys, code, "another label set", str(out))
    (tmp_path / "bad.json").write_text("{}")
    one_line_error(capsys, predict.main(["--ckpt", ckpt, str(setup["photos"]), "--thresholds",
                                         str(tmp_path / "bad.json")]), "bad.json", "not a thresholds file")
    one_line_error(capsys, predict.main(["--ckpt", ckpt, str(setup["photos"]), "--thresholds", str(out),
                                         "--threshold", "0.1"]), "not both")
    one_line_error(capsys, evaluation.main(["--ckpt", ckpt, "--thresholds", str(tmp_path / "none.json")]),
                   "none.json", "no such file")


def forward_scores_all(setup, paths):
    H = torch.load(setup["ckpt"], weights_only=True)["label_emb"]
    return forward_scores(setup["model"], paths, H)


# ----------------------------------------------------------------------------- the gallery
class Page(html.parser.HTMLParser):
    """The parts of index.html the tests check: every src, and per card its text, its name (<h2>), its struck
    labels (<s>) and the [class, label name] of each <li>."""
    def __init__(self):
        super().__init__()
        self.srcs, self.cards, self.body = [], [], {}
        self.in_card = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if tag == "section" and "card" in attrs.get("class", "").split():
            self.cards.append({"text": "", "li": [], "struck": []})
        if self.cards and tag == "li":
            self.cards[-1]["li"].append([attrs.get("class", ""), ""])
        self.tag = tag

    def handle_endtag(self, tag):
        self.tag = None

    def handle_data(self, data):
        if self.cards:
            self.cards[-1]["text"] += data
            if self.tag == "span" and self.cards[-1]["li"] and not self.cards[-1]["li"][-1][1]:
                self.cards[-1]["li"][-1][1] = data  # the first span of an <li> is the label's name
            if self.tag == "s":
                self.cards[-1]["struck"].append(data)
            if self.tag == "h2":
                self.cards[-1]["name"] = data


def read_page(index):
    page = Page()
    page.feed(open(index, encoding="utf-8").read())
    return page


@pytest.fixture(scope="module")
def folder_gallery(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert predict.main(["--ckpt", str(setup["ckpt"]), str(setup["photos"]), "--html", str(out), "--top-k",
                             "3", "--workers", "0"]) == 0
    assert f"written to {out / 'index.html'}" in err.getvalue()
    return out


def test_gallery_of_a_folder(setup, folder_gallery):
    out = folder_gallery
    page = read_page(out / "index.html")
    assert page.srcs and all((out / unquote(src)).is_file() for src in page.srcs)  # every picture is there
    assert not any(src.startswith(("http:", "https:", "//", "/")) for src in page.srcs)  # nothing from outside
    assert len(page.cards) == len(setup["created"]) == 6
    images = sorted(setup["created"], key=lambda r: (os.path.dirname(r), os.path.basename(r)))  # the walk order
    names = setup["names"]
    scores = forward_scores_all(setup, [str(setup["photos"] / r) for r in images])
    for card, row in zip(page.cards, scores):
        top = [names[c] for c in np.argsort(-row, kind="stable")[:gallery.RANKED]]
        assert [name for _, name in card["li"]] == top  # every ranked label, best first
        assert [("tagged" in cls.split()) for cls, _ in card["li"]] == [True] * 3 + [False] * (len(top) - 3)
        assert "explain maps" in card["text"]  # the toy run has a local branch
    assert sum("explain/" in src for src in page.srcs) == 6


def test_gallery_marks_right_and_wrong(tmp_path, monkeypatch):
    """Known case: truth {cat, dog, sky}, tagged {dog, car}: dog right, car wrong, cat and sky struck."""
    Image.new("RGB", (40, 30), (10, 120, 40)).save(tmp_path / "x.png")
    index = gallery.write(str(tmp_path / "g"), "title <&>", ["a note"], [str(tmp_path / "x.png")],
                          ["cat", "dog", "car", "sky"], np.array([[0.1, 0.4, 0.3, 0.2]]), [{"dog", "car"}],
                          [{"cat", "dog", "sky"}])
    page = read_page(index)
    (card,) = page.cards
    assert card["li"] == [["tagged right", "dog"], ["tagged wrong", "car"], ["ranked", "sky"], ["ranked", "cat"]]
    assert card["struck"] == ["cat", "sky"]
    monkeypatch.setattr(gallery, "RANKED", 1)  # the top label, and every tag however low it ranks
    index2 = gallery.write(str(tmp_path / "g2"), "t", [], [str(tmp_path / "x.png")], ["cat", "dog", "car", "sky"],
                           np.array([[0.1, 0.4, 0.3, 0.2]]), [{"cat"}], None)
    assert read_page(index2).cards[0]["li"] == [["ranked", "dog"], ["tagged", "cat"]]
    text = open(index, encoding="utf-8").read()
    assert "title &lt;&amp;&gt;" in text and "title <&>" not in text  # text is escaped
    assert Image.open(tmp_path / "g" / "images" / "0000.png").size == (40, 30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_gallery_in_a_browser(folder_gallery, tmp_path):
    """Chromium loads the page from disk, runs its one script after every photo has loaded, and draws it."""
    url = (folder_gallery / "index.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    page = Page()
    page.feed(dom)
    assert page.body.get("data-photos-drawn") == "6" and len(page.cards) == 6, dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1000,800", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape == (800, 1000, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # photos and text, not a blank page


def test_figure_gallery_marks_against_the_test_labels(setup, tmp_path):
    out = tmp_path / "fig"
    assert figure3.main(["--ckpt", str(setup["ckpt"]), "--out", str(tmp_path / "f.png"), "--n", "3",
                         "--html", str(out), "--workers", "0"]) == 0
    page, data = read_page(out / "index.html"), setup["data"]
    unseen = list(data.unseen)  # the figure scores the unseen labels alone (the ZSL pass)
    truth = {os.path.basename(p): {unseen[c] for c in np.flatnonzero(y[len(data.seen):] == 1)}
             for p, y in zip(data.test_paths, data.test_labels)}
    assert len(page.cards) == 3 and all((out / unquote(src)).is_file() for src in page.srcs)
    for card in page.cards:
        known = truth[card["name"]]
        tagged = [(cls.split(), name) for cls, name in card["li"] if "tagged" in cls.split()]
        assert len(tagged) == 3 and all(("right" in cls) == (name in known) for cls, name in tagged)
        assert set(card["struck"]) == known - {name for _, name in tagged}
