"""Datasets: NUS-WIDE for (generalised) zero-shot, COCO-2014 / PASCAL VOC for single-positive multi-label.

Layouts on disk: README.md, 'Datasets'. N images, S seen / U unseen labels, C classes.
  load_nuswide(root, out=None)  the prepared layout <out or root>/sigrl_nuswide/ (numpy + text), else BiAM's h5
      layout in root. `python data.py prepare nuswide --root DIR [--out DIR]` writes the prepared layout from the
      h5 layout or from the official release, derived as BiAM/LESA did. Images: <root>/Flickr/<folder>/<file>.
  load_spml(dataset, root, year="2012", out=None)  Cole et al.'s formatted_*.npy, written on first use into
      <out or root>/sigrl_spml/<coco|voc2012|voc2007>/ (a folder per dataset, so one --out serves all).
Every bad input raises DataError: one line naming the file and what was expected. The readers of other
projects' formats (BiAM h5, the official NUS-WIDE release, COCO json, VOC lists) live in support/data_formats.py.
"""
import argparse
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from support.data_formats import (NUS_H5, NUS_RAW, DOWNLOADS, DataError, changed_source, format_coco, format_voc,
                          observe_single_positive, read_h5_layout, read_lines, read_names, read_raw_release,
                          record_sources, voc_dir)
from support.image_check import check_images
from support.parallel import seeded

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# NUS-WIDE holds very large files, which the reference code opens too. It also sets LOAD_TRUNCATED_IMAGES, which
# turns a file cut short into rows of grey without a word; here such a file fails the start-up check instead.
Image.MAX_IMAGE_PIXELS = None
NUS_DIR = "sigrl_nuswide"
SPML_FILES = [f"formatted_{s}_{k}.npy" for s in ("train", "val") for k in ("images", "labels", "labels_obs")]


def write_lines(path, names):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(n + "\n" for n in names)


def _load_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: missing or not a readable .npy file ({e})") from e


@contextlib.contextmanager
def _new_folder(folder):
    """Write into folder + ".tmp", then swap it in: an interrupted run never leaves half a layout behind."""
    tmp = folder + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        raise DataError(f"cannot write {folder} ({e.strerror}): pass --data-out DIR (data.py prepare: --out DIR) "
                        f"to write the prepared files elsewhere") from e
    print(f"wrote {folder}")


# ------------------------------------------------------------------------------------------ NUS-WIDE
@dataclass
class NusWide:
    """NUS-WIDE (G)ZSL; labels +1 / -1 (0 = unknown). ZSL uses the last U test columns, GZSL all S + U."""
    seen: list
    unseen: list
    train_paths: list
    train_labels: np.ndarray  # int8 (N, S)
    test_paths: list
    test_labels: np.ndarray  # int8 (M, S + U): seen columns, then unseen (the BiAM/MKT GZSL order)
    layout: str  # "prepared" | "h5"
    files: dict = field(default_factory=dict)  # split -> the file its labels came from (for messages)


def nus_path(root, name):
    """`<folder>_<NNNN>_<id>.jpg` -> <root>/Flickr/<folder>/<NNNN>_<id>.jpg (a folder may contain `_`)."""
    parts = name.split("_")
    if len(parts) < 3:
        raise DataError(f"image name {name!r} is not of the form <folder>_<NNNN>_<id>.jpg")
    return os.path.join(root, "Flickr", "_".join(parts[:-2]), "_".join(parts[-2:]))


def load_nuswide(root, out=None):
    """Read NUS-WIDE. `out` is the folder given to `prepare --out`: its sigrl_nuswide/ is used before root's.
    When only the h5 layout exists and `out` is given, the labels read from h5 are also saved there in the
    prepared layout, so the slow h5 read happens once. Nothing is written into root unless out is root."""
    prepared = [os.path.join(d, NUS_DIR) for d in (out, root) if d is not None]
    found = [d for d in prepared if os.path.isfile(os.path.join(d, "seen.txt"))]
    changed = found and changed_source(found[0], root)
    if changed:  # prepared from sources that have changed since: rebuilt from them where it was written
        print(f"{os.path.join(root, changed[1])} changed since {found[0]} was prepared from it: rebuilding it",
              file=sys.stderr)
        read = read_h5_layout if changed[0] == "h5" else read_raw_release
        _write_prepared(found[0], *read(root), root=root, kind=changed[0])
    if found:
        seen, unseen, train, test = _read_prepared(found[0])
        files = {s: os.path.join(found[0], f"{s}_labels.npy") for s in ("train", "test")}
    elif all(os.path.isfile(os.path.join(root, f)) for f in NUS_H5):
        seen, unseen, train, test = read_h5_layout(root)
        files = {"train": os.path.join(root, NUS_H5[0]), "test": os.path.join(root, NUS_H5[1])}
        if out is not None:
            _write_prepared(os.path.join(out, NUS_DIR), seen, unseen, train, test, root=root, kind="h5")
    elif os.path.isfile(os.path.join(root, NUS_RAW)):
        raise DataError(f"{root} holds the official NUS-WIDE release: convert it once with "
                        f"`python data.py prepare nuswide --root {root}` (add --out DIR if root is read-only)")
    else:
        raise DataError(f"no NUS-WIDE in {root}: looked for {' and '.join(d + '/seen.txt' for d in prepared)}, "
                        f"for {', '.join(NUS_H5)} (BiAM layout) and for {NUS_RAW} (official release); "
                        f"get {DOWNLOADS['biam']}")
    return NusWide(seen, unseen, [nus_path(root, n) for n in train[0]], train[1],
                   [nus_path(root, n) for n in test[0]], test[1], "prepared" if found else "h5", files)


def _check_labels(labels, path, rows, cols):
    """(rows, cols) with values in {-1, 0, 1} -> int8."""
    if labels.ndim != 2 or labels.shape != (rows, cols):
        raise DataError(f"{path}: labels of shape {labels.shape}, expected ({rows}, {cols}) = (names, labels)")
    # a range check, not np.isin: at NUS-WIDE's 150M entries isin took 8.8 s and an int64 copy of the array
    integral = np.issubdtype(labels.dtype, np.integer)
    valid = labels.size == 0 or (labels.min() >= -1 and labels.max() <= 1 if integral else
                                 ((labels == -1) | (labels == 0) | (labels == 1)).all())  # NaN fails
    if not valid:
        raise DataError(f"{path}: label values outside {{-1, 0, 1}}")
    return labels.astype(np.int8)


def _read_prepared(folder):
    seen, unseen = read_names(os.path.join(folder, "seen.txt")), read_names(os.path.join(folder, "unseen.txt"))
    splits = []
    for split, cols in (("train", len(seen)), ("test", len(seen) + len(unseen))):
        names = read_lines(os.path.join(folder, f"{split}_names.txt"))
        path = os.path.join(folder, f"{split}_labels.npy")
        splits.append((names, _check_labels(_load_npy(path), path, len(names), cols)))
    return seen, unseen, *splits


def _write_prepared(folder, seen, unseen, train, test, root, kind):
    with _new_folder(folder) as tmp:
        record_sources(tmp, root, kind)
        write_lines(os.path.join(tmp, "seen.txt"), seen)
        write_lines(os.path.join(tmp, "unseen.txt"), unseen)
        for split, (names, labels) in (("train", train), ("test", test)):
            write_lines(os.path.join(tmp, f"{split}_names.txt"), names)
            np.save(os.path.join(tmp, f"{split}_labels.npy"), labels.astype(np.int8))
    return folder


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
    test_labels: np.ndarray  # float32 (M, C) clean
    files: dict = field(default_factory=dict)  # split -> the file its labels came from (for messages)


def _spml_folder(dataset, root, year, out):
    return os.path.join(out or root, "sigrl_spml", "coco" if dataset == "coco" else f"voc{year}")


def prepare(dataset, root, out=None, year="2012"):
    """Write the formatted files of "nuswide" | "coco" | "voc" (year 2012 | 2007) under <out or root>; return
    the folder written (sigrl_nuswide/ or sigrl_spml/<coco|voc2012|voc2007>/)."""
    year = str(year)
    if dataset == "nuswide":
        if all(os.path.isfile(os.path.join(root, f)) for f in NUS_H5):
            return _write_prepared(os.path.join(out or root, NUS_DIR), *read_h5_layout(root), root=root, kind="h5")
        if os.path.isfile(os.path.join(root, NUS_RAW)):
            return _write_prepared(os.path.join(out or root, NUS_DIR), *read_raw_release(root), root=root, kind="raw")
        raise DataError(f"nothing to prepare in {root}: looked for {', '.join(NUS_H5)} (BiAM layout) "
                        f"and {NUS_RAW} (official release); get {DOWNLOADS['nuswide']}")
    if dataset not in ("coco", "voc") or year not in ("2012", "2007"):
        raise DataError(f"unknown dataset {dataset!r} / year {year!r}: expected nuswide, coco or voc (2012 | 2007)")
    classes, splits = format_coco(root) if dataset == "coco" else format_voc(root, year)
    folder = _spml_folder(dataset, root, year, out)
    with _new_folder(folder) as tmp:
        record_sources(tmp, root, dataset, year)
        write_lines(os.path.join(tmp, "classes.txt"), classes)
        for split, (images, labels) in splits.items():
            np.save(os.path.join(tmp, f"formatted_{split}_images.npy"), np.array(images, dtype=str))  # <U..
            np.save(os.path.join(tmp, f"formatted_{split}_labels.npy"), labels)
            np.save(os.path.join(tmp, f"formatted_{split}_labels_obs.npy"), observe_single_positive(labels))
    return folder


def load_spml(dataset, root, year="2012", out=None):
    """COCO-2014 or VOC (2012 default, 2007 option); formats on first use, then reuses the saved files."""
    year, folder = str(year), _spml_folder(dataset, root, str(year), out)
    changed = os.path.isdir(folder) and changed_source(folder, root)
    if changed:
        print(f"{os.path.join(root, changed[1])} changed since {folder} was prepared from it: rebuilding it",
              file=sys.stderr)
    if changed or not all(os.path.isfile(os.path.join(folder, f)) for f in SPML_FILES + ["classes.txt"]):
        prepare(dataset, root, out=out, year=year)
    return read_spml_folder(folder, root if dataset == "coco" else os.path.join(voc_dir(root, year), "JPEGImages"))


def read_spml_folder(folder, image_root, classes=None):
    """Cole et al.'s formatted_*.npy in `folder` -> Spml (classes default to folder/classes.txt). Split as
    SigRL's SPML/datasets.py (Cole et al.'s generate_split) does: a RandomState(1200) permutation sends 80 % of
    the train file to train (observed labels) and 20 % to val (clean labels); test = the val file (clean).
    Image paths are relative to image_root."""
    classes = classes or read_names(os.path.join(folder, "classes.txt"))
    a = {f[10:-4]: _load_npy(os.path.join(folder, f)) for f in SPML_FILES}  # "formatted_train_labels.npy"
    for key in ("train_labels", "train_labels_obs", "val_labels", "val_labels_obs"):  # -> "train_labels"
        want, path = (len(a[key.split("_")[0] + "_images"]), len(classes)), os.path.join(folder, f"formatted_{key}.npy")
        if a[key].shape != want:
            raise DataError(f"{path}: shape {a[key].shape}, expected {want}")
        if not np.isin(a[key], (0, 1)).all():  # NaN included: it is neither
            bad = np.asarray(a[key], np.float64)[~np.isin(a[key], (0, 1))]
            raise DataError(f"{path}: {bad.size} values that are not 0/1 labels (first: {bad[0]}"
                            f"{', NaN' if np.isnan(bad).any() else ''})")
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
    bicubic, R = T.InterpolationMode.BICUBIC, resolution
    if task == "zsl" and train:
        steps = [T.RandomResizedCrop(R, scale=(0.08, 1.0), interpolation=bicubic), T.RandomHorizontalFlip(),
                 T.RandAugment(2, 9, interpolation=bicubic, fill=[round(255 * m) for m in IMAGENET_MEAN])]
    elif task == "zsl":
        steps = [T.Resize(int(R / 0.875), interpolation=bicubic), T.CenterCrop(R)]
    elif task == "spml":
        steps = [T.Resize((2 * R, 2 * R), interpolation=T.InterpolationMode.BILINEAR)]
        steps += [T.RandomHorizontalFlip()] if train else []
    else:
        raise ValueError(f"task must be 'zsl' or 'spml', got {task!r}")
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def spml_resize(images, resolution):
    """SPML loads 2R x 2R images; the reference model resizes the normalised tensor to R (bilinear)."""
    if images.shape[-1] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)  # (B, 3, R, R)


def view_transform(task, resolution):
    """The evaluation preprocessing up to the image the model sees, as a PIL image (no tensor, no
    normalisation; SPML's 2R x 2R resized to R): for drawing pictures of it, patch grid aligned."""
    steps = [t for t in build_transform(task, False, resolution).transforms
             if not isinstance(t, (T.ToTensor, T.Normalize))]
    return T.Compose(steps + [T.Resize((resolution, resolution))])


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
            raise DataError(f"{self.paths[i]}: cannot read image ({e}); exclude it with check_images()") from e
        with seeded((*self.key, i)) if self.key is not None else contextlib.nullcontext():
            image = self.transform(image)
        return image, torch.as_tensor(np.asarray(self.labels[i])), i


def read_image(path):
    """The image as 8-bit RGB. 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: convert("RGB") alone clips
    every value above 255, so a 16-bit photograph would come out nearly white."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I"):  # "I" is how some Pillow versions open 16-bit PNGs
            wide = np.asarray(im, dtype=np.float64)  # (H, W) in 0 .. 65535
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
              (": " + ", ".join(f"{p} ({r})" for p, r in zip(bad[:5], why)) if bad else ""))


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Prepare or inspect the SigRL datasets (layouts: README.md, 'Datasets').",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  python data.py prepare nuswide --root data/NUS_WIDE       # BiAM h5 layout or official release -> sigrl_nuswide/
  python data.py prepare nuswide --root /ro/NUS_WIDE --out ~/nus   # read-only root; then load_nuswide(root, out)
  python data.py prepare coco --root data/coco              # annotations/instances_{train,val}2014.json
  python data.py show voc --root data/pascal --check-images  # VOCdevkit/VOC2012/ImageSets/Main""")
    p.add_argument("command", choices=["prepare", "show"], help="prepare: write formatted files; show: counts")
    p.add_argument("dataset", choices=["nuswide", "coco", "voc"])
    p.add_argument("--root", required=True, help="dataset folder (holds the images)")
    p.add_argument("--out", default=None, help="where the formatted files go / are read from (default: --root)")
    p.add_argument("--year", default="2012", choices=["2012", "2007"], help="VOC release (default 2012, as the code)")
    p.add_argument("--check-images", action="store_true", help="show: also open every image, list unreadable ones")
    a = p.parse_args(argv)
    try:
        prepare(a.dataset, a.root, out=a.out, year=a.year) if a.command == "prepare" else _show(a)
    except DataError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
