"""The CLIP visual tower (a ViT), written out by hand, plus the transformer blocks the text tower shares.

Shape legend (one for the whole book: vit.py, clip_text.py, gat.py, sigrl.py, data.py use the same letters)
    B  images in a batch (vit.py's shared Transformer: sequences, images or texts)
    N  images in a dataset split    Nt texts encoded at once        R  image side in pixels
    P  patch tokens per image       L  tokens in a sequence (1 + P for an image, 77 for a text)
    W  ViT width (768)              Wt text width (512)             D  joint embedding width (512)
    nh attention heads              hd width of one head            V  vocabulary size (49408)
    C  labels in the scored set     c  labels in one chunk of a fast path
    S  seen labels                  U  unseen labels                K  patches in the top-K, min(topk, P)
    n_ctx  CoOp's learned context tokens
Every other capital is a paper symbol with the paper's meaning: H (C, D) the label embeddings h^i, G GMC's
graph-refined H-hat, F the patch features F_patch (B, P, D), M, Q, T (SDA), O (VFR's fused class features),
M_hat (VFR's output). Greek letters too: here alpha is only GAT's attention vector, beta only its attention
coefficients (the SPML losses' alpha and beta, Zhou et al.'s loss weights, live in protocol/ and train.py's
flags); SDA's and VFR's attentions are the paper's a and a-hat (code: a, a_hat). One exception, the paper's
own: W in GAT's formulas (gat.py) is the paper's weight matrix (code: lin), not a width.
Here P = (R / patch)^2, nh = W // 64 and hd = 64; D is the columns of proj.

SigRL uses the CLIP ViT-B/16 visual tower as its student and a frozen copy as its teacher:
    tokens = ln_post(ViT(x))            (B, 1+P, W)   -> `VisionTransformer.forward_tokens`
    g      = tokens[:, 0] @ proj        (B, D)        -> `VisionTransformer.forward` (= CLIP encode_image)
    F      = tokens[:, 1:] @ proj       (B, P, D)     patch features, computed by the SigRL head
The paper's text says "ViT-B/16 pre-trained on ImageNet-1K"; the reference code loads CLIP's visual weights, and
so does this implementation: SigRL needs CLIP's proj into the label space, which an ImageNet ViT has not, so
no command trains one. `load_timm_vit` only reads a timm ImageNet checkpoint into this tower (a loader tested
against timm), for inspecting that tower; it is not the paper's backbone made trainable.

Parameter names ARE the OpenAI checkpoint key names (`conv1`, `class_embedding`, `ln_pre`,
`transformer.resblocks.N.attn.in_proj_weight`, ...), so a CLIP state dict loads with no renaming.
"""
from collections import OrderedDict
from dataclasses import dataclass
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.errors import CheckpointError



def check_keys(state_dict, expected, source):
    """Strict key check: raise one `CheckpointError` line naming missing / unexpected keys (first 3 + count)."""
    got, want = set(state_dict), set(expected)
    problems = []
    for what, keys in (("missing", sorted(want - got)), ("unexpected", sorted(got - want))):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what} key(s): {', '.join(keys[:3])}{more}")
    if problems:
        raise CheckpointError(f"{source}: not the expected key set: {'; '.join(problems)}")


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with the nn.MultiheadAttention parameter layout of the CLIP checkpoint.

    in_proj_weight stacks the query, key and value projections along its rows: (3W, W).
    """

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} must be a multiple of heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width ** -0.5)

    def forward(self, x, attn_mask=None):
        B, L, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, W)
        q, k, v = (t.view(B, L, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
        # One fused kernel computes  softmax(q k^T / sqrt(hd) + attn_mask) v  per head (attn_mask is additive:
        # 0 or -inf); where the backend allows, it never stores the (B, nh, L, L) score matrix. test_vit.py checks
        # it against that formula written out.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))  # (B, L, W)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP widens 4x."""

    def __init__(self, width, heads, quick_gelu=True, eps=1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width),
            gelu=QuickGELU() if quick_gelu else nn.GELU(),
            c_proj=nn.Linear(4 * width, width),
        ))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)  # (B, L, W)
        return x + self.mlp(self.ln_2(x))  # (B, L, W)


class Transformer(nn.Module):
    """A stack of residual blocks; the text tower passes a causal `attn_mask`, the visual tower none."""

    def __init__(self, width, layers, heads, quick_gelu=True, eps=1e-5):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, quick_gelu, eps) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        assert x.dim() == 3 and x.shape[-1] == self.width, f"expected (B, L, {self.width}), got {tuple(x.shape)}"
        for block in self.resblocks:
            x = block(x, attn_mask)  # (B, L, W)
        return x


@dataclass
class VisionConfig:
    width: int = 768
    layers: int = 12
    patch: int = 16
    resolution: int = 224
    embed_dim: int | None = 512  # proj columns; None = no projection (timm ViT)
    heads: int | None = None     # None -> width // 64, as OpenAI's build_model
    quick_gelu: bool = True      # OpenAI CLIP: QuickGELU; timm: exact GELU
    ln_pre: bool = True          # CLIP normalises the embedded tokens before the blocks; timm does not
    eps: float = 1e-5            # LayerNorm eps (timm: 1e-6)
    patch_bias: bool = False     # CLIP's conv1 has no bias; timm's patch embedding has one

    def __post_init__(self):
        if self.heads is None:
            self.heads = self.width // 64
        assert self.heads >= 1, f"width {self.width} gives no attention head (heads = width // 64)"
        assert self.resolution % self.patch == 0, f"resolution {self.resolution} not a multiple of {self.patch}"


class VisionTransformer(nn.Module):
    """CLIP's ViT: patchify with a strided conv, prepend a class token, add positions, pre-LN blocks, ln_post."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        grid = c.resolution // c.patch
        scale = c.width ** -0.5
        self.conv1 = nn.Conv2d(3, c.width, kernel_size=c.patch, stride=c.patch, bias=c.patch_bias)
        self.class_embedding = nn.Parameter(scale * torch.randn(c.width))  # (W,)
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + grid * grid, c.width))  # (1+P, W)
        self.ln_pre = nn.LayerNorm(c.width, eps=c.eps) if c.ln_pre else nn.Identity()
        self.transformer = Transformer(c.width, c.layers, c.heads, c.quick_gelu, c.eps)
        self.ln_post = nn.LayerNorm(c.width, eps=c.eps)
        self.proj = None if c.embed_dim is None else nn.Parameter(scale * torch.randn(c.width, c.embed_dim))

    @property
    def resolution(self):
        return self.config.resolution

    def forward_tokens(self, x):
        """Images (B, 3, R, R) -> ln_post of EVERY token (B, 1+P, W); SigRL needs the patch tokens too."""
        R = self.config.resolution
        assert x.dim() == 4 and x.shape[1:] == (3, R, R), f"expected (B, 3, {R}, {R}), got {tuple(x.shape)}"
        x = self.conv1(x)  # (B, W, R/patch, R/patch)
        x = x.flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 1+P, W)
        x = self.transformer(self.ln_pre(x))  # (B, 1+P, W)
        return self.ln_post(x)  # (B, 1+P, W)

    def forward(self, x):
        """Images (B, 3, R, R) -> class-token embedding (B, D), OpenAI's encode_image."""
        cls = self.forward_tokens(x)[:, 0]  # (B, W)
        return cls if self.proj is None else cls @ self.proj  # (B, W) @ (W, D) -> (B, D)

    @classmethod
    def from_state_dict(cls, state_dict, prefix="visual."):
        """Build from a CLIP state dict, inferring the configuration from tensor shapes (OpenAI's rules)."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        model = cls(infer_vision_config(sd))
        check_keys(sd, model.state_dict(), f"{prefix or 'visual'} state dict")
        model.load_state_dict(sd)  # casts fp16 entries into the fp32 parameters
        return model


def infer_vision_config(sd):
    """VisionConfig from shapes of an un-prefixed visual state dict, by the rules of OpenAI's build_model."""
    missing = [k for k in ("conv1.weight", "positional_embedding") if k not in sd]
    if missing:
        raise CheckpointError(f"visual state dict: missing {', '.join(missing)} (needed to infer the config)")
    width, _, patch, _ = sd["conv1.weight"].shape
    layers = sum(1 for k in sd if re.fullmatch(r"transformer\.resblocks\.\d+\.attn\.in_proj_weight", k))
    grid = round(math.sqrt(sd["positional_embedding"].shape[0] - 1))
    return VisionConfig(
        width=width, layers=layers, patch=patch, resolution=patch * grid,
        embed_dim=sd["proj"].shape[1] if "proj" in sd else None,
        ln_pre="ln_pre.weight" in sd, patch_bias="conv1.bias" in sd)


# timm name -> our name; "{i}" is a block index. timm's ViT differs from CLIP's in four ways: exact GELU,
# LayerNorm eps 1e-6, a bias on the patch embedding, and no ln_pre; its classifier `head.*` is ignored
# (SigRL needs tokens, not ImageNet logits), and there is no proj, so forward() returns the (B, W) class token.
TIMM_RENAMES = {
    "cls_token": "class_embedding",
    "pos_embed": "positional_embedding",
    "patch_embed.proj.weight": "conv1.weight",
    "patch_embed.proj.bias": "conv1.bias",
    "blocks.{i}.norm1.weight": "transformer.resblocks.{i}.ln_1.weight",
    "blocks.{i}.norm1.bias": "transformer.resblocks.{i}.ln_1.bias",
    "blocks.{i}.attn.qkv.weight": "transformer.resblocks.{i}.attn.in_proj_weight",
    "blocks.{i}.attn.qkv.bias": "transformer.resblocks.{i}.attn.in_proj_bias",
    "blocks.{i}.attn.proj.weight": "transformer.resblocks.{i}.attn.out_proj.weight",
    "blocks.{i}.attn.proj.bias": "transformer.resblocks.{i}.attn.out_proj.bias",
    "blocks.{i}.norm2.weight": "transformer.resblocks.{i}.ln_2.weight",
    "blocks.{i}.norm2.bias": "transformer.resblocks.{i}.ln_2.bias",
    "blocks.{i}.mlp.fc1.weight": "transformer.resblocks.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.fc1.bias": "transformer.resblocks.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.fc2.weight": "transformer.resblocks.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.fc2.bias": "transformer.resblocks.{i}.mlp.c_proj.bias",
    "norm.weight": "ln_post.weight",
    "norm.bias": "ln_post.bias",
}


def load_timm_vit(state_dict):
    """A timm `vit_base_patch16_224` state dict -> VisionTransformer (ImageNet ViT, for the paper's reading)."""
    config = VisionConfig(width=768, layers=12, patch=16, resolution=224, embed_dim=None,
                          quick_gelu=False, ln_pre=False, eps=1e-6, patch_bias=True)
    model = VisionTransformer(config)
    renames = {}
    for timm_name, ours in TIMM_RENAMES.items():
        for i in range(config.layers) if "{i}" in timm_name else [None]:
            renames[timm_name.format(i=i)] = ours.format(i=i)
    sd = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    check_keys(sd, renames, "timm vit_base_patch16_224 state dict")
    sd = {renames[k]: v for k, v in sd.items()}
    sd["class_embedding"] = sd["class_embedding"].reshape(-1)  # (1, 1, W) -> (W,)
    sd["positional_embedding"] = sd["positional_embedding"].reshape(-1, config.width)  # (1, 1+P, W) -> (1+P, W)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in sd.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"timm vit_base_patch16_224 state dict: wrong shape for {'; '.join(wrong[:3])}")
    model.load_state_dict(sd)
    return model


if __name__ == "__main__":
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig(width=128, layers=2, patch=8, resolution=32, embed_dim=64)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        print("tokens", tuple(vit.forward_tokens(images).shape), "-> embedding", tuple(vit(images).shape))
    print("config inferred back from the state dict:", infer_vision_config(vit.state_dict()))
