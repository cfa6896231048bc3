"""GATv2 / GMC tests: both paths (plain, and fast = chunked under checkpoint) against torch_geometric's GATv2Conv
(the oracle), and fast == plain in values and gradients."""
import pytest
import torch
import torch.nn.functional as F
from optional import need

from support import runs
import train
from gat import GMC, GATv2Layer
from sigrl import SigRL, SigRLConfig
from vit import VisionConfig, VisionTransformer


def complete_graph(C):
    """edge_index of the complete directed graph on C nodes, self-loops included (every (j -> i) once)."""
    src, dst = torch.meshgrid(torch.arange(C), torch.arange(C), indexing="ij")
    return torch.stack([src.flatten(), dst.flatten()])  # (2, C * C)


def pyg_twin(layer: GATv2Layer):
    """A GATv2Conv computing what `layer` should compute: shared W, no bias, every head given the same a."""
    conv = need("torch_geometric.nn").GATv2Conv(layer.in_dim, layer.out_dim, heads=layer.heads, concat=True, negative_slope=0.2,
                     dropout=0.0, add_self_loops=False, bias=False, share_weights=True)
    with torch.no_grad():
        conv.lin_l.weight.copy_(layer.lin.weight)
        conv.att.copy_(layer.att[:, None].expand(1, layer.heads, layer.out_dim))  # (1, hd) -> (1, nh, hd)
    return conv.double().eval()


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("C", [1, 2, 9, 40])
@pytest.mark.parametrize("in_dim, out_dim, heads", [(24, 8, 4), (32, 24, 1)])
def test_layer_matches_torch_geometric(C, in_dim, out_dim, heads, chunk):
    torch.manual_seed(C)
    layer = GATv2Layer(in_dim, out_dim, heads, dropout=0.0).double().eval()
    h = torch.randn(C, in_dim, dtype=torch.float64)
    ours = layer(h, chunk)
    assert ours.shape == (C, heads * out_dim)
    theirs = pyg_twin(layer)(h, complete_graph(C))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_layer_matches_torch_geometric_float32_default_init():
    # the real setting: fp32, default initialisation, D = 512 -> 4 x 32 -> 512
    torch.manual_seed(0)
    gmc = GMC(dim=512).eval()
    H = torch.randn(30, 512)
    x1 = F.elu(pyg_twin(gmc.layer1).float()(H, complete_graph(30)))
    G = pyg_twin(gmc.layer2).float()(x1, complete_graph(30))
    torch.testing.assert_close(gmc(H, 16), G, rtol=1e-5, atol=1e-5)


def test_heads_share_one_attention_vector():
    layer = GATv2Layer(16, 8, heads=4)
    assert layer.att.shape == (1, 8)  # as the reference's nn.Linear(O, 1) weight: 2-D, so weight-decayed
    assert sum(p.numel() for p in layer.parameters()) == 16 * 32 + 8  # W and a, no bias


def test_initialisation_is_the_reference_layers():
    """labml's GATv2 layer (the reference's) builds nn.Linear(D_in, nh * hd) then nn.Linear(hd, 1), no bias, with
    nn.Linear's default initialisation: the same seed must give the same numbers."""
    torch.manual_seed(3)
    ours = GMC(dim=64, heads=4, hidden=8)
    torch.manual_seed(3)
    reference = []
    for in_dim, heads, out_dim in ((64, 4, 8), (32, 1, 64)):  # layer 1, then layer 2
        reference += [torch.nn.Linear(in_dim, heads * out_dim, bias=False), torch.nn.Linear(out_dim, 1, bias=False)]
    ours = [p for layer in (ours.layer1, ours.layer2) for p in (layer.lin.weight, layer.att)]
    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got, want.weight)


def test_attention_vector_is_weight_decayed_as_in_the_reference():
    """The reference's optimiser exempts 1-D parameters from weight decay; its a is 2-D, so it is decayed."""
    cfg = runs.Config(weight_decay=0.05)
    visual = VisionTransformer(VisionConfig(width=64, layers=1, patch=8, resolution=16, embed_dim=32))
    groups = train.param_groups(SigRL(visual, SigRLConfig(embed_dim=32)), cfg)
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert decay["gmc.layer1.att"] == decay["gmc.layer2.att"] == decay["gmc.layer1.lin.weight"] == 0.05
    assert decay["sda.fc_sda.bias"] == decay["student.ln_post.weight"] == 0.0


def grads_of(layer, h, chunk, weight):
    h = h.clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(h, chunk)
    (out * weight).sum().backward()
    return out.detach(), h.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("heads", [4, 1])
def test_fast_equals_plain(heads):
    torch.manual_seed(1)
    C = 13
    layer = GATv2Layer(12, 6, heads, dropout=0.3).eval()
    h = torch.randn(C, 12)
    weight = torch.randn(C, heads * 6)
    ref_out, ref_dh, ref_dp = grads_of(layer, h, None, weight)  # the plain path
    for chunk in [1, 2, 5, 12, C + 5]:
        out, dh, dp = grads_of(layer, h, chunk, weight)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-5)
        for g, ref in zip(dp, ref_dp):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_gradients_with_dropout_are_exact():
    # Training mode: the backward pass recomputes each chunk, and must replay the dropout mask of forward.
    # Reseeding before every call makes the layer a fixed function, so finite differences check autograd.
    torch.manual_seed(2)
    gmc = GMC(dim=6, heads=2, hidden=3, dropout=0.3).double().train()
    H = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def seeded(H):
        torch.manual_seed(123)
        return gmc(H, 2)

    assert not torch.equal(seeded(H), gmc.eval()(H, 2)), "dropout should be active in training mode"
    gmc.train()
    assert torch.autograd.gradcheck(seeded, (H,), eps=1e-6, atol=1e-6)


def test_gmc_dropout_only_in_training():
    torch.manual_seed(3)
    gmc = GMC(dim=16, heads=4, hidden=4)
    H = torch.randn(6, 16)
    gmc.eval()
    assert torch.equal(gmc(H), gmc(H))
    gmc.train()
    assert not torch.equal(gmc(H), gmc(H))
