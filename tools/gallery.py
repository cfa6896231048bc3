"""A static HTML gallery of tagged images: OUT_DIR/index.html with its pictures beside it, nothing from outside.

    python predict.py --ckpt RUN/last.pt photos/ --html OUT_DIR [--thresholds THRESHOLDS.json]
    python predict.py                                  # the offline demo also writes runs/zsl-toy/gallery/

One card per image: the image as data.read_image gives the model its pixels (upright by its EXIF orientation,
16-bit greyscale scaled, CMYK and palette converted), its best-ranked labels with a bar for each score, the
labels it is tagged with (the top-k, those above --threshold, or above their own --thresholds) in bold, and,
where the checkpoint has a local branch, its explain picture (predict.py --explain) folded under a <details>.
Where ground truth is known (the demo's toy-world test images) the tags are marked as in the paper's Fig. 3:
blue when right, red when wrong, and the ground-truth labels that were not tagged are listed struck through.

The bars are scaled to the page's range of shown scores, not to [0, 1]: SigRL's scores are the reference
code's normalised ones (the paper's Eq. 13 adds raw scores; the code divides each branch by its norm over the
labels, then averages), of the order of 1 / sqrt(C) for C labels, not probabilities. The page's one inline script counts the photos
the browser has drawn into <body data-photos-drawn>, which the browser test reads.
"""
import html
import os
import sys
from urllib.parse import quote

import numpy as np
from PIL import Image

from data import read_image
from support.paths import FOLDER, inner_folder
from support.safe_io import atomic_write
from tools import explain as explain_maps

RANKED = 8  # labels listed per card at least, and every tag (a label's own threshold can tag a low score)
THUMB = 320  # longest side of a card's picture, in pixels; smaller images are enlarged by the browser

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } p.note { color: #555; margin: .2em 0; max-width: 70em; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; margin-top: 1em; }
section.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .7em; }
section.card h2 { font-size: .95em; margin: .4em 0; word-break: break-all; }
img.photo { width: 100%; max-width: 320px; image-rendering: pixelated; display: block; margin: auto; }
ol { list-style: none; padding: 0; margin: .3em 0; font-size: .9em; }
li { display: grid; grid-template-columns: 9em 1fr 4.5em; gap: .4em; align-items: center; padding: 1px 0; }
li .bar { background: #eee; height: .8em; border-radius: 2px; }
li .bar span { display: block; height: 100%; background: #999; border-radius: 2px; }
li.tagged { font-weight: bold; } li.tagged .bar span { background: #555; }
li.right { color: rgb(20, 80, 200); } li.right .bar span { background: rgb(20, 80, 200); }
li.wrong { color: rgb(200, 30, 30); } li.wrong .bar span { background: rgb(200, 30, 30); }
li .score { text-align: right; font-variant-numeric: tabular-nums; }
p.missed { font-size: .9em; margin: .3em 0; } p.missed s { margin-right: .5em; }
details summary { cursor: pointer; font-size: .9em; color: #555; } details img { width: 100%; margin-top: .4em; }
"""

SCRIPT = """
window.addEventListener("load", () => {
  const drawn = [...document.querySelectorAll("img.photo")].filter(im => im.complete && im.naturalWidth > 0
    && im.getBoundingClientRect().width > 0);
  document.body.dataset.photosDrawn = drawn.length;
});
"""


def picture_name(i):
    """images/NNNN.png: numbered, so any image file name makes a safe link."""
    return os.path.join("images", f"{i:04d}.png")


def outputs(flag, out_dir, n):
    """Every path write() puts in OUT_DIR for n images, as support/paths.check_outputs takes them: the folder,
    index.html and images/0000.png .. , so none of them may be an input or another output of the command."""
    return ([(flag, out_dir, FOLDER), (flag, os.path.join(out_dir, "index.html"))]
            + [(flag, os.path.join(out_dir, picture_name(i))) for i in range(n)])


def card(i, image_src, name, ranked, tagged, truth, explain_src, lo, hi):
    """One image's <section>: ranked [(label, score)] best first, tagged a set of labels, truth a set or None."""
    rows = []
    for label, score in ranked:
        kind = ["tagged"] if label in tagged else []
        if truth is not None and label in tagged:
            kind.append("right" if label in truth else "wrong")
        width = 100 * (score - lo) / (hi - lo) if hi > lo else 100
        rows.append(f'<li class="{" ".join(kind) or "ranked"}"><span class="name">{html.escape(label)}</span>'
                    f'<span class="bar"><span style="width:{max(width, 2):.1f}%"></span></span>'
                    f'<span class="score">{score:.4f}</span></li>')
    parts = [f'<section class="card" id="card-{i}">',
             f'<img class="photo" src="{quote(image_src)}" alt="{html.escape(name)}">',
             f"<h2>{html.escape(name)}</h2>", "<ol>", *rows, "</ol>"]
    if truth is not None:
        missed = [label for label in sorted(truth) if label not in tagged]
        parts.append('<p class="missed">ground truth not tagged: ' + (
            "".join(f"<s>{html.escape(label)}</s>" for label in missed) or "none") + "</p>")
    if explain_src:
        parts.append(f'<details><summary>where the local score comes from (explain maps)</summary>'
                     f'<img src="{quote(explain_src)}" alt="explain maps of {html.escape(name)}"></details>')
    return "\n".join(parts + ["</section>"])


def write(out_dir, title, notes, images, names, scores, tagged, truth=None, explain=None):
    """OUT_DIR/index.html and OUT_DIR/images/*.png. scores (N, C) against `names`; per image (lists in the
    order of `images`): its tagged labels (a set), its ground truth (a set; truth=None when unknown) and its
    explain PNG (inside out_dir; explain=None without). Returns the path of index.html."""
    os.makedirs(out_dir, exist_ok=True)
    inner_folder(out_dir, "images")  # never through a link that leads out of out_dir
    ranked = []
    for row, tags in zip(scores, tagged):
        order = np.argsort(-row, kind="stable")  # best first: the top RANKED, and every tag however low
        ranked.append([(names[c], float(row[c])) for r, c in enumerate(order) if r < RANKED or names[c] in tags])
    shown = [s for r in ranked for _, s in r]
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
    cards = []
    for i, path in enumerate(images):
        src = picture_name(i)
        picture = read_image(path)  # the reader the model's input comes from: upright, 16-bit scaled, CMYK, palette
        picture.thumbnail((THUMB, THUMB))
        atomic_write(os.path.join(out_dir, src), lambda f, p=picture: p.save(f, format="PNG"))
        explain_src = os.path.relpath(explain[i], out_dir) if explain else None
        cards.append(card(i, src, os.path.basename(path), ranked[i], tagged[i],
                          None if truth is None else truth[i], explain_src, lo, hi))
    legend = "bold: tagged" + ("; blue: tagged and right, red: tagged and wrong, struck through: ground truth "
                               "not tagged (as in the paper's Fig. 3)" if truth is not None else "")
    page = "\n".join(["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{html.escape(title)}</title><style>{STYLE}</style>",
                      f"<script>{SCRIPT}</script></head><body>", f"<h1>{html.escape(title)}</h1>",
                      *[f'<p class="note">{html.escape(n)}</p>' for n in notes + [legend]],
                      "<main>", *cards, "</main>", "</body></html>", ""])
    index = os.path.join(out_dir, "index.html")
    atomic_write(index, lambda f: f.write(page.encode("utf-8")))
    return index



def write_tagged(args, tagger, paths, scores, picks, known, device, written=None):
    """predict.py --html OUT_DIR: the page of its tags (`write`), with explain maps when the model has a local branch, in
    OUT_DIR/explain/: those --explain has just drawn (`written`) are copied there, not computed again."""
    maps = None
    if tagger.model is not None and not tagger.model.config.global_only:
        os.makedirs(args.html, exist_ok=True)
        folder = inner_folder(args.html, "explain")  # never through a link that leads out of OUT_DIR
        if written is None:
            maps = explain_maps.explain(tagger, paths, picks, folder, device)
        else:
            maps = explain_maps.explain_targets(paths, folder)
            for source, target in zip(written, maps):
                if os.path.realpath(source) == os.path.realpath(target):  # --explain OUT_DIR/explain
                    continue
                with open(source, "rb") as f:
                    png = f.read()
                atomic_write(target, lambda f, png=png: f.write(png))
    rule = (f"each label at or above its own threshold ({args.thresholds})" if args.thresholds else
            f"labels scoring at least {args.threshold}" if args.threshold is not None else f"the top {args.top_k}")
    notes = [f"{len(paths)} images, {len(tagger.names)} labels; tagged: {rule}. Scores are normalised over this "
             f"label list per image (the reference code's step; the paper's Eq. 13 adds raw scores): compare them "
             f"within this page."]
    index = write(args.html, tagger.kind, notes, paths, tagger.names, scores,
                          [{n for n, _ in p} for p in picks], known, maps)
    print(f"gallery: {len(paths)} images written to {index}", file=sys.stderr)


def main(argv=None):
    """A page of three made-up images: python -m tools.gallery [OUT_DIR] (default: a new temporary folder)."""
    import argparse
    import tempfile
    from support import cli
    from support.paths import FOLDER, check_outputs

    @cli.command
    def run(argv):
        p = cli.parser(prog="python -m tools.gallery", description=__doc__.split("\n\n")[0] + "\n\nWith OUT_DIR "
                       "(default: a new temporary folder): a page of three made-up images, to see one.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("out", nargs="?", metavar="OUT_DIR", help="where the page and its pictures are written")
        out = p.parse_args(argv).out
        if out is not None:
            check_outputs([("OUT_DIR", out, FOLDER)], [])
        out = out or tempfile.mkdtemp(prefix="gallery-")
        names, paths = ["red", "green", "blue", "dark"], []
        os.makedirs(out, exist_ok=True)
        for i, colour in enumerate([(220, 30, 30), (30, 180, 60), (20, 20, 90)]):
            paths.append(os.path.join(out, f"made-up-{i}.png"))
            Image.new("RGB", (64, 64), colour).save(paths[-1])
        scores = np.array([[0.5, 0.1, 0.0, 0.2], [0.1, 0.45, 0.2, 0.3], [0.0, 0.1, 0.4, 0.42]])  # (3, 4)
        tagged = [{names[c] for c in np.flatnonzero(row >= 0.3)} for row in scores]
        print("written to", write(out, "three made-up images", ["scores >= 0.3 are tagged"], paths, names, scores,
                                  tagged, [{"red"}, {"green"}, {"blue", "dark"}]))
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
