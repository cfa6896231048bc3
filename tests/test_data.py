"""Tests for data.py / data_formats.py on fixtures in the real on-disk formats (fixtures_data.py).

Expected values come from the fixtures' own hand computation, from h5py / json / plain-text reads written out
here, and from a plain re-implementation of Cole et al.'s RandomState(1200) sampling -- never from data.py.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from optional import need
import fixtures_data as fx

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def names(fname):
    with open(os.path.join(HERE, "labels", fname)) as f:
        return [line.strip() for line in f if line.strip()]


def tree(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def same_nus(a, b):
    assert (a.seen, a.unseen, a.train_paths, a.test_paths) == (b.seen, b.unseen, b.train_paths, b.test_paths)
    assert np.array_equal(a.train_labels, b.train_labels) and np.array_equal(a.test_labels, b.test_labels)


@pytest.fixture(scope="module")
def nus_h5(tmp_path_factory):
    need("h5py")  # to write BiAM's h5 layout; the tests that read it skip without it
    return fx.make_nuswide_h5(str(tmp_path_factory.mktemp("h5")))


# ------------------------------------------------------------------------------------------ NUS-WIDE
def test_h5_layout_end_to_end(nus_h5):
    h5py = need("h5py")
    before = tree(nus_h5)
    d = data.load_nuswide(nus_h5)
    assert d.layout == "h5" and d.seen == names("nuswide_925.txt") and d.unseen == names("nuswide_81.txt")
    assert tree(nus_h5) == before, "reading must not write into the data root"
    with open(os.path.join(nus_h5, "img_names.pkl"), "rb") as f:
        train_names = pickle.load(f)["img_names"]
    folder, nnnn, rest = train_names[0].rsplit("_", 2)  # the name -> path rule, written out independently
    assert d.train_paths[0] == os.path.join(nus_h5, "Flickr", folder, f"{nnnn}_{rest}")
    assert len(d.train_paths) == len(train_names) and all(os.path.isfile(p) for p in d.train_paths + d.test_paths)
    assert {os.path.basename(os.path.dirname(p)) for p in d.train_paths} >= {"car_crash", "dark-skinned_people"}
    with h5py.File(os.path.join(nus_h5, "features", "nus_wide_train.h5")) as f:
        assert np.array_equal(d.train_labels, np.stack([f[n + "-labels"][()] for n in train_names]))
    with open(os.path.join(nus_h5, "test_img_names.pkl"), "rb") as f:
        test_names = pickle.load(f)["img_names"]
    with h5py.File(os.path.join(nus_h5, "features", "nus_wide_test.h5")) as f:
        assert np.array_equal(d.test_labels, np.stack([f[n + "-labels"][()] for n in test_names]))
        assert np.array_equal(d.test_labels[:, 925:], np.stack([f[n + "-labels_81"][()] for n in test_names]))
    assert d.train_labels.dtype == np.int8 and d.train_labels.shape == (12, 925) and d.test_labels.shape == (8, 1006)
    assert not (d.train_labels == 1).any(1).all() and not (d.test_labels[:, 925:] == 1).any(1).all()


def test_raw_release_equals_hand_computed_and_h5(tmp_path, nus_h5, capsys):
    root, exp = fx.make_nuswide_raw(str(tmp_path))
    with pytest.raises(data.DataError, match="prepare nuswide"):
        data.load_nuswide(root)
    assert data.prepare("nuswide", root) == os.path.join(root, "sigrl_nuswide")
    assert "wrote" in capsys.readouterr().out
    d = data.load_nuswide(root)
    assert d.layout == "prepared" and (d.seen, d.unseen) == (exp["seen"], exp["unseen"])
    assert [os.path.relpath(p, os.path.join(root, "Flickr")).replace(os.sep, "_") for p in d.test_paths] == \
        exp["test_names"]
    assert np.array_equal(d.train_labels, exp["train_labels"]) and np.array_equal(d.test_labels, exp["test_labels"])
    h5 = data.load_nuswide(nus_h5)  # the same world (same seed) in the BiAM layout
    assert np.array_equal(d.train_labels, h5.train_labels) and np.array_equal(d.test_labels, h5.test_labels)
    assert [os.path.relpath(p, root) for p in d.train_paths] == [os.path.relpath(p, nus_h5) for p in h5.train_paths]
    # Concepts81.txt kept at the root instead of ConceptsList/ gives the same files
    shutil.move(os.path.join(root, "ConceptsList", "Concepts81.txt"), os.path.join(root, "Concepts81.txt"))
    data.prepare("nuswide", root, out=str(tmp_path / "again"))
    same_nus(data.load_nuswide(root, out=str(tmp_path / "again")), d)


def test_h5_to_prepared_equals_h5(nus_h5, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    assert data.main(["prepare", "nuswide", "--root", nus_h5, "--out", out]) == 0
    assert not os.path.exists(os.path.join(nus_h5, "sigrl_nuswide"))
    prepared = data.load_nuswide(nus_h5, out=out)
    assert prepared.layout == "prepared"
    same_nus(prepared, data.load_nuswide(nus_h5))
    assert np.load(os.path.join(out, "sigrl_nuswide", "train_labels.npy")).dtype == np.int8
    cache = str(tmp_path / "cache")  # load with out= on the h5 layout caches the prepared layout there
    assert data.load_nuswide(nus_h5, out=cache).layout == "h5"
    monkeypatch.setitem(sys.modules, "h5py", None)  # the prepared layout needs no h5py
    same_nus(data.load_nuswide(nus_h5, out=cache), prepared)


def test_without_h5py_one_line_hint(nus_h5, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(data.DataError) as e:
        data.load_nuswide(nus_h5)
    assert "pip install h5py" in str(e.value) and "prepare nuswide" in str(e.value) and "\n" not in str(e.value)


def test_concepts_files(tmp_path):
    need("h5py")
    root = fx.make_nuswide_h5(str(tmp_path))
    path = os.path.join(root, "Concepts925.txt")
    seen = names("nuswide_925.txt")
    with open(path, "w", newline="") as f:  # MKT tolerates `index<TAB>name`
        f.write("".join(f"{i}\t{n}\r\n" for i, n in enumerate(seen)))
    assert data.load_nuswide(root).seen == seen
    seen[5], seen[6] = seen[6], seen[5]
    with open(path, "w") as f:
        f.write("\n".join(seen))
    with pytest.raises(data.DataError, match=r"Concepts925\.txt: line 6 is"):
        data.load_nuswide(root)


# ------------------------------------------------------------------------------------------ COCO / VOC
def observed_plain(labels):
    """Cole et al.'s sampling written out: fresh RandomState(1200); per row shuffle the positives, keep the first,
    then shuffle the negatives too."""
    rng, obs = np.random.RandomState(1200), np.zeros_like(labels)
    for i in range(labels.shape[0]):
        pos = [j for j in range(labels.shape[1]) if labels[i, j] == 1]
        neg = [j for j in range(labels.shape[1]) if labels[i, j] != 1]
        rng.shuffle(pos)
        rng.shuffle(neg)
        obs[i, pos[0]] = 1.0
    return obs


def check_formatted(folder, expected_images, expected_labels, capsys=None):
    for split in ("train", "val"):
        images = np.load(os.path.join(folder, f"formatted_{split}_images.npy"))
        labels = np.load(os.path.join(folder, f"formatted_{split}_labels.npy"))
        obs = np.load(os.path.join(folder, f"formatted_{split}_labels_obs.npy"))
        assert images.dtype.kind == "U" and images.ndim == 1 and list(images) == expected_images[split]
        assert labels.dtype == obs.dtype == np.float64 and labels.shape == obs.shape
        assert np.array_equal(labels, expected_labels[split])
        assert (obs.sum(1) == 1).all() and (obs <= labels).all(), "one observed positive, a true one"
        assert np.array_equal(obs, observed_plain(labels))


def check_split(s, folder):
    labels = np.load(os.path.join(folder, "formatted_train_labels.npy"))
    n = len(labels)
    assert (len(s.train_paths), len(s.val_paths)) == (n - int(np.round(0.2 * n)), int(np.round(0.2 * n)))
    assert len(set(s.train_paths) | set(s.val_paths)) == n and all(os.path.isfile(p) for p in s.train_paths)
    assert s.train_obs.dtype == np.float32 and (s.train_obs.sum(1) == 1).all() and (s.train_obs <= s.train_true).all()
    assert (s.train_true.sum(0) > 0).all(), "fixture: every class has a positive in the training part"
    assert np.array_equal(s.test_labels, np.load(os.path.join(folder, "formatted_val_labels.npy")))
    assert set(np.unique(s.val_labels)) <= {0.0, 1.0}


def test_coco(tmp_path, capsys):
    root = fx.make_coco(str(tmp_path))
    expected_images, expected_labels = {}, {}
    for split in ("train", "val"):
        with open(os.path.join(root, "annotations", f"instances_{split}2014.json")) as f:
            d = json.load(f)
        cat_ids = [c["id"] for c in d["categories"]]
        ids = sorted({str(a["image_id"]) for a in d["annotations"]})
        assert len(ids) == len(d["images"]) - 1, "the image without annotation is dropped"
        expected_images[split] = [f"{split}2014/COCO_{split}2014_{int(i):012d}.jpg" for i in ids]
        expected_labels[split] = np.zeros((len(ids), 80))
        for a in d["annotations"]:  # crowd annotations count
            expected_labels[split][ids.index(str(a["image_id"])), cat_ids.index(a["category_id"])] = 1
    assert ids != sorted(ids, key=int) and expected_images["train"][:3] == [
        f"train2014/COCO_train2014_{i:012d}.jpg" for i in (10, 100)] + [expected_images["train"][2]]
    s = data.load_spml("coco", root)
    folder = os.path.join(root, "sigrl_spml", "coco")
    assert "wrote " + folder in capsys.readouterr().out
    assert s.classes == names("coco_80.txt")
    check_formatted(folder, expected_images, expected_labels)
    check_split(s, folder)
    first = {f: open(f, "rb").read() for f in tree(folder)}
    data.prepare("coco", root)
    assert {f: open(f, "rb").read() for f in tree(folder)} == first, "re-running gives identical files"
    capsys.readouterr()
    data.load_spml("coco", root)
    assert capsys.readouterr().out == "", "formatted files are reused"


@pytest.mark.parametrize("year", ["2012", "2007"])
def test_voc(tmp_path, year):
    root = fx.make_voc(str(tmp_path), year=year)
    main = os.path.join(root, "VOCdevkit", f"VOC{year}", "ImageSets", "Main")
    classes = names("voc_20.txt")
    expected_images, expected_labels = {}, {}
    for split, phase in zip(("train", "val"), ("train", "val") if year == "2012" else ("trainval", "test")):
        table = {}
        for c, cls in enumerate(classes):
            for line in open(os.path.join(main, f"{cls}_{phase}.txt")):
                image_id, value = line.split()[0], line.split()[-1]
                table.setdefault(image_id, np.zeros(20))[c] = value == "1"
        kept = sorted(i for i in table if table[i].any())
        assert len(kept) == len(table) - 1, "the image with only a difficult (0) label is dropped"
        expected_images[split] = [i + ".jpg" for i in kept]
        expected_labels[split] = np.stack([table[i] for i in kept])
    s = data.load_spml("voc", root, year=year, out=str(tmp_path / "out"))
    folder = os.path.join(tmp_path, "out", "sigrl_spml", f"voc{year}")
    assert s.classes == classes and s.train_paths[0].startswith(os.path.join(root, "VOCdevkit", f"VOC{year}"))
    check_formatted(folder, expected_images, expected_labels)
    check_split(s, folder)


# ------------------------------------------------------------------------------------------ images
def test_check_images_and_imagelist(tmp_path, nus_h5):
    good = data.load_nuswide(nus_h5).train_paths[:3]
    garbage, empty = str(tmp_path / "garbage.jpg"), str(tmp_path / "empty.jpg")
    open(garbage, "wb").write(b"not an image at all" * 10)
    open(empty, "wb").close()
    paths = [good[0], str(tmp_path / "missing.jpg"), good[1], garbage, empty, good[2]]
    mask, bad, why = data.check_images(paths, workers=2)
    assert mask.dtype == np.bool_ and mask.tolist() == [True, False, True, False, False, True]
    assert bad == [paths[1], garbage, empty]
    assert why == ["no such file", "unknown format (not an image file Pillow can read)", "empty file (0 bytes)"]
    labels = np.eye(6, dtype=np.float32)
    ds = data.ImageList(paths, labels, data.build_transform("zsl", False, 16))
    image, label, index = ds[2]
    assert image.shape == (3, 16, 16) and torch.equal(label, torch.from_numpy(labels[2])) and index == 2
    with pytest.raises(data.DataError, match="garbage.jpg"):
        ds[3]


def test_transforms(tmp_path):
    mean = tuple(round(255 * m) for m in data.IMAGENET_MEAN)
    image = Image.new("RGB", (40, 30), mean)
    torch.manual_seed(0)
    for task, train, shape in [("zsl", True, 16), ("zsl", False, 16), ("spml", True, 32), ("spml", False, 32)]:
        x = data.build_transform(task, train, 16)(image)
        assert x.shape == (3, shape, shape) and x.abs().max() < 0.02, (task, train)  # the mean colour -> ~0
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8))
    evaluate = data.build_transform("zsl", False, 224)
    assert evaluate.transforms[0].size == 256 and torch.equal(evaluate(noise), evaluate(noise))


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_file(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    # each names what it looked for and where to get it (the official pages and archives)
    for call, words in [(lambda: data.load_nuswide(empty), ["sigrl_nuswide/seen.txt", "img_names.pkl", "Imagelist",
                                                            "nuswide/NUS-WIDE.html", "data.py prepare nuswide"]),
                        (lambda: data.prepare("nuswide", empty), ["Imagelist", "nuswide/NUS-WIDE.html"]),
                        (lambda: data.load_spml("coco", empty), ["instances_train2014.json",
                                                                 "annotations_trainval2014.zip"]),
                        (lambda: data.load_spml("voc", empty), ["VOC2012", "ImageSets/Main",
                                                                "VOCtrainval_11-May-2012.tar"]),
                        (lambda: data.load_spml("voc", empty, year="2007"), ["VOCtest_06-Nov-2007.tar"])]:
        with pytest.raises(data.DataError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)

    coco = fx.make_coco(str(tmp_path / "c"))
    os.remove(os.path.join(coco, "annotations", "instances_val2014.json"))
    with pytest.raises(data.DataError, match="instances_val2014.json: file not found"):
        data.load_spml("coco", coco)
    voc = fx.make_voc(str(tmp_path / "v"))
    os.remove(os.path.join(voc, "VOCdevkit", "VOC2012", "ImageSets", "Main", "cow_val.txt"))
    with pytest.raises(data.DataError, match="cow_val.txt: file not found"):
        data.prepare("voc", voc)

    h5py = need("h5py")  # the rest reads BiAM's h5 layout
    root = fx.make_nuswide_h5(str(tmp_path / "h5"))
    data.prepare("nuswide", root, out=str(tmp_path / "p"))
    labels_npy = os.path.join(tmp_path, "p", "sigrl_nuswide", "train_labels.npy")
    np.save(labels_npy, np.ones((12, 924), np.int8))  # one column short
    with pytest.raises(data.DataError, match=r"train_labels\.npy: labels of shape \(12, 924\), expected \(12, 925\)"):
        data.load_nuswide(root, out=str(tmp_path / "p"))
    np.save(labels_npy, np.full((12, 925), 2, np.int8))
    with pytest.raises(data.DataError, match=r"train_labels\.npy: label values outside"):
        data.load_nuswide(root, out=str(tmp_path / "p"))
    with h5py.File(os.path.join(root, "features", "nus_wide_test.h5"), "a") as f:
        name = next(k for k in f if k.endswith("-labels"))
        del f[name]
        f[name] = np.ones(1005, np.int8)
    with pytest.raises(data.DataError, match=r"nus_wide_test\.h5: dataset .*-labels is \(1005,\), expected \(1006,\)"):
        data.load_nuswide(root)
    with open(os.path.join(root, "img_names.pkl"), "wb") as f:
        pickle.dump(["not", "a", "dict"], f)
    with pytest.raises(data.DataError, match=r"img_names\.pkl: expected a pickled dict"):
        data.load_nuswide(root)

    raw, _ = fx.make_nuswide_raw(str(tmp_path / "raw"))
    tags = os.path.join(raw, "NUS_WID_Tags", "AllTags1k.txt")
    lines = open(tags).read().splitlines()
    open(tags, "w").write("\n".join(lines[:3] + [lines[3].rsplit("\t", 2)[0]] + lines[4:]))
    with pytest.raises(data.DataError, match=r"AllTags1k\.txt: row 4 has 999 values, expected 1000"):
        data.prepare("nuswide", raw)
    open(tags, "w").write("\n".join(lines))
    person = os.path.join(raw, "Groundtruth", "AllLabels", "Labels_person.txt")
    open(person, "a").write("1\n")
    with pytest.raises(data.DataError, match=r"Labels_person\.txt: the file has 21 values, expected 20"):
        data.prepare("nuswide", raw)


def test_cli_one_line_error_exit_2(tmp_path):
    for args in (["show", "nuswide", "--root", str(tmp_path)], ["prepare", "coco", "--root", str(tmp_path)]):
        r = subprocess.run([sys.executable, os.path.join(HERE, "data.py")] + args, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert str(tmp_path) in r.stderr


def test_cli_show(tmp_path, capsys):
    root = fx.make_voc(str(tmp_path))
    assert data.main(["show", "voc", "--root", root, "--check-images"]) == 0
    out = capsys.readouterr().out
    assert "voc: 20 classes; train 9" in out and "0 of 16 images missing or unreadable" in out
