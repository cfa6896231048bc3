"""Test support: CLIP checkpoints in OpenAI's file format, built with open_clip (no download needed).

Nobody here has the real ViT-B-16.pt, so tests use files made the way OpenAI's were (as far as public code shows):
an open_clip CLIP with QuickGELU, every parameter randomised, the fp16 subset rounded through fp16, then
saved either as a traced TorchScript archive (what OpenAI ships) or as a partly-fp16 plain state dict.
The open_clip model that made a file is its *oracle*: it holds exactly the numbers in the file, in fp32.

    oracle = make_clip_checkpoint(tmp_path / "clip.pt")          # tiny, JIT, seed 0
    clip = load_clip(tmp_path / "clip.pt")                         # ours must match oracle

Needs open_clip (a test-only package) for the oracle and the TorchScript archive. Without it,
make_clip_checkpoint still writes a tiny CLIP file, made by this repository's own CLIP with the same random
draws and saved in OpenAI's plain layout (toy/pretrain.py's writer), and returns no oracle: enough for the
tests that only need a CLIP file to train on; the comparisons, which need the oracle, skip (tests/optional.py).
"""
import copy
import math
import os
import warnings
import zipfile

import torch

from optional import have

if have("open_clip"):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp
else:  # the sizes below still describe the tiny CLIP; only the oracle needs the library
    CLIP = convert_weights_to_lp = None

    def CLIPVisionCfg(**kwargs):
        return dict(kwargs)

    CLIPTextCfg = CLIPVisionCfg

# embed_dim, vision tower, text tower; "tiny" keeps widths of 128 (2 heads, so the head split is exercised)
SIZES = {
    "tiny": (64, CLIPVisionCfg(width=128, layers=2, patch_size=16, image_size=32),
             CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)),
    "full": (512, CLIPVisionCfg(width=768, layers=12, patch_size=16, image_size=224),
             CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)),
}


def randomize_(model, seed=0):
    """Overwrite every parameter but logit_scale with seeded noise at a sane scale, in place.

    Fresh LayerNorms (weight 1, bias 0) and zero biases would hide bugs that drop a bias or a norm.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "embed" in name or "cls_token" in name:      # token/positional/class embeddings
                p.copy_(0.02 * noise)
            elif name.endswith("proj") or name.endswith("text_projection"):  # (in, out), used as x @ P
                p.copy_(noise * p.shape[0] ** -0.5)
            elif p.dim() == 1 and name.endswith("weight"):   # LayerNorm gains
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:                                # biases
                p.copy_(0.02 * noise)
            else:                                             # Linear (out, in) and conv weights
                p.copy_(noise * p[0].numel() ** -0.5)
    return model


def fp16_subset(model):
    """Names of the entries OpenAI stores in fp16 (conv1, Linear and in_proj weights/biases, proj, text_projection).

    Uses open_clip's own converter so the subset is not our guess. The model comes back in fp32 with those
    entries rounded through fp16 (so the model is then the oracle of any file saved from it). The names
    depend only on the architecture: they are remembered on the model, as the conversion takes seconds.
    """
    if not hasattr(model, "fp16_names"):
        convert_weights_to_lp(model)
        model.fp16_names = {k for k, v in model.state_dict().items() if v.dtype == torch.float16}
        model.float()
    return model.fp16_names


def random_model(build, seed=0):
    """build() with every parameter drawn by randomize_, without paying for the library's own initialisation.

    At full size the library's random init (150M numbers, several passes) costs several times randomize_,
    which overwrites it anyway; so the model is built on the meta device and given fresh memory. Buffers are
    not parameters: each is recomputed here from its definition, and an unknown one stops the test.
    """
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("position_ids"):  # transformers: the position index of each token / patch
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            elif name == "attn_mask":  # open_clip: the causal mask, -inf above the diagonal
                buf.copy_(torch.full(buf.shape, float("-inf")).triu(1))
            else:
                raise AssertionError(f"buffer {name}: say here how it is computed")
        model.logit_scale.fill_(math.log(1 / 0.07))  # CLIP's initial value; randomize_ leaves it alone
    return randomize_(model, seed)


def build_oracle(size="tiny", seed=0, quick_gelu=True):
    """An open_clip CLIP (eval, fp32) whose fp16-subset values are exactly representable in fp16."""
    embed_dim, vision_cfg, text_cfg = SIZES[size]
    # randomize_ draws with its own seeded generator: the global RNG is left alone
    model = random_model(lambda: CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu), seed)
    fp16_subset(model)  # rounds through fp16 in place, so oracle numbers == checkpoint numbers
    return model.eval()


def _int_entries(model):
    return {"input_resolution": model.visual.image_size[0], "context_length": model.context_length,
            "vocab_size": model.vocab_size}


def save_official(model, path, fmt="jit", gpu_tags=False):
    """Save an open_clip CLIP as OpenAI would: "jit" = traced TorchScript archive, "plain" = state dict.

    Both hold the official 302 weights (fp16 subset in half precision) plus the three int64 scalars
    input_resolution, context_length and vocab_size. gpu_tags marks every storage as `cuda:0`, as in a
    file traced on a GPU, so a loader that forgets map_location="cpu" fails on this CPU machine.
    """
    path = str(path)
    half = fp16_subset(model)
    ints = _int_entries(model)
    if fmt == "plain":
        sd = {k: v.half() if k in half else v.clone() for k, v in model.state_dict().items()}
        sd.update({k: torch.tensor(v) for k, v in ints.items()})
        torch.save(sd, path)
    elif fmt == "jit":
        _save_jit(copy.deepcopy(model).eval(), path, half, ints)
    else:
        raise ValueError(f"fmt must be 'jit' or 'plain', got {fmt!r}")
    if gpu_tags:
        _tag_storages_cuda(path)


def _save_jit(model, path, half, ints):
    # open_clip keeps context_length / vocab_size as plain ints; OpenAI's archive has int64 scalar buffers.
    del model.context_length, model.vocab_size
    for name, value in ints.items():
        model.register_buffer(name, torch.tensor(value))
    # TorchScript ignores persistent=False, so a mask buffer would land in the archive's state dict.
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    R, L = ints["input_resolution"], ints["context_length"]
    image = torch.randn(1, 3, R, R, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(1, L, dtype=torch.long)
    tokens[0, :3] = torch.tensor([ints["vocab_size"] - 2, 1, ints["vocab_size"] - 1])  # SOT, a word, EOT
    with warnings.catch_warnings(), torch.no_grad():  # no_grad: the graph is the same, tracing is cheaper
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14, and tracing warns on asserts
        traced = torch.jit.trace_module(
            model, {"forward": (image, tokens), "encode_image": image, "encode_text": tokens}, check_trace=False)
        for name, p in traced.named_parameters():
            if name in half:
                p.data = p.data.half()
        torch.jit.save(traced, path)


def _tag_storages_cuda(path):
    """Rewrite the storage location 'cpu' -> 'cuda:0' in the archive's pickles (protocol-2 BINUNICODE)."""
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    tmp = path + ".tmp"
    tagged = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(("/data.pkl", "/constants.pkl")):
                tagged += data.count(cpu)
                data = data.replace(cpu, cuda)
            dst.writestr(info, data)
    assert tagged, f"{path}: found no 'cpu' storage location to rewrite"
    os.replace(tmp, path)


def make_clip_checkpoint(path, size="tiny", fmt="jit", seed=0):
    """Write an official-format CLIP file at `path` and return its open_clip oracle (fp32, eval); without
    open_clip, a plain-layout file of the same size made by clip_text.CLIP, and None (module docstring)."""
    if CLIP is None:
        return _make_without_open_clip(path, size, seed)
    oracle = build_oracle(size, seed)
    save_official(oracle, path, fmt)
    return oracle



def _make_without_open_clip(path, size, seed):
    from clip_text import CLIP as OurCLIP, CLIPConfig
    from toy.pretrain import save_official as save_plain
    from vit import VisionConfig

    embed_dim, v, t = SIZES[size]
    vision = VisionConfig(width=v["width"], layers=v["layers"], patch=v["patch_size"], resolution=v["image_size"],
                          embed_dim=embed_dim)
    config = CLIPConfig(vision=vision, embed_dim=embed_dim, context_length=t["context_length"],
                        vocab_size=t["vocab_size"], text_width=t["width"], text_layers=t["layers"], text_heads=t["heads"])
    model = randomize_(OurCLIP(config), seed).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    save_plain(model, path)
    return None


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("jit", "plain"):
            make_clip_checkpoint(os.path.join(d, f"tiny-{fmt}.pt"), fmt=fmt)
            print(fmt, os.path.getsize(os.path.join(d, f"tiny-{fmt}.pt")) // 1024, "KiB")
