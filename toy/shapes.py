"""What the toy world looks like: 25 objects drawn from primitives, and a textured background per scene.

toy/world.py decides what is in a picture (scene, objects, sizes, places, caption); this file only draws.

    python -m toy.shapes sheet.png        # every object, large and small, on one contact sheet
"""
import math
import sys

import numpy as np
from PIL import Image, ImageDraw

from support import cli


# ----------------------------------------------------------------------------------------- objects
def _circle(x, y, r):
    return (x - r, y - r, x + r, y + r)


def _arc(r, start, end, dx=0.0, n=12):
    """Points on a circle of radius r centred at (dx, 0), from angle `start` to `end` in degrees."""
    angles = np.radians(np.linspace(start, end, n))
    return [(dx + r * math.cos(a), r * math.sin(a)) for a in angles]


def _star(n, outer, inner):
    return [((outer, inner)[i % 2] * math.cos(math.pi * (i / n - 0.5)),
             (outer, inner)[i % 2] * math.sin(math.pi * (i / n - 0.5))) for i in range(2 * n)]


_RAYS = [[(0.6 * math.cos(a), 0.6 * math.sin(a)), (math.cos(a), math.sin(a))] for a in np.arange(8) * math.pi / 4]
_PETALS = [(0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.arange(5) * 2 * math.pi / 5]
DARK, WHITE, RED, BLUE, GREY = (30, 30, 40), (250, 250, 250), (220, 30, 35), (30, 80, 220), (110, 110, 120)
# Each object is a list of primitives in a unit box [-1, 1]^2 (x right, y down), drawn in order:
# (kind, where, rgb, *outline): "ellipse"/"rect"/"ring" (ellipse outline) take a box (x0, y0, x1, y1),
# "pie" a box and (start, end) degrees, "poly"/"line" a list of points.
SHAPES = {
    "sun": [("line", r, (255, 190, 0)) for r in _RAYS] + [("ellipse", _circle(0, 0, 0.55), (255, 220, 30))],
    "cloud": [("ellipse", box, (240, 242, 250), (140, 140, 165))
              for box in [(-1, -0.1, -0.1, 0.6), (-0.5, -0.6, 0.4, 0.4), (0, -0.2, 1, 0.6)]],
    "bird": [("poly", [(-0.1, 0), (-1, -0.7), (-0.35, 0.05)], DARK),
             ("poly", [(0.1, 0), (1, -0.7), (0.35, 0.05)], DARK), ("ellipse", (-0.4, -0.15, 0.4, 0.2), DARK),
             ("poly", [(0.38, -0.05), (0.65, 0.05), (0.38, 0.15)], (255, 150, 0))],
    "boat": [("line", [(0, -1), (0, 0.25)], (90, 60, 30)),
             ("poly", [(0.05, -1), (0.05, 0.15), (0.75, 0.15)], WHITE),
             ("poly", [(-1, 0.2), (1, 0.2), (0.6, 0.7), (-0.6, 0.7)], (130, 75, 30))],
    "fish": [("poly", [(0.35, 0), (1, -0.5), (1, 0.5)], (255, 110, 0)),
             ("ellipse", (-0.8, -0.45, 0.5, 0.45), (255, 140, 20)), ("ellipse", _circle(-0.45, -0.05, 0.1), (0, 0, 0))],
    "umbrella": [("line", [(0, 0), (0, 1)], (60, 40, 30))]
                + [("pie", (-1, -0.8, 1, 0.8, 180 + 45 * i, 225 + 45 * i), (RED, WHITE)[i % 2]) for i in range(4)],
    "ball": [("pie", _circle(0, 0, 0.75) + (120 * i, 120 * i + 120), rgb) for i, rgb in enumerate([RED, WHITE, BLUE])],
    "tree": [("rect", (-0.15, 0.5, 0.15, 1), (100, 60, 20)),
             ("poly", [(-0.8, 0.55), (0, -0.3), (0.8, 0.55)], (30, 120, 40)),
             ("poly", [(-0.6, 0), (0, -1), (0.6, 0)], (30, 140, 45))],
    "flower": [("ellipse", _circle(x, y, 0.38), (255, 105, 180)) for x, y in _PETALS]
              + [("ellipse", _circle(0, 0, 0.3), (255, 220, 0))],
    "mushroom": [("rect", (-0.22, -0.1, 0.22, 0.9), (240, 230, 210)),
                 ("pie", (-1, -0.9, 1, 0.5, 180, 360), (200, 20, 30))]
                + [("ellipse", _circle(x, y, 0.12), WHITE) for x, y in [(-0.5, -0.35), (0, -0.6), (0.45, -0.3)]],
    "apple": [("ellipse", (-0.75, -0.55, 0.75, 0.9), (210, 20, 30)),
              ("line", [(0, -0.5), (0.1, -0.95)], (90, 50, 20)), ("ellipse", (0.1, -0.95, 0.55, -0.65), (40, 160, 40))],
    "house": [("rect", (-0.7, -0.1, 0.7, 0.9), (230, 200, 150)),
              ("poly", [(-0.9, -0.1), (0, -0.9), (0.9, -0.1)], (150, 30, 30)),
              ("rect", (-0.15, 0.35, 0.15, 0.9), (100, 60, 30))],
    "car": [("rect", (-0.5, -0.65, 0.4, -0.15), BLUE), ("rect", (-0.4, -0.55, 0.3, -0.25), (170, 220, 250)),
            ("rect", (-1, -0.2, 1, 0.35), BLUE), ("ellipse", _circle(-0.55, 0.4, 0.25), (15, 15, 15)),
            ("ellipse", _circle(0.55, 0.4, 0.25), (15, 15, 15))],
    "lamp": [("rect", (-0.07, -0.6, 0.07, 0.9), GREY), ("rect", (-0.3, 0.85, 0.3, 1), (80, 80, 90)),
             ("ellipse", (-0.3, -1, 0.3, -0.4), (255, 245, 150), GREY)],
    "balloon": [("line", [(0, 0.3), (-0.1, 1)], (80, 80, 80)), ("ellipse", (-0.55, -1, 0.55, 0.35), (200, 40, 200))],
    "moon": [("poly", _arc(0.8, 90, 270) + _arc(0.55, 270, 90, dx=0.3), (245, 235, 160))],
    "star": [("poly", _star(5, 1, 0.42), (255, 200, 0), (200, 140, 0))],
    "rocket": [("poly", [(-0.3, 0.4), (-0.6, 0.9), (0.6, 0.9), (0.3, 0.4)], RED),
               ("ellipse", (-0.3, -1, 0.3, 0.8), (235, 235, 240)),
               ("poly", [(-0.2, -0.75), (0, -1.05), (0.2, -0.75)], RED),
               ("ellipse", (-0.12, -0.4, 0.12, -0.15), (60, 140, 230))],
    "planet": [("ellipse", _circle(0, 0, 0.55), (210, 150, 80)), ("ring", (-1, -0.3, 1, 0.3), (235, 215, 170))],
    "snowman": [("ellipse", (-0.55, -0.05, 0.55, 1), WHITE, (150, 160, 180)),
                ("ellipse", (-0.38, -0.85, 0.38, -0.05), WHITE, (150, 160, 180)),
                ("poly", [(0, -0.5), (0.45, -0.42), (0, -0.35)], (255, 120, 0)),
                ("ellipse", _circle(-0.15, -0.62, 0.06), (0, 0, 0)),
                ("ellipse", _circle(0.15, -0.62, 0.06), (0, 0, 0))],
    "cactus": [("rect", box, (90, 175, 60)) for box in [(-0.18, -1, 0.18, 1), (-0.7, 0, -0.18, 0.2),
                                                        (-0.7, -0.6, -0.5, 0.2), (0.18, -0.2, 0.6, 0),
                                                        (0.4, -0.8, 0.6, 0)]],
    "pyramid": [("poly", [(-1, 0.8), (0, -0.9), (1, 0.8)], (205, 190, 150), (110, 90, 50)),
                ("line", [(-0.35, -0.3), (0.35, -0.3)], (110, 90, 50)),
                ("line", [(-0.68, 0.25), (0.68, 0.25)], (110, 90, 50))],
    "cup": [("ring", (0.15, -0.3, 0.8, 0.35), (20, 150, 160)), ("rect", (-0.6, -0.55, 0.35, 0.65), (20, 160, 170))],
    "cake": [("rect", (-0.8, -0.1, 0.8, 0.8), (250, 180, 210)), ("rect", (-0.8, -0.25, 0.8, 0.05), (255, 250, 240)),
             ("rect", (-0.06, -0.8, 0.06, -0.25), (220, 40, 40)),
             ("ellipse", (-0.12, -1, 0.12, -0.75), (255, 210, 0))],
    "clock": [("ellipse", _circle(0, 0, 0.8), (250, 250, 240), (20, 20, 20)),
              ("line", [(0, 0), (0, -0.6)], (20, 20, 20)), ("line", [(0, 0), (0.4, 0.1)], (20, 20, 20))],
}


def draw_object(d, name, cx, cy, s, jitter):
    """Draw SHAPES[name] centred at (cx, cy) with half-size s (pixels); fill colours are scaled by `jitter`."""
    w = max(1, round(0.12 * s))                                        # line / outline width
    for kind, where, rgb, *outline in SHAPES[name]:
        fill = tuple(int(min(255, v * j)) for v, j in zip(rgb, jitter))
        if kind in ("poly", "line"):
            pts = [(cx + x * s, cy + y * s) for x, y in where]
            d.polygon(pts, fill=fill, outline=outline[0] if outline else None) if kind == "poly" else \
                d.line(pts, fill=fill, width=w)
            continue
        box = [cx + where[0] * s, cy + where[1] * s, cx + where[2] * s, cy + where[3] * s]
        if kind == "ellipse":
            d.ellipse(box, fill=fill, outline=outline[0] if outline else None, width=w)
        elif kind == "rect":
            d.rectangle(box, fill=fill)
        elif kind == "ring":
            d.ellipse(box, outline=fill, width=w)
        else:                                                          # "pie"
            d.pieslice(box, where[4], where[5], fill=fill)


# -------------------------------------------------------------------------------------- backgrounds
def _smooth_noise(rng, side, cells):
    """Low-frequency noise in [-1, 1]: a random (cells x cells) grid, bilinearly upsampled to side x side."""
    grid = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
    return np.asarray(grid.resize((side, side), Image.BILINEAR), np.float32) / 127.5 - 1  # (side, side)


def background(scene, rng, n):
    """Textured background for a scene, (n, n, 3) uint8."""
    y = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]                     # (n, 1, 1) top -> bottom
    x = np.linspace(0, 1, n, dtype=np.float32)[None, :, None]                     # (1, n, 1)
    noise = _smooth_noise(rng, n, 8)[..., None]                                   # (n, n, 1)
    fine = rng.normal(0, 1, (n, n, 1)).astype(np.float32)                         # (n, n, 1)
    tint = rng.uniform(0.9, 1.1, 3).astype(np.float32)                            # (3,)
    if scene == "beach":
        horizon, shore = rng.uniform(0.3, 0.45), rng.uniform(0.55, 0.7)
        img = np.where(y < horizon, [135, 200, 240], np.where(y < shore, [40, 110, 190], [230, 210, 160]))
        img = img + 12 * noise + 5 * fine
    elif scene == "forest":
        img = np.array([45, 100, 50]) + 35 * noise * np.array([0.6, 1, 0.5]) + 8 * fine
    elif scene == "street":
        wall = rng.uniform(0.45, 0.6)
        bricks = ((y * 16 % 1 < 0.12) | ((x * 8 + 0.5 * (np.floor(y * 16) % 2)) % 1 < 0.06))
        img = np.where(y < wall, np.where(bricks, [200, 190, 180], [165, 80, 60]), [110, 110, 115])
        img = img + 10 * noise + 6 * fine
    elif scene == "night":
        img = np.array([15, 20, 60]) * (1.3 - 0.6 * y) + 6 * noise + 3 * fine
        img = img + 180 * (rng.uniform(0, 1, (n, n, 1)) > 0.997)              # a few single-pixel stars
    elif scene == "snow":
        img = np.array([228, 236, 246]) + 12 * noise * np.array([1, 1, 0.6]) + 4 * fine
    elif scene == "desert":
        sky = rng.uniform(0.2, 0.35)
        dunes = np.sin(2 * np.pi * (6 * y + 1.5 * np.sin(2 * np.pi * x + rng.uniform(0, 6))))
        img = np.where(y < sky, [245, 225, 175], np.array([225, 155, 85]) + 12 * dunes) + 6 * noise + 4 * fine
    elif scene == "kitchen":
        planks = (x * rng.integers(4, 7) % 1 < 0.04)
        grain = np.sin(2 * np.pi * (x * 40 + 3 * noise))
        img = np.where(planks, [90, 55, 30], np.array([160, 105, 60]) + 10 * grain) + 4 * fine
    else:
        raise KeyError(f"unknown scene {scene!r}")
    img = np.broadcast_to(img, (n, n, 3)) * tint                                  # (n, n, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def contact_sheet(path, sizes=(24, 6), side=64):
    """Every object on a plain background at each half-size of `sizes` (pixels), one row per size."""
    names = list(SHAPES)
    sheet = Image.new("RGB", (side * len(names), side * len(sizes)), (200, 200, 200))
    d = ImageDraw.Draw(sheet)
    for row, s in enumerate(sizes):
        for col, name in enumerate(names):
            draw_object(d, name, col * side + side / 2, row * side + side / 2, s, (1, 1, 1))
    sheet.save(path)


@cli.command
def main(argv=None):
    from support.paths import check_outputs
    p = cli.parser(prog="python -m toy.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="sheet.png", help="the PNG to write (default sheet.png)")
    out = p.parse_args(argv).out
    check_outputs([("out", out)])
    contact_sheet(out)
    print(f"contact sheet -> {out}")


if __name__ == "__main__":
    sys.exit(main())
