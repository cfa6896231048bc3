"""Datasets: NUS-WIDE for (generalised) zero-shot, COCO-2014 / PASCAL VOC for single-positive multi-label.

Layouts on disk, by loader (N images of a split, S seen / U unseen labels, C classes; the legend below):
  load_nuswide(root, out=None)  the prepared layout <out or root>/sigrl_nuswide/ (numpy + text), else BiAM's h5
      layout in root. `python data.py prepare nuswide --root DIR [--out DIR]` writes the prepared layout from the
      h5 layout or from the official release, derived as BiAM/LESA did. Images: <root>/Flickr/<folder>/<file>.
  load_spml(dataset, root, year="2012", out=None)  Cole et al.'s formatted_*.npy, written on first use into
      <out or root>/sigrl_spml/<coco|voc2012|voc2007>/ (a folder per dataset, so one --out serves all).
Every bad input raises DataError: one line naming the file and what was expected. The files on disk are
machinery a first reading may skip: support/prepared.py writes and reads the prepared layouts, from the readers
of other projects' formats (BiAM h5, the official NUS-WIDE release, COCO json, VOC lists) in support/data_formats.py.

Shape legend: the book's one legend (in full in vit.py and README.md). Here: N images of a split, B images in a
batch, R image side in pixels, C classes (S seen, U unseen).
"""
import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms

from support import cli, prepared
from support.errors import DataError
from support.prepared import prepare
from support.image_check import check_images, forget_verdicts, shape_problem
from support.parallel import seeded
from support.paths import FOLDER, check_outputs, printable

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# NUS-WIDE holds very large files, which the reference code opens too. It also sets LOAD_TRUNCATED_IMAGES, which
# turns a file cut short into rows of grey without a word; here such a file fails the start-up check instead.
Image.MAX_IMAGE_PIXELS = None


# ------------------------------------------------------------------------------------------ NUS-WIDE
@dataclass
class NusWide:
    """NUS-WIDE (G)ZSL; labels +1 / -1 (0 = unknown). ZSL uses the last U test columns, GZSL all S + U."""
    seen: list
    unseen: list
    train_paths: list
    train_labels: np.ndarray  # int8 (N, S)
    test_paths: list
    test_labels: np.ndarray  # int8 (N, S + U): seen columns, then unseen (the BiAM/MKT GZSL order)
    layout: str  # "prepared" | "h5"
    files: dict = field(default_factory=dict)  # split -> the file its labels came from (for messages)


def nus_path(root, name):
    """`<folder>_<NNNN>_<id>.jpg` -> <root>/Flickr/<folder>/<NNNN>_<id>.jpg (a folder may contain `_`)."""
    parts = name.split("_")
    if len(parts) < 3:
        raise DataError(f"image name {name!r} is not of the form <folder>_<NNNN>_<id>.jpg")
    return os.path.join(root, "Flickr", "_".join(parts[:-2]), "_".join(parts[-2:]))


def load_nuswide(root, out=None):
    """Read NUS-WIDE: its prepared layout (<out or root>/sigrl_nuswide/, support/prepared.py), else BiAM's h5
    layout in root (saved into out's prepared layout when out is given, so the slow h5 read happens once)."""
    seen, unseen, train, test, layout, files = prepared.nuswide_labels(root, out)
    return NusWide(seen, unseen, [nus_path(root, n) for n in train[0]], train[1],
                   [nus_path(root, n) for n in test[0]], test[1], layout, files)


# ------------------------------------------------------------------------------------------ COCO / VOC (SPML)
@dataclass
class Spml:
    """Cole et al.'s protocol: train/val = 80/20 of the official train split, test = the official val split."""
    classes: list
    train_paths: list
    train_obs: np.ndarray  # float32 (N, C) {0, 1}: one observed positive per image, nothing else observed
    train_true: np.ndarray  # float32 (N, C) the clean labels of the same images
    val_paths: list
    val_labels: np.ndarray  # float32 (Nv, C) clean
    test_paths: list
    test_labels: np.ndarray  # float32 (N, C) clean
    files: dict = field(default_factory=dict)  # split -> the file its labels came from (for messages)


def load_spml(dataset, root, year="2012", out=None):
    """COCO-2014 or VOC (2012 default, 2007 option); formats on first use, then reuses the saved files."""
    return read_spml_folder(*prepared.spml_folder(dataset, root, str(year), out))


def read_spml_folder(folder, image_root, classes=None):
    """Cole et al.'s formatted_*.npy in `folder` -> Spml (classes default to folder/classes.txt). Split as
    SigRL's SPML/datasets.py (Cole et al.'s generate_split) does: a RandomState(1200) permutation sends 80 % of
    the train file to train (observed labels) and 20 % to val (clean labels); test = the val file (clean).
    Image paths are relative to image_root."""
    classes, a = prepared.read_spml_arrays(folder, classes)
    paths = [os.path.join(image_root, p) for p in a["train_images"]]
    n_train = len(paths) - int(np.round(0.2 * len(paths)))
    perm = np.random.RandomState(1200).permutation(len(paths))
    tr, va = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    files = {s: os.path.join(folder, f) for s, f in (("train", "formatted_train_labels_obs.npy"),
                                                      ("val", "formatted_train_labels.npy"),
                                                      ("test", "formatted_val_labels.npy"))}
    return Spml(list(classes), [paths[i] for i in tr], f32(a["train_labels_obs"][tr]), f32(a["train_labels"][tr]),
                [paths[i] for i in va], f32(a["train_labels"][va]),
                [os.path.join(image_root, p) for p in a["val_images"]], f32(a["val_labels"]), files)


# ------------------------------------------------------------------------------------------ images
def build_transform(task, train, resolution):
    """The reference preprocessing at R = `resolution`, the checkpoint's input size: SigRL's OV code builds it
    with timm 0.6.12's create_transform (input size 224), its SPML/datasets.py with torchvision; both normalise
    with the ImageNet mean/std, not CLIP's.

    zsl train: RandomResizedCrop(R, scale (0.08, 1), bicubic) -> flip -> RandAugment(2 ops, magnitude 9, bicubic,
               fill = ImageNet mean) -> tensor -> ImageNet mean/std. Reference code differs: timm's
               "rand-m9-mstd0.5-inc1" draws each magnitude from N(9, 0.5), applies each op with p = 0.5 and picks
               from its own op set (Invert, SolarizeAdd, no Identity); torchvision's RandAugment does not.
    zsl eval:  Resize the shorter side to int(R / 0.875) (256 for 224: timm's floor), bicubic -> CenterCrop(R).
    spml:      Resize((2R, 2R)) bilinear (448 for 224) [+ flip in training]; spml_resize (below) resizes the
               normalised batch to R, as the reference model does.
    """
    bicubic, R = transforms.InterpolationMode.BICUBIC, resolution
    if task == "zsl" and train:
        steps = [transforms.RandomResizedCrop(R, scale=(0.08, 1.0), interpolation=bicubic), transforms.RandomHorizontalFlip(),
                 transforms.RandAugment(2, 9, interpolation=bicubic, fill=[round(255 * m) for m in IMAGENET_MEAN])]
    elif task == "zsl":
        steps = [transforms.Resize(int(R / 0.875), interpolation=bicubic), transforms.CenterCrop(R)]
    elif task == "spml":
        steps = [transforms.Resize((2 * R, 2 * R), interpolation=transforms.InterpolationMode.BILINEAR)]
        steps += [transforms.RandomHorizontalFlip()] if train else []
    else:
        raise ValueError(f"task must be 'zsl' or 'spml', got {task!r}")
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def spml_resize(images, resolution):
    """SPML loads 2R x 2R images; the reference model resizes the normalised tensor to R (bilinear)."""
    if images.shape[-1] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)  # (B, 3, R, R)


def view_transform(task, resolution):
    """The evaluation preprocessing up to the image the model sees, as a PIL image (no tensor, no
    normalisation; SPML's 2R x 2R resized to R): for drawing pictures of it, patch grid aligned."""
    steps = [t for t in build_transform(task, False, resolution).transforms
             if not isinstance(t, (transforms.ToTensor, transforms.Normalize))]
    return transforms.Compose(steps + [transforms.Resize((resolution, resolution))])


class ImageList(torch.utils.data.Dataset):
    """(image, label row as a tensor, index). Run check_images first: an unreadable file here is an error.
    key: a tuple of ints; when given, image i's random transform draws from a generator seeded by (*key, i), so an
    image is augmented the same way whichever process, worker or batch loads it (train.py: key = (seed, epoch))."""

    def __init__(self, paths, labels, transform, key=None):
        assert len(paths) == len(labels), f"{len(paths)} paths but {len(labels)} label rows"
        self.paths, self.labels, self.transform, self.key = list(paths), labels, transform, key

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = read_image(self.paths[i])
        except (OSError, ValueError) as e:  # missing, not an image, cut short
            forget_verdicts()  # the start-up check passed it: no cached verdict is trusted any more
            raise DataError(f"{self.paths[i]}: cannot read image ({' '.join(str(e).split())}), though the start-up "
                            f"check passed it (changed since, or its disk fails); replace or delete it, or run the "
                            f"same command again: its start-up check then decodes every image anew and leaves out "
                            f"the unreadable ones") from e
        with seeded((*self.key, i)) if self.key is not None else contextlib.nullcontext():
            image = self.transform(image)
        return image, torch.as_tensor(np.asarray(self.labels[i])), i


def read_image(path):
    """The image as people see it, as 8-bit RGB: every reader (training, evaluation, predict.py, its explain
    pictures, Fig. 3) goes through here, so a picture always shows the pixels that were scored.
    EXIF orientation is applied (a phone stores a portrait photo sideways with Orientation = 6; every viewer
    turns it upright). 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: convert("RGB") alone clips every value
    above 255, so a 16-bit photograph would come out nearly white. An image whose shape would make the resize
    unbounded (support/image_check.MAX_ASPECT) is refused with a ValueError before its pixels are decoded."""
    with Image.open(path) as im:
        if shape_problem(im.size):
            raise ValueError(shape_problem(im.size))
        im = ImageOps.exif_transpose(im)  # a copy turned upright, or `im` itself when there is nothing to turn
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):  # "I" is how some Pillow versions open 16-bit PNGs
            wide = np.asarray(im, dtype=np.float64)  # (rows, columns) in 0 .. 65535
            return Image.fromarray(np.round(np.clip(wide, 0, 65535) * (255 / 65535)).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


# ------------------------------------------------------------------------------------------ command line
def _show(a):
    if a.dataset == "nuswide":
        d = load_nuswide(a.root, a.out)
        print(f"NUS-WIDE ({d.layout} layout): {len(d.seen)} seen + {len(d.unseen)} unseen labels\n"
              f"train: {len(d.train_paths)} images, {int((d.train_labels == 1).any(1).sum())} with a seen positive\n"
              f"test:  {len(d.test_paths)} images, {int((d.test_labels[:, len(d.seen):] == 1).any(1).sum())} "
              "with an unseen positive")
        paths = d.train_paths + d.test_paths
    else:
        d = load_spml(a.dataset, a.root, a.year, a.out)
        print(f"{a.dataset}: {len(d.classes)} classes; train {len(d.train_paths)} (one observed positive each) / "
              f"val {len(d.val_paths)} / test {len(d.test_paths)} images")
        paths = d.train_paths + d.val_paths + d.test_paths
    if a.check_images:
        _, bad, why = check_images(paths)
        print(f"{len(bad)} of {len(paths)} images missing or unreadable" +
              (": " + printable(", ".join(f"{p} ({r})" for p, r in zip(bad[:5], why))) if bad else ""))


def demo():
    """No arguments: what the preprocessing does to one made-up photo, at ViT-B/16's input size (writes nothing)."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))  # (H, W, 3)
    print(f"a made-up {photo.width} x {photo.height} photo, as each pipeline hands it to a 224 px model:")
    for task, train in (("zsl", True), ("zsl", False), ("spml", True), ("spml", False)):
        with seeded((0,)):  # the training pipelines draw their crop, flip and RandAugment ops from here
            x = build_transform(task, train, 224)(photo)  # (3, R, R), or (3, 2R, 2R) for SPML
        print(f"  {task + (' train:' if train else ' eval:'):12}{tuple(x.shape)}, mean {x.mean():+.3f}, std {x.std():.3f}")
    print("datasets: python data.py prepare|show nuswide|coco|voc --root DIR (see --help); the toy world needs none")


@cli.command
def main(argv=None):
    p = cli.parser(
        description="Prepare or inspect the SigRL datasets: NUS-WIDE (BiAM h5 layout or the official release), "
                    "COCO 2014, PASCAL VOC 2012 / 2007.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python data.py prepare nuswide --root data/NUS_WIDE       # BiAM h5 layout or official release -> sigrl_nuswide/
  python data.py prepare nuswide --root /ro/NUS_WIDE --out ~/nus   # read-only root; then load_nuswide(root, out)
  python data.py prepare coco --root data/coco              # annotations/instances_{train,val}2014.json
  python data.py show voc --root data/pascal --check-images  # VOCdevkit/VOC2012/ImageSets/Main
  python data.py                                            # no dataset: the preprocessing on a made-up photo""")
    p.add_argument("command", choices=["prepare", "show"], help="prepare: write formatted files; show: counts")
    p.add_argument("dataset", choices=["nuswide", "coco", "voc"])
    p.add_argument("--root", required=True, help="dataset folder (holds the images)")
    p.add_argument("--out", default=None, help="where the formatted files go / are read from (default: --root)")
    p.add_argument("--year", default="2012", choices=["2012", "2007"], help="VOC release (default 2012, as the code)")
    p.add_argument("--check-images", action="store_true", help="show: also open every image, list unreadable ones")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    a = p.parse_args(argv)
    check_outputs([("--out", a.out, FOLDER)])
    prepare(a.dataset, a.root, out=a.out, year=a.year) if a.command == "prepare" else _show(a)


if __name__ == "__main__":
    sys.exit(main())
