"""The project's prepared label files on disk, written once from the formats other projects ship
(support/data_formats.py) and rebuilt when those sources change: <out or root>/sigrl_nuswide/ (NUS-WIDE) and
<out or root>/sigrl_spml/<coco|voc2012|voc2007>/ (Cole et al.'s formatted_*.npy). data.py reads them through here.
"""
import contextlib
import os
import shutil
import sys

import numpy as np

from support.data_formats import (NUS_H5, NUS_RAW, DOWNLOADS, DataError, changed_source, format_coco, format_voc,
                                  observe_single_positive, read_h5_layout, read_lines, read_names, read_raw_release,
                                  record_sources, voc_dir)

NUS_DIR = "sigrl_nuswide"
SPML_FILES = [f"formatted_{s}_{k}.npy" for s in ("train", "val") for k in ("images", "labels", "labels_obs")]


def write_lines(path, names):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(n + "\n" for n in names)


def load_npy(path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: missing or not a readable .npy file ({e})") from e


@contextlib.contextmanager
def new_folder(folder):
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
def nuswide_labels(root, out=None):
    """NUS-WIDE's label lists and matrices -> (seen, unseen, (train_names, train_labels), (test_names,
    test_labels), layout "prepared" | "h5", {split: the file its labels came from}). `out` is the folder given to
    `prepare --out`: its sigrl_nuswide/ is used before root's.
    When only the h5 layout exists and `out` is given, the labels read from h5 are also saved there in the
    prepared layout, so the slow h5 read happens once. Nothing is written into root unless out is root."""
    prepared = [os.path.join(d, NUS_DIR) for d in (out, root) if d is not None]
    found = [d for d in prepared if os.path.isfile(os.path.join(d, "seen.txt"))]
    changed = found and changed_source(found[0], root)
    if changed:  # prepared from sources that have changed since: rebuilt from them where it was written
        print(f"{os.path.join(root, changed[1])} changed since {found[0]} was prepared from it: rebuilding it",
              file=sys.stderr)
        read = read_h5_layout if changed[0] == "h5" else read_raw_release
        write_prepared(found[0], *read(root), root=root, kind=changed[0])
    if found:
        seen, unseen, train, test = read_prepared(found[0])
        files = {s: os.path.join(found[0], f"{s}_labels.npy") for s in ("train", "test")}
    elif all(os.path.isfile(os.path.join(root, f)) for f in NUS_H5):
        seen, unseen, train, test = read_h5_layout(root)
        files = {"train": os.path.join(root, NUS_H5[0]), "test": os.path.join(root, NUS_H5[1])}
        if out is not None:
            write_prepared(os.path.join(out, NUS_DIR), seen, unseen, train, test, root=root, kind="h5")
    elif os.path.isfile(os.path.join(root, NUS_RAW)):
        raise DataError(f"{root} holds the official NUS-WIDE release: convert it once with "
                        f"`python data.py prepare nuswide --root {root}` (add --out DIR if root is read-only)")
    else:
        raise DataError(f"no NUS-WIDE in {root}: looked for {' and '.join(d + '/seen.txt' for d in prepared)}, "
                        f"for {', '.join(NUS_H5)} (BiAM layout) and for {NUS_RAW} (official release); "
                        f"get {DOWNLOADS['biam']}")
    return seen, unseen, train, test, "prepared" if found else "h5", files


def check_labels(labels, path, rows, cols):
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


def read_prepared(folder):
    seen, unseen = read_names(os.path.join(folder, "seen.txt")), read_names(os.path.join(folder, "unseen.txt"))
    splits = []
    for split, cols in (("train", len(seen)), ("test", len(seen) + len(unseen))):
        names = read_lines(os.path.join(folder, f"{split}_names.txt"))
        path = os.path.join(folder, f"{split}_labels.npy")
        splits.append((names, check_labels(load_npy(path), path, len(names), cols)))
    return seen, unseen, *splits


def write_prepared(folder, seen, unseen, train, test, root, kind):
    with new_folder(folder) as tmp:
        record_sources(tmp, root, kind)
        write_lines(os.path.join(tmp, "seen.txt"), seen)
        write_lines(os.path.join(tmp, "unseen.txt"), unseen)
        for split, (names, labels) in (("train", train), ("test", test)):
            write_lines(os.path.join(tmp, f"{split}_names.txt"), names)
            np.save(os.path.join(tmp, f"{split}_labels.npy"), labels.astype(np.int8))
    return folder


# ------------------------------------------------------------------------------------------ COCO / VOC (SPML)
def spml_dir(dataset, root, year, out):
    return os.path.join(out or root, "sigrl_spml", "coco" if dataset == "coco" else f"voc{year}")


def prepare(dataset, root, out=None, year="2012"):
    """Write the formatted files of "nuswide" | "coco" | "voc" (year 2012 | 2007) under <out or root>; return
    the folder written (sigrl_nuswide/ or sigrl_spml/<coco|voc2012|voc2007>/)."""
    year = str(year)
    if dataset == "nuswide":
        if all(os.path.isfile(os.path.join(root, f)) for f in NUS_H5):
            return write_prepared(os.path.join(out or root, NUS_DIR), *read_h5_layout(root), root=root, kind="h5")
        if os.path.isfile(os.path.join(root, NUS_RAW)):
            return write_prepared(os.path.join(out or root, NUS_DIR), *read_raw_release(root), root=root, kind="raw")
        raise DataError(f"nothing to prepare in {root}: looked for {', '.join(NUS_H5)} (BiAM layout) "
                        f"and {NUS_RAW} (official release); get {DOWNLOADS['nuswide']}")
    if dataset not in ("coco", "voc") or year not in ("2012", "2007"):
        raise DataError(f"unknown dataset {dataset!r} / year {year!r}: expected nuswide, coco or voc (2012 | 2007)")
    classes, splits = format_coco(root) if dataset == "coco" else format_voc(root, year)
    folder = spml_dir(dataset, root, year, out)
    with new_folder(folder) as tmp:
        record_sources(tmp, root, dataset, year)
        write_lines(os.path.join(tmp, "classes.txt"), classes)
        for split, (images, labels) in splits.items():
            np.save(os.path.join(tmp, f"formatted_{split}_images.npy"), np.array(images, dtype=str))  # <U..
            np.save(os.path.join(tmp, f"formatted_{split}_labels.npy"), labels)
            np.save(os.path.join(tmp, f"formatted_{split}_labels_obs.npy"), observe_single_positive(labels))
    return folder


def spml_folder(dataset, root, year="2012", out=None):
    """The prepared folder of COCO-2014 or VOC (2012 default, 2007 option) and the folder its image paths are
    relative to; formatted on first use (and when its sources changed), then reused."""
    year, folder = str(year), spml_dir(dataset, root, str(year), out)
    changed = os.path.isdir(folder) and changed_source(folder, root)
    if changed:
        print(f"{os.path.join(root, changed[1])} changed since {folder} was prepared from it: rebuilding it",
              file=sys.stderr)
    if changed or not all(os.path.isfile(os.path.join(folder, f)) for f in SPML_FILES + ["classes.txt"]):
        prepare(dataset, root, out=out, year=year)
    return folder, root if dataset == "coco" else os.path.join(voc_dir(root, year), "JPEGImages")


def read_spml_arrays(folder, classes=None):
    """Cole et al.'s formatted_{train,val}_{images,labels,labels_obs}.npy in `folder`, checked -> (classes,
    {"train_images": ..., "train_labels": ..., ...}); classes default to folder/classes.txt."""
    classes = classes or read_names(os.path.join(folder, "classes.txt"))
    a = {f[10:-4]: load_npy(os.path.join(folder, f)) for f in SPML_FILES}  # "formatted_train_labels.npy"
    for key in ("train_labels", "train_labels_obs", "val_labels", "val_labels_obs"):  # -> "train_labels"
        want, path = (len(a[key.split("_")[0] + "_images"]), len(classes)), os.path.join(folder, f"formatted_{key}.npy")
        if a[key].shape != want:
            raise DataError(f"{path}: shape {a[key].shape}, expected {want}")
        if not np.isin(a[key], (0, 1)).all():  # NaN included: it is neither
            bad = np.asarray(a[key], np.float64)[~np.isin(a[key], (0, 1))]
            raise DataError(f"{path}: {bad.size} values that are not 0/1 labels (first: {bad[0]}"
                            f"{', NaN' if np.isnan(bad).any() else ''})")
    return classes, a
