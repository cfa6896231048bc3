"""GMC, the graph over labels: two GATv2 layers on a fully connected label graph (paper Eq. 2-4).

Shape legend
    C  labels in the scored label set (the graph's nodes)
    c  query nodes in one chunk of the fast path (<= chunk)
    D  joint embedding width (GMC's input and output, 512 for CLIP ViT-B/16)
    K  attention heads of a layer
    O  width of one head

Paper vs. reference code
    The paper writes the original GAT (Velickovic et al.): Eq. 2, the edge score
    e_ij = LeakyReLU(alpha^T [W h_i || W h_j]); Eq. 3, beta_ij = softmax over the neighbours j of e_ij; Eq. 4,
    h-hat_i = sigma(sum_j beta_ij W h_j). Names: the paper calls the attention VECTOR alpha and the attention
    COEFFICIENTS beta; this file calls the vector a (self.att) and the coefficients alpha, as GATv2's paper does.
    Because LeakyReLU is monotone and a^T splits into a part for i and a part for j, every node i ranks its
    neighbours j in the same order ("static" attention). The reference code uses GATv2 (Brody et al.)
    instead, which this file follows:
        e_ij     = a^T LeakyReLU(W h_i + W h_j)          Eq. 2 as GATv2; slope 0.2, one W for both ends
        alpha_ij = softmax_j(e_ij)                        Eq. 3 (the paper's beta); over all j, self-loops included
        h_i'     = sum_j alpha_ij W h_j                   Eq. 4; heads concatenated, sigma = ELU after layer 1
    Further details of the code: ONE attention vector a per layer, shared by all of that layer's heads
    (length O), no bias terms, dropout 0.3 on the GMC input, on alpha and between the two layers.
    Layer 1: D -> 4 heads x 32 (concatenated, 128), then ELU; layer 2: 128 -> D with one head.
    The reference's layer is labml's GraphAttentionV2Layer (vendored as models/graphs/gatv2): W and a are
    nn.Linear(D_in, K * O) and nn.Linear(O, 1) weights without bias, with nn.Linear's default initialisation.
    So a is a (1, O) matrix here too, and the weights start from the same distribution (the same numbers
    under the same seed); being 2-D, a also gets weight decay under the reference's optimiser rule, which
    exempts only 1-D parameters.

Plain path and fast path (forward's `chunk`: None or a number of query rows). The plain path computes e_ij
for every pair at once, through the (C, C, K, O) tensor LeakyReLU(W h_i + W h_j) (layer 2 at C = 1006,
D = 512: 2 GB in fp32, and autograd keeps it). The fast path exists to avoid that, and it is exact because a
query row i needs only its own scores e_i:, softmaxed over j: it runs the same `attend` on `chunk` rows at a
time, each under torch.utils.checkpoint, so autograd keeps only the chunk's inputs and its (c, K, O) output
and rebuilds the (c, C, K, O) intermediates one chunk at a time in backward. Checkpoint replays the random
state, so the recomputed dropout mask on alpha is the one used in forward. (In training mode the two paths
draw their dropout masks differently, one (C, C, K) draw against one per chunk; each is exact dropout.)
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GATv2Layer(nn.Module):
    """One GATv2 layer on the complete graph with self-loops; heads are concatenated (K * O outputs)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int = 1, dropout: float = 0.0, negative_slope: float = 0.2):
        super().__init__()
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.dropout, self.negative_slope = dropout, negative_slope
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)  # W (= W_l = W_r), all heads stacked
        # a, shared by all heads of this layer: (1, O), initialised as nn.Linear(O, 1) initialises its weight,
        # uniform in +-1/sqrt(O) (kaiming_uniform_ with a = sqrt(5)), drawn after W as in the reference
        self.att = nn.Parameter(torch.empty(1, out_dim))
        nn.init.kaiming_uniform_(self.att, a=math.sqrt(5))

    def forward(self, h: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """chunk None: the plain path; a number: the fast path, `chunk` query rows at a time (module docstring)."""
        assert h.dim() == 2 and h.shape[1] == self.in_dim, f"expected h (C, {self.in_dim}), got {tuple(h.shape)}"
        C = h.shape[0]
        x = self.lin(h).view(C, self.heads, self.out_dim)  # (C, D_in) -> (C, K, O): W h_j for every node
        if chunk is None:
            out = self.attend(x, x)  # (C, K, O), through (C, C, K, O) tensors
        else:
            out = torch.cat([checkpoint(self.attend, x_query, x, use_reentrant=False)  # (c, K, O) each
                             for x_query in x.split(chunk)])  # (C, K, O)
        return out.reshape(C, self.heads * self.out_dim)  # (C, K * O), heads concatenated

    def attend(self, x_query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """New features of the query nodes x_query (c, K, O), attending to all C nodes x (C, K, O)."""
        # Eq. 2, as GATv2: e_ij = a^T LeakyReLU(W h_i + W h_j)
        pair = x_query[:, None] + x[None]  # (c, 1, K, O) + (1, C, K, O) -> (c, C, K, O)
        pair = F.leaky_relu(pair, self.negative_slope, inplace=True)  # in place: the largest tensor here, once
        e = (pair @ self.att.T).squeeze(-1)  # (c, C, K, O) @ (O, 1) -> (c, C, K)
        # Eq. 3: alpha_ij = softmax_j(e_ij) (the paper's beta_ij), then dropout on the coefficients
        alpha = F.dropout(e.softmax(dim=1), self.dropout, self.training)  # (c, C, K)
        # Eq. 4: h_i' = sum_j alpha_ij W h_j, per head
        return torch.einsum("ijk,jko->iko", alpha, x)  # (c, C, K) x (C, K, O) -> (c, K, O)

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
        self.layer1 = GATv2Layer(dim, hidden, heads, dropout)  # D -> K x O, concatenated
        self.layer2 = GATv2Layer(heads * hidden, dim, 1, dropout)  # K * O -> D, one head

    def forward(self, H: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        assert H.dim() == 2 and H.shape[1] == self.dim, f"expected H (C, {self.dim}), got {tuple(H.shape)}"
        x = F.dropout(H, self.dropout, self.training)  # (C, D)
        x = F.dropout(F.elu(self.layer1(x, chunk)), self.dropout, self.training)  # (C, K * O)
        G = self.layer2(x, chunk)  # (C, D)
        assert G.shape == H.shape, f"expected G {tuple(H.shape)}, got {tuple(G.shape)}"
        return G


if __name__ == "__main__":
    torch.manual_seed(0)
    H = torch.randn(10, 64)  # (C, D): 10 labels
    gmc = GMC(dim=64, heads=4, hidden=8).eval()
    with torch.no_grad():
        x = gmc.layer1.lin(H).view(10, 4, 8)  # (C, K, O)
        alpha = (F.leaky_relu(x[:, None] + x[None], 0.2) @ gmc.layer1.att[0]).softmax(dim=1)  # (C, C, K)
        plain, fast = gmc(H), gmc(H, chunk=3)  # (C, D) each: every pair at once, or 3 query rows at a time
    torch.set_printoptions(precision=2, linewidth=120)
    print("layer-1 attention alpha_ij of head 0 (row i sums to 1 over j):")
    print(alpha[..., 0])
    print("H", tuple(H.shape), "-> layer1", tuple(gmc.layer1(H).shape), "-> G", tuple(plain.shape),
          f"| fast vs plain path: largest difference {(fast - plain).abs().max():.1e}")
