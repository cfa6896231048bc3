"""load_clip on other projects' layouts, against the projects' own forwards at random weights: transformers'
CLIPModel (a saved folder: config.json + model.safetensors or pytorch_model.bin) and open_clip (its hub folder
and its training checkpoint, with GELU as LAION's models and QuickGELU as OpenAI's); their one-line errors."""
import json
import sys

import pytest
import torch

from optional import need

open_clip = need("open_clip")  # every test here compares with it or with transformers
transformers = need("transformers")
from open_clip.model import CLIP as OpenClipCLIP  # noqa: E402

from support import clip_convert
from support.clip_files import load_clip
from fixtures_clip import SIZES, random_model
from support.errors import CheckpointError


ATOL = RTOL = 1e-4  # independent implementations in fp32 (as the OpenAI-layout parity tests)
TEXTS = ["a photo of a dog.", "There is a sunset in the scene"]
# transformers' CLIPConfig of a ViT-B/16 CLIP (as the hub's openai/clip-vit-base-patch16) and a tiny one
HF_SIZES = {
    "full": (512, dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       image_size=224, patch_size=16),
             dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)),
    "tiny": (64, dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2,
                      image_size=32, patch_size=16),
             dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2)),
}


def build_transformers(size, act="quick_gelu", seed=0):
    proj, vision, text = HF_SIZES[size]
    config = transformers.CLIPConfig(vision_config=dict(vision, hidden_act=act),
                                     text_config=dict(text, hidden_act=act), projection_dim=proj)
    return random_model(lambda: transformers.CLIPModel(config), seed).eval()


def build_open_clip(size, quick_gelu, seed=0):
    embed_dim, vision_cfg, text_cfg = SIZES[size]
    return random_model(lambda: OpenClipCLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu), seed).eval()


def open_clip_model_cfg(size, quick_gelu):
    """What open_clip_config.json's "model_cfg" holds for the model build_open_clip makes."""
    embed_dim, v, t = SIZES[size]
    cfg = {"embed_dim": embed_dim, "vision_cfg": dict(image_size=v.image_size, layers=v.layers, width=v.width,
                                                       patch_size=v.patch_size),
           "text_cfg": dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                            heads=t.heads, layers=t.layers)}
    return cfg | ({"quick_gelu": True} if quick_gelu else {})


def save_open_clip_hub(model, folder, model_cfg, weights="open_clip_pytorch_model.bin"):
    """open_clip's hub folder: open_clip_config.json + the state dict (.bin via torch.save, or .safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                     "std": [0.26862954, 0.26130258, 0.27577711]}}))
    sd = model.state_dict()
    if weights.endswith(".safetensors"):
        save_file = need("safetensors.torch").save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / weights)
    else:
        torch.save(sd, folder / weights)
    return folder


@torch.no_grad()
def features(model, images, tokens):
    if isinstance(model, transformers.CLIPModel):
        out = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=tokens)
        return [x if torch.is_tensor(x) else x.pooler_output for x in out]  # transformers 5 returns an output
    return model.encode_image(images), model.encode_text(tokens)


def assert_parity(ours, oracle, resolution, n_images=1):
    images = torch.randn(n_images, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.tokenize(TEXTS)
    for got, want in zip(features(ours, images, tokens), features(oracle, images, tokens)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def openai_keys(size):
    return set(build_open_clip(size, quick_gelu=True).state_dict())


# ------------------------------------------------------------------------------ full ViT-B/16 size
@pytest.fixture(scope="module")
def full_transformers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-vit-base-patch16")
    oracle = build_transformers("full")
    oracle.save_pretrained(folder)  # config.json + model.safetensors, as on the hub
    return oracle, folder


def test_transformers_full_size_parity(full_transformers):
    oracle, folder = full_transformers
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    clip = load_clip(folder)
    c, v = clip.config, clip.config.vision
    assert (v.width, v.layers, v.heads, v.patch, v.resolution, v.quick_gelu) == (768, 12, 12, 16, 224, True)
    assert (c.embed_dim, c.text_width, c.text_layers, c.text_heads, c.quick_gelu) == (512, 512, 12, 8, True)
    assert len(clip.state_dict()) == 302 and sum(p.numel() for p in clip.parameters()) == 149_620_737
    assert clip.source == str(folder) and len(clip.sha256) == 64
    assert_parity(clip, oracle, 224)


@pytest.fixture(scope="module")
def full_open_clip_gelu(tmp_path_factory):
    """LAION's ViT-B-16 architecture: OpenAI's, but exact GELU (open_clip's model_configs/ViT-B-16.json)."""
    oracle = build_open_clip("full", quick_gelu=False)
    folder = save_open_clip_hub(oracle, tmp_path_factory.mktemp("laion") / "CLIP-ViT-B-16",
                                open_clip_model_cfg("full", quick_gelu=False), weights="open_clip_model.safetensors")
    return oracle, folder


def test_open_clip_gelu_full_size_parity(full_open_clip_gelu):
    oracle, folder = full_open_clip_gelu
    clip = load_clip(folder)
    assert not clip.config.quick_gelu and not clip.config.vision.quick_gelu
    assert set(clip.state_dict()) == set(oracle.state_dict())
    assert_parity(clip, oracle, 224)


# ------------------------------------------------------------------------------------- tiny variants
def test_transformers_bin_with_position_ids_and_gelu(tmp_path):
    """pytorch_model.bin as older transformers wrote it (with the position_ids buffers), read by its path."""
    oracle = build_transformers("tiny", act="gelu", seed=2)
    oracle.config.save_pretrained(tmp_path)
    sd = dict(oracle.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    clip = load_clip(tmp_path / "pytorch_model.bin")
    assert not clip.config.quick_gelu and (clip.config.text_heads, clip.config.vision.heads) == (2, 2)
    assert set(clip.state_dict()) == openai_keys("tiny")
    assert_parity(clip, oracle, 32, n_images=2)


def test_open_clip_training_checkpoint(tmp_path):
    """open_clip's epoch_N.pt: {"epoch", "name", "state_dict" with DDP's "module." prefix, "optimizer"}; its
    activation comes from the open_clip_config.json beside it, and without one it is refused."""
    oracle = build_open_clip("tiny", quick_gelu=True, seed=3)
    opt = torch.optim.AdamW(oracle.parameters())
    ckpt = {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in oracle.state_dict().items()},
            "optimizer": opt.state_dict()}
    torch.save(ckpt, tmp_path / "epoch_2.pt")
    with pytest.raises(CheckpointError, match="open_clip_config.json"):
        load_clip(tmp_path / "epoch_2.pt")
    save_open_clip_hub(oracle, tmp_path, open_clip_model_cfg("tiny", quick_gelu=True))  # adds the config
    clip = load_clip(tmp_path / "epoch_2.pt")
    assert clip.config.quick_gelu
    assert_parity(clip, oracle, 32, n_images=2)


def test_unwrap_and_arch_rules():
    sd = {"module.logit_scale": torch.ones(1), "module.visual.proj": torch.ones(2, 2)}
    out = clip_convert.unwrap_open_clip({"epoch": 1, "state_dict": sd})
    assert set(out) == {"logit_scale", "visual.proj"} and out["logit_scale"].shape == ()
    assert clip_convert.open_clip_arch({"embed_dim": 8}, "x") == clip_convert.Arch(quick_gelu=False, text_heads=8)
    defaults = {"custom_text": False, "vision_cfg": {"timm_model_name": None, "pool_type": "tok"},
                "text_cfg": {"hf_tokenizer_name": None, "proj_bias": False, "heads": 12}}
    assert clip_convert.open_clip_arch(defaults, "x") == clip_convert.Arch(quick_gelu=False, text_heads=12)
    for cfg in ({"vision_cfg": {"timm_model_name": "vit"}}, {"text_cfg": {"hf_model_name": "bert"}},
                {"text_cfg": {"pool_type": "first"}}, {"vision_cfg": {"head_width": 80}}, {"custom_text": True},
                {"vision_cfg": {"final_ln_after_pool": True}}, {"text_cfg": {"proj_bias": True}}, {"siglip": 1}):
        with pytest.raises(CheckpointError, match="is not supported"):
            clip_convert.open_clip_arch(cfg, "x")


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hf")
    build_transformers("tiny", seed=4).save_pretrained(folder)
    return folder


def _edit_config(src, dst, **changes):
    dst.mkdir()
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for dotted, value in changes.items():
        part, _, key = dotted.rpartition("__")
        (config[part] if part else config)[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_errors_are_one_line(tiny_hf, tmp_path, monkeypatch):
    cases = {
        "wrong size": (_edit_config(tiny_hf, tmp_path / "a", vision_config__hidden_size=256),
                       "vision_config.hidden_size is 256, but the weights give 128"),
        "activation": (_edit_config(tiny_hf, tmp_path / "b", text_config__hidden_act="gelu_new"),
                       "activations ['gelu_new', 'quick_gelu'] are not supported"),
        "not clip": (_edit_config(tiny_hf, tmp_path / "c", model_type="siglip"), "'siglip' model, not CLIP"),
        "empty folder": (tmp_path, "neither a transformers CLIPModel folder"),
        "no config": (tmp_path / "lonely" / "model.safetensors", "config.json"),
        "missing": (tmp_path / "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    }
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "model.safetensors").symlink_to(tiny_hf / "model.safetensors")
    for name, (path, needle) in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_clip(path)
        message = str(err.value)
        assert message.startswith(str(path)) and needle in message and "\n" not in message, (name, message)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="needs the safetensors package"):
        load_clip(tiny_hf)
