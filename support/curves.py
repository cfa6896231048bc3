"""Training curves of a run, from its RUN_DIR/log.jsonl: each loss term and each split's mAP per epoch, one PNG.

    python -m tools.plot runs/zsl-toy                 # -> runs/zsl-toy/curves.png (train.py also writes it)
    python -m tools.plot RUN_DIR --out curves.png
    python -m tools.plot RUN_DIR --zsl-groups --out zsl_groups.png    # ZSL by group, each branch

One panel per loss term, averaged over each epoch's steps (ZSL: "local", the ranking loss on the fused score,
Eq. 15, and "global", the L1 distillation of the class token, Eq. 16; SPML: the chosen loss); then the
mAP of every evaluated setting (ZSL and GZSL, or SPML val and test), in percent, and, where the log holds
them, the mAP of the local and global scores alone (dashed). With --zsl-groups: one panel per score (fused,
local branch, global branch), each with the ZSL mAP of the whole unseen set, of its twins and of its novel
labels (protocol/zsl_groups.py), and GZSL for reference. Drawn with Pillow only.
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw

from protocol import zsl_groups
from support import draw
from support import cli
from support.paths import check_outputs
from support.errors import UsageError

# distinct, colour-blind-safe enough line colours (the first of the usual "tab10" palette)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 36  # margins around the plotting area, pixels


def read_log(run_dir):
    """The log's records, one per epoch (a resumed run may have written an epoch twice: the last one wins)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file (expected the log.jsonl that train.py writes in its run folder)")
    by_epoch = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read as a UTF-8 text file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
            series([record])  # every figure a number, every group a dict: drawing it cannot fail later
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: nested too deep
            raise UsageError(f"{path}:{n}: not a train.py log record (JSON with an 'epoch', numeric losses "
                             f"and figures)") from None
    if not by_epoch:
        raise UsageError(f"{path}: empty (no epoch has finished yet)")
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(records):
    """(losses, maps): {name: [(epoch, value), ...]} for the two panels; names ending in ' (dashed)' are the
    per-branch figures."""
    losses, maps = {}, {}

    def add(where, name, epoch, value):  # a branch without a figure (None) or a NaN figure is not drawn
        points = where.setdefault(name, [])
        if value is not None and math.isfinite(float(value)):
            points.append((int(epoch), float(value)))

    for r in records:
        for term, value in (r.get("loss") or {}).items():
            add(losses, term, r["epoch"], value)
        for split, m in r.items():
            if isinstance(m, dict) and "map" in m and not split.startswith("zsl_"):  # groups: --zsl-groups
                add(maps, split.upper(), r["epoch"], m["map"])
        for split, branches in (r.get("branch_map") or {}).items():
            for branch, value in branches.items() if not split.startswith("zsl_") else ():
                add(maps, f"{split.upper()} {branch} (dashed)", r["epoch"], value)
    return losses, maps


def nice_step(span, n=4):
    """A tick step of 1, 2 or 5 x 10^k giving about n intervals over span."""
    raw = span / n if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def chart(lines, title, size=(460, 300)):
    """One panel: {name: [(x, y), ...]} as lines with dots, axes with ticks, the legend under the plot."""
    fnt = draw.font(12)
    names = list(lines)
    legend_rows = -(-len(names) // 2)
    W, H = size[0], size[1] + legend_rows * (fnt.size + 6)
    img = Image.new("RGB", (W, H), draw.WHITE)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, size[1] - BOTTOM  # the plotting area
    d.text((LEFT, 8), title, fill=draw.BLACK, font=fnt)
    points = [p for pts in lines.values() for p in pts]
    if not points:
        d.text((x0, (y0 + y1) // 2), "nothing logged", fill=draw.GREY, font=fnt)
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    step = nice_step(max(ys) - min(ys))
    ymin, ymax = math.floor(min(ys) / step) * step, math.ceil(max(ys) / step) * step
    ymax = ymax if ymax > ymin else ymin + step
    px = lambda x: x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)  # noqa: E731, data -> pixels
    py = lambda y: y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)  # noqa: E731
    d.rectangle([x0, y0, x1, y1], outline=draw.BLACK)
    for k in range(round((ymax - ymin) / step) + 1):
        y = ymin + k * step
        d.line([(x0 - 4, py(y)), (x0, py(y))], fill=draw.BLACK)
        label = f"{y:.4g}"
        d.text((x0 - 6 - fnt.getlength(label), py(y) - fnt.size // 2 - 1), label, fill=draw.BLACK, font=fnt)
    xstep = max(1, math.ceil((xmax - xmin) / 10))
    for x in range(math.ceil(xmin), math.floor(xmax) + 1, xstep):
        d.line([(px(x), y1), (px(x), y1 + 4)], fill=draw.BLACK)
        d.text((px(x) - fnt.getlength(str(x)) / 2, y1 + 6), str(x), fill=draw.BLACK, font=fnt)
    d.text(((x0 + x1) / 2 - 16, y1 + 20), "epoch", fill=draw.GREY, font=fnt)
    for i, name in enumerate(names):
        colour, pts = PALETTE[i % len(PALETTE)], [(px(x), py(y)) for x, y in sorted(lines[name])]
        if name.endswith("(dashed)"):  # every other segment of each step
            for (ax, ay), (bx, by) in zip(pts, pts[1:]):
                for t in range(0, 10, 2):
                    d.line([(ax + (bx - ax) * t / 10, ay + (by - ay) * t / 10),
                            (ax + (bx - ax) * (t + 1) / 10, ay + (by - ay) * (t + 1) / 10)], fill=colour, width=2)
        elif len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        lx, ly = 12 + (i % 2) * (W // 2), size[1] + (i // 2) * (fnt.size + 6)
        d.line([(lx, ly + fnt.size // 2 + 1), (lx + 18, ly + fnt.size // 2 + 1)], fill=colour, width=3)
        d.text((lx + 24, ly), name.replace(" (dashed)", ", alone"), fill=draw.BLACK, font=fnt)
    return img


def group_series(records):
    """{score: {setting: [(epoch, mAP), ...]}} for score in fused, local, global and setting in ZSL, its
    groups and GZSL (--zsl-groups)."""
    panels = {"fused": {}, "local": {}, "global": {}}
    for r in records:
        for split in ("zsl", "zsl_twins", "zsl_novel", "gzsl"):
            if split not in r:
                continue
            name = zsl_groups.setting_name(split)
            panels["fused"].setdefault(name, []).append((r["epoch"], r[split]["map"]))
            for branch, value in (r.get("branch_map") or {}).get(split, {}).items():
                if value is not None:
                    panels[branch].setdefault(name, []).append((r["epoch"], value))
    return panels


def write_group_curves(run_dir, out=None):
    """Draw the ZSL groups' curves into `out` (default RUN_DIR/zsl_groups.png); returns the path."""
    records = read_log(run_dir)
    if not any("zsl_twins" in r for r in records):
        raise UsageError(f"{os.path.join(run_dir, 'log.jsonl')}: no ZSL groups logged (a ZSL run whose unseen "
                         f"labels have both twins and novel labels writes zsl_twins and zsl_novel)")
    panels = [chart(lines, f"{score} {'score' if score == 'fused' else 'branch'} mAP (%)")
              for score, lines in group_series(records).items() if lines]
    out = out or os.path.join(run_dir, "zsl_groups.png")
    draw.save(side_by_side(panels), out)
    return out


def side_by_side(panels):
    picture = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), draw.WHITE)
    for i, panel in enumerate(panels):
        picture.paste(panel, (sum(p.width for p in panels[:i]), 0))
    return picture


def write_curves(run_dir, out=None, rows=None):
    """Draw the run's curves into `out` (default RUN_DIR/curves.png), and with `rows` (tables.like_for_like's) the
    rows chart into rows.png beside it; returns the curves' path."""
    losses, maps = series(read_log(run_dir))
    # a panel per loss term: their scales differ by orders of magnitude (ranking loss ~1, L1 distillation ~0.01)
    panels = [chart({term: pts}, f"loss {term} (mean over the epoch)") for term, pts in losses.items()]
    panels.append(chart(maps, "mAP (%)"))
    out = out or os.path.join(run_dir, "curves.png")
    draw.save(side_by_side(panels), out)
    if rows:
        draw.save(rows_chart(rows), os.path.join(os.path.dirname(out), "rows.png"))
    return out


def rows_chart(rows, title="The same test images, the same protocol: mAP (%)", size=(760, 330)):
    """The rows a trained number is read against ({method: metrics}, tables.like_for_like's) as one dot per method
    and setting (ZSL, its twin and novel groups, GZSL; SPML's test), each with its value: which row is above which
    reads at a glance where a table of 4 x 4 figures does not."""
    settings = [s for s in ("zsl", "zsl_twins", "zsl_novel", "gzsl", "test") if any(s in r for r in rows.values())]
    values = {name: {s: r[s]["map"] for s in settings if s in r} for name, r in rows.items()}
    ys = [v for per in values.values() for v in per.values()]
    if not ys:
        raise UsageError("no mAP to draw")
    fnt, names = draw.font(12), list(rows)
    W, H = size[0], size[1] + len(names) * (fnt.size + 6)
    img = Image.new("RGB", (W, H), draw.WHITE)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, size[1] - BOTTOM
    d.text((LEFT, 8), title, fill=draw.BLACK, font=fnt)
    step = nice_step(max(ys) - min(ys))
    ymin, ymax = math.floor(min(ys) / step) * step, math.ceil(max(ys) / step) * step
    ymax = ymax if ymax > ymin else ymin + step
    py = lambda y: y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)  # noqa: E731, mAP -> pixels
    d.rectangle([x0, y0, x1, y1], outline=draw.BLACK)
    for k in range(round((ymax - ymin) / step) + 1):
        y = ymin + k * step
        d.line([(x0, py(y)), (x1, py(y))], fill=(230, 230, 230))
        d.text((x0 - 6 - fnt.getlength(f"{y:.4g}"), py(y) - fnt.size // 2 - 1), f"{y:.4g}", fill=draw.BLACK, font=fnt)
    column = (x1 - x0) / len(settings)
    for j, split in enumerate(settings):
        label = zsl_groups.setting_name(split)
        d.text((x0 + (j + 0.5) * column - fnt.getlength(label) / 2, y1 + 8), label, fill=draw.BLACK, font=fnt)
        for i, name in enumerate(names):  # side by side within the setting's column, in the rows' order
            if split not in values[name]:
                continue
            x, y = x0 + (j + (i + 1) / (len(names) + 1)) * column, py(values[name][split])
            colour = PALETTE[i % len(PALETTE)]
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
            label = f"{values[name][split]:.1f}"
            d.text((x - fnt.getlength(label) / 2, y - fnt.size - 8), label, fill=colour, font=fnt)  # above the dot
    for i, name in enumerate(names):
        ly = size[1] + i * (fnt.size + 6)
        d.ellipse([14, ly + 2, 24, ly + 12], fill=PALETTE[i % len(PALETTE)])
        d.text((32, ly), name, fill=draw.BLACK, font=fnt)
    return img


@cli.command
def main(argv=None):
    p = cli.parser(prog="python -m tools.plot", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder written by train.py (holds log.jsonl)")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/curves.png, or zsl_groups.png)")
    p.add_argument("--zsl-groups", action="store_true", help="ZSL mAP on the unseen set, its twins and its novel "
                   "labels, for the fused score and each branch, instead of the training curves")
    args = p.parse_args(argv)
    read_log(args.run_dir)  # the input first: a missing run folder is named as such
    out = args.out or os.path.join(args.run_dir, "zsl_groups.png" if args.zsl_groups else "curves.png")
    check_outputs([("--out", out)], [("the log", os.path.join(args.run_dir, "log.jsonl"))])
    write = write_group_curves if args.zsl_groups else write_curves
    print(f"curves written to {write(args.run_dir, args.out)}")

