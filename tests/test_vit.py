"""vit.py against independent implementations: explicit attention maths, open_clip's ViT, timm's ViT."""
import math

import pytest
import torch

from fixtures_clip import randomize_
from optional import need
from vit import (Attention, CheckpointError, Transformer, VisionConfig, VisionTransformer, infer_vision_config,
                 load_timm_vit)

ATOL = RTOL = 1e-4  # independent fp32 implementations of CLIP agree to ~3e-6


def explicit_attention(attn, x, mask=None):
    """softmax(Q K^T / sqrt(hd) + mask) V per head, written out with no fused kernel."""
    B, N, W = x.shape
    H, hd = attn.heads, W // attn.heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(W, dim=-1)
    q, k, v = (t.reshape(B, N, H, hd).permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, N, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, N, N)
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(dim=-1) @ v  # (B, H, N, hd)
    return attn.out_proj(out.permute(0, 2, 1, 3).reshape(B, N, W))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_explicit_softmax(causal):
    torch.manual_seed(0)
    attn = randomize_(Attention(128, heads=2), seed=1)
    x = torch.randn(3, 7, 128)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    torch.testing.assert_close(attn(x, mask), explicit_attention(attn, x, mask), atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_the_future():
    torch.manual_seed(0)
    blocks = randomize_(Transformer(128, layers=2, heads=2), seed=2).eval()
    x = torch.randn(1, 6, 128)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    y1 = blocks(x, mask)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change only the last two tokens
    y2 = blocks(x2, mask)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])
    assert not torch.allclose(y1[:, 4:], y2[:, 4:])


def open_clip_visual(width, layers, patch, resolution, embed_dim, seed=0):
    open_clip = need("open_clip")
    cfg = open_clip.model.CLIPVisionCfg(width=width, layers=layers, patch_size=patch, image_size=resolution,
                                        output_tokens=True)
    tower = open_clip.model._build_vision_tower(embed_dim, cfg, quick_gelu=True)
    return randomize_(tower, seed).eval()


def test_config_inferred_at_a_non_default_size_and_tokens_match_open_clip():
    oracle = open_clip_visual(width=128, layers=2, patch=8, resolution=48, embed_dim=96)
    ours = VisionTransformer.from_state_dict(oracle.state_dict(), prefix="").eval()
    c = ours.config
    assert (c.width, c.layers, c.patch, c.resolution, c.embed_dim, c.heads) == (128, 2, 8, 48, 96, 2)
    assert (c.quick_gelu, c.ln_pre, c.patch_bias, ours.resolution) == (True, True, False, 48)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        pooled, patch_tokens = oracle(images)
        tokens = ours.forward_tokens(images)
        assert tokens.shape == (2, 1 + 36, 128)
        # ln_post reaches every token, not just the class token (SigRL needs the patch tokens)
        torch.testing.assert_close(tokens[:, 1:], patch_tokens, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours(images), pooled, atol=ATOL, rtol=RTOL)


def test_from_state_dict_is_strict():
    sd = VisionTransformer(VisionConfig(width=128, layers=1, patch=16, resolution=32, embed_dim=64)).state_dict()
    sd["transformer.resblocks.0.extra"] = torch.zeros(1)
    del sd["ln_post.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): ln_post.bias; 1 unexpected key\(s\)"):
        VisionTransformer.from_state_dict(sd, prefix="")
    with pytest.raises(CheckpointError, match="missing conv1.weight"):
        infer_vision_config({})


def test_input_shape_is_checked():
    vit = VisionTransformer(VisionConfig(width=64, layers=1, patch=16, resolution=32, embed_dim=32))
    with pytest.raises(AssertionError, match=r"expected \(B, 3, 32, 32\)"):
        vit(torch.randn(1, 3, 48, 48))


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    model = need("timm").create_model("vit_base_patch16_224", pretrained=False)
    return randomize_(model, seed=3).eval()


def test_timm_vit_parity(timm_vit):
    ours = load_timm_vit(timm_vit.state_dict()).eval()
    c = ours.config
    assert (c.quick_gelu, c.ln_pre, c.eps, c.patch_bias, ours.proj) == (False, False, 1e-6, True, None)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = timm_vit.forward_features(images)  # (1, 197, 768), final norm on every token
        tokens = ours.forward_tokens(images)
        torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours(images), expected[:, 0], atol=ATOL, rtol=RTOL)  # no proj: class token


def test_timm_vit_bad_state_dicts(timm_vit):
    sd = dict(timm_vit.state_dict())
    del sd["blocks.3.mlp.fc1.bias"]
    with pytest.raises(CheckpointError) as err:
        load_timm_vit(sd)
    assert "blocks.3.mlp.fc1.bias" in str(err.value) and "\n" not in str(err.value)
    sd = dict(timm_vit.state_dict())
    sd["pos_embed"] = torch.zeros(1, 50, 768)  # a 112-pixel model's positions
    with pytest.raises(CheckpointError, match=r"wrong shape for positional_embedding \(50, 768\)"):
        load_timm_vit(sd)
