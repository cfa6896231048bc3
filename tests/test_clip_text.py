"""clip_text.py and clip_files.py against open_clip on files in OpenAI's format (built by fixtures_clip), plus
loader errors, encode_labels and CoOp."""
import hashlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from optional import need

open_clip = need("open_clip")  # every test here compares with it (its oracle made each file)
from open_clip.model import CLIP as OpenClipCLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from support.clip_files import bpe_for, load_clip, main
from support.errors import CheckpointError
from clip_text import PromptLearner, encode_labels, tokenize
from fixtures_clip import build_oracle, make_clip_checkpoint, randomize_, save_official
from support.tokenizer import learn_bpe, write_bpe

ATOL = RTOL = 1e-4  # independent fp32 implementations of CLIP agree to ~3e-6
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TEXTS = ["a photo of a dog.", "There is a sunset in the scene", "x"]
NAMES = ["dog", "traffic light", "sunset"]


@torch.no_grad()
def encode_both(model, images, texts):
    tokens = open_clip.tokenize(texts)  # an independent tokenizer, so only the towers are compared here
    return model.encode_image(images), model.encode_text(tokens)


def assert_matches(ours, expected):
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------ full-size ViT-B/16
@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A random ViT-B/16 CLIP saved both ways (JIT with cuda:0 storage tags; partly-fp16 plain dict)."""
    folder = tmp_path_factory.mktemp("full")
    oracle = build_oracle("full", seed=0)
    paths = {"jit": str(folder / "ViT-B-16.pt"), "plain": str(folder / "ViT-B-16-plain.pt")}
    save_official(oracle, paths["jit"], fmt="jit", gpu_tags=True)
    save_official(oracle, paths["plain"], fmt="plain")
    images = torch.randn(1, 3, 224, 224)
    return oracle, paths, images, encode_both(oracle, images, TEXTS[:2])  # small batch: 2 cores, shared


@pytest.mark.parametrize("fmt", ["jit", "plain"])
def test_full_size_parity_with_open_clip(full, fmt):
    oracle, paths, images, expected = full
    clip = load_clip(paths[fmt])
    sd = clip.state_dict()
    assert len(sd) == 302
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in oracle.state_dict().items()}
    c, v = clip.config, clip.config.vision
    assert (v.width, v.layers, v.heads, v.patch, v.resolution) == (768, 12, 12, 16, 224)
    assert (c.embed_dim, c.context_length, c.vocab_size, c.text_width, c.text_layers, c.text_heads) == \
        (512, 77, 49408, 512, 12, 8)
    assert sum(p.numel() for p in clip.parameters()) == 149_620_737  # OpenAI's ViT-B/16 CLIP
    assert sum(p.numel() for p in clip.visual.parameters()) == 86_192_640
    assert_matches(encode_both(clip, images, TEXTS[:2]), expected)


# ------------------------------------------------------------------------------------------- tiny size
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CLIP as a JIT archive (tiny.pt) and a plain state dict (tiny-plain.pt), and ours loaded."""
    folder = tmp_path_factory.mktemp("tiny")
    oracle = make_clip_checkpoint(folder / "tiny.pt", size="tiny", fmt="jit", seed=0)
    save_official(oracle, folder / "tiny-plain.pt", fmt="plain")
    return oracle, load_clip(folder / "tiny.pt"), folder


@pytest.mark.parametrize("fmt", ["jit", "plain"])
def test_tiny_parity_and_loaded_state(tmp_path, fmt):
    path = str(tmp_path / f"tiny-{fmt}.pt")
    oracle = build_oracle("tiny", seed=1)
    save_official(oracle, path, fmt=fmt, gpu_tags=True)
    with warnings.catch_warnings(), pytest.raises(RuntimeError):  # the tags are real: no map_location, no load
        warnings.simplefilter("ignore")
        torch.jit.load(path) if fmt == "jit" else torch.load(path, weights_only=True)
    clip = load_clip(path)
    assert not clip.training and all(t.dtype == torch.float32 for t in clip.state_dict().values())
    with open(path, "rb") as f:
        assert clip.sha256 == hashlib.sha256(f.read()).hexdigest() and clip.source == path
    assert clip.config.vision.resolution == 32 and clip.embed_dim == 64 and clip.config.text_heads == 2
    images = torch.randn(3, 3, 32, 32)
    assert_matches(encode_both(clip, images, TEXTS), encode_both(oracle, images, TEXTS))


def test_official_vocab_gets_the_official_tokenizer(tiny):
    _, clip, _ = tiny
    assert clip.tokenizer.vocab_size == 49408
    assert clip.tokenizer("a photo of a dog.")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407]


def test_custom_vocab_finds_its_bpe_next_to_the_checkpoint(tmp_path, monkeypatch):
    merges = learn_bpe(["a photo of a dog", "a photo of a cat", "the scene"], n_merges=20)
    vocab = 512 + len(merges) + 2
    text_cfg = CLIPTextCfg(context_length=16, vocab_size=vocab, width=64, heads=1, layers=1)
    vision_cfg = CLIPVisionCfg(width=64, layers=1, patch_size=16, image_size=32)
    oracle = randomize_(OpenClipCLIP(32, vision_cfg, text_cfg, quick_gelu=True), seed=4).eval()
    save_official(oracle, tmp_path / "toy.pt", fmt="jit")
    write_bpe(tmp_path / "toy.bpe.txt.gz", merges)
    monkeypatch.delenv("SIGRL_BPE", raising=False)
    clip = load_clip(tmp_path / "toy.pt")
    assert (clip.config.vocab_size, clip.config.context_length) == (vocab, 16)
    tokens = clip.tokenizer(["a photo of a dog"], context_length=16)
    assert tokens.max() == vocab - 1 and clip.encode_text(tokens).shape == (1, 32)
    # lookup order: argument, then <stem>.bpe.txt.gz beside the checkpoint, then $SIGRL_BPE
    assert bpe_for("/x/toy.pt", vocab) == "/x/toy.bpe.txt.gz"
    assert bpe_for("/x/toy.pt", vocab, bpe="/y/arg.gz") == "/y/arg.gz"
    assert bpe_for("/x/toy.pt", 49408) is None
    monkeypatch.setenv("SIGRL_BPE", "/z/env.gz")
    assert bpe_for("/x/toy.pt", vocab) == "/z/env.gz"  # no sibling file: the variable
    assert bpe_for(tmp_path / "toy.pt", vocab) == str(tmp_path / "toy.bpe.txt.gz")  # the sibling wins
    with_env = load_clip(tmp_path / "toy.pt")
    assert torch.equal(with_env.tokenizer(["a photo of a dog"], context_length=16), tokens)


# ---------------------------------------------------------------------------------------- bad files
def _bad_file(kind, folder, good):
    path = str(folder / f"{kind}.pt")
    if kind == "truncated":
        with open(good, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "tensor":
        torch.save(torch.randn(4, 4), path)
    elif kind in ("key_missing", "resnet"):
        sd = torch.load(good.replace(".pt", "-plain.pt"), weights_only=True)
        del sd["visual.ln_post.bias"]
        if kind == "resnet":  # ModifiedResNet keys instead of the ViT's
            sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
            sd.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(1)})
        torch.save(sd, path)
    elif kind == "jit_not_clip":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(torch.nn.Linear(3, 2), torch.randn(1, 3)), path)
    elif kind == "text":
        with open(path, "w") as f:
            f.write("not a checkpoint\n")
    return path


BAD = {
    "missing_file": "file not found",
    "truncated": "truncated zip archive",
    "tensor": "expected a CLIP state dict (dict of tensors), got Tensor",
    "key_missing": "1 missing key(s): visual.ln_post.bias",
    "jit_not_clip": "TorchScript archive is not a CLIP model",
    "resnet": "only ViT CLIP checkpoints are supported",
    "text": "not a checkpoint",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoints_give_one_line(tiny, kind):
    folder = tiny[2]
    path = _bad_file(kind, folder, str(folder / "tiny.pt"))
    with pytest.raises(CheckpointError) as err:
        load_clip(path)
    message = str(err.value)
    assert message.startswith(path + ": ") and BAD[kind] in message and "\n" not in message


def test_cli(tiny, capsys):
    folder = tiny[2]
    bad = _bad_file("truncated", folder, str(folder / "tiny.pt"))
    run = subprocess.run([sys.executable, "-m", "support.clip_files", bad], capture_output=True, text=True,
                         cwd=HERE)
    assert run.returncode == 2 and "Traceback" not in run.stderr  # the one-line rule: exit 2
    assert run.stderr.count("\n") == 1 and "truncated zip archive" in run.stderr
    main([str(folder / "tiny.pt"), "a photo of a dog."])  # the success path, in-process (a subprocess costs ~4 s)
    out = capsys.readouterr().out
    assert "embed_dim=64" in out and "'a photo of a dog.'" in out


# ------------------------------------------------------------------------------------- encode_labels
def test_encode_labels_is_encode_text_of_the_template_and_cached(tiny, tmp_path, monkeypatch):
    _, clip, _ = tiny
    emb = encode_labels(clip, NAMES, cache_dir=tmp_path)
    with torch.no_grad():
        expected = clip.encode_text(tokenize([f"There is a {n} in the scene" for n in NAMES]))
    assert emb.dtype == torch.float32 and emb.shape == (3, 64)
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=1e-6)  # not normalised, row by row
    assert len(os.listdir(tmp_path)) == 1

    def not_again(tokens):
        raise AssertionError("the text tower ran again: cache miss")

    monkeypatch.setattr(clip, "encode_text", not_again)
    assert torch.equal(encode_labels(clip, NAMES, cache_dir=tmp_path), emb)  # served from the cache
    monkeypatch.undo()
    encode_labels(clip, NAMES[:2], cache_dir=tmp_path)
    encode_labels(clip, NAMES, template="a photo of a {}.", cache_dir=tmp_path)
    files = os.listdir(tmp_path)
    assert len(files) == 3 and not any(f.endswith(".tmp") for f in files)
    # embeddings rounded by other CPU code paths (another thread count here) are another entry, never reused
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        encode_labels(clip, NAMES, cache_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert len(os.listdir(tmp_path)) == 4


def test_encode_labels_template_ensemble(tiny, tmp_path):
    _, clip, _ = tiny
    templates = ["a photo of a {}.", "There is a {} in the scene"]
    emb = encode_labels(clip, NAMES, templates=templates, cache_dir=tmp_path)
    singles = torch.stack([encode_labels(clip, NAMES, template=t, cache_dir=tmp_path) for t in templates])
    direction = torch.nn.functional.normalize(singles, dim=-1).mean(0)
    torch.testing.assert_close(torch.nn.functional.normalize(emb, dim=-1),
                               torch.nn.functional.normalize(direction, dim=-1))
    torch.testing.assert_close(emb.norm(dim=-1), singles.norm(dim=-1).mean(0))


# ---------------------------------------------------------------------------------------------- CoOp
def test_coop_with_init_words_equals_encode_text(tiny):
    _, clip, _ = tiny
    learner = PromptLearner(clip, NAMES + ["black_and_white"], init="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx.shape == (4, 128)
    texts = [f"a photo of a {n}." for n in NAMES + ["black and white"]]
    with torch.no_grad():
        torch.testing.assert_close(learner(), clip.encode_text(tokenize(texts)), atol=1e-5, rtol=1e-5)


def test_coop_gradients_reach_only_the_context(tiny):
    _, clip, _ = tiny
    torch.manual_seed(0)
    learner = PromptLearner(clip, NAMES, n_ctx=16)
    assert learner.ctx.shape == (16, 128) and 0.015 < learner.ctx.std() < 0.025
    assert set(learner.state_dict()) == {"ctx", "token_prefix", "token_suffix", "eot_index"}
    out = learner()
    assert out.shape == (3, 64)
    out.square().sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


# ------------------------------------------------------------------------------------------ the fixture
def test_fixture_files_have_the_official_layout_and_are_stable(tiny):
    oracle, _, folder = tiny
    sd = torch.load(folder / "tiny-plain.pt", weights_only=True)
    assert len(sd) == 62 + 3 and all(sd[k].dtype == torch.int64 and sd[k].dim() == 0
                                     for k in ("input_resolution", "context_length", "vocab_size"))
    half = {k for k, v in sd.items() if v.dtype == torch.float16}
    assert half == {k for k in sd if k.endswith(("conv1.weight", "in_proj_weight", "in_proj_bias", "proj"))
                    or ".out_proj." in k or ".mlp.c_" in k or k == "text_projection"}
    assert sd["visual.proj"].dtype == torch.float16 and sd["visual.class_embedding"].dtype == torch.float32
    again = build_oracle("tiny", seed=0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in oracle.state_dict().items())
