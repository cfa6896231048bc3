"""Start-up at scale: the image check's cache (a second start over unchanged files decodes nothing, a changed file
is decoded again), its reasons in words, only the splits a command uses checked, and the label range check."""
import os

import numpy as np
import pytest
from PIL import Image

import data
from support import image_check, prepared, tasks


def jpegs(folder, n):
    rng = np.random.default_rng(0)
    paths = [str(folder / f"{i}.jpg") for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(p, quality=90)
    return paths


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """image_check.unreadable, counting the files it decodes; the cache in a folder of this test."""
    monkeypatch.setenv("SIGRL_CACHE", str(tmp_path / "cache"))
    decoded, real = [], image_check.unreadable
    monkeypatch.setattr(image_check, "unreadable", lambda p: decoded.append(p) or real(p))
    return decoded


def test_second_check_decodes_nothing_and_a_changed_file_is_decoded_again(tmp_path, counted):
    paths = jpegs(tmp_path, 5)
    good, bad, why = image_check.check_images(paths)
    assert good.all() and bad == [] and why == [] and sorted(counted) == sorted(paths)
    counted.clear()
    assert image_check.check_images(paths)[0].all() and counted == []  # all from the cache
    with open(paths[3], "r+b") as f:  # cut short: size and mtime change
        f.truncate(os.path.getsize(paths[3]) // 2)
    good, bad, why = image_check.check_images(paths)
    assert counted == [paths[3]] and good.tolist() == [True, True, True, False, True] and bad == [paths[3]]
    assert why[0].startswith("truncated"), why
    counted.clear()
    assert image_check.check_images(paths)[1] == [paths[3]] and counted == []  # a bad verdict is cached too
    assert image_check.check_images(paths[:4])[1] == [paths[3]] and len(counted) == 4  # another list, its own cache
    counted.clear()
    image_check.check_images(paths, cache=False)
    assert len(counted) == 5


def test_unreadable_says_why(tmp_path):
    bmp = tmp_path / "a.bmp"
    Image.new("RGB", (8, 8)).save(bmp)
    cut = tmp_path / "cut.bmp"
    cut.write_bytes(bmp.read_bytes()[:60])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    assert image_check.unreadable(str(bmp)) == ""
    assert image_check.unreadable(str(tmp_path / "none.jpg")) == "no such file"
    assert image_check.unreadable(str(tmp_path / "empty.png")) == "empty file (0 bytes)"
    assert image_check.unreadable(str(tmp_path / "text.jpg")).startswith("unknown format")
    assert image_check.unreadable(str(cut)).startswith(("truncated", "BMP data cannot be decoded"))


def test_only_the_splits_a_command_uses_are_checked(monkeypatch, tmp_path):
    from support import runs
    cfg = runs.parse_args(["--data-root", str(tmp_path / "world"), "--world-train", "8", "--world-test", "6"])
    checked = []
    real = tasks.check_images
    monkeypatch.setattr(tasks, "check_images", lambda paths, desc: checked.append(desc) or real(paths, desc=desc))
    tasks.make_toy_world(cfg)
    tasks.load_dataset(cfg)
    assert checked == ["checking train images", "checking test images"]
    checked.clear()
    tasks.load_dataset(cfg, check=("test",))  # eval.py --ckpt
    assert checked == ["checking test images"]


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.float32])
def test_label_range_check(tmp_path, dtype):
    ok = np.array([[-1, 0, 1], [1, 1, -1]], dtype=dtype)
    assert prepared.check_labels(ok, "x.npy", 2, 3).dtype == np.int8
    for bad in (2, -2) + ((0.5, np.nan) if dtype == np.float32 else ()):
        wrong = ok.copy()
        wrong[1, 2] = bad
        with pytest.raises(data.DataError, match="outside"):
            prepared.check_labels(wrong, "x.npy", 2, 3)
