"""Untrusted files are read, never run, and never trusted more than they prove: TorchScript CLIP archives read
without their code, caches that check themselves, a damaged log kept on resume and no silent NaN (the other
one-line cases: tests/test_one_line.py)."""
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from typing import Tuple

import pytest
import torch
from PIL import Image

import eval as eval_cli
import fixtures_clip
import fixtures_run
import predict
import train as train_cli
from support import checkpoints
from clip_text import encode_labels
from data import DataError, ImageList, build_transform
from support.clip_files import load_clip
from support.image_check import check_images
from tools import plot
from toy import world as toyworld
from support.torchscript_files import read_archive
from support.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


def one_line(result, *needles):
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def jit_state_dict(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def assert_identical(ours, theirs):
    assert list(ours) == list(theirs)
    for k, want in theirs.items():
        got = ours[k]
        assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride()), k
        assert torch.equal(got, want), k


# ------------------------------------------------------------------------ TorchScript archives, code never run
class Scripted(torch.nn.Module):
    """A scripted (not traced) module with a buffer, a shared submodule and non-tensor attributes."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 3, bias=False)])
        self.register_buffer("steps", torch.arange(6).view(2, 3)[:, 1])  # a view: offset 1, stride 3
        self.sizes = [4, 3]
        self.name = "scripted"

    def forward(self, x):
        for block in self.blocks:
            x = block(self.norm(x) if x.shape[-1] == 4 else x)
        return x


def test_official_layout_reads_like_jit_load(tmp_path):
    """OpenAI's layout (traced, partly fp16, int buffers, cuda:0 storage tags) and a scripted module: the same
    tensors, dtypes, strides and values as torch.jit.load's state dict (0 difference)."""
    traced = tmp_path / "ViT-tiny.pt"
    fixtures_clip.save_official(fixtures_clip.build_oracle("tiny", seed=2), traced, fmt="jit", gpu_tags=True)
    ours = read_archive(traced)
    assert ours["visual.conv1.weight"].dtype == torch.float16 and ours["context_length"].item() == 77
    assert_identical(ours, jit_state_dict(traced))
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Scripted()), str(scripted))
    ours = read_archive(scripted)
    assert ours["steps"].tolist() == [1, 4]
    assert_identical(ours, jit_state_dict(scripted))


class Crafted(torch.nn.Module):
    """Writes a file of its choosing when torch.jit.load restores it: its __setstate__ is compiled code."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.marker = marker

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker, self.training = state[0], state[2]
        self.weight = state[1] + torch.from_file(self.marker, shared=True, size=2)  # creates the marker file


def crafted(path, marker):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Crafted(str(marker))), str(path))
    return path


def test_crafted_archive_runs_no_code(tmp_path):
    """The attack is real (torch.jit.load creates its marker); predict.py --clip on it: no marker, one line, rc 2."""
    probe = crafted(tmp_path / "probe.pt", tmp_path / "probe-marker")
    jit_state_dict(probe)
    assert (tmp_path / "probe-marker").exists()
    attack = crafted(tmp_path / "crafted.pt", tmp_path / "marker")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photos / "red.png")
    result = run("predict.py", "--clip", attack, "--labels", "red,blue", photos)
    one_line(result, str(attack), "__setstate__")
    assert not (tmp_path / "marker").exists()


def test_archive_whose_state_is_not_an_attribute_dict_is_refused(tmp_path):
    """The crafted archive with its code's `def __setstate__` renamed (so the text check misses it): its module's
    pickled state is a tuple, refused before anything reads it."""
    path = crafted(tmp_path / "crafted.pt", tmp_path / "marker")
    renamed = tmp_path / "renamed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(renamed, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info).replace(b"def __setstate__", b"def __setstatf__"))
    with pytest.raises(CheckpointError) as err:
        load_clip(renamed)
    assert str(err.value).startswith(f"{renamed}: __torch__.") and "Crafted" in str(err.value) and "tuple" in str(err.value)
    assert not (tmp_path / "marker").exists()


def test_archive_naming_a_foreign_global_is_refused(tmp_path):
    """A data.pkl that would call os.system when unpickled: refused by name, before anything is called."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'marker'}",)

    path = tmp_path / "global.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_clip(path)
    assert str(err.value).startswith(f"{path}: ") and "system" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------------------------------- no silent NaN
@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A run checkpoint in train.py's format (untrained, on the toy world) and a folder of its test images."""
    d = tmp_path_factory.mktemp("untrusted")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGRL_CACHE", str(d / "cache"))
        ckpt, cfg, data, clip, names = fixtures_run.untrained_run(d)
        photos = d / "photos"
        photos.mkdir()
        for path in data.test_paths[:3]:
            Image.open(path).save(photos / os.path.basename(path))
        yield {"dir": d, "ckpt": ckpt, "photos": photos, "cfg": cfg, "clip": clip, "names": names}


def edited(untrained, tmp_path, change):
    """A copy of the run checkpoint with `change(ckpt)` applied and its checksum made right again."""
    ckpt = torch.load(untrained["ckpt"], weights_only=True)
    change(ckpt)
    ckpt["sha256"] = checkpoints.payload_sha256(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def called(main, capsys, *args):
    try:
        rc = main([str(a) for a in args])
    except KeyboardInterrupt:  # escaping, it would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped the command: a traceback on the command line")
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_in(rc, err, *needles):
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error", "warning", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.mark.parametrize("tensor", ["model.gmc.layer1.att", "label_emb"])
def test_nonfinite_checkpoint_tensor_is_refused_at_load(untrained, tmp_path, capsys, tensor):
    """One NaN weight, or an infinite row of label embeddings, in a checkpoint whose checksum is right."""
    def change(ckpt):
        if tensor == "label_emb":
            ckpt["label_emb"][2] = float("inf")
        else:
            ckpt["model"][tensor[len("model."):]][0, 3] = float("nan")
    rc, out, err = called(predict.main, capsys, "--ckpt", edited(untrained, tmp_path, change), untrained["photos"])
    one_line_in(rc, err, tensor, "edited.pt")
    assert out == ""


def test_nonfinite_scores_stop_with_one_line(untrained, tmp_path, capsys):
    """Finite weights whose forward pass overflows (ln_post's gains at 1e38): predict.py and eval.py stop with
    one line naming an image, no table and no tags of nan."""
    def change(ckpt):
        ckpt["model"]["student.ln_post.weight"].fill_(1e38)
    path = edited(untrained, tmp_path, change)
    rc, out, err = called(predict.main, capsys, "--ckpt", path, untrained["photos"], "--workers", 0)
    one_line_in(rc, err, "not finite", untrained["photos"])
    assert out == ""
    rc, out, err = called(eval_cli.main, capsys, "--ckpt", path, "--workers", 0, "--json", tmp_path / "m.json")
    one_line_in(rc, err, "not finite")
    assert "nan" not in out and not (tmp_path / "m.json").exists()


# --------------------------------------------------------------------------------- caches that check themselves
def test_label_embedding_cache_entry_is_verified(tmp_path, capsys):
    """16 floats changed inside the cached entry, the entry cut in half, another key's entry under this name:
    each is recomputed after one warning line, never served (the values come from encode_text itself)."""
    clip = load_clip(toyworld.TOYCLIP)
    names, template = ["sun", "mug", "tree"], "There is a {} in the scene"
    with torch.no_grad():
        want = clip.encode_text(clip.tokenizer([template.format(n) for n in names])).float()  # (3, D)
    first = encode_labels(clip, names, template=template, cache_dir=tmp_path)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    [entry] = tmp_path.glob("labels-*.pt")
    good = entry.read_bytes()
    other = encode_labels(clip, ["cat", "dog", "car"], template=template, cache_dir=tmp_path)
    foreign = next(p for p in tmp_path.glob("labels-*.pt") if p != entry).read_bytes()

    def tampered():
        hit = torch.load(entry, weights_only=True)
        hit["embeddings"].view(-1)[:16] += 0.5
        torch.save(hit, entry)
    for damage in (tampered, lambda: entry.write_bytes(good[:len(good) // 2]), lambda: entry.write_bytes(foreign)):
        entry.write_bytes(good)
        damage()
        capsys.readouterr()
        got = encode_labels(clip, names, template=template, cache_dir=tmp_path)
        err = capsys.readouterr().err
        assert torch.equal(got, first) and not torch.equal(got[:, :4], other[:, :4])
        assert err.count("\n") == 1 and err.startswith(f"warning: {entry}") and "Traceback" not in err, err
    capsys.readouterr()
    assert torch.equal(encode_labels(clip, names, template=template, cache_dir=tmp_path), first)  # rewritten whole
    assert capsys.readouterr().err == ""


def images(folder, n=4):
    folder.mkdir()
    paths = []
    for k in range(n):
        Image.new("RGB", (24, 16), (60 * k, 90, 200 - 40 * k)).save(folder / f"im{k}.png")
        paths.append(str(folder / f"im{k}.png"))
    return paths


def test_image_check_cache_is_verified(tmp_path, capsys, monkeypatch):
    """A cache cut in half is one warning (it was a BadZipFile traceback); an image overwritten with random bytes
    of its size, its modification time put back, is decoded again and found bad."""
    monkeypatch.setenv("SIGRL_CACHE", str(tmp_path / "cache"))
    paths = images(tmp_path / "img")
    assert check_images(paths)[0].all()
    [cache] = (tmp_path / "cache").glob("images-*.npz")
    cache.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])
    capsys.readouterr()
    good, bad, _ = check_images(paths)
    err = capsys.readouterr().err
    assert good.all() and not bad
    assert err.count("\n") == 1 and err.startswith(f"warning: {cache}") and "Traceback" not in err, err
    st = os.stat(paths[2])
    with open(paths[2], "wb") as f:
        f.write(os.urandom(st.st_size))
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(paths[2]).st_size, os.stat(paths[2]).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    good, bad, _ = check_images(paths)
    assert good.tolist() == [True, True, False, True] and bad == [paths[2]]
    assert capsys.readouterr().err == ""


def test_image_failing_after_the_check_clears_the_verdicts(tmp_path, monkeypatch):
    """An image that the check passed and that then fails to load: one DataError naming it and a command-line
    step (not an internal function), and no cached verdict is left to pass it again."""
    monkeypatch.setenv("SIGRL_CACHE", str(tmp_path / "cache"))
    paths = images(tmp_path / "img")
    assert check_images(paths)[0].all() and list((tmp_path / "cache").glob("images-*.npz"))
    (tmp_path / "img" / "im1.png").write_bytes(b"not a PNG any more")
    ds = ImageList(paths, [[0]] * len(paths), build_transform("zsl", False, 16))
    with pytest.raises(DataError) as err:
        ds[1]
    line = str(err.value)
    assert line.startswith(paths[1] + ": ") and "run the same command again" in line and "()" not in line
    assert "\n" not in line and not list((tmp_path / "cache").glob("images-*.npz"))
    assert check_images(paths)[0].tolist() == [True, False, True, True]


# ----------------------------------------------------------------------------------------- resume keeps the log
@pytest.mark.parametrize("damage", ["first line cut short", "byte 0xff", "nested 100000 deep", "not a record"])
def test_resume_refuses_a_damaged_log_and_keeps_it(untrained, tmp_path, capsys, damage):
    """A damaged line in log.jsonl: --resume is one line naming the line, and the log is left byte for byte
    (the intact epoch-1 record after it used to be dropped; a 0xff byte was a UnicodeDecodeError traceback)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(untrained["ckpt"].read_bytes())
    first = {"first line cut short": b'{"epoch": 0, "loss": {"tot', "byte 0xff": b'{"epoch": 0, "note": "\xff"}',
             "nested 100000 deep": b"[" * 100000, "not a record": b"[0, 1]"}[damage]
    log = first + b'\n{"epoch": 1, "loss": {"total": 0.5}}\n'
    (run / "log.jsonl").write_bytes(log)
    rc, out, err = called(train_cli.main, capsys, "--resume", run / "last.pt")
    one_line_in(rc, err, f"{run / 'log.jsonl'}:1", "--resume")
    assert (run / "log.jsonl").read_bytes() == log and sorted(os.listdir(run)) == ["last.pt", "log.jsonl"]


@pytest.mark.parametrize("line", [b'{"epoch": 1, "loss": {"total": "\xff"}}', b"[" * 100000])
def test_plot_reads_a_damaged_log_in_one_line(tmp_path, capsys, line):
    (tmp_path / "log.jsonl").write_bytes(b'{"epoch": 0, "loss": {"total": 1.0}}\n' + line + b"\n")
    rc, _, err = called(plot.main, capsys, tmp_path, "--out", tmp_path / "curves.png")
    one_line_in(rc, err, "log.jsonl")
    assert not (tmp_path / "curves.png").exists()


def test_archive_entry_larger_than_the_file_is_refused(tmp_path):
    """A compressed storage entry that would unpack to 50 MB from a file of kilobytes: refused before reading it."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/data/0", bytes(50 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="archive/data/0 would unpack to more bytes"):
        load_clip(path)
