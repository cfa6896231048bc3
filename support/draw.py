"""Pictures with Pillow alone: a colour map, heat maps over the patch grid, and the paper's Fig. 3 grid.

    explain_panel(image, grid, maps, title)    an image beside, per label, where its local score comes from
    figure_grid(cells, columns)                 Fig. 3: images with their ground truth and top-k predictions
Used by predict.py (--explain) and tools/figure3.py; support/curves.py draws the training curves with the same font.

Heat maps live on the model's patch grid (h x w cells, 8 x 8 for the toy CLIP at 64 px with 8 px patches,
14 x 14 for ViT-B/16 at 224 px with 16 px patches). Each is scaled to its own [min, max] and shown with
nearest-neighbour upsampling, so one cell on screen is one patch the model saw.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from support.safe_io import atomic_write

BLUE, RED, BLACK, GREY, WHITE = (20, 80, 200), (200, 30, 30), (0, 0, 0), (110, 110, 110), (255, 255, 255)
# Anchor colours of the "inferno" colour map (black, purple, red, orange, pale yellow) at 0, 1/4, ..., 1; the
# rest is linear between them. Dark = low, bright = high, and it stays readable in greyscale.
INFERNO = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
PAD = 6


def font(size=13):
    """Pillow's built-in scalable font (Pillow >= 10.1; a fixed bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3)."""
    t = np.clip(np.asarray(x, dtype=np.float64), 0, 1) * (len(INFERNO) - 1)  # position between anchors
    i = np.minimum(t.astype(int), len(INFERNO) - 2)  # left anchor
    f = (t - i)[..., None]  # (..., 1) fraction towards the right anchor
    return np.round((1 - f) * INFERNO[i] + f * INFERNO[i + 1]).astype(np.uint8)  # (..., 3)


def heat_overlay(image, grid, boxes=(), alpha=0.6):
    """`grid` (h, w) scaled to [0, 1], coloured, upsampled to the image (nearest: one block per patch) and
    blended over it; `boxes` = flat indices of cells to outline (the top-k patches of the local score)."""
    grid = np.asarray(grid, dtype=np.float64)
    h, w = grid.shape
    span = grid.max() - grid.min()
    scaled = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)  # a flat map shows flat
    heat = Image.fromarray(colormap(scaled)).resize(image.size, Image.Resampling.NEAREST)
    out = Image.blend(image.convert("RGB"), heat, alpha)
    draw, cw, ch = ImageDraw.Draw(out), image.width / w, image.height / h
    for k in boxes:
        r, c = divmod(int(k), w)
        draw.rectangle([round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1],
                       outline=(0, 230, 255))
    return out


def shown(image, side=192):
    """The image as the model saw it, enlarged by a whole factor to about `side` pixels (nearest), so that
    patch boundaries fall on pixel boundaries."""
    factor = max(1, round(side / image.width))
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def wrap(text, width, fnt):
    """Greedy word wrap to `width` pixels."""
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and fnt.getlength(trial) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def explain_panel(image, grid, maps, title, legend):
    """One picture per image: the input on the left, then one column per label with a row per map.

    maps: [(column heading, [(row map (h, w), cells to outline), ...]), ...]; every column has the same rows.
    grid: (h, w) of the patch grid. legend: the rows' meanings, written under the input image.
    """
    fnt, big = font(13), shown(image)
    side, n_rows = big.width, max(len(rows) for _, rows in maps)
    line = fnt.size + 4
    head = 2 * line
    canvas = Image.new("RGB", (PAD + (1 + len(maps)) * (side + PAD), line + head + n_rows * (side + PAD) + PAD),
                       WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 2), title, fill=BLACK, font=fnt)
    top = line + head
    canvas.paste(big, (PAD, top))
    y = top + side + PAD
    for text in legend:
        for part in wrap(text, side, fnt):
            draw.text((PAD, y), part, fill=GREY, font=fnt)
            y += line
    bar = np.repeat(colormap(np.linspace(0, 1, side))[None], 10, axis=0)  # (10, side, 3) the colour scale
    canvas.paste(Image.fromarray(bar), (PAD, y + 4))
    draw.text((PAD, y + 16), "low", fill=GREY, font=fnt)
    draw.text((PAD + side - fnt.getlength("high"), y + 16), "high", fill=GREY, font=fnt)
    for j, (heading, rows) in enumerate(maps):
        x = PAD + (j + 1) * (side + PAD)
        for i, part in enumerate(wrap(heading, side, fnt)[:2]):
            draw.text((x, line + i * line), part, fill=BLACK, font=fnt)
        for i, (values, cells) in enumerate(rows):
            values = np.asarray(values).reshape(grid)
            canvas.paste(heat_overlay(big, values, cells), (x, top + i * (side + PAD)))
    return canvas


def marks(truth, predicted):
    """Fig. 3's marks for one image: [(name, colour, struck)]. The top-k predictions come first, blue when the
    label is in the ground truth and red when not; then the ground-truth labels the top-k missed, struck
    through. `truth` and `predicted` are lists of names (predicted: best first)."""
    hits = [(name, BLUE if name in truth else RED, False) for name in predicted]
    return hits + [(name, BLACK, True) for name in truth if name not in predicted]


def strike(draw, xy, text, colour, fnt, struck):
    """Write text, struck through the middle of its letters when `struck`; returns its bounding box."""
    box = tuple(round(v) for v in draw.textbbox(xy, text, font=fnt))  # (x0, y0, x1, y1), whole pixels
    draw.text(xy, text, fill=colour, font=fnt)
    if struck:
        mid = (box[1] + box[3]) // 2
        draw.line([(box[0], mid), (box[2], mid)], fill=colour, width=2)
    return box


def figure_grid(cells, title, columns=4, side=192):
    """The paper's Fig. 3: cells = [(image, caption, truth names, predicted names (top-k, best first))].
    Returns (picture, boxes), boxes = [(cell index, name, colour, struck, (x0, y0, x1, y1))]: where each label
    was written (what the tests read back)."""
    fnt, small = font(14), font(11)
    line = fnt.size + 5
    lines_per_cell = []  # per cell: lines of marks, wrapped to the image width
    for _, _, truth, predicted in cells:
        lines, width = [[]], 0.0
        for mark in marks(truth, predicted):
            w = fnt.getlength(mark[0] + "  ")
            if lines[-1] and width + w > side:
                lines, width = lines + [[]], 0.0
            lines[-1].append(mark)
            width += w
        lines_per_cell.append(lines)
    cell_w, cell_h = side + 2 * PAD, side + line * (1 + max(map(len, lines_per_cell))) + 2 * PAD
    key = (("correct", BLUE, False), ("wrong", RED, False), ("missed", BLACK, True),
           ("= ground truth outside the top-k", GREY, False))
    top, key_w = 2 * line, max(fnt.getlength(title), sum(fnt.getlength(k[0] + "  ") for k in key)) + 2 * PAD
    canvas = Image.new("RGB", (max(min(columns, len(cells)) * cell_w, round(key_w)),
                               top + -(-len(cells) // columns) * cell_h), WHITE)
    draw, boxes = ImageDraw.Draw(canvas), []
    draw.text((PAD, 2), title, fill=BLACK, font=fnt)
    x = PAD
    for text, colour, struck in key:
        strike(draw, (x, line), text, colour, fnt, struck)
        x += fnt.getlength(text + "  ")
    for idx, ((image, caption, _, _), lines) in enumerate(zip(cells, lines_per_cell)):
        x0, y0 = (idx % columns) * cell_w + PAD, top + (idx // columns) * cell_h + PAD
        canvas.paste(shown(image, side).resize((side, side), Image.Resampling.NEAREST), (x0, y0))
        draw.text((x0, y0 + side + 3), caption[-36:], fill=GREY, font=small)
        y = y0 + side + line
        for marks_on_line in lines:
            x = x0
            for name, colour, struck in marks_on_line:
                boxes.append((idx, name, colour, struck, strike(draw, (x, y), name, colour, fnt, struck)))
                x += fnt.getlength(name + "  ")
            y += line
    return canvas, boxes

def save(picture, path):
    """Write a PNG atomically (safe_io): an interrupted run leaves the old picture or the new one, never half."""
    atomic_write(path, lambda f: picture.save(f, format="PNG", optimize=True))


if __name__ == "__main__":  # imported by other commands; alone it says which
    import sys
    from support import cli
    sys.exit(cli.describe(__spec__.name if __spec__ else __file__, __doc__))
