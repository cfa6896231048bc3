"""Shapes through every model module at a small configuration (width 128 -> 2 attention heads, 2 blocks),
including one class (C = 1) and more top-k than patches (k > P)."""
import pytest
import torch

from clip_text import CLIP, CLIPConfig, PromptLearner, encode_labels
from gat import GMC, GATv2Layer
from sigrl import SDA, VFR, SigRL, SigRLConfig
from vit import Attention, ResidualAttentionBlock, Transformer, VisionConfig, VisionTransformer

W, LAYERS, D, B = 128, 2, 64, 2


def vision(resolution):
    return VisionConfig(width=W, layers=LAYERS, patch=16, resolution=resolution, embed_dim=D)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig(vision=vision(32), embed_dim=D, text_width=W, text_layers=LAYERS)).eval()


def test_transformer_blocks():
    x = torch.randn(B, 5, W)  # (B, N, W)
    attn = Attention(W, heads=W // 64)
    assert attn.heads == 2 and attn.in_proj_weight.shape == (3 * W, W)
    assert attn(x).shape == (B, 5, W)
    mask = torch.full((5, 5), float("-inf")).triu(1)  # causal, as the text tower uses
    assert attn(x, mask).shape == (B, 5, W)
    assert ResidualAttentionBlock(W, 2)(x).shape == (B, 5, W)
    blocks = Transformer(W, LAYERS, 2)
    assert len(blocks.resblocks) == LAYERS and blocks(x, mask).shape == (B, 5, W)


@pytest.mark.parametrize("resolution, P", [(32, 4), (64, 16)])
def test_vision_transformer(resolution, P):
    vit = VisionTransformer(vision(resolution))
    assert vit.config.heads == 2 and vit.resolution == resolution
    assert vit.positional_embedding.shape == (1 + P, W) and vit.proj.shape == (W, D)
    images = torch.randn(B, 3, resolution, resolution)
    tokens = vit.forward_tokens(images)
    assert tokens.shape == (B, 1 + P, W)
    assert vit(images).shape == (B, D)


def test_clip(clip):
    assert clip.embed_dim == D and clip.resolution == 32
    assert clip.encode_image(torch.randn(B, 3, 32, 32)).shape == (B, D)
    tokens = clip.tokenizer(["a dog", "two red cars"])  # (N, L)
    assert tokens.shape == (2, 77)
    assert clip.encode_text(tokens).shape == (2, D)
    x = clip.token_embedding(tokens)  # (N, L, Wt)
    assert x.shape == (2, 77, W)
    assert clip.encode_text_embeddings(x, tokens.argmax(dim=-1)).shape == (2, D)


@pytest.mark.parametrize("names", [["dog"], ["dog", "sky", "red car"]])
def test_label_embeddings(clip, names):
    C = len(names)
    assert encode_labels(clip, names).shape == (C, D)
    assert encode_labels(clip, names, templates=["a {}", "a photo of a {}"]).shape == (C, D)
    prompts = PromptLearner(clip, names, n_ctx=4)
    assert prompts.ctx.shape == (4, W)
    assert prompts().shape == (C, D)


@pytest.mark.parametrize("C", [1, 2, 9])
def test_gat(C):
    H = torch.randn(C, D)  # (C, D)
    layer1 = GATv2Layer(D, 32, heads=4)
    assert layer1(H).shape == layer1(H, chunk=4).shape == (C, 4 * 32)  # plain path, fast path
    assert GATv2Layer(4 * 32, D, heads=1)(layer1(H), chunk=4).shape == (C, D)
    assert GMC(D, heads=4, hidden=32)(H, chunk=4).shape == (C, D)


@pytest.mark.parametrize("C", [1, 9])
def test_heads(C):
    P = 4
    patch, H = torch.randn(B, P, D), torch.randn(C, D)
    T = SDA(D)(patch, H, chunk=4)
    assert T.shape == (B, C, D)
    assert VFR(D)(patch, T, H, chunk=4).shape == (B, P, D)


@pytest.mark.parametrize("resolution, C", [(32, 1), (32, 9), (64, 1), (64, 9)])
def test_sigrl_stage_by_stage(resolution, C):
    P = (resolution // 16) ** 2  # 4 or 16 patches; topk = 16 >= P in both cases
    torch.manual_seed(0)
    model = SigRL(VisionTransformer(vision(resolution)), SigRLConfig(embed_dim=D, topk=16, class_chunk=4))
    images, H = torch.randn(B, 3, resolution, resolution), torch.randn(C, D)
    student = model.student
    tokens = student.forward_tokens(images)
    assert tokens.shape == (B, 1 + P, W)
    tokens = tokens @ student.proj
    g, patch = tokens[:, 0], tokens[:, 1:]
    assert g.shape == (B, D) and patch.shape == (B, P, D)
    G = model.gmc(H)
    assert G.shape == (C, D)
    T = model.sda(patch, H, model.config.class_chunk)
    assert T.shape == (B, C, D)
    M_hat = model.vfr(patch, T, G, model.config.class_chunk)
    assert M_hat.shape == (B, P, D)
    maps = model.explain(patch, H)  # what the local score looks at (predict.py --explain)
    assert maps.similarity.shape == maps.attention.shape == (B, P, C)
    out = model(images, H)
    for name in ("scores", "local", "glob"):
        assert getattr(out, name).shape == (B, C), name
        assert torch.isfinite(getattr(out, name)).all(), name
    assert out.feat.shape == (B, D) and model.teacher_feat(images).shape == (B, D)
    out.scores.sum().backward()  # backward works at these sizes too


def test_sigrl_from_clip_ablations(clip):
    images, H = torch.randn(B, 3, 32, 32), torch.randn(1, D)
    for switches in (dict(), dict(gmc=False), dict(sda=False), dict(vfr=False, gmc=False, sda=False),
                     dict(global_only=True)):
        out = SigRL.from_clip(clip, **switches)(images, H)
        assert out.scores.shape == out.glob.shape == (B, 1) and out.feat.shape == (B, D), switches
        assert out.local is None if switches.get("global_only") else out.local.shape == (B, 1), switches
