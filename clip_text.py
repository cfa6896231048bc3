"""CLIP's text tower and the whole `CLIP` module; label embeddings; CoOp prompts. (Files: support/clip_files.py.)

Shape legend: the book's one legend (in full in vit.py and README.md). Here: Nt texts encoded at once, L tokens in
a sequence (77), Wt text width (512), D joint width (512), nh heads and hd the width of one, V vocabulary size
(49408), C labels, n_ctx CoOp's learned context tokens; H (C, D) the label embeddings h^i.

SigRL needs one text embedding per label, H in R^{C x D}, the h^i that every later equation reads. The paper's
Eq. 1 writes h^i = CoOp(Y_i), a learned prompt context; the reference code instead uses a fixed template: it
loads MKT's precomputed label_emb.pt, encode_text("There is a {name} in the scene") per label, not normalised.
This file follows the code: `encode_labels` recomputes exactly that from the CLIP file (the default prompt of
every command), so no opaque file is needed. `PromptLearner` is CoOp's learnable prompt, Eq. 1 as printed;
`python train.py --prompt coop` learns it jointly with SigRL (the reference code has none).

Text encoder (OpenAI): token_embedding + positional_embedding -> causal pre-LN transformer -> ln_final at
the EOT position (the largest token id) -> @ text_projection. Outputs are NOT normalised.
"""
from dataclasses import dataclass, field, replace
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn

from support import caches, safe_io
from support.progress import working
from support.tokenizer import N_RESERVED, Tokenizer, tokenize  # noqa: F401  (tokenize is re-exported: `from clip_text import tokenize`)
from vit import Transformer, VisionConfig, VisionTransformer, infer_vision_config

OFFICIAL_VOCAB = 49408
# CLIP's own image normalisation (OpenAI's preprocess); SigRL's reference code feeds ImageNet's instead (data.py)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    embed_dim: int = 512
    context_length: int = 77
    vocab_size: int = OFFICIAL_VOCAB
    text_width: int = 512
    text_layers: int = 12
    text_heads: int | None = None  # None -> text_width // 64, as OpenAI's build_model
    quick_gelu: bool = True  # both towers; OpenAI's CLIP: QuickGELU, open_clip's LAION models: exact GELU

    def __post_init__(self):
        if self.text_heads is None:
            self.text_heads = self.text_width // 64
        assert self.vision.embed_dim == self.embed_dim, "visual proj must map into the joint embedding"
        assert self.vision.quick_gelu == self.quick_gelu, "both towers use the same activation"

    @classmethod
    def from_state_dict(cls, sd, quick_gelu=True, vision_heads=None, text_heads=None):
        """Everything else from tensor shapes, by OpenAI's build_model rules (heads = width // 64 in both towers
        unless given: the activation and the head counts are the two things shapes cannot tell)."""
        vision = infer_vision_config({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
        embed_dim = sd["text_projection"].shape[1]
        text_blocks = {k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}
        return cls(vision=replace(vision, embed_dim=embed_dim, quick_gelu=quick_gelu, heads=vision_heads),
                   embed_dim=embed_dim, context_length=sd["positional_embedding"].shape[0],
                   vocab_size=sd["token_embedding.weight"].shape[0], text_width=sd["ln_final.weight"].shape[0],
                   text_layers=len(text_blocks), text_heads=text_heads, quick_gelu=quick_gelu)


class CLIP(nn.Module):
    """OpenAI's CLIP (ViT image tower + causal text tower); attribute names == checkpoint key names."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c.vision)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(c.context_length, c.text_width))  # (L, Wt)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quick_gelu)
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(c.text_width ** -0.5 * torch.randn(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.source, self.sha256, self.bpe = None, None, None  # set by clip_files.load_clip
        self._tokenizer = None

    @property
    def embed_dim(self):
        return self.config.embed_dim

    @property
    def resolution(self):
        return self.visual.resolution

    @property
    def tokenizer(self):
        """A Tokenizer for this checkpoint's vocabulary, built on first use from `self.bpe` (set by load_clip).

        A CLIP built in memory with a non-official vocabulary must be given its file (`clip.bpe = path`) or
        a tokenizer (`clip.tokenizer = Tokenizer(path, vocab_size)`); otherwise the official merges are used.
        """
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.bpe, vocab_size=self.config.vocab_size)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer):
        self._tokenizer = tokenizer

    def encode_image(self, images):
        """Images (B, 3, R, R), CLIP-normalised -> (B, D)."""
        return self.visual(images)

    def encode_text(self, tokens):
        """Token ids (Nt, L) -> (Nt, D), pooled at the EOT token (the largest id in each row)."""
        L = self.config.context_length
        assert tokens.dim() == 2 and tokens.shape[1] == L, f"expected token ids (Nt, {L}), got {tuple(tokens.shape)}"
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens.argmax(dim=-1))  # (Nt, L, Wt) -> (Nt, D)

    def encode_text_embeddings(self, x, eot_index):
        """Token embeddings (Nt, L, Wt) WITHOUT positions, EOT positions (Nt,) -> (Nt, D). For prompt learners."""
        Nt, L, Wt = x.shape
        assert (L, Wt) == tuple(self.positional_embedding.shape), f"expected (Nt, {L}, {Wt}), got {tuple(x.shape)}"
        assert eot_index.shape == (Nt,), f"expected eot_index ({Nt},), got {tuple(eot_index.shape)}"
        # Causal mask: token i sees tokens j <= i (additive, -inf above the diagonal). Built per call (77 x 77
        # is nothing) rather than kept as a buffer, so the module holds exactly the checkpoint's tensors.
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # (L, L)
        x = self.transformer(x + self.positional_embedding, mask)  # (Nt, L, Wt)
        x = x[torch.arange(Nt, device=x.device), eot_index]  # (Nt, Wt)
        # LayerNorm acts per token, so normalising only the pooled row equals ln_final over all, then pooling.
        return self.ln_final(x) @ self.text_projection  # (Nt, Wt) @ (Wt, D) -> (Nt, D)

    def forward(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens)


# --------------------------------------------------------------------------------------- label embeddings
@torch.no_grad()
def _encode_texts(clip, texts, chunk=256):
    device = clip.text_projection.device
    rows = [clip.encode_text(clip.tokenizer(texts[i:i + chunk]).to(device)) for i in range(0, len(texts), chunk)]
    return torch.cat(rows).float().cpu()  # (Nt, D)


def _cached(path, key):
    """The label embeddings cached at `path` for `key`, or None (not there; damaged or foreign: one warning)."""
    try:
        hit = torch.load(path, map_location="cpu", weights_only=True)
        emb = hit["embeddings"]
        if not hit.get("sha256") == caches.checksum(key, [emb]):  # also a hash collision's entry
            raise ValueError("its checksum does not match its names, templates, CLIP file and values")
        return emb
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001  torch.load raises many types on a damaged file (BadZipFile, ...)
        caches.distrusted(path, f"damaged or foreign label-embedding cache entry ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:80]})")
        return None


def numerics(module):
    """What decides the last bits of a module's output besides its weights and inputs: the device, and on a CPU
    the kernels' instruction set, MKL's reproducibility mode and the thread count. Part of the label cache's key,
    so that a run whose CPU code paths are pinned (train.py's toy run) never reads embeddings another run rounded
    differently."""
    device = next(module.parameters()).device.type
    if device != "cpu":
        return {"device": device}
    return {"device": device, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def encode_labels(clip, names, template="There is a {} in the scene", templates=None, cache_dir=None):
    """Label embeddings H (C, D), fp32, NOT normalised: encode_text(template.format(name)) per name.

    This is how MKT made the label_emb.pt the SigRL reference code loads (its author, sunanhe/MKT issue #12:
    ViT-B/16, that single template, no ensemble, not normalised).
    templates=[t1, t2, ...]: a prompt ensemble. Each template's rows are L2-normalised and averaged (CLIP's
    zero-shot recipe), then the mean direction is rescaled to the mean norm of the raw rows, so ensembled
    embeddings keep the scale of single-template ones (SigRL uses H unnormalised, so its scale matters).
    Results are cached in <cache_dir or $SIGRL_CACHE or ~/.cache/sigrl> under a hash of the checkpoint's
    sha256, the names, the templates and the numerics that round them (`numerics`), with a checksum of those and of the values (support/caches.py); a CLIP
    not loaded from a file (no sha256) is never cached.
    """
    names, templates = list(names), [template] if templates is None else list(templates)
    cache = None
    if clip.sha256 is not None:
        key = [clip.sha256, names, templates, numerics(clip)]
        cache_dir = cache_dir or caches.cache_dir()
        cache = os.path.join(cache_dir, f"labels-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.pt")
        hit = _cached(cache, key)
        if hit is not None:
            return hit
    with working(f"encoding {len(names)} labels x {len(templates)} prompt template(s)"):  # ViT-B/16 on a CPU: minutes
        per_template = [_encode_texts(clip, [t.format(n) for n in names]) for t in templates]  # one (C, D) per template
    if len(per_template) == 1:
        emb = per_template[0]  # (C, D)
    else:
        stack = torch.stack(per_template)  # (templates, C, D)
        direction = nn.functional.normalize(stack, dim=-1).mean(0)  # (C, D)
        emb = nn.functional.normalize(direction, dim=-1) * stack.norm(dim=-1).mean(0, keepdim=True).T  # (C, D)
    if cache is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            entry = {"names": names, "templates": templates, "embeddings": emb, "sha256": caches.checksum(key, [emb])}
            safe_io.atomic_write(cache, lambda f: torch.save(entry, f))
        except (OSError, safe_io.WriteError) as err:  # a cache that cannot be written only costs time
            print(f"warning: label embeddings not cached ({err})", file=sys.stderr)
    return emb


# ------------------------------------------------------------------------------------------ CoOp prompts
class PromptLearner(nn.Module):
    """CoOp (Zhou et al., IJCV 2022): a learned context shared by all classes, class name at the end.

    prompt_c = [SOT] ctx_1 ... ctx_n [name_c tokens] . [EOT]  -> frozen text tower -> (C, D)
    ctx: random normal (std 0.02) for `init=None`, else the (frozen-CLIP) token embeddings of the init words.
    CoOp counts init *words* for n_ctx; we count init *tokens* (the same for "a photo of a").
    Only `ctx` learns. The CLIP is held by reference, not registered as a submodule: state_dict() then
    holds only the prompt, and the image tower (which SigRL may be training) is left alone. Move the CLIP
    to the device yourself.
    """

    def __init__(self, clip, names, n_ctx=16, init=None):
        super().__init__()
        self.__dict__["clip"] = clip  # bypasses nn.Module registration on purpose (see docstring)
        for p in (clip.token_embedding.weight, clip.positional_embedding, clip.text_projection,
                  *clip.transformer.parameters(), *clip.ln_final.parameters()):
            p.requires_grad_(False)  # the text tower is frozen
        tok, device = clip.tokenizer, clip.positional_embedding.device
        if init is not None:
            n_ctx = len(tok.encode(init))
            with torch.no_grad():
                ctx = clip.token_embedding(tok(init).to(device))[0, 1:1 + n_ctx]  # (n_ctx, Wt)
            words = init
        else:
            ctx = 0.02 * torch.randn(n_ctx, clip.config.text_width, device=device)  # (n_ctx, Wt)
            words = " ".join(["X"] * n_ctx)  # placeholders, overwritten by ctx (CoOp does the same)
        self.ctx = nn.Parameter(ctx.clone())
        tokens = tok([f"{words} {name.replace('_', ' ')}." for name in names]).to(device)  # (C, L)
        with torch.no_grad():
            embedded = clip.token_embedding(tokens)  # (C, L, Wt)
        self.register_buffer("token_prefix", embedded[:, :1].clone())  # (C, 1, Wt)  SOT
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:].clone())  # (C, L-1-n_ctx, Wt) name . EOT pad
        self.register_buffer("eot_index", tokens.argmax(dim=-1))  # (C,)  pooled at the placeholder prompt's EOT
        self.n_ctx = n_ctx

    def forward(self):
        C = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(C, -1, -1)  # (C, n_ctx, Wt)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, L, Wt)
        return self.clip.encode_text_embeddings(prompts, self.eot_index)  # (C, D)


if __name__ == "__main__":
    # A tiny CLIP at random weights with the committed toy vocabulary: the shapes, not the meaning.
    torch.manual_seed(0)
    bpe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "toyclip.bpe.txt.gz")
    vocab = N_RESERVED + 100  # the byte symbols, the first 100 merges of that file, SOT and EOT
    clip = CLIP(CLIPConfig(vision=VisionConfig(width=128, layers=2, patch=8, resolution=32, embed_dim=64),
                           embed_dim=64, vocab_size=vocab, text_width=128, text_layers=2)).eval()
    clip.bpe = bpe
    tokens = clip.tokenizer(["There is a dog in the scene"])  # (Nt, L)
    print("tokens", tokens[0, :12].tolist(), "...", tuple(tokens.shape))
    with torch.no_grad():
        print("encode_text", tuple(clip.encode_text(tokens).shape), "| encode_image",
              tuple(clip.encode_image(torch.randn(2, 3, 32, 32)).shape))
        print("label embeddings H", tuple(encode_labels(clip, ["dog", "red car", "sky"]).shape),
              "| CoOp prompts", tuple(PromptLearner(clip, ["dog", "sky"], n_ctx=4)().shape))
