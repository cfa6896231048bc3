"""SigRL tests: the fast path (class chunks under checkpoint, optionally compiled) against sigrl's plain path,
the reference code's Frobenius scaling, score normalisation, the frozen teacher, ablation switches, determinism."""
import pytest
import torch
import torch.nn as nn

import sigrl
from sigrl import SDA, VFR, SigRL, SigRLConfig
from tools import explain
from vit import VisionConfig, VisionTransformer

B, C, D = 2, 13, 16
CHUNKS = [1, 7, C, C + 5]


def tower():
    """A tiny CLIP visual tower: width 64 (one head), 1 block, 24 px / 8 px patches -> P = 9."""
    return VisionTransformer(VisionConfig(width=64, layers=1, patch=8, resolution=24, embed_dim=D))


def plain_forward(model, images, H):
    """(scores, local, glob) of `model`: its ablation switches and the scores (Eq. 13 as the reference code
    normalises and averages them) written out here, around the plain
    path of its modules (no chunking anywhere)."""
    tokens = model.student.forward_tokens(images) @ model.student.proj
    g, patch = tokens[:, 0], tokens[:, 1:]
    s_glob = g @ H.T
    glob = s_glob / s_glob.norm(dim=1, keepdim=True)
    if model.config.global_only:
        return glob, None, glob
    s_local = plain_local(model, patch, H)
    local = s_local / s_local.norm(dim=1, keepdim=True)
    return (local + glob) / 2, local, glob


def plain_local(model, patch, H):
    """The local score before the reference code's normalisation over the classes (B, C): top-k mean over p of <M_hat[b,p,:], H[c,:]>."""
    cfg = model.config
    M_hat = patch
    if cfg.vfr:
        G = model.gmc(H) if cfg.gmc else H
        T = model.sda(patch, H) if cfg.sda else H.expand(len(patch), -1, -1)
        M_hat = model.vfr(patch, T, G)
    sim = torch.einsum("bpd,cd->bpc", M_hat, H)
    k = min(cfg.topk, patch.shape[1])
    return sim.sort(dim=1, descending=True).values[:, :k].mean(dim=1)


# ---- helpers ---------------------------------------------------------------------------------------------

def make_model(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"embed_dim": D, "topk": 4, **cfg}
    return SigRL(tower(), SigRLConfig(**cfg)).double().eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 24, 24, generator=g, dtype=torch.float64)
    return images, torch.randn(C, D, generator=g, dtype=torch.float64)


def value_and_grads(fn, module, *xs):
    """fn(*xs) and the gradients of a fixed random projection of it w.r.t. module's parameters and xs."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), params + xs, allow_unused=True)
    return out.detach(), grads


def assert_same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


# ---- the maps behind the local score (predict.py --explain; tools/explain.py) -----------------------------
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("switches", [{}, {"gmc": False, "sda": False}, {"gmc": False, "sda": False, "vfr": False}])
def test_explain_maps_are_what_the_local_score_ranks(fast, switches):
    """The similarity map's top-k mean is the local score before its normalisation over the classes (against
    the plain path written out above); normalised, it is score()'s local; SDA's map is alpha averaged over the
    channels (written out here), a distribution over the patches for every class."""
    model = make_model(fast=fast, class_chunk=5, **switches)
    images, H = inputs()
    with torch.no_grad():
        g, patch = model.encode(images)
        maps = explain.maps(model, patch, H)
        out = model.score(g, patch, H)
        s_local = maps.similarity.topk(model.config.topk, dim=1).values.mean(dim=1)  # (B, C)
        torch.testing.assert_close(s_local, plain_local(model, patch, H), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s_local / s_local.norm(dim=1, keepdim=True), out.local, rtol=1e-12, atol=1e-12)
        if model.sda is None:
            assert maps.attention is None
            return
        alpha = model.sda.fc_sda(torch.tanh(patch[:, :, None, :] * H)).softmax(dim=1)  # (B, P, C, D)
        torch.testing.assert_close(maps.attention, alpha.mean(dim=-1), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(maps.attention.sum(dim=1), torch.ones(B, C, dtype=torch.float64))


# ---- fast path == plain path ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", CHUNKS)
def test_sda_fast_equals_plain(chunk):
    torch.manual_seed(0)
    sda = SDA(D).double()
    patch, H = torch.randn(B, 9, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    ours = value_and_grads(lambda p, h: sda(p, h, chunk), sda, patch, H)
    ref = value_and_grads(lambda p, h: sda(p, h), sda, patch, H)
    assert ours[0].shape == (B, C, D)
    assert_same(ours, ref)


def test_sda_leaves_out_the_reference_frobenius_scaling_harmlessly():
    """The reference computes ReLU(M^T H / (||M||_F ||H||_F)) before the row normalisation; SDA leaves the
    positive scalar out. Written out here with it: the same T."""
    torch.manual_seed(0)
    sda = SDA(D).double()
    patch, H = torch.randn(B, 9, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64)
    M = sigrl.decouple(sda.fc_sda, patch, H)  # (B, C, D)
    Q = torch.relu(M.transpose(1, 2) @ H / (M.norm() * H.norm()))  # (B, D, D)
    Q = Q / Q.norm(dim=2, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(sda(patch, H, 5), M @ Q, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_vfr_fast_equals_plain(chunk):
    torch.manual_seed(0)
    vfr = VFR(D).double()
    patch, T, G = (torch.randn(*s, dtype=torch.float64) for s in [(B, 9, D), (B, C, D), (C, D)])
    ours = value_and_grads(lambda p, t, g: vfr(p, t, g, chunk), vfr, patch, T, G)
    ref = value_and_grads(lambda p, t, g: vfr(p, t, g), vfr, patch, T, G)
    assert ours[0].shape == (B, 9, D)
    assert_same(ours, ref)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_model_fast_equals_plain(chunk):
    model = make_model(class_chunk=chunk, gat_chunk=chunk)
    images, H = inputs()
    ours = value_and_grads(lambda x, h: torch.stack(model(x, h)[:3]), model, images, H)
    ref = value_and_grads(lambda x, h: torch.stack(plain_forward(model, x, h)), model, images, H)
    plain = make_model(fast=False)  # the same weights (same seed), the one switch off
    by_switch = value_and_grads(lambda x, h: torch.stack(plain(x, h)[:3]), plain, images, H)
    assert_same(ours, ref)
    assert_same(ours, by_switch)


def test_compiled_heads_equal_plain():
    """SigRL.compile_heads runs the same maths through torch.compile (chunk 5 of C = 13: two chunk shapes)."""
    model = make_model(class_chunk=5).compile_heads()
    images, H = inputs()
    ours = value_and_grads(lambda x, h: torch.stack(model(x, h)[:3]), model, images, H)
    ref = value_and_grads(lambda x, h: torch.stack(plain_forward(model, x, h)), model, images, H)
    assert model.sda.fused and model.vfr.fused and "fused" not in str(model.state_dict().keys())
    assert sigrl.compiled.cache_info().currsize == 2  # both chunk functions went through torch.compile
    assert_same(ours, ref)


def test_linear_layers_as_in_the_reference_code():
    model = make_model()
    assert model.sda.fc_sda.weight.shape == (D, D) and model.sda.fc_sda.bias is not None
    assert model.vfr.fc_vfr.weight.shape == (D, D) and model.vfr.fc_vfr.bias is not None
    assert model.vfr.fc_o.weight.shape == (D, 2 * D) and model.vfr.fc_o.bias is None


def test_no_dense_tensor_is_saved_for_backward():
    # With checkpointed chunks, autograd keeps no (B, P, c, D) tensor at all after SDA/VFR's forward pass:
    # only chunk inputs and (B, C, D)-sized results. The plain path keeps several (B, P, C, D) ones.
    torch.manual_seed(0)
    sda, vfr = SDA(D), VFR(D)
    P = 9
    patch, H = torch.randn(B, P, D, requires_grad=True), torch.randn(C, D, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vfr(patch, sda(patch, H, 2), H, 2)
    assert saved and not [s for s in saved if len(s) == 4], saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vfr(patch, sda(patch, H), H)
    assert (B, P, C, D) in saved  # the hook does see a dense tensor when there is one


# ---- scores, teacher, ablations, determinism -------------------------------------------------------------

def test_scores_are_normalised_and_bounded():
    model = make_model()
    out = model(*inputs())
    assert out.scores.shape == out.local.shape == out.glob.shape == (B, C) and out.feat.shape == (B, D)
    assert out[0] is out.scores
    for part in (out.local, out.glob):
        torch.testing.assert_close(part.norm(dim=1), torch.ones(B, dtype=torch.float64))
    assert out.scores.abs().max() <= 1
    torch.testing.assert_close(out.scores, (out.local + out.glob) / 2)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = make_model()
    images, H = inputs()
    assert model.teacher is not model.student
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.training and model.student.training and model.gmc.training
    assert not any(m.training for m in model.teacher.modules())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    out = model(images, H)
    target = model.teacher_feat(images)
    assert torch.equal(target, out.feat)  # teacher == initial student, bit for bit (the L1 is exactly 0)
    torch.testing.assert_close(target, model.teacher(images))  # the tower's own class-token embedding
    assert not target.requires_grad
    loss = out.scores.sum() + (out.feat - target).abs().mean()
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.proj.grad is not None and model.sda.fc_sda.weight.grad is not None
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in before.items())
    assert not torch.allclose(model.teacher_feat(images), model(images, H).feat)


def test_state_dict_trainable_leaves_out_the_teacher():
    model = make_model()
    sd = model.state_dict_trainable()
    assert sd and not any(k.startswith("teacher.") for k in sd)
    fresh = make_model(seed=5)
    fresh.load_state_dict_trainable(sd)
    images, H = inputs()
    torch.testing.assert_close(fresh(images, H).scores, model(images, H).scores)
    with pytest.raises(KeyError):
        fresh.load_state_dict_trainable({k: v for k, v in sd.items() if not k.startswith("sda.")})


def test_from_clip_copies_the_visual_tower():
    torch.manual_seed(0)
    clip = nn.Module()
    clip.visual = tower()
    model = SigRL.from_clip(clip, topk=3, sda=False)
    assert model.config.embed_dim == D and model.config.topk == 3 and model.sda is None
    assert model.student is not clip.visual
    assert torch.equal(model.student.proj, clip.visual.proj)


@pytest.mark.parametrize("switches, built", [
    (dict(gmc=False), ("sda", "vfr")),
    (dict(sda=False), ("gmc", "vfr")),
    (dict(gmc=False, sda=False), ("vfr",)),
    (dict(vfr=False, gmc=False, sda=False), ()),
    (dict(global_only=True), ()),
])
def test_ablations(switches, built):
    images, H = inputs()
    full = make_model()(images, H).scores
    model = make_model(**switches)
    assert {n for n in ("gmc", "sda", "vfr") if getattr(model, n) is not None} == set(built)
    out = model(images, H)
    scores, local, glob = plain_forward(model, images, H)
    torch.testing.assert_close(out.scores, scores)
    assert not torch.allclose(out.scores, full)
    if switches.get("global_only"):
        assert out.local is None
    else:
        torch.testing.assert_close(out.local, local)


def test_global_only_is_the_normalised_class_token_score():
    model = make_model(global_only=True)
    images, H = inputs()
    out = model(images, H)
    g = model.student(images)  # class token @ proj
    s = g @ H.T
    torch.testing.assert_close(out.scores, s / s.norm(dim=1, keepdim=True))
    torch.testing.assert_close(out.feat, g)


def test_vfr_off_requires_gmc_and_sda_off():
    for switches in (dict(vfr=False), dict(vfr=False, gmc=False), dict(vfr=False, sda=False)):
        with pytest.raises(ValueError):
            make_model(**switches)


def test_seeded_runs_repeat():
    # training mode, so GMC's dropout draws random numbers
    images, H = inputs()
    runs = []
    for _ in range(2):
        model = make_model(seed=3).train()
        torch.manual_seed(11)
        runs.append(value_and_grads(lambda x, h: model(x, h).scores, model, images, H))
    assert_same(*runs)
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)


def test_encode_once_score_many_equals_forward():
    """Evaluation encodes a batch once and scores it against several label sets with a precomputed G."""
    model = make_model().eval()
    images, H = inputs()
    with torch.no_grad():
        g, patch = model.encode(images)
        for labels in (H, H[3:]):  # a second, smaller label set (like ZSL's unseen labels)
            want = model(images, labels)
            got = model.score(g, patch, labels, G=model.label_graph(labels))
            assert torch.allclose(got.scores, want.scores, atol=1e-6)
    with pytest.raises(AssertionError, match="precomputed G"):
        model.train().score(g, patch, H, G=H)
