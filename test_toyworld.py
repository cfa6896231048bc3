"""Tests of the toy world (toyworld.py) (the tiny CLIP's tests come with its weights): determinism,
co-occurrence, the real loaders reading the files."""
import hashlib
import os
from collections import Counter

import numpy as np
import pytest

import toyworld as tw
from data import check_images, load_nuswide


def tree_digest(root):
    """sha256 of every file under root (relative path + bytes)."""
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(d, f)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tw.make_world(tmp_path_factory.mktemp("world"), seed=0, n_train=240, n_test=160)


def test_same_seed_same_bytes(world, tmp_path):
    again = tw.make_world(tmp_path / "again", seed=0, n_train=240, n_test=160)
    assert tree_digest(world) == tree_digest(again)
    other = tw.make_world(tmp_path / "other", seed=1, n_train=240, n_test=160)
    a, b = np.load(world / "sigrl_nuswide/train_labels.npy"), np.load(other / "sigrl_nuswide/train_labels.npy")
    assert not np.array_equal(a, b)


def test_cached_world_is_reused_and_foreign_data_refused(world, tmp_path):
    stamp = os.path.getmtime(world / "sigrl_nuswide" / "train_labels.npy")
    tw.make_world(world, seed=0, n_train=240, n_test=160)
    assert os.path.getmtime(world / "sigrl_nuswide" / "train_labels.npy") == stamp
    (tmp_path / "sigrl_nuswide").mkdir()
    with pytest.raises(FileExistsError):
        tw.make_world(tmp_path, seed=0, n_train=4, n_test=4)


def test_label_sets():
    assert len(tw.LABELS) == len(set(tw.LABELS)) == 32 and len(tw.UNSEEN) == 8
    assert set(tw.SEEN) | set(tw.UNSEEN) == set(tw.LABELS) and not set(tw.SEEN) & set(tw.UNSEEN)
    assert set(tw.SHAPES) == set(tw.OBJECTS)
    for scene, (_, phrase, pool) in tw.SCENES.items():
        assert scene in phrase and set(pool) <= set(tw.OBJECTS)


def test_scene_pools_drive_co_occurrence():
    rng = np.random.default_rng(0)
    samples = [tw.sample_scene(rng) for _ in range(4000)]
    from_pool = [o in tw.SCENES[s][2] for s, objects in samples for o in objects]
    assert np.mean(from_pool) > 0.75                      # P_POOL = 0.8, plus off-pool picks that hit the pool
    counts = Counter(s for s, _ in samples)
    for scene, (_, _, pool) in tw.SCENES.items():
        for obj in pool:
            p_given = np.mean([obj in o for s, o in samples if s == scene])
            p_all = np.mean([obj in o for _, o in samples])
            assert p_given > 1.5 * p_all, (scene, obj, p_given, p_all)   # the pool lifts the object
        assert 0.1 < counts[scene] / len(samples) < 0.19
    assert all(1 <= len(o) <= 4 and len(set(o)) == len(o) for _, o in samples)


def test_captions_name_every_label_somewhere():
    captions = [tw.draw_example(0, tw.PRETRAIN, i)[3] for i in range(300)]
    words = set(" ".join(captions).replace(",", " ").replace(".", " ").split())
    assert set(tw.LABELS) <= words and "scene" in words
    image, scene, objects, caption = tw.draw_example(0, tw.PRETRAIN, 7)
    assert image.size == (tw.RES, tw.RES) and image.mode == "RGB"
    assert any(o in caption for o in objects)


def test_nuswide_view_loads_with_data_py(world):
    nus = load_nuswide(world)
    assert (nus.seen, nus.unseen, nus.layout) == (tw.SEEN, tw.UNSEEN, "prepared")
    assert nus.train_labels.shape == (240, 24) and nus.test_labels.shape == (160, 32)
    assert nus.train_labels.dtype == np.int8 and set(np.unique(nus.test_labels)) == {-1, 1}
    assert (nus.train_labels == 1).any(0).all() and (nus.test_labels == 1).any(0).all()  # every label occurs
    good, bad = check_images(nus.train_paths + nus.test_paths)
    assert good.all() and not bad
    assert any("/Flickr/city_street/" in p for p in nus.train_paths)  # a folder name holding "_"
    names = open(world / "sigrl_nuswide" / "test_names.txt").read().split()
    assert len(set(names)) == 160 and all(n.count("_") >= 2 for n in names)
    # the test rows' labels are the drawn scene + objects, seen columns then unseen
    _, scene, objects, _ = tw.draw_example(0, tw.TEST, 5)
    assert sorted(np.array(tw.SEEN + tw.UNSEEN)[nus.test_labels[5] == 1]) == sorted([scene] + objects)


def test_spml_view(world):
    spml = tw.load_spml_view(world)
    assert spml.classes == tw.LABELS
    assert (len(spml.train_paths), len(spml.val_paths), len(spml.test_paths)) == (192, 48, 160)
    assert (spml.train_obs.sum(1) == 1).all() and (spml.train_obs <= spml.train_true).all()
    assert all(os.path.isfile(p) for p in spml.train_paths[:5] + spml.test_paths[:5])
