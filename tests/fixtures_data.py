"""Tiny datasets in each REAL on-disk format (BiAM h5 / official NUS-WIDE release, COCO json, VOC lists), for the data, train and eval tests.

  make_nuswide_h5(dir)    -> root      BiAM/MKT layout: h5 label files, name pickles, Concepts*.txt, label_emb.pt
  make_nuswide_raw(dir)   -> (root, expected)   the official release; `expected` = labels computed by hand
  make_coco(dir)          -> root      COCO-2014: annotations/instances_{train,val}2014.json + images
  make_voc(dir, year)     -> root      VOCdevkit/VOC<year>/ImageSets/Main/<cls>_<phase>.txt + JPEGImages
Images are seeded 24 x 24 colour-noise JPEGs. Everything is deterministic for a given seed, and the two NUS-WIDE
builders describe the SAME world for the same arguments (so a test can compare the two layouts). Every class has
a positive in the training part (for SPML: in the 80 % that load_spml keeps for training), so training tests
have something to learn. make_nuswide_h5 needs h5py (a test-only package) and returns None without it
(tests/optional.py's World then skips the tests that read it).
"""
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image

LABELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "labels")
NUS_FOLDERS = ("actor", "car_crash", "cul-de-sac", "dark-skinned_people")  # with `_` and `-`, as in the release


def _names(fname):
    with open(os.path.join(LABELS, fname), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _write(path, lines, eol="\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + eol for line in lines))


def _jpeg(path, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)


def _nus_world(n_train, n_test, seed):
    """Relative paths in official list order, train / test indices, tags (A, 1000) and human labels (A, 81)."""
    rng = np.random.RandomState(seed)
    n = n_train + n_test
    ids = rng.randint(10 ** 8, 10 ** 10, size=n)
    ids[1] = ids[0]  # the same Flickr id (and file name) under two folders, as in the real release
    rel = sorted((f"{NUS_FOLDERS[i % 4]}/{1 + i // 4:04d}_{ids[i]}.jpg" for i in range(n)),
                 key=lambda r: (NUS_FOLDERS.index(r.split("/")[0]), r))  # folders grouped, not Python-sorted
    test = np.sort(rng.choice(n, n_test, replace=False))
    train = np.setdiff1d(np.arange(n), test)
    taglist, seen, unseen = _names("nuswide_taglist1k.txt"), _names("nuswide_925.txt"), _names("nuswide_81.txt")
    seen_cols = [taglist.index(s) for s in seen]
    tags = (rng.rand(n, 1000) < 0.02).astype(np.uint8)
    human = (rng.rand(n, 81) < 0.05).astype(np.uint8)
    tags[train[0], seen_cols] = 0  # a train image without a seen positive ...
    tags[train[0], taglist.index(unseen[0])] = 1  # ... though it carries a concept TAG (must not count as seen)
    human[test[0]] = 0  # a test image without an unseen positive
    for k, c in enumerate(seen_cols):  # every seen label has a train positive
        tags[train[1 + k % (n_train - 1)], c] = 1
    for k in range(81):  # every unseen label has a test positive
        human[test[1 + k % (n_test - 1)], k] = 1
    pm = lambda bits: 2 * bits.astype(np.int8) - 1  # noqa: E731   0/1 -> -1/+1
    expected = dict(seen=seen, unseen=unseen,
                    train_names=[rel[i].replace("/", "_") for i in train], train_labels=pm(tags[train][:, seen_cols]),
                    test_names=[rel[i].replace("/", "_") for i in test],
                    test_labels=pm(np.concatenate([tags[test][:, seen_cols], human[test]], 1)))
    return rel, train, test, tags, human, expected, rng


def make_nuswide_h5(dir, n_train=12, n_test=8, seed=0):
    """<dir>/NUS_WIDE in the layout SigRL/MKT read (BiAM's h5 labels, MKT's pickles); returns its path (None
    where h5py is not installed)."""
    try:
        import h5py
    except ImportError:
        return None
    root = os.path.join(dir, "NUS_WIDE")
    rel, train, test, tags, human, exp, rng = _nus_world(n_train, n_test, seed)
    for r in rel:
        _jpeg(os.path.join(root, "Flickr", r), rng)
    os.makedirs(os.path.join(root, "features"))
    for split, short in (("train", "img_names.pkl"), ("test", "test_img_names.pkl")):
        with open(os.path.join(root, short), "wb") as f:
            pickle.dump({"img_names": exp[f"{split}_names"]}, f, protocol=3)
        idx = train if split == "train" else test
        with h5py.File(os.path.join(root, "features", f"nus_wide_{split}.h5"), "w") as f:
            for k, (name, y) in enumerate(zip(exp[f"{split}_names"], exp[f"{split}_labels"])):
                f.create_dataset(name + "-labels", data=y.astype(np.int8), compression="gzip")
                f.create_dataset(name + "-labels_81", data=(2 * human[idx[k]].astype(np.int8) - 1))
                if k < 2:  # BiAM's VGG grid features: present, and to be ignored
                    f.create_dataset(name + "-features", data=np.zeros((512, 196), np.float32), compression="gzip")
    _write(os.path.join(root, "Concepts81.txt"), exp["unseen"], "\r\n")
    _write(os.path.join(root, "Concepts925.txt"), exp["seen"], "\r\n")
    torch.save(torch.from_numpy(rng.randn(1006, 512).astype(np.float32)), os.path.join(root, "label_emb.pt"))
    return root


def make_nuswide_raw(dir, n_train=12, n_test=8, seed=0):
    """<dir>/NUS_WIDE as the official release -> (root, expected), where expected holds seen,
    unseen, train_names, train_labels (N, 925), test_names, test_labels (M, 1006) computed here by hand."""
    root = os.path.join(dir, "NUS_WIDE")
    rel, train, test, tags, human, expected, rng = _nus_world(n_train, n_test, seed)
    for r in rel:
        _jpeg(os.path.join(root, "Flickr", r), rng)
    win = [r.replace("/", "\\") for r in rel]
    _write(os.path.join(root, "ImageList", "Imagelist.txt"), win, "\r\n")
    _write(os.path.join(root, "ImageList", "TrainImagelist.txt"), [win[i] for i in train], "\r\n")
    _write(os.path.join(root, "ImageList", "TestImagelist.txt"), ["C:\\ImageData\\Flickr\\" + win[i] for i in test])
    _write(os.path.join(root, "NUS_WID_Tags", "TagList1k.txt"), _names("nuswide_taglist1k.txt"), "\r\n")
    _write(os.path.join(root, "NUS_WID_Tags", "AllTags1k.txt"), ["\t".join(map(str, row)) + "\t" for row in tags])
    _write(os.path.join(root, "ConceptsList", "Concepts81.txt"), expected["unseen"], "\r\n")
    for c, name in enumerate(expected["unseen"]):
        _write(os.path.join(root, "Groundtruth", "AllLabels", f"Labels_{name}.txt"), map(str, human[:, c]))
    return root, expected


def _train_rows(n):
    """Rows that load_spml keeps for training out of n formatted rows (Cole et al.'s generate_split)."""
    n_train = n - int(np.round(0.2 * n))
    return np.sort(np.random.RandomState(1200).permutation(n)[:n_train])


def make_coco(dir, n_train=12, n_val=6, seed=0):
    """<dir>/coco with both instances jsons (full 80 categories) and images; returns the path."""
    rng, root = np.random.RandomState(seed), os.path.join(dir, "coco")
    cats = [{"id": int(i), "name": n, "supercategory": "thing"}
            for i, n in zip(_names("coco_80_category_ids.txt"), _names("coco_80.txt"))]
    pool = rng.choice(np.arange(101, 600000), n_train + n_val, replace=False)
    ids = {"train": [9, 10, 100] + list(pool[3:n_train]), "val": list(pool[n_train:])}  # 9, 10: "10" < "9"
    ann_id = 1
    for split, split_ids in ids.items():
        annotated = [int(i) for i in split_ids[:-1]]  # the last image has no annotation: it must be dropped
        rows = sorted(annotated, key=str)  # the formatted row order
        labels = {i: set(rng.choice(80, rng.randint(1, 4), replace=False)) for i in annotated}
        if split == "train":
            train_rows = _train_rows(len(rows))
            for c in range(80):
                labels[rows[train_rows[c % len(train_rows)]]].add(c)
        anns = []
        for i in annotated:
            for c in sorted(labels[i]):
                anns.append({"id": ann_id, "image_id": i, "category_id": cats[c]["id"], "iscrowd": 0,
                             "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0})
                ann_id += 1
        crowd_cat = next(c for c in range(80) if c not in labels[annotated[0]])  # a class seen only in a crowd
        anns.append({"id": ann_id, "image_id": annotated[0], "category_id": cats[crowd_cat]["id"], "iscrowd": 1,
                     "bbox": [0.0, 0.0, 24.0, 24.0], "area": 576.0})
        ann_id += 1
        images = [{"id": int(i), "file_name": f"COCO_{split}2014_{int(i):012d}.jpg", "width": 24, "height": 24}
                  for i in split_ids]
        for im in images:
            _jpeg(os.path.join(root, f"{split}2014", im["file_name"]), rng)
        path = os.path.join(root, "annotations", f"instances_{split}2014.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"info": {}, "images": images, "annotations": anns, "categories": cats}, f)
    return root


def make_voc(dir, year="2012", n_train=12, n_val=6, seed=0):
    """<dir>/pascal/VOCdevkit/VOC<year> with all 20 per-class lists for both phases; returns <dir>/pascal."""
    rng, root, classes = np.random.RandomState(seed), os.path.join(dir, "pascal"), _names("voc_20.txt")
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    phases = ("train", "val") if str(year) == "2012" else ("trainval", "test")
    for phase, n, offset in ((phases[0], n_train, 0), (phases[1], n_val, n_train)):
        ids = [f"{2008 + k % 4}_{k:06d}" if str(year) == "2012" else f"{k:06d}" for k in range(offset, offset + n)]
        ids.sort()
        y = np.where(rng.rand(n, 20) < 0.1, 1, -1)  # (n, 20)
        if phase == phases[0]:  # the last image is dropped below, so the formatted rows are the first n - 1
            train_rows = _train_rows(n - 1)
            for c in range(20):
                y[train_rows[c % len(train_rows)], c] = 1
        y[y.max(1) < 1, rng.randint(20)] = 1
        y[0, (y[0] == -1).argmax()] = 0  # a difficult-only instance next to real positives
        y[-1] = -1
        y[-1, 3] = 0  # the last image's only non-negative label is difficult: no positive, so it is dropped
        for c, name in enumerate(classes):
            _write(os.path.join(base, "ImageSets", "Main", f"{name}_{phase}.txt"),
                   [f"{i} {v:2d}" for i, v in zip(ids, y[:, c])])  # the devkit's "%s %2d"
        for i in ids:
            _jpeg(os.path.join(base, "JPEGImages", i + ".jpg"), rng)
    return root


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for make in (make_nuswide_h5, make_coco, make_voc):
            root = make(os.path.join(d, make.__name__))
            print(make.__name__, root, sum(len(fs) for _, _, fs in os.walk(root)), "files")
