"""A synthetic multi-label world and a tiny CLIP pre-trained on it, so the whole pipeline runs offline, built
to have the properties of the real zero-shot setting that SigRL's local branch is meant to exploit.

SigRL's zero-shot job needs a CLIP that already knows the UNSEEN label names from pre-training, then
fine-tunes on images labelled with the SEEN names only (NUS-WIDE: 925 seen tags, 81 unseen concepts). Here:
7 scene types (textured backgrounds) holding 1-5 of 25 drawn objects; a tiny CLIP (the project's own
clip_text.CLIP) pre-trained contrastively on captioned images of a separate split (toy/pretrain.py);
35 labels (7 scenes, 25 objects, 3 twin words), of which the SigRL job trains on 27 and must recognise the
other 8 through their text embeddings.

    python -m toy.world make --root DIR     # write a world (train.py --data toy does this itself)
    python -m toy.world zeroshot            # the tiny CLIP's zero-shot mAP vs chance (toy/toyclip.json)
    python -m toy.pretrain --out toy/       # re-create the committed tiny CLIP (toy/pretrain.py)

Each choice copies a property of the real setting:
- Several labels per image, many of them small. NUS-WIDE images carry several concepts, and a photo has a
  subject and smaller things around it. Here 1-5 objects (mean 3) with half-sizes drawn log-uniformly from
  4.5 to 12 px: from about one 8 px patch to a third of the image.
- Captions name the salient thing. Alt-text rarely lists everything in a photo, so CLIP's class token learns
  the salient content and under-represents small and secondary objects. A pre-training caption names the
  largest object, each other object with probability 0.3, and the scene (90 %). Every object is the largest
  one in some images, so CLIP learns every name, unseen ones included.
- Labels name everything. NUS-WIDE's labels (tags, human-verified concepts) name small things as well, so
  the seen labels teach what the captions did not.
- Scenes are labels and predict their objects. NUS-WIDE mixes scene concepts (beach, snow) with objects, and
  they co-occur (what GMC can exploit): each scene has a pool of likely objects; a slot is filled from the
  pool with probability 0.8, else from all objects.
- Some unseen labels are another word for a seen one. In NUS-WIDE's own lists (labels/nuswide_81.txt,
  labels/nuswide_925.txt) 30 of the 81 unseen labels are the exact singular or plural of a seen label (dog and
  dogs, clouds and cloud, ...): Flickr users tag a thing in either form. Here 3 of the 8 unseen labels, the
  nearest ratio to 30 of 81, are TWINS: "auto" for the seen car, "mug" for the seen cup, and the plural
  "mushrooms" for the seen mushroom. A twin label is true exactly where its object is drawn, and a caption
  calls a twinned object by either word with equal probability (P_TWIN), as people write either form, so
  CLIP learns the two words as neighbours. The other 5 unseen labels (NOVEL: fish, planet, snowman, cactus,
  desert) name things no seen label names: the hardest case, and on NUS-WIDE the commoner one (51 of 81).
One property it does not copy: NUS-WIDE's seen labels outnumber the unseen 11 to 1 and include looser relatives
of them (airplane for plane, night for nighttime); here 27 seen labels face 8 unseen ones, and a novel label
has no relative among them (a 64-label variant with relatives of each unseen object among 52 seen
labels did not transfer more at the default budget: ZSL local +3.3, and it ran 2.5 times as slowly).

Images: 64 x 64 RGB, drawn at 2x with PIL and box-downsampled, objects at random places inside a 4 px margin
(the evaluation centre crop cuts about 4 px per side). Everything derives from numpy Generators seeded with
(seed, split, index), so any image can be redrawn alone and the files are byte-identical for the same seed.
Splits: 0 train, 1 test, 2 pre-training (captions).
"""
import gzip
import json
import math
import os
import shutil
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads wait at every
# op for each other's time slices: 2-thread pre-training ran 3.5x slower. Works only before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from clip_text import CLIP_MEAN, CLIP_STD  # noqa: E402
from support import cli, safe_io  # noqa: E402
from data import nus_path, read_spml_folder  # noqa: E402
from support.errors import DataError  # noqa: E402
from support.clip_files import file_sha256  # noqa: E402
from support.tokenizer import N_RESERVED  # noqa: E402
from support.data_formats import observe_single_positive  # noqa: E402
from toy.shapes import background, draw_object  # noqa: E402

RES = 64                 # image side in pixels (the tiny CLIP's input resolution)
_K = 2                   # drawing supersampling factor
VERSION = 4              # bump when the drawing or sampling changes, so cached worlds are rebuilt
TRAIN, TEST, PRETRAIN = 0, 1, 2     # split ids: part of every image's seed
SPML_DIR = os.path.join("sigrl_spml", "toy")
TOYCLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyclip.pt")

# scene label -> (image folder, phrase used in captions, likely objects)
SCENES = {
    "beach":   ("beach",       "on the beach",  ["sun", "cloud", "bird", "boat", "fish", "umbrella", "ball"]),
    "forest":  ("forest",      "in the forest", ["tree", "flower", "mushroom", "apple", "bird"]),
    "street":  ("city_street", "on a street",   ["house", "car", "lamp", "balloon", "cloud", "tree"]),
    "night":   ("night_sky",   "at night",      ["moon", "star", "rocket", "planet", "lamp"]),
    "snow":    ("snow",        "in the snow",   ["snowman", "tree", "house", "star", "cloud"]),
    "desert":  ("desert",      "in the desert", ["cactus", "pyramid", "sun", "bird"]),
    "kitchen": ("kitchen",     "in a kitchen",  ["cup", "cake", "clock", "apple", "flower"]),
}
OBJECTS = ["sun", "cloud", "bird", "boat", "fish", "umbrella", "ball", "tree", "flower", "mushroom", "apple",
           "house", "car", "lamp", "balloon", "moon", "star", "rocket", "planet", "snowman", "cactus",
           "pyramid", "cup", "cake", "clock"]
# twin label -> the seen object it is another word for (the captions use either word, see caption())
TWINS = {"auto": "car", "mug": "cup", "mushrooms": "mushroom"}
PLURALS = {"mushrooms"}  # twin words that take no article
LABELS = list(SCENES) + OBJECTS + list(TWINS)                            # 35 names
NOVEL = ["fish", "planet", "snowman", "cactus", "desert"]               # unseen, and no seen label names them
UNSEEN = ["fish", "mushrooms", "auto", "planet", "snowman", "cactus", "mug", "desert"]  # NOVEL + TWINS
SEEN = [name for name in LABELS if name not in UNSEEN]                 # 27 names, LABELS order
P_POOL = 0.8             # probability that an object slot is filled from the scene's pool
N_OBJECTS_P = [0.15, 0.25, 0.25, 0.2, 0.15]                             # P(1..5 objects)
HALF_SIZE = (4.5, 12.0)  # object half-size in pixels, log-uniform between these
P_OTHER = 0.3            # probability that a caption names an object other than the largest
P_TWIN = 0.5             # probability that a caption calls a twinned object by its twin word


# ------------------------------------------------------------------------------------ sampling, drawing
def sample_scene(rng):
    """(scene, objects): a scene label and 1-5 distinct object labels, mostly from the scene's pool."""
    scene = LABELS[rng.integers(len(SCENES))]
    pool = SCENES[scene][2]
    objects = []
    for _ in range(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P) + 1):
        from_pool = [o for o in pool if o not in objects]
        choices = from_pool if from_pool and rng.uniform() < P_POOL else [o for o in OBJECTS if o not in objects]
        objects.append(choices[rng.integers(len(choices))])
    return scene, objects


def render(scene, objects, rng):
    """Draw the scene with its objects at non-overlapping-ish random places; returns a RES x RES RGB image and
    the objects' half-sizes (pixels)."""
    img = Image.fromarray(background(scene, rng, RES * _K))
    d = ImageDraw.Draw(img)
    placed = []                                                                   # (cx, cy, s) in RES units
    for name in objects:
        for _ in range(20):                                                       # keep the least overlapping try
            s = math.exp(rng.uniform(math.log(HALF_SIZE[0]), math.log(HALF_SIZE[1])))
            cx, cy = rng.uniform(4 + s, RES - 4 - s, 2)
            overlap = max([min(s, t) - math.hypot(cx - u, cy - v) / 1.6 for u, v, t in placed] + [0])
            if overlap <= 0:
                break
        placed.append((cx, cy, s))
        draw_object(d, name, cx * _K, cy * _K, s * _K, rng.uniform(0.85, 1.15, 3))
    return img.reduce(_K), [t for _, _, t in placed]


def caption(scene, objects, sizes, rng):
    """A caption in random phrasing naming the largest object, each other one with probability P_OTHER, and the
    scene (90 %): like alt-text, which names the salient things of a picture, not everything in it. A twinned
    object (car, cup, mushroom) is called by its twin word (auto, mug, mushrooms) with probability P_TWIN."""
    order = np.argsort(-np.asarray(sizes))
    mentioned = [objects[order[0]]] + [objects[i] for i in order[1:] if rng.uniform() < P_OTHER]
    mentioned = [mentioned[i] for i in rng.permutation(len(mentioned))]
    word_for = {seen: twin for twin, seen in TWINS.items()}
    mentioned = [word_for[o] if o in word_for and rng.uniform() < P_TWIN else o for o in mentioned]
    words = [o if o in PLURALS else ("an " if o[0] in "aeiou" else "a ") + o for o in mentioned]
    things = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    where = SCENES[scene][1] if rng.uniform() < 0.9 else ""
    template = ["a photo of {t} {w}", "{t} {w}", "there is {t} {w}", "{w}, {t}", "a picture of {t} {w}",
                "a drawing showing {t} {w}", "a scene {w} with {t}"][rng.integers(7)]
    return " ".join(template.format(t=things, w=where).strip(", ").split()) + "."


def present_labels(scene, objects):
    """The label names true of an image: its scene, its objects and the twin words of its objects."""
    return [scene] + objects + [twin for twin, seen in TWINS.items() if seen in objects]


def draw_example(seed, split, index):
    """(image, scene, objects, caption) of example `index` of a split; a pure function of its arguments."""
    rng = np.random.default_rng([seed, split, index])
    scene, objects = sample_scene(rng)
    image, sizes = render(scene, objects, rng)
    return image, scene, objects, caption(scene, objects, sizes, rng)


# ----------------------------------------------------------------------------------- files on disk
def make_world(root, seed=0, n_train=3000, n_test=1000):
    """Write the world's train and test splits in two views and return `root` (a Path).

    NUS-WIDE view (ZSL; the project's prepared layout, read by data.load_nuswide):
      <root>/sigrl_nuswide/{seen,unseen,train_names,test_names}.txt, train_labels.npy int8 +-1 (N, S),
      test_labels.npy int8 +-1 (M, S+U) (seen columns, then unseen), images <root>/Flickr/<folder>/<NNNN>_<id>.jpg
      listed as <folder>_<NNNN>_<id>.jpg.
    SPML view (read by load_spml_view): Cole et al.'s formatted files in <root>/sigrl_spml/toy/, all 32 labels,
      "train" = the train split, "val" = the test split, images as paths relative to root.
    <root>/toyworld.json records version, seed and sizes, first with "writing": true, and as they are once every
    file is written: a matching world is reused as it is; another toy world, or half of one (a run killed
    while writing it), is written again; a folder holding other data is refused. Two processes that need the
    same world: the second waits for the first.
    """
    root, want = Path(root), {"version": VERSION, "seed": seed, "n_train": n_train, "n_test": n_test}
    if _made(root, want):
        return root
    with safe_io.locked(root, wait=True):
        if not _made(root, want):  # (or another process made it while this one waited)
            _write_world(root, seed, n_train, n_test, want)
    return root


def _made(root, want):
    try:
        return json.loads((root / "toyworld.json").read_text()) == want
    except (OSError, ValueError, RecursionError):  # damaged, or nested too deep: the world is written again
        return False


def _write_world(root, seed, n_train, n_test, want):
    marker, nus, spml = root / "toyworld.json", root / "sigrl_nuswide", root / SPML_DIR
    if not marker.is_file() and any(p.exists() for p in (nus, spml, root / "Flickr")):
        raise DataError(f"{root} holds data that toy/world.py did not write (no toyworld.json); choose an empty or "
                        f"new folder for the toy world (--data-root)")
    safe_io.atomic_write(marker, lambda f: f.write(json.dumps({**want, "writing": True}).encode()))
    for path in (root / "Flickr", nus, spml):
        shutil.rmtree(path, ignore_errors=True)
    nus.mkdir(parents=True)
    spml.mkdir(parents=True)
    id_rng, used_ids, counters = np.random.default_rng([seed, 99]), set(), {}   # counters: folder -> last NNNN
    for split, n, prefix in [(TRAIN, n_train, "train"), (TEST, n_test, "test")]:
        names, present = [], np.zeros((n, len(LABELS)), bool)                     # (n, C) in LABELS order
        for i in range(n):
            image, scene, objects, _ = draw_example(seed, split, i)
            folder = SCENES[scene][0]
            counters[folder] = counters.get(folder, 0) + 1
            assert counters[folder] <= 9999, "NNNN has 4 digits: too many images per folder"
            flickr_id = int(id_rng.integers(10**8, 10**10))
            while flickr_id in used_ids:
                flickr_id += 1
            used_ids.add(flickr_id)
            (root / "Flickr" / folder).mkdir(exist_ok=True, parents=True)
            image.save(root / "Flickr" / folder / f"{counters[folder]:04d}_{flickr_id}.jpg", quality=92)
            names.append(f"{folder}_{counters[folder]:04d}_{flickr_id}.jpg")
            present[i, [LABELS.index(name) for name in present_labels(scene, objects)]] = True
        cols = [LABELS.index(name) for name in (SEEN if split == TRAIN else SEEN + UNSEEN)]
        (nus / f"{prefix}_names.txt").write_text("".join(f"{name}\n" for name in names))
        np.save(nus / f"{prefix}_labels.npy", np.where(present[:, cols], 1, -1).astype(np.int8))  # (n, S|S+U)
        spml_split = "train" if split == TRAIN else "val"
        labels = present.astype(np.float64)                                                    # (n, C)
        np.save(spml / f"formatted_{spml_split}_images.npy", np.array([nus_path("", n) for n in names]))
        np.save(spml / f"formatted_{spml_split}_labels.npy", labels)
        np.save(spml / f"formatted_{spml_split}_labels_obs.npy", observe_single_positive(labels))
    (nus / "seen.txt").write_text("".join(f"{name}\n" for name in SEEN))
    (nus / "unseen.txt").write_text("".join(f"{name}\n" for name in UNSEEN))
    (spml / "classes.txt").write_text("".join(f"{name}\n" for name in LABELS))
    safe_io.atomic_write(marker, lambda f: f.write(json.dumps(want).encode()))


def load_spml_view(root):
    """The SPML view of a world written by make_world, as data.Spml, split as Cole et al. (data.read_spml_folder):
    80 % of the train split trains (one observed positive each), 20 % validates, the test split tests."""
    return read_spml_folder(os.path.join(root, SPML_DIR), image_root=str(root))


# ------------------------------------------------------------------------------------- the tiny CLIP
def to_clip_input(images):
    """RGB uint8 images (B, R, R, 3) -> float (B, 3, R, R) normalised with CLIP's own mean/std."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255                # (B, 3, R, R)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@torch.no_grad()
def zeroshot(clip=TOYCLIP, n=1000, seed=0, template="There is a {} in the scene"):
    """Zero-shot CLIP on the first n images of the test split of world `seed`, drawn in memory.

    Scores = cosine(image embedding, embedding of the prompted label name), as the CLIP baseline of MKT/SigRL.
    Returns percentages: {"zsl": nus_metrics over the unseen labels, "gzsl": over all, "chance": {"zsl",
    "gzsl"}}; chance = the mAP of a random ranking, i.e. the mean label frequency.
    """
    from support.clip_files import load_clip
    from clip_text import encode_labels
    from protocol.metrics import nus_metrics
    clip = load_clip(clip) if isinstance(clip, (str, os.PathLike)) else clip
    draws = [draw_example(seed, TEST, i) for i in range(n)]
    names = SEEN + UNSEEN
    labels = np.array([[1 if name in present_labels(scene, objects) else -1 for name in names]
                       for _, scene, objects, _ in draws], np.int8)                   # (n, S+U)
    x = to_clip_input(np.stack([np.asarray(d[0]) for d in draws]))                   # (n, 3, R, R)
    image = F.normalize(torch.cat([clip.encode_image(x[i:i + 250]) for i in range(0, n, 250)]), dim=-1)
    text = F.normalize(encode_labels(clip, names, template=template), dim=-1)        # (S+U, D)
    scores = (image @ text.T).numpy()                                                # (n, S+U)
    S, freq = len(SEEN), 100 * (labels > 0).mean(0)                                  # (S+U,)
    return {"zsl": nus_metrics(scores[:, S:], labels[:, S:]), "gzsl": nus_metrics(scores, labels),
            "chance": {"zsl": float(freq[S:].mean()), "gzsl": float(freq.mean())}}



def foreign_images_warning(clip_sha256, kind, paths):
    """predict.py's one line when a tagger (`kind`) rests on the toy world's tiny CLIP (`clip_sha256` is
    toy/toyclip.pt's) and an image is not of the toy world, else None. An image counts as the toy world's when it is 64 x 64 pixels, the size
    every toy-world image is drawn at: a photo or a drawing of any other size gets the warning."""
    if not os.path.isfile(TOYCLIP) or file_sha256(TOYCLIP) != clip_sha256:
        return None
    other = []
    for path in paths:
        with Image.open(path) as im:  # the header only: the size
            if im.size != (RES, RES):
                other.append((path, *im.size))
    if not other:
        return None
    bpe = os.path.splitext(TOYCLIP)[0] + ".bpe.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        vocabulary = N_RESERVED + sum(1 for line in f.read().split("\n")[1:] if line)  # bytes, merges, SOT/EOT
    path, w, h = other[0]
    return (f"warning: {kind} rests on the toy world's tiny CLIP, which knows only {RES} x {RES} "
            f"drawings of the toy world and a vocabulary of {vocabulary} tokens; {len(other)} of {len(paths)} "
            f"images are not of that kind (first: {path}, {w} x {h}), so their tags mean little. For your own "
            f"images, train with a real CLIP: python train.py --task zsl --data nuswide --data-root DIR --clip "
            f"ViT-B-16.pt")


@cli.command
def main(argv=None):
    from support.paths import FOLDER, check_outputs
    p = cli.parser(prog="python -m toy.world", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=type(p))
    make = sub.add_parser("make", help="write the world (NUS-WIDE and SPML views) into --root")
    make.add_argument("--root", required=True)
    make.add_argument("--seed", type=cli.at_least(0), default=0)
    make.add_argument("--n-train", type=cli.at_least(1), default=3000)
    make.add_argument("--n-test", type=cli.at_least(1), default=1000)
    zs = sub.add_parser("zeroshot", help="zero-shot mAP of a CLIP file on freshly drawn test images")
    zs.add_argument("--clip", default=TOYCLIP)
    zs.add_argument("--n", type=cli.at_least(1), default=1000)
    zs.add_argument("--seed", type=cli.at_least(0), default=0)
    args = p.parse_args(argv)
    if args.command == "make":
        check_outputs([("--root", args.root, FOLDER)])
        make_world(args.root, args.seed, args.n_train, args.n_test)
        print(f"world in {args.root}: {len(SEEN)} seen + {len(UNSEEN)} unseen labels")
    else:
        r = zeroshot(args.clip, args.n, args.seed)
        for split in ("zsl", "gzsl"):
            print(f"{split.upper():4s} mAP {r[split]['map']:5.1f}  (chance {r['chance'][split]:4.1f})  "
                  f"F1@3 {r[split]['f1@3']:5.1f}  F1@5 {r[split]['f1@5']:5.1f}")


if __name__ == "__main__":
    sys.exit(main())
