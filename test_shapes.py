"""The shape tour: every tensor of one SigRL training forward and its losses, stage by stage, at a small
configuration (width 128 -> 2 attention heads, 2 blocks), then every model module alone, including one class
(C = 1) and a top-K larger than the patches (topk > P). Run it as a test (python -m pytest -q test_shapes.py)
or as a script that prints the tour (python test_shapes.py). The letters are the book's one shape legend
(B images, P patches, C labels, D joint width, W ViT width, K top-K; see sigrl.py's docstring)."""
import pytest
import torch
import torch.nn.functional as F

from clip_text import CLIP, CLIPConfig, PromptLearner, encode_labels
from gat import GMC, GATv2Layer
import sigrl
from sigrl import SDA, VFR, SigRL, SigRLConfig
from vit import Attention, ResidualAttentionBlock, Transformer, VisionConfig, VisionTransformer

W, LAYERS, D, B = 128, 2, 64, 2


def vision(resolution):
    return VisionConfig(width=W, layers=LAYERS, patch=16, resolution=resolution, embed_dim=D)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig(vision=vision(32), embed_dim=D, text_width=W, text_layers=LAYERS)).eval()


def tour(resolution=64, C=9, topk=4):
    """[(name, tensor, expected shape)] for one training forward written out stage by stage with sigrl.py's own
    functions, on random images, label embeddings and labels; and the model's own forward, to compare."""
    torch.manual_seed(0)
    P = (resolution // 16) ** 2
    model = SigRL(VisionTransformer(vision(resolution)), SigRLConfig(embed_dim=D, topk=topk, class_chunk=4))
    model.eval()  # GMC's dropout off, so the model's own forward can be compared with the tour
    images, H = torch.randn(B, 3, resolution, resolution), torch.randn(C, D)  # (B, 3, R, R), (C, D)
    labels = torch.where(torch.rand(B, C) < 0.4, 1.0, -1.0)  # (B, C) seen-label targets in {+1, -1}
    labels[:, 0] = 1  # each image keeps a positive, as the batches of training do
    K = min(topk, P)
    rows = []

    def see(name, t, shape):
        rows.append((name, t, shape))
        return t

    tokens = see("tokens = ln_post(ViT(images))", model.student.forward_tokens(images), (B, 1 + P, W))
    tokens = see("tokens @ proj", tokens @ model.student.proj, (B, 1 + P, D))
    g, patch = see("g = F_class", tokens[:, 0], (B, D)), see("F = F_patch", tokens[:, 1:], (B, P, D))
    G = see("G = GMC(H) (Eq. 2-4)", model.gmc(H), (C, D))
    sda, vfr = model.sda, model.vfr
    x = see("F * H (Eq. 5's product)", patch[:, :, None, :] * H, (B, P, C, D))
    f = see("f = fc_sda(tanh(F * H)) (Eq. 5)", sda.fc_sda(x.tanh()), (B, P, C, D))
    a = see("a = softmax over p of f (Eq. 7)", sigrl.sda_attention(sda.fc_sda, patch, H), (B, P, C, D))
    assert torch.equal(a, f.softmax(dim=1))
    M = see("M = sum_p a * F (Eq. 6, as the code)", torch.einsum("bpcd,bpd->bcd", a, patch), (B, C, D))
    Q = see("Q = ReLU(M^T H) (Eq. 8, as the code)", torch.relu(M.transpose(1, 2) @ H), (B, D, D))
    T = see("T = M Norm(Q) (Eq. 9)", M @ F.normalize(Q, dim=-1), (B, C, D))
    TG = see("[T ; G] (unnumbered)", torch.cat([T, G.expand(B, C, D)], dim=-1), (B, C, 2 * D))
    O = see("O = fc_o([T ; G]) (unnumbered)", vfr.fc_o(TG), (B, C, D))
    f_hat = see("f_hat = fc_vfr(tanh(F * O)) (Eq. 10)", vfr.fc_vfr((patch[:, :, None, :] * O[:, None]).tanh()),
                (B, P, C, D))
    a_hat = see("a_hat = softmax over p of f_hat (Eq. 11)", f_hat.softmax(dim=1), (B, P, C, D))
    weight = see("sum_c a_hat (Eq. 12, as the code)", a_hat.sum(dim=2), (B, P, D))
    assert torch.allclose(weight, sigrl.reconstruction_weight(vfr.fc_vfr, patch, O), atol=1e-6)
    M_hat = see("M_hat = F * sum_c a_hat (Eq. 12)", patch * weight, (B, P, D))
    sim = see("<M_hat_p, H_c>, before the top-K", M_hat @ H.T, (B, P, C))
    top = see("Top-K over p (Eq. 13)", sim.topk(K, dim=1).values, (B, K, C))
    local = see("local: top-K mean, normalised over C (code)", F.normalize(top.mean(dim=1), dim=-1), (B, C))
    glob = see("global: <g, H>, normalised over C (code)", F.normalize(g @ H.T, dim=-1), (B, C))
    scores = see("scores = (local + global) / 2 (code)", (local + glob) / 2, (B, C))
    pair = (labels == 1)[:, :, None] & (labels == -1)[:, None, :]  # (B, C, C): [b, p, n]
    hinge = see("Eq. 15's hinge over pairs [b, p, n]",
                torch.relu(1 + scores[:, None, :] - scores[:, :, None]) * pair, (B, C, C))
    see("L_local (Eq. 15)", sigrl.ranking_loss(scores, labels), ())
    see("L_global (Eq. 16)", sigrl.l1_distill(g, model.teacher_feat(images)), ())
    return rows, model(images, H), scores, labels, hinge


def test_tour_every_intermediate():
    rows, out, scores, labels, hinge = tour()
    for name, t, shape in rows:
        assert tuple(t.shape) == shape, f"{name}: expected {shape}, got {tuple(t.shape)}"
    # the stage-by-stage forward is the model's forward (its fast path, 4 classes at a time)
    torch.testing.assert_close(scores, out.scores, rtol=1e-5, atol=1e-6)
    violating = (hinge > 0).sum(dim=(1, 2))  # (B,)
    torch.testing.assert_close(hinge.sum(dim=(1, 2)) / (violating + 1e-8),
                               sigrl.ranking_loss_per_image(scores, labels))


def test_transformer_blocks():
    x = torch.randn(B, 5, W)  # (B, L, W)
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
    tokens = clip.tokenizer(["a dog", "two red cars"])  # (Nt, L)
    assert tokens.shape == (2, 77)
    assert clip.encode_text(tokens).shape == (2, D)
    x = clip.token_embedding(tokens)  # (Nt, L, Wt)
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


if __name__ == "__main__":
    rows, out, scores, _, _ = tour()
    print(f"One SigRL training forward at B = {B}, W = {W}, D = {D}, R = 64 (P = 16), C = 9, topk = 4:")
    for name, t, shape in rows:
        print(f"  {name:<46} {str(tuple(t.shape)):>14}")
    print(f"largest difference to SigRL.forward's scores: {(scores - out.scores).abs().max():.1e}")
    print("the same, checked, with every module alone: python -m pytest -q test_shapes.py")
