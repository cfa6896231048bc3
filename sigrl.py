"""SigRL: semantic-guided representation learning for multi-label recognition (ICME 2025).

Shape legend: the book's one legend (in full in vit.py and README.md). Here:
    B images, P patch tokens, C labels in the scored set (c in one chunk; S seen, U unseen), D joint width,
    K patches in the top-K; H (C, D) the label embeddings, G GMC's H-hat, F the patch features (B, P, D), and
    SDA's / VFR's attentions the paper's a and a-hat. No letter has a second meaning anywhere in the book.

Symbols (paper -> code): F_patch -> patch, F_class -> g, h^i / H -> H (label_emb), H-hat (Eq. 4) -> G, f (Eq. 5)
-> f, a (Eq. 7) -> a, M -> M, Q -> Q, T -> T, O -> O, f-hat / a-hat (Eq. 10-11) -> f_hat / a_hat, M-hat -> M_hat.
Pipeline, following the reference code wherever it differs from the paper:
    tokens = student.forward_tokens(images)            (B, 1+P, W), ln_post on every token
    g = tokens[:, 0] @ proj,  patch = tokens[:, 1:] @ proj        (B, D), (B, P, D), one projection
    G = GMC(H)                    graph over labels, Eq. 2-4 (see gat.py)     (C, D)
    T = SDA(patch, H)             semantic decoupling, Eq. 5-9                (B, C, D)
    M_hat = VFR(patch, T, G)      reconstruction, unnumbered step + Eq. 10-12 (B, P, D)
    scores                        Eq. 13 sums the two branches' raw scores;  (B, C)
                                  the reference code normalises each over the classes, then averages
A frozen teacher (a copy of the initial student) gives the target of the distillation loss on g.

Two paths, one switch (SigRLConfig.fast; default True). The plain path computes SDA and VFR as written, on
(B, P, C, D) tensors: several alive at once, 12 GB each in fp32 at B = 32, C = 925, as in the reference code.
The fast path exists because that does not fit a GPU, and it is exact because, for one class c, every step
before the pooling touches only that class (the product patch * H[c], the tanh, the D -> D linear, the softmax
over the patches p); the pooling then sums over p (SDA) or over c (VFR: a running sum over the chunks). So it
runs the plain path's own functions (`decouple`, `reconstruction_weight`) on at most `class_chunk` classes at a
time, each chunk under torch.utils.checkpoint, so neither forward nor backward memory grows with B x P x C x D.
Both give the same numbers up to float rounding (tests/test_sigrl.py compares values and gradients).

Precision. The commands run this file under the precision policy opened where the forward is called
(support/precision.py: bf16 autocast on CUDA, plain fp32 on the CPU). Three lines here fix a dtype themselves,
each saying why: the softmax over the patches keeps its input's dtype, VFR's sum over the classes accumulates
in fp32, and the score matmuls run in fp32 with autocast off (`score_matmul`). On the CPU all three are no-ops.
"""
import copy
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gat import GMC
from support.compiling import compiled  # --compile only (SigRL.compile_heads); the default path never calls it


@dataclass
class SigRLConfig:
    embed_dim: int = 512  # D, the columns of the visual tower's proj
    gmc: bool = True  # False: G := H
    sda: bool = True  # False: T := H for every image
    vfr: bool = True  # False: M_hat := patch (MKT's top-k on raw patch tokens); needs gmc = sda = False
    global_only: bool = False  # scores = normalised global score; the heads are not built
    topk: int = 16  # local score = mean of the top-K patch similarities (K = min(topk, P))
    fast: bool = True  # False: the plain path on full (B, P, C, D) and (C, C, hidden) tensors; same numbers
    class_chunk: int = 64  # fast path: classes per SDA/VFR step (near-equal chunks); memory only
    gat_chunk: int = 16  # fast path: query labels per GATv2 step (gat.py); memory only
    gat_heads: int = 4
    gat_hidden: int = 32
    dropout: float = 0.3  # GMC dropout (input, attention coefficients, between the layers)


class SigRLOutput(NamedTuple):
    scores: torch.Tensor  # (B, C) fused score, what metrics and losses use
    local: Optional[torch.Tensor]  # (B, C) local score, normalised over C (reference code); None when global_only
    glob: torch.Tensor  # (B, C) global score, normalised over C (reference code)
    feat: torch.Tensor  # (B, D) student class-token embedding g (for L_global)


# ---- SDA and VFR: the paper's computation, on any number of classes ------------------------------------------
def sda_attention(fc_sda: nn.Linear, patch: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """SDA's attention a (B, P, C, D) of patch (B, P, D) for the classes H (C, D) (Eq. 5 and 7)."""
    # Eq. 5: f[b,p,c,:] = fc_sda(tanh(F[b,p,:] * H[c,:])); H is cast to patch's dtype so that under bf16 autocast
    # the product, the step's largest tensor, is not promoted to fp32
    x = patch[:, :, None, :] * H.to(patch.dtype)  # (B, P, 1, D) * (C, D) -> (B, P, C, D)
    f = fc_sda(x.tanh_())  # (B, P, C, D); tanh in place saves one such tensor (the product's backward needs no x)
    # Eq. 7 without its FC and tanh (the reference code has Eq. 5's FC only): a[b,:,c,d] = softmax over p of
    # f[b,:,c,d]. dtype=f.dtype: CUDA's autocast would store it in fp32, twice the bytes, for no measured gain
    return f.softmax(dim=1, dtype=f.dtype)  # (B, P, C, D)


def decouple(fc_sda: nn.Linear, patch: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """SDA's category-specific features M (B, C, D) of patch (B, P, D) for the classes H (C, D) (Eq. 5-7)."""
    a = sda_attention(fc_sda, patch, H)  # (B, P, C, D)
    # Eq. 6 sums over the classes; the reference code pools over the patches, per class: M[b,c,:] = sum_p a * F
    return torch.einsum("bpcd,bpd->bcd", a, patch)  # (B, P, C, D) x (B, P, D) -> (B, C, D)


def reconstruction_weight(fc_vfr: nn.Linear, patch: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """VFR's sum_c a_hat[b,p,c,:] (B, P, D) of patch (B, P, D) for the fused class features O (B, C, D): Eq. 10-11,
    and the sum over the classes that the reference code does in Eq. 12's place."""
    # Eq. 10: f_hat[b,p,c,:] = fc_vfr(tanh(F[b,p,:] * O[b,c,:])); O in patch's dtype, as H in sda_attention
    x = patch[:, :, None, :] * O[:, None].to(patch.dtype)  # (B, P, 1, D) * (B, 1, C, D) -> (B, P, C, D)
    f_hat = fc_vfr(x.tanh_())  # (B, P, C, D); tanh in place, as in sda_attention
    # Eq. 11: a_hat[b,:,c,d] = softmax over p of f_hat[b,:,c,d] (kept in its input's dtype, as in sda_attention)
    a_hat = f_hat.softmax(dim=1, dtype=f_hat.dtype)  # (B, P, C, D)
    # then summed over the classes (the reference code's Eq. 12), accumulated in fp32, or fp64 for an fp64
    # model: a sum over up to 1006 classes, where autocast's choice differs between devices
    return a_hat.sum(dim=2, dtype=torch.promote_types(a_hat.dtype, torch.float32))  # (B, P, D)


def class_chunks(x: torch.Tensor, chunk: int, dim: int = 0) -> tuple:
    """x split along `dim` (the classes) into ceil(C / chunk) near-equal chunks of at most `chunk` (925 at 64:
    15 chunks of 61-62). Near-equal, not `chunk` then a remainder: a last chunk of one class would cost
    torch.compile (--compile) a graph of its own. Each class is computed alone, so the split changes no result."""
    return x.tensor_split(max(1, math.ceil(x.shape[dim] / chunk)), dim=dim)


def score_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (fp64 for an fp64 model) with autocast off: mAP ranks up to 107,859 images per class, and
    bf16's 8 bits of mantissa would make ties that the stable sort breaks by row index."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


class SDA(nn.Module):
    """Semantic decoupling attention (paper Eq. 5-9): patch F (B, P, D), H (C, D) -> T (B, C, D).

        f[b,p,c,:]     = fc_sda(tanh(F[b,p,:] * H[c,:]))       Eq. 5; fc_sda: D -> D with bias
        a[b,:,c,d]     = softmax over p of f[b,:,c,d]           Eq. 7, without its FC and tanh (reference code)
        M[b,c,:]       = sum_p a[b,p,c,:] * F[b,p,:]            Eq. 6 as the reference code computes it (B, C, D)
        Q[b]           = ReLU(M[b]^T H)                         Eq. 8 as the reference code computes it (D, D)
        T[b]           = M[b] Norm(Q[b])                        Eq. 9; Norm: each row to unit L2 norm (B, C, D)
    That is the reference code's form; the paper's differs: Eq. 5 and 7 show two FC layers (the code: one);
    Eq. 6 sums over the classes (the code pools over the patches, one feature per class); Eq. 8-9 re-weight
    with a C x C cosine matrix (the code: the D x D matrix Q). This file follows the code.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fc_sda = nn.Linear(dim, dim)
        self.fused = False  # fast path only: the chunks run through torch.compile (SigRL.compile_heads)

    def forward(self, patch: torch.Tensor, H: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """chunk None: the plain path; an int: the fast path, `chunk` classes at a time (module docstring)."""
        (B, P, D), C = patch.shape, H.shape[0]
        assert H.shape == (C, D), f"expected H (C, {D}), got {tuple(H.shape)}"
        if chunk is None:
            M = decouple(self.fc_sda, patch, H)  # (B, C, D), through (B, P, C, D) tensors
        else:
            step = compiled(decouple) if self.fused else decouple
            M = torch.cat([checkpoint(step, self.fc_sda, patch, H_c, use_reentrant=False)  # (B, c, D) each
                           for H_c in class_chunks(H, chunk)], dim=1)  # (B, C, D)
        # The reference divides M^T H by ||M||_F * ||H||_F before the ReLU: a positive scalar, which Norm removes
        # (rows of norm < 1e-12 stay ~0 either way), so it is left out.
        # Eq. 8 as the reference code computes it: Q[b] = ReLU(M[b]^T H), a D x D matrix where the paper has C x C
        Q = torch.relu(M.transpose(1, 2) @ H)  # (B, D, C) @ (C, D) -> (B, D, D)
        # Eq. 9: T[b] = M[b] Norm(Q[b]), Norm taking each row of Q to unit L2 norm
        T = M @ F.normalize(Q, dim=-1, eps=1e-12)  # (B, C, D) @ (B, D, D) -> (B, C, D)
        return T


class VFR(nn.Module):
    """Visual feature reconstruction (paper Eq. 10-12): patch F (B, P, D), T (B, C, D), G (C, D) -> M_hat (B, P, D).

        O[b,c,:]        = fc_o([T[b,c,:] ; G[c,:]])             unnumbered: the paper writes FC([H-hat ; T]);
                                                                the code concatenates T first; fc_o: 2D -> D
        f_hat[b,p,c,:]  = fc_vfr(tanh(F[b,p,:] * O[b,c,:]))     Eq. 10; fc_vfr: D -> D with bias
        a_hat[b,:,c,d]  = softmax over p of f_hat[b,:,c,d]      Eq. 11
        M_hat[b,p,:]    = F[b,p,:] * sum_c a_hat[b,p,c,:]       Eq. 12 as the reference code computes it
    The paper's Eq. 12 sums the attention over the patches; the code sums it over the classes, keeping one
    reconstructed feature per patch, and this file follows the code.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fc_o = nn.Linear(2 * dim, dim, bias=False)
        self.fc_vfr = nn.Linear(dim, dim)
        self.fused = False  # as in SDA

    def forward(self, patch: torch.Tensor, T: torch.Tensor, G: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """chunk None: the plain path; an int: the fast path, `chunk` classes at a time (module docstring)."""
        (B, P, D), C = patch.shape, G.shape[0]
        assert T.shape == (B, C, D) and G.shape == (C, D), f"expected T (B, C, D), G (C, D); got {T.shape}, {G.shape}"
        # unnumbered in the paper, O = FC([H-hat ; T]); the reference code concatenates [T ; G], so the first
        # D columns of fc_o.weight multiply T and the last D multiply G
        TG = torch.cat([T, G.expand(B, C, D)], dim=-1)  # (B, C, D) ; (B, C, D) -> (B, C, 2D)
        O = self.fc_o(TG)  # (B, C, 2D) -> (B, C, D)
        if chunk is None:
            weight = reconstruction_weight(self.fc_vfr, patch, O)  # (B, P, D), through (B, P, C, D) tensors
        else:
            step = compiled(reconstruction_weight) if self.fused else reconstruction_weight
            weight = 0  # a running sum over the chunks: one chunk's (B, P, D) term alive at a time
            for O_c in class_chunks(O, chunk, dim=1):  # (B, c, D)
                weight = weight + checkpoint(step, self.fc_vfr, patch, O_c, use_reentrant=False)  # (B, P, D)
        M_hat = patch * weight  # Eq. 12, summed over the classes as the reference code does: (B, P, D)
        return M_hat


class SigRL(nn.Module):
    """Student visual tower + GMC + SDA + VFR, scored against label embeddings; a frozen teacher for L_global.

    `visual` is any tower with forward_tokens(x) -> (B, 1+P, W), a proj (W, D) parameter and
    forward(x) -> (B, D) (vit.VisionTransformer). It becomes the student; the teacher is a frozen deep copy.
    """

    def __init__(self, visual: nn.Module, config: Optional[SigRLConfig] = None):
        super().__init__()
        cfg = self.config = config or SigRLConfig()
        if not cfg.vfr and (cfg.gmc or cfg.sda):
            raise ValueError("vfr=False scores the raw patch tokens, so GMC and SDA would be unused: "
                             "set gmc=False and sda=False too")
        proj = visual.proj  # None for a timm ViT: SigRL needs CLIP's projection into the label space
        assert proj is not None and proj.shape[1] == cfg.embed_dim, \
            f"SigRL needs visual.proj (W, {cfg.embed_dim}), got {None if proj is None else tuple(proj.shape)}"
        self.student = visual
        self.teacher = copy.deepcopy(visual).requires_grad_(False).eval()
        heads = not cfg.global_only
        D = cfg.embed_dim
        self.gmc = GMC(D, cfg.gat_heads, cfg.gat_hidden, cfg.dropout) if heads and cfg.gmc else None
        self.sda = SDA(D) if heads and cfg.sda else None
        self.vfr = VFR(D) if heads and cfg.vfr else None

    @classmethod
    def from_clip(cls, clip: nn.Module, **config_overrides) -> "SigRL":
        """SigRL on a copy of clip.visual (the CLIP model itself is left untouched), e.g. from_clip(clip, sda=False)."""
        config = SigRLConfig(**{"embed_dim": clip.visual.proj.shape[1], **config_overrides})
        return cls(copy.deepcopy(clip.visual), config)

    def compile_heads(self) -> "SigRL":
        """Run the fast path's SDA and VFR chunks through torch.compile (--compile; support/compiling.py). Not
        saved with the weights; the first calls at each new shape are slow while it compiles."""
        for module in (self.sda, self.vfr):
            if module is not None:
                module.fused = True
        return self

    def train(self, mode: bool = True) -> "SigRL":
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target: always eval mode
        return self

    def forward(self, images: torch.Tensor, label_emb: torch.Tensor) -> SigRLOutput:
        assert images.dim() == 4 and images.shape[1] == 3, f"expected images (B, 3, R, R), got {tuple(images.shape)}"
        g, patch = self.encode(images)
        return self.score(g, patch, label_emb)

    def encode(self, images: torch.Tensor) -> tuple:
        """The student's global and patch features, both through CLIP's projection: g (B, D), patch (B, P, D)."""
        tokens = self.student.forward_tokens(images) @ self.student.proj  # (B, 1+P, W) @ (W, D) -> (B, 1+P, D)
        return tokens[:, 0], tokens[:, 1:]  # (B, D), (B, P, D)

    def label_graph(self, H: torch.Tensor) -> torch.Tensor:
        """G (C, D): GMC's graph-refined label embeddings, or H itself when GMC is off. It depends only on the
        label set, so evaluation computes it once per label set instead of once per batch."""
        if self.gmc is None:
            return H  # (C, D)
        return self.gmc(H, self.config.gat_chunk if self.config.fast else None)  # (C, D)

    def score(self, g: torch.Tensor, patch: torch.Tensor, label_emb: torch.Tensor, G=None) -> SigRLOutput:
        """Scores of encoded images against one label set (Eq. 13). Evaluation encodes a batch once and
        scores it against several label sets (ZSL and GZSL), passing a precomputed G (eval mode only)."""
        cfg, H = self.config, label_emb
        assert H.dim() == 2 and H.shape[1] == cfg.embed_dim, \
            f"expected label_emb (C, {cfg.embed_dim}), got {tuple(H.shape)}"
        assert G is None or not self.training, "a precomputed G would skip GMC's dropout and gradients"
        B, P, D = patch.shape

        # Eq. 13 adds the raw scores: s = <h, F_class> + Top-K(<h, M_hat_p>). The reference code instead divides
        # each branch by its L2 norm over the classes of each image, then averages the two; this follows the code.
        # Global branch: s_global[b,c] = <g[b], H[c]>, then the reference code's normalisation over c
        s_global = score_matmul(g, H.T)  # (B, D) @ (D, C) -> (B, C), fp32
        glob = F.normalize(s_global, dim=-1)  # (B, C), each image's row to unit L2 norm (reference code)
        if cfg.global_only:
            return SigRLOutput(glob, None, glob, g)

        # Local branch: s_local[b,c] = mean of the top-k over p of <M_hat[b,p,:], H[c,:]> (the paper's Top-K; the
        # reference code takes the mean of the K largest), then normalised over c as the global branch
        sim = self.local_similarity(patch, H, G)  # (B, P, C)
        top = sim.topk(min(cfg.topk, P), dim=1).values  # (B, P, C) -> (B, K, C)
        local = F.normalize(top.mean(dim=1), dim=-1)  # (B, K, C) -> (B, C), each row to unit L2 norm (reference code)
        scores = (local + glob) / 2  # (B, C): the reference code's average where Eq. 13 has a sum
        assert scores.shape == (B, H.shape[0]), f"expected scores (B, C) = {(B, H.shape[0])}, got {tuple(scores.shape)}"
        return SigRLOutput(scores, local, glob, g)

    def local_similarity(self, patch: torch.Tensor, H: torch.Tensor, G=None) -> torch.Tensor:
        """<M_hat[b,p,:], H[c,:]> (B, P, C): every reconstructed patch feature against every label (SDA, GMC, VFR
        as configured). Its top-k mean over the patches is the local score before the reference code's
        normalisation over the classes."""
        B, chunk = patch.shape[0], self.config.class_chunk if self.config.fast else None  # fast or plain path
        if self.vfr is None:
            M_hat = patch  # (B, P, D)
        else:
            G = self.label_graph(H) if G is None else G  # (C, D)
            T = self.sda(patch, H, chunk) if self.sda is not None else H.expand(B, -1, -1)  # (B, C, D)
            M_hat = self.vfr(patch, T, G, chunk)  # (B, P, D)
        return score_matmul(M_hat, H.T)  # (B, P, D) @ (D, C) -> (B, P, C), fp32

    @torch.no_grad()
    def teacher_feat(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's class-token embedding (B, D), target of L_global, computed along the student's path
        (`encode`: every token through proj), not the tower's forward: while the student equals its teacher the L1
        is exactly 0 with no gradient, not rounding noise. It opens no autocast: inside the student's (train.py)
        it runs at the student's precision (the reference runs an fp16 teacher beside an fp32 student)."""
        tokens = self.teacher.forward_tokens(images) @ self.teacher.proj  # (B, 1+P, W) @ (W, D) -> (B, 1+P, D)
        return tokens[:, 0]  # (B, D)

    def state_dict_trainable(self) -> dict:
        """state_dict without the teacher (it equals the CLIP file's visual tower, so run checkpoints skip it)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_state_dict_trainable(self, state_dict: dict) -> None:
        """Inverse of state_dict_trainable: every non-teacher key must be present, and nothing else."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise KeyError(f"SigRL checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---- The zero-shot losses (paper Eq. 15-16; train.py adds them); SPML's are in protocol/spml_losses.py ----
# Each loss twice, as SDA and VFR are: written out as a loop (to read), then vectorised (what training calls).
# tests/test_losses.py checks the two equal, values and gradients, on random inputs and on the golden vectors.
def ranking_loss_plain(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_local (Eq. 15) of scores (B, C) against labels (B, C) in {+1, -1, 0}, one image and one pair at a time."""
    per_image = []
    for s, y in zip(scores, labels):  # one image k: s (C,), y (C,)
        total, violating = s.new_zeros(()), 0
        for p in (y == 1).nonzero()[:, 0].tolist():  # each positive label p (y = 0 takes no part)
            for n in (y == -1).nonzero()[:, 0].tolist():  # each negative label n
                hinge = torch.relu(1 + s[n] - s[p])  # Eq. 15: max(1 + s_n - s_p, 0)
                total = total + hinge
                violating += int(hinge > 0)  # a count: a constant for autograd
        # Eq. 15 sums; the reference code divides each image by its count of strictly violating pairs (+ 1e-8)
        per_image.append(total / (violating + 1e-8))
    return torch.stack(per_image).mean()  # the reference code: the mean over all B images, where Eq. 15 sums over k


def ranking_loss_per_image(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ranking_loss_plain's per-image terms l (B,), all pairs at once in a (B, C, C) tensor, as the reference code
    (MKT's models/rank_loss.py) computes them: h[b, p, n] = max(1 + s[b, n] - s[b, p], 0) for y_p = +1, y_n = -1;
    l[b] = sum_{p, n} h / (V[b] + 1e-8), V[b] = #{(p, n): h > 0}. So an exact-margin pair counts nowhere and an
    image with no violating pair gives 0. The pair tensor has 27M entries at B = 32, C = 925: small beside the ViT.
    """
    if scores.dim() != 2 or scores.shape != labels.shape:
        raise ValueError(f"ranking_loss: expected two (B, C) tensors of equal shape, got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if not bool(((labels == 1) | (labels == 0) | (labels == -1)).all()):
        raise ValueError(f"ranking_loss labels must take values in (-1, 0, 1), got {torch.unique(labels)[:10].tolist()}")
    pair = (labels == 1)[:, :, None] & (labels == -1)[:, None, :]  # (B, C, 1) & (B, 1, C) -> (B, C, C): [b, p, n]
    hinge = torch.relu(1 + scores[:, None, :] - scores[:, :, None]) * pair  # (B, C, C): 1 + s_n - s_p, pairs only
    violations = (hinge > 0).sum(dim=(1, 2)).to(hinge.dtype)  # (B,)
    return hinge.sum(dim=(1, 2)) / (violations + 1e-8)  # (B, C, C) -> (B,)


def ranking_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_local (Eq. 15) as training computes it, on the fused score as the reference trains it: the mean of
    ranking_loss_per_image over all B images (scalar)."""
    return ranking_loss_per_image(scores, labels).mean()


def l1_distill_plain(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 16, L_global, of the student's class-token features g (B, D) and the frozen teacher's (B, D), one image
    at a time."""
    total = student.new_zeros(())
    for g, target in zip(student, teacher.detach()):  # one image k: (D,) each; the teacher is a fixed target
        total = total + (target - g).abs().sum()  # Eq. 16: ||CLIP(X_k) - F_class||_1, neither normalised
    return total / student.numel()  # the reference code: the mean over all B x D entries, not the sum


def l1_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_global (Eq. 16) as training computes it: the mean of |g - CLIP(X)| over all B x D entries (scalar)."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"l1_distill: expected two (B, D) tensors of equal shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    return (student - teacher.detach()).abs().mean()  # (B, D) -> ()


if __name__ == "__main__":
    from vit import VisionConfig, VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(VisionConfig(width=128, layers=2, patch=16, resolution=64, embed_dim=32))
    model = SigRL(visual, SigRLConfig(embed_dim=32, class_chunk=4)).eval()
    images, H = torch.randn(2, 3, 64, 64), torch.randn(10, 32)  # (B, 3, R, R), (C, D)
    with torch.no_grad():
        out = model(images, H)  # the fast path: 4 classes at a time
        model.config.fast = False
        plain = model(images, H)
    print({k: tuple(v.shape) for k, v in out._asdict().items()}, "| teacher_feat", tuple(model.teacher_feat(images).shape))
    print(f"scores[0] {out.scores[0]}\nfast vs plain path: largest difference {(out.scores - plain.scores).abs().max():.1e}")
