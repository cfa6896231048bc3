"""Every file a command writes into an output folder is under the output rule (support/paths.py): a gallery's
index.html and images/, the explain PNGs, Fig. 3's page; no write goes through a link out of the folder, and a
lock file is never a link to somebody's file. Names that would shift a one-name-a-line side file are refused,
names are printed with their control characters escaped, an image whose resize has no memory bound is refused,
and the gallery shows each image through the reader the model's input comes from.

The run checkpoint is SigRL on the committed tiny CLIP at its initial weights, saved without training."""
import os

import numpy as np
import pytest
from PIL import Image

from tools import figure3
import fixtures_run
from data import read_image
from test_outputs_and_inputs import one_line
import predict
from support import paths, safe_io
from support.errors import UsageError
from tools import explain as explain_maps, gallery
from toy import world


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("folders")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGRL_CACHE", str(d / "cache"))
        yield fixtures_run.with_photos(d)


def tag(run, *args):
    return predict.main(["--ckpt", str(run["ckpt"]), "--workers", "0", *map(str, args)])


def never_scored(monkeypatch):
    """Make any scoring fail the test: the refusals below must come before the first image is scored."""
    def fail(*a, **k):
        raise AssertionError("an image was scored before the outputs were checked")
    monkeypatch.setattr(predict.evaluation, "predict", fail)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ----------------------------------------------------------------------------- the files inside an output folder
def test_photos_inside_the_gallery_images_folder_are_not_replaced(run, tmp_path, capsys, monkeypatch):
    never_scored(monkeypatch)
    G = tmp_path / "G"
    (G / "images").mkdir(parents=True)
    for i in range(2):  # named as the thumbnails of the first two images would be
        Image.open(run["photos"] / f"img{i}.jpg").save(G / "images" / f"{i:04d}.png")
    before = {p: (G / "images" / p).read_bytes() for p in ("0000.png", "0001.png")}
    one_line(capsys, tag(run, G / "images" / "0000.png", G / "images" / "0001.png", "--html", G),
             "--html", "0000.png", "an image")
    one_line(capsys, tag(run, G / "images", "--html", G), "--html", "inside", "images")
    assert {p: (G / "images" / p).read_bytes() for p in before} == before
    assert files_under(G) == ["images/0000.png", "images/0001.png"]


def test_page_file_given_to_another_flag(run, tmp_path, capsys, monkeypatch):
    never_scored(monkeypatch)
    G = tmp_path / "G"
    one_line(capsys, tag(run, run["photos"], "--json", G / "index.html", "--html", G), "index.html", "also given")
    assert not G.exists()
    G.mkdir()
    (G / "index.html").write_text("cat\ndog\n")  # a labels file where the page would go
    one_line(capsys, tag(run, run["photos"], "--labels-file", G / "index.html", "--html", G),
             "index.html", "the labels file")
    assert (G / "index.html").read_text() == "cat\ndog\n" and files_under(G) == ["index.html"]


def test_figure_onto_its_own_page(run, tmp_path, capsys):
    G = tmp_path / "G"
    code = figure3.main(["--ckpt", str(run["ckpt"]), "--out", str(G / "index.html"), "--html", str(G), "--n", "2",
                         "--workers", "0"])
    one_line(capsys, code, "index.html", "also given")
    assert not (G / "index.html").exists()


def test_no_write_through_a_link_out_of_the_folder(run, tmp_path, capsys, monkeypatch):
    G, elsewhere = tmp_path / "G", tmp_path / "elsewhere"
    G.mkdir()
    elsewhere.mkdir()
    (G / "images").symlink_to(elsewhere)
    with monkeypatch.context() as m:
        never_scored(m)
        one_line(capsys, tag(run, run["photos"], "--html", G), "--html", "leads out of", "elsewhere")
    # a link made after the check: the page writer checks again before it writes
    with pytest.raises(UsageError, match="symbolic link"):
        gallery.write(str(G), "t", [], [str(run["photos"] / "img0.jpg")], ["a", "b"], np.zeros((1, 2)), [set()])
    (G / "images").unlink()
    (G / "explain").symlink_to(elsewhere)
    assert tag(run, run["photos"], "--html", G) == 2  # the explain maps of the page: refused too
    assert os.listdir(elsewhere) == []
    # a file in the folder that is a link: the link is replaced, the file it pointed to is left as it was
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    G2 = tmp_path / "G2"
    (G2 / "images").mkdir(parents=True)
    (G2 / "index.html").symlink_to(victim)
    (G2 / "images" / "0000.png").symlink_to(victim)
    gallery.write(str(G2), "t", [], [str(run["photos"] / "img0.jpg")], ["a", "b"], np.zeros((1, 2)), [set()])
    assert victim.read_text() == "precious\n"
    assert not (G2 / "index.html").is_symlink() and Image.open(G2 / "images" / "0000.png").size[0] > 0


def test_a_lock_that_is_a_link_is_never_followed(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    root = tmp_path / "world"
    root.mkdir()
    (root / ".lock").symlink_to(victim)
    code = world.main(["make", "--root", str(root), "--n-train", "4", "--n-test", "4"])
    one_line(capsys, code, ".lock", "symbolic link")
    assert victim.read_text() == "precious\n"
    (root / ".lock").unlink()
    os.link(victim, root / ".lock")  # a second name of the same file
    with pytest.raises(safe_io.WriteError, match="not a lock file"):
        with safe_io.locked(str(root)):
            pass
    assert victim.read_text() == "precious\n"
    (root / ".lock").unlink()
    with safe_io.locked(str(root)):  # a lock it makes itself, and the same again on the next run
        assert (root / ".lock").read_text() == str(os.getpid())
    with safe_io.locked(str(root)):
        assert (root / ".lock").read_text() == str(os.getpid())


# ----------------------------------------------------------------------------- names in side files and on screen
def test_names_that_would_shift_the_side_files(run, tmp_path, capsys, monkeypatch):
    never_scored(monkeypatch)
    s = tmp_path / "s.npy"
    line = one_line(capsys, tag(run, run["photos"], "--labels", "sun,a\nb", "--save-scores", s), "a\\nb")
    line = one_line(capsys, tag(run, run["photos"], "--labels", "sun,\x1b[31mred"), "\\x1b[31mred")
    assert "\x1b" not in line
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.open(run["photos"] / "img0.jpg").save(odd / "two\nlines.jpg")
    one_line(capsys, tag(run, odd, "--save-scores", s), "--save-scores", "two\\nlines.jpg")
    assert not s.exists() and not (tmp_path / "s.images.txt").exists()


def test_names_are_printed_escaped(run, tmp_path, capsys):
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.open(run["photos"] / "img0.jpg").save(odd / "two\nlines.jpg")
    Image.open(run["photos"] / "img1.jpg").save(odd / "\x1b[2Jclear.jpg")
    assert tag(run, odd, "--top-k", "1") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "two\nlines" not in out
    assert len(out.splitlines()) == 2 and "two\\nlines.jpg: " in out and "\\x1b[2Jclear.jpg: " in out
    # a right-to-left override would print the rest reversed; a line separator would break the line
    assert paths.printable("a\u202eb\u2028c\td é") == "a\\u202eb\\u2028c\\td é"


# ----------------------------------------------------------------------------- bounded resources, early checks
def test_a_strip_image_is_refused_with_its_name(run, tmp_path, capsys):
    strip = tmp_path / "strip.png"
    Image.new("L", (30000, 1), 128).save(strip)
    assert strip.stat().st_size < 1000  # a tiny file; its shorter side resized to R / 0.875 would be millions long
    assert tag(run, strip) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"skipped {strip}") and "50 times" in err[0]
    assert err[1].startswith("error: no readable images")
    code = tag(run, strip, run["photos"] / "img0.jpg", "--top-k", "1")
    err = capsys.readouterr().err
    assert code == 0 and f"skipped {strip}" in err and "30000 x 1 pixels" in err
    with pytest.raises(ValueError, match="30000 x 1"):  # the reader every scoring path uses refuses it too
        read_image(strip)


def test_output_names_too_long_are_refused_before_scoring(run, tmp_path, capsys, monkeypatch):
    long = tmp_path / "long"
    long.mkdir()
    Image.open(run["photos"] / "img0.jpg").save(long / ("n" * 242 + ".jpg"))  # 246 characters
    with monkeypatch.context() as m:
        never_scored(m)
        one_line(capsys, tag(run, run["photos"], "--json", tmp_path / ("j" * 250 + ".json")), "--json", "shorten")
    assert tag(run, long, "--explain", tmp_path / "maps", "--top-k", "1") == 0  # its PNG's name is cut, not refused
    assert len(os.listdir(tmp_path / "maps")) == 1


# ----------------------------------------------------------------------------- what the gallery shows
def test_gallery_reads_through_the_model_reader(tmp_path):
    grey = tmp_path / "grey16.png"
    ramp = np.tile(np.linspace(1000, 30000, 40, dtype=np.uint16), (30, 1))  # (30, 40): all above 255, below 1/2
    Image.fromarray(ramp).save(grey)
    assert Image.open(grey).mode.startswith("I")
    turned = tmp_path / "turned.jpg"
    pixels = np.zeros((30, 60, 3), np.uint8)  # stored 60 wide, 30 high
    pixels[:, :30] = (250, 20, 20)
    pixels[:, 30:] = (20, 20, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(turned, exif=exif, quality=95)
    G = tmp_path / "G"
    gallery.write(str(G), "t", [], [str(grey), str(turned)], ["a", "b"], np.zeros((2, 2)), [set(), set()])
    tile = np.asarray(Image.open(G / "images" / "0000.png").convert("RGB")).astype(int)
    assert tile.shape[:2] == (30, 40)
    assert tile.mean() < 140 and tile[:, 0].mean() < tile[:, -1].mean()  # 8-bit scaled: dark to mid grey, a ramp
    upright = Image.open(G / "images" / "0001.png")
    assert upright.size == (30, 60)  # shown 30 wide, 60 high, as every viewer shows it
    a = np.asarray(upright.convert("RGB")).astype(int)
    # turned clockwise, the stored left half (red) is on top, the right half (blue) below
    assert a[:25, :, 0].mean() > 200 and a[35:, :, 2].mean() > 200


def test_explain_and_html_compute_the_maps_once(run, tmp_path, monkeypatch, capsys):
    calls = []
    real = explain_maps.maps

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(explain_maps, "maps", counted)
    E, G = tmp_path / "E", tmp_path / "G"
    assert tag(run, run["photos"], "--explain", E, "--html", G, "--top-k", "2") == 0
    assert len(calls) == 3  # one per image
    made = sorted(os.listdir(E))
    assert len(made) == 3 and sorted(os.listdir(G / "explain")) == made
    assert all((E / f).read_bytes() == (G / "explain" / f).read_bytes() for f in made)
    assert sum(f"explain/{f}" in (G / "index.html").read_text() for f in made) == 3
    calls.clear()  # --explain OUT_DIR/explain: the page's own maps, drawn once too
    assert tag(run, run["photos"], "--explain", tmp_path / "H" / "explain", "--html", tmp_path / "H") == 0
    assert len(calls) == 3 and len(os.listdir(tmp_path / "H" / "explain")) == 3
