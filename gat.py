"""GMC, the graph over labels: two GATv2 layers on a fully connected label graph (paper Eq. 2-4).

Shape legend: the book's one legend (in full in vit.py and README.md). Here: C labels in the scored set (the
graph's nodes), c query labels in one chunk of the fast path, D joint width, nh heads and hd the width of one;
H (C, D) the label embeddings h^i, G GMC's H-hat. alpha is GAT's attention vector and beta its attention
coefficients (the paper's names); W in GAT's formulas is the paper's weight matrix (code: lin), not a width.
Here nh is 4 with hd = 32 in layer 1, and 1 with hd = D in layer 2.

The paper and GATv2
    The paper's Eq. 2-4 print the static GAT formula: Eq. 2, the edge score
    e_ij = LeakyReLU(alpha^T [W h_i || W h_j]); Eq. 3, beta_ij = softmax over the neighbours j of e_ij; Eq. 4,
    h-hat_i = sigma(sum_j beta_ij W h_j). But the paper's citation for them, its reference [9], is Brody et al.,
    "How attentive are graph attention networks?", i.e. GATv2, and GATv2 is what the reference code runs; this
    file follows it. GATv2 moves the LeakyReLU inside, before alpha, so that a node's ranking of its neighbours
    can depend on the node (in the printed form, LeakyReLU is monotone and alpha^T splits into a part for i and
    a part for j, so every node ranks its neighbours in the same order):
        e_ij    = alpha^T LeakyReLU(W h_i + W h_j)       Eq. 2 as GATv2; slope 0.2, one W for both ends
        beta_ij = softmax_j(e_ij)                         Eq. 3; over all j, self-loops included
        h_i'    = sum_j beta_ij W h_j                     Eq. 4; heads concatenated, sigma = ELU after layer 1
    Names are the paper's: alpha the attention vector (self.att), beta the attention coefficients.
    Further details of the reference code: ONE attention vector alpha per layer, shared by all of that layer's
    heads (length hd), no bias terms, dropout 0.3 on the GMC input, on beta and between the two layers.
    Layer 1: D -> 4 heads x 32 (concatenated, 128), then ELU; layer 2: 128 -> D with one head.
    The reference's layer is labml's GraphAttentionV2Layer (vendored as models/graphs/gatv2): W and alpha are
    nn.Linear(D_in, nh * hd) and nn.Linear(hd, 1) weights without bias, with nn.Linear's default
    initialisation. So alpha is a (1, hd) matrix here too, and the weights start from the same distribution
    (the same numbers under the same seed); being 2-D, alpha also gets weight decay under the reference's
    optimiser rule, which exempts only 1-D parameters.

Plain path and fast path (forward's `chunk`: None or a number of query rows). The plain path computes e_ij
for every pair at once, through the (C, C, nh, hd) tensor LeakyReLU(W h_i + W h_j) (layer 2 at C = 1006,
D = 512: 2 GB in fp32, and autograd keeps it). The fast path exists to avoid that, and it is exact because a
query row i needs only its own scores e_i:, softmaxed over j: it runs the same `attend` on `chunk` rows at a
time, each under torch.utils.checkpoint, so autograd keeps only the chunk's inputs and its (c, nh, hd) output
and rebuilds the (c, C, nh, hd) intermediates one chunk at a time in backward. Checkpoint replays the random
state, so the recomputed dropout mask on beta is the one used in forward. (In training mode the two paths
draw their dropout masks differently, one (C, C, nh) draw against one per chunk; each is exact dropout.)
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GATv2Layer(nn.Module):
    """One GATv2 layer on the complete graph with self-loops; heads are concatenated (nh * hd outputs)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int = 1, dropout: float = 0.0, negative_slope: float = 0.2):
        super().__init__()
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.dropout, self.negative_slope = dropout, negative_slope
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)  # W (= W_l = W_r), all heads stacked
        # alpha, shared by all heads of this layer: (1, hd), initialised as nn.Linear(hd, 1) initialises its weight,
        # uniform in +-1/sqrt(hd) (kaiming_uniform_ with a = sqrt(5)), drawn after W as in the reference
        self.att = nn.Parameter(torch.empty(1, out_dim))
        nn.init.kaiming_uniform_(self.att, a=math.sqrt(5))

    def forward(self, h: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """chunk None: the plain path; a number: the fast path, `chunk` query rows at a time (module docstring)."""
        assert h.dim() == 2 and h.shape[1] == self.in_dim, f"expected h (C, {self.in_dim}), got {tuple(h.shape)}"
        C = h.shape[0]
        x = self.lin(h).view(C, self.heads, self.out_dim)  # (C, D_in) -> (C, nh, hd): W h_j for every node
        if chunk is None:
            out = self.attend(x, x)  # (C, nh, hd), through (C, C, nh, hd) tensors
        else:
            out = torch.cat([checkpoint(self.attend, x_query, x, use_reentrant=False)  # (c, nh, hd) each
                             for x_query in x.split(chunk)])  # (C, nh, hd)
        return out.reshape(C, self.heads * self.out_dim)  # (C, nh * hd), heads concatenated

    def attend(self, x_query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """New features of the query nodes x_query (c, nh, hd), attending to all C nodes x (C, nh, hd)."""
        # Eq. 2, as GATv2 (the paper's reference [9]): e_ij = alpha^T LeakyReLU(W h_i + W h_j)
        pair = x_query[:, None] + x[None]  # (c, 1, nh, hd) + (1, C, nh, hd) -> (c, C, nh, hd)
        pair = F.leaky_relu(pair, self.negative_slope, inplace=True)  # in place: the largest tensor here, once
        e = (pair @ self.att.T).squeeze(-1)  # (c, C, nh, hd) @ (hd, 1) -> (c, C, nh)
        # Eq. 3: beta_ij = softmax_j(e_ij), then dropout on the coefficients
        beta = F.dropout(e.softmax(dim=1), self.dropout, self.training)  # (c, C, nh)
        # Eq. 4: h_i' = sum_j beta_ij W h_j, per head
        return torch.einsum("ijk,jko->iko", beta, x)  # (c, C, nh) x (C, nh, hd) -> (c, nh, hd)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.heads} x {self.out_dim}, dropout={self.dropout}"


class GMC(nn.Module):
    """Graph-based multi-label correlation: label embeddings H (C, D) -> graph-refined G (C, D).

    G depends only on the label set, not on the image. `chunk` (forward): None for the plain path, else the
    query rows per attention step of the fast path.
    """

    def __init__(self, dim: int = 512, heads: int = 4, hidden: int = 32, dropout: float = 0.3):
        super().__init__()
        self.dim, self.dropout = dim, dropout
        self.layer1 = GATv2Layer(dim, hidden, heads, dropout)  # D -> nh x hd, concatenated
        self.layer2 = GATv2Layer(heads * hidden, dim, 1, dropout)  # nh * hd -> D, one head

    def forward(self, H: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        assert H.dim() == 2 and H.shape[1] == self.dim, f"expected H (C, {self.dim}), got {tuple(H.shape)}"
        x = F.dropout(H, self.dropout, self.training)  # (C, D)
        x = F.dropout(F.elu(self.layer1(x, chunk)), self.dropout, self.training)  # (C, nh * hd)
        G = self.layer2(x, chunk)  # (C, D)
        assert G.shape == H.shape, f"expected G {tuple(H.shape)}, got {tuple(G.shape)}"
        return G


if __name__ == "__main__":
    torch.manual_seed(0)
    H = torch.randn(10, 64)  # (C, D): 10 labels
    gmc = GMC(dim=64, heads=4, hidden=8).eval()
    with torch.no_grad():
        x = gmc.layer1.lin(H).view(10, 4, 8)  # (C, nh, hd)
        beta = (F.leaky_relu(x[:, None] + x[None], 0.2) @ gmc.layer1.att[0]).softmax(dim=1)  # (C, C, nh)
        plain, fast = gmc(H), gmc(H, chunk=3)  # (C, D) each: every pair at once, or 3 query rows at a time
    torch.set_printoptions(precision=2, linewidth=120)
    print("layer-1 attention coefficients beta_ij of head 0 (row i sums to 1 over j):")
    print(beta[..., 0])
    print("H", tuple(H.shape), "-> layer1", tuple(gmc.layer1(H).shape), "-> G", tuple(plain.shape),
          f"| fast vs plain path: largest difference {(fast - plain).abs().max():.1e}")
