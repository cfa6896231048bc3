"""Readers for the dataset formats other projects ship; support/prepared.py turns their output into the project's files.

  read_h5_layout(root)      BiAM/MKT NUS-WIDE: features/nus_wide_{train,test}.h5 + img_names pickles (h5py lazily)
  read_raw_release(root)    the official NUS-WIDE release, labels derived exactly as BiAM/LESA did
  format_coco(root), format_voc(root, year), observe_single_positive(labels)   Cole et al.'s SPML formatting
  record_sources(folder, root, kind), changed_source(folder, root)   the sources a prepared folder came from
Both NUS-WIDE readers return (seen, unseen, (train_names, train_labels), (test_names, test_labels)) with int8
+1 / -1 labels, test columns seen then unseen. Each reader's docstring names the files it expects.
"""
import glob
import json
import os
import pickle

import numpy as np
from tqdm import tqdm

from support.errors import DataError

LABELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "labels")
NUS_H5 = ("features/nus_wide_train.h5", "features/nus_wide_test.h5", "img_names.pkl", "test_img_names.pkl")
NUS_RAW = "ImageList/Imagelist.txt"
# Where each dataset's files come from; the "not found" errors name them.
NUS_WIDE_PAGE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
DOWNLOADS = {
    "nuswide": f"the official NUS-WIDE release: {NUS_WIDE_PAGE}",
    "biam": ("BiAM's h5 files, https://drive.google.com/drive/folders/1jvJ0FnO_bs3HJeYrEJu7IcuilgBipasA, and MKT's "
             "pickles, https://drive.google.com/drive/folders/1kTb83_p92fM04OAkGyiHypOgwtxc4wVa; if those links are "
             f"dead, the official release ({NUS_WIDE_PAGE}) converted once with `python data.py prepare nuswide "
             "--root DIR` gives the same labels"),
    "coco": ("COCO 2014: http://images.cocodataset.org/annotations/annotations_trainval2014.zip, "
             "http://images.cocodataset.org/zips/train2014.zip and .../zips/val2014.zip"),
    "voc2012": "VOC 2012: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "voc2007": ("VOC 2007: http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar and "
                ".../voc2007/VOCtest_06-Nov-2007.tar"),
}



def read_lines(path, source=None):
    """Stripped non-empty lines (CRLF fine) of a UTF-8 text file. `source`: where the file comes from, for the
    "not found" error."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found" + (f" (from {source})" if source else ""))
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM (Windows Notepad's "UTF-8") is not a name
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8") from None


def read_names(path, source=None):
    """A label list, one name per line; an `index<TAB>name` line gives its last field (as MKT tolerates)."""
    return [line.split("\t")[-1].strip() for line in read_lines(path, source)]


def bundled(name):
    """A list from the repository's labels/ folder, e.g. bundled("nuswide_925.txt")."""
    return read_names(os.path.join(LABELS_DIR, name))


# ------------------------------------------------------------------------------------------ NUS-WIDE
class _NoGlobals(pickle.Unpickler):
    """img_names.pkl is a dict of str: refusing every global makes loading a downloaded pickle safe."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickled_names(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (from {DOWNLOADS['biam']})")
    try:
        with open(path, "rb") as f:
            names = _NoGlobals(f).load()["img_names"]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: expected a pickled dict {{'img_names': [str, ...]}} ({e})") from e


def _read_h5_labels(path, names, cols):
    """Each `<name>-labels` dataset, looked up by name (the files also hold `-labels_81` and `-features`)."""
    try:
        import h5py
    except ImportError:
        raise DataError(f"reading {path} needs h5py: `pip install h5py`, or convert once with `python data.py "
                        "prepare nuswide --root DIR` where h5py is installed") from None
    labels = np.empty((len(names), cols), np.int8)  # (N, cols)
    try:
        with h5py.File(path, "r") as f:
            for i, name in enumerate(tqdm(names, desc=os.path.basename(path), unit="img", disable=None)):
                ds = f.get(name + "-labels")
                row = None if ds is None else np.asarray(ds[()]).reshape(-1)  # (cols,) int8 in BiAM's files
                if row is None or row.shape != (cols,) or not np.isin(row, (-1, 0, 1)).all():
                    raise DataError(f"{path}: dataset {name}-labels is {'missing' if row is None else row.shape}, "
                                    f"expected ({cols},) values in -1/0/1")
                labels[i] = row
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from e
    return labels


def read_h5_layout(root):
    """BiAM/MKT layout: names from the pickles (file order kept), labels from the h5 files, columns as labels/."""
    seen, unseen = bundled("nuswide_925.txt"), bundled("nuswide_81.txt")
    for fname, expected in (("Concepts925.txt", seen), ("Concepts81.txt", unseen)):
        path = os.path.join(root, fname)  # optional; when present it must be the h5 column order
        names = read_names(path) if os.path.isfile(path) else expected
        bad = [i for i, (a, b) in enumerate(zip(names, expected)) if a != b]
        if bad:
            raise DataError(f"{path}: line {bad[0] + 1} is {names[bad[0]]!r}, expected {expected[bad[0]]!r}")
        if len(names) != len(expected):
            raise DataError(f"{path}: {len(names)} lines, expected {len(expected)}")
    splits = []
    for pkl, h5, cols in (("img_names.pkl", NUS_H5[0], len(seen)),
                          ("test_img_names.pkl", NUS_H5[1], len(seen) + len(unseen))):
        names = _read_pickled_names(os.path.join(root, pkl))  # its order is the row order: keep it
        splits.append((names, _read_h5_labels(os.path.join(root, h5), names, cols)))
    return seen, unseen, *splits


def _bits(tokens, path, where, n):
    """n tokens, each "0" or "1" -> uint8 (n,)."""
    joined = b"".join(tokens)
    bits = np.frombuffer(joined, np.uint8) - 48  # ASCII "0"/"1" -> 0/1; anything else lands above 1
    if len(tokens) != n or len(joined) != n or (bits > 1).any():
        raise DataError(f"{path}: {where} has {len(tokens)} values, expected {n} values of 0/1")
    return bits


def _read_imagelist(path):
    """Windows list lines (`actor\\0001_2124494179.jpg`, maybe `C:\\ImageData\\Flickr\\...`) -> `folder/file`."""
    lines = read_lines(path, DOWNLOADS["nuswide"])
    rel = [line.replace("\\", "/").rsplit("Flickr/", 1)[-1] for line in lines]
    for r in rel:
        if r.count("/") != 1 or r.split("/")[1].count("_") != 1:
            raise DataError(f"{path}: {r!r} is not <folder>\\<NNNN>_<id>.jpg")
    return rel


def read_raw_release(root):
    """The official release -> seen/unseen lists and +-1 labels, exactly as BiAM/LESA derived them (1b)."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    taglist = read_names(j("NUS_WID_Tags", "TagList1k.txt"), DOWNLOADS["nuswide"])
    concepts = read_names(j("ConceptsList", "Concepts81.txt") if os.path.isfile(j("ConceptsList", "Concepts81.txt"))
                          else j("Concepts81.txt"), DOWNLOADS["nuswide"])
    concept_set = set(concepts)
    seen = [t for t in taglist if t not in concept_set]  # TagList1k order minus the concepts
    every = _read_imagelist(j(NUS_RAW))  # its order is the row order of every All* file
    path = j("NUS_WID_Tags", "AllTags1k.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (from {DOWNLOADS['nuswide']})")
    with open(path, "rb") as f:  # whitespace split: tabs and a trailing separator are fine
        tags = [_bits(line.split(), path, f"row {i + 1}", len(taglist)) for i, line in
                enumerate(tqdm(f, total=len(every), desc="AllTags1k.txt", unit="img", disable=None)) if line.strip()]
    if len(tags) != len(every):
        raise DataError(f"{path}: {len(tags)} rows, expected {len(every)} (one per line of Imagelist.txt)")
    tags = np.stack(tags)  # (A, 1000) 0/1
    human = np.zeros((len(every), len(concepts)), np.uint8)  # (A, U) 0/1
    for c, name in enumerate(concepts):
        path = j("Groundtruth", "AllLabels", f"Labels_{name}.txt")
        human[:, c] = _bits([line.encode() for line in read_lines(path, DOWNLOADS["nuswide"])], path, "the file",
                            len(every))
    row_of, seen_cols, splits = {r: i for i, r in enumerate(every)}, [taglist.index(s) for s in seen], []
    for fname in ("TrainImagelist.txt", "TestImagelist.txt"):
        path = j("ImageList", fname)
        rel = _read_imagelist(path)
        missing = [r for r in rel if r not in row_of]
        if missing:
            raise DataError(f"{path}: {missing[0]} is not listed in Imagelist.txt")
        rows = np.array([row_of[r] for r in rel], dtype=np.int64)  # (N,)
        y = tags[rows][:, seen_cols]  # (N, S): the train `-labels`
        if fname.startswith("Test"):
            y = np.concatenate([y, human[rows]], 1)  # (N, S + U): the test `-labels`, seen first
        splits.append(([r.replace("/", "_") for r in rel], 2 * y.astype(np.int8) - 1))
    return seen, concepts, *splits


# ------------------------------------------------------------------------------------------ COCO / VOC (SPML)
def format_coco(root):
    """Rows: images with >= 1 annotation (crowd included), sorted by id AS A STRING; columns: json categories."""
    cats, splits = None, {}
    for split in ("train", "val"):
        path = os.path.join(root, "annotations", f"instances_{split}2014.json")
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found (from {DOWNLOADS['coco']})")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            these = [(int(c["id"]), str(c["name"])) for c in d["categories"]]
            pairs = [(str(int(a["image_id"])), int(a["category_id"])) for a in d["annotations"]]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:  # bad JSON, a non-integer id
            raise DataError(f"{path}: expected COCO instances json with categories and annotations ({e})") from e
        if cats is not None and these != cats:
            raise DataError(f"{path}: category list differs from instances_train2014.json")
        cats, col = these, {cid: c for c, (cid, _) in enumerate(these)}
        ids = sorted({i for i, _ in pairs})  # "10" < "9": string order, as the reference's np.unique on str
        row, labels = {i: r for r, i in enumerate(ids)}, np.zeros((len(ids), len(cats)))  # (N, C) float64
        for i, c in pairs:
            if c not in col:
                raise DataError(f"{path}: annotation with unknown category_id {c}")
            labels[row[i], col[c]] = 1.0
        splits[split] = ([f"{split}2014/COCO_{split}2014_{int(i):012d}.jpg" for i in ids], labels)
    return [name for _, name in cats], splits


def voc_dir(root, year):
    tried = [os.path.join(root, "VOCdevkit", f"VOC{year}"), os.path.join(root, f"VOC{year}"), root]
    for d in tried:
        if os.path.isdir(os.path.join(d, "ImageSets", "Main")):
            return d
    raise DataError(f"no VOC{year} in {root}: looked for ImageSets/Main in {', '.join(tried)} (from "
                    f"{DOWNLOADS['voc' + year]})")


def format_voc(root, year):
    """Per-class files `<id> <label>`: 1 -> positive; 0 (difficult only) and -1 -> 0. Rows sorted by file name."""
    main, classes, splits = os.path.join(voc_dir(root, year), "ImageSets", "Main"), bundled("voc_20.txt"), {}
    for split, phase in zip(("train", "val"), ("train", "val") if year == "2012" else ("trainval", "test")):
        table = {}
        for c, name in enumerate(classes):
            path = os.path.join(main, f"{name}_{phase}.txt")
            for line in read_lines(path, DOWNLOADS["voc" + year]):
                parts = line.split()  # the devkit right-aligns the label: two spaces before a 1
                if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                    raise DataError(f"{path}: line {line!r} is not '<image id> <1|0|-1>'")
                table.setdefault(parts[0], np.zeros(len(classes)))[c] = float(parts[1] == "1")
        ids = sorted(i for i, y in table.items() if y.any())
        if not ids:
            raise DataError(f"{main}: no image has a label 1 in the *_{phase}.txt files")
        splits[split] = ([i + ".jpg" for i in ids], np.stack([table[i] for i in ids]))  # (N, C) float64
    return classes, splits


# ------------------------------------------------------------------------------------------ sources
def source_files(kind, root, year="2012"):
    """The files (relative to root) that each reader reads labels from: kind = "h5" | "raw" | "coco" | "voc".
    Prepared label files record their sizes and times, so a changed source is noticed (support/prepared.py)."""
    if kind == "voc":
        main = os.path.relpath(os.path.join(voc_dir(root, year), "ImageSets", "Main"), root)
        patterns = [os.path.join(main, "*.txt")]
    else:
        patterns = {"h5": [*NUS_H5, "Concepts925.txt", "Concepts81.txt"],
                    "raw": ["ImageList/*.txt", "NUS_WID_Tags/*.txt", "Concepts81.txt", "ConceptsList/Concepts81.txt",
                            "Groundtruth/AllLabels/Labels_*.txt"],
                    "coco": ["annotations/instances_train2014.json", "annotations/instances_val2014.json"]}[kind]
    return sorted({os.path.relpath(p, root) for pattern in patterns for p in glob.glob(os.path.join(root, pattern))})


def fingerprint(root, files):
    """{file: [size, modification time in ns]}: cheap even for BiAM's h5 files (they also hold image features),
    and any edit or copy of a source changes it (a copy that does not keep the times costs one needless
    rebuild, never a stale file)."""
    stats = {f: os.stat(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f))}
    return {f: [st.st_size, st.st_mtime_ns] for f, st in stats.items()}


SOURCES = "sources.json"  # in a prepared folder: {"kind": reader, "year": VOC year, "files": fingerprint(...)}


def record_sources(folder, root, kind, year="2012"):
    """Write folder/sources.json: which reader made the prepared files in `folder`, and its sources' fingerprint."""
    files = fingerprint(root, source_files(kind, root, year))
    with open(os.path.join(folder, SOURCES), "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "year": year, "files": files}, f, indent=1)


def changed_source(folder, root):
    """(kind, the first source file that changed since `folder` was prepared) or None. A folder without a
    record (prepared by hand, by the toy world, or before records existed) is trusted; a source that is gone
    (deleted to save space once prepared) is not a change."""
    path = os.path.join(folder, SOURCES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        files, kind = list(record["files"]), record["kind"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise DataError(f"{path}: not the record of sources this project writes ({e}); delete {folder} to have "
                        f"it prepared again") from None
    now = fingerprint(root, files)
    changed = [f for f in record["files"] if f in now and now[f] != record["files"][f]]
    return (kind, changed[0]) if changed else None


def observe_single_positive(labels):
    """Cole et al.'s preproc/generate_observed_labels.py: a fresh RandomState(1200) per file; per row the
    positive indices are shuffled and the first kept, then the negative indices are shuffled too: none is kept,
    but it advances the generator exactly as the reference does, which reproduces the published draw."""
    signed = np.where(labels == 1, 1, -1)  # (N, C); 0 -> -1
    if not ((signed == 1).any() and (signed == -1).any()):
        raise DataError("the label matrix must hold both positives and negatives")
    rng, obs = np.random.RandomState(1200), np.zeros_like(labels)  # (N, C)
    for r, y in enumerate(signed):
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
        rng.shuffle(pos)
        rng.shuffle(neg)
        obs[r, pos[0]] = 1.0
    return obs


if __name__ == "__main__":
    demo = np.array([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=np.float64)  # (N, C) clean labels
    print("clean labels\n", demo, "\none observed positive per row (Cole et al., RandomState(1200))\n",
          observe_single_positive(demo))
