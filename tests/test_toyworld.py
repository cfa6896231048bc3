"""Tests of the toy world (toyworld.py) and its tiny CLIP (toyclip/): determinism, co-occurrence, the real
loaders reading the files, OpenAI's checkpoint layout (open_clip as the oracle) and a zero-shot margin."""
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from toy import shapes as toydraw
from toy import world as tw
from data import check_images, load_nuswide
from support.errors import DataError
from toy.pretrain import PretrainConfig, build_clip, encode_text_prefix, save_official
from optional import need

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root):
    """sha256 of every file under root (relative path + bytes)."""
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(d, f)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tw.make_world(tmp_path_factory.mktemp("world"), seed=0, n_train=240, n_test=160)


def test_same_seed_same_bytes(world, tmp_path):
    again = tw.make_world(tmp_path / "again", seed=0, n_train=240, n_test=160)
    assert tree_digest(world) == tree_digest(again)
    other = tw.make_world(tmp_path / "other", seed=1, n_train=240, n_test=160)
    a, b = np.load(world / "sigrl_nuswide/train_labels.npy"), np.load(other / "sigrl_nuswide/train_labels.npy")
    assert not np.array_equal(a, b)


def test_cached_world_is_reused_and_foreign_data_refused(world, tmp_path):
    stamp = os.path.getmtime(world / "sigrl_nuswide" / "train_labels.npy")
    tw.make_world(world, seed=0, n_train=240, n_test=160)
    assert os.path.getmtime(world / "sigrl_nuswide" / "train_labels.npy") == stamp
    (tmp_path / "sigrl_nuswide").mkdir()
    with pytest.raises(DataError, match="did not write"):
        tw.make_world(tmp_path, seed=0, n_train=4, n_test=4)


def test_label_sets():
    assert len(tw.LABELS) == len(set(tw.LABELS)) == 35 and len(tw.UNSEEN) == 8 and len(tw.SEEN) == 27
    assert set(tw.SEEN) | set(tw.UNSEEN) == set(tw.LABELS) and not set(tw.SEEN) & set(tw.UNSEEN)
    # 3 of the 8 unseen labels are twins (another word for a seen object), as 30 of NUS-WIDE's 81; 5 are novel
    assert set(tw.UNSEEN) == set(tw.TWINS) | set(tw.NOVEL) and len(tw.TWINS) == 3 and len(tw.NOVEL) == 5
    assert set(tw.TWINS.values()) <= set(tw.SEEN) & set(tw.OBJECTS) and not set(tw.NOVEL) & set(tw.SEEN)
    assert set(toydraw.SHAPES) == set(tw.OBJECTS)
    for scene, (_, phrase, pool) in tw.SCENES.items():
        assert scene in phrase and set(pool) <= set(tw.OBJECTS)


def test_scene_pools_drive_co_occurrence():
    rng = np.random.default_rng(0)
    samples = [tw.sample_scene(rng) for _ in range(4000)]
    from_pool = [o in tw.SCENES[s][2] for s, objects in samples for o in objects]
    assert np.mean(from_pool) > 0.75                      # P_POOL = 0.8, plus off-pool picks that hit the pool
    counts = Counter(s for s, _ in samples)
    for scene, (_, _, pool) in tw.SCENES.items():
        for obj in pool:
            p_given = np.mean([obj in o for s, o in samples if s == scene])
            p_all = np.mean([obj in o for _, o in samples])
            assert p_given > 1.5 * p_all, (scene, obj, p_given, p_all)   # the pool lifts the object
        assert 0.1 < counts[scene] / len(samples) < 0.19
    assert all(1 <= len(o) <= len(tw.N_OBJECTS_P) and len(set(o)) == len(o) for _, o in samples)


def test_captions_name_every_label_somewhere():
    captions = [tw.draw_example(0, tw.PRETRAIN, i)[3] for i in range(300)]
    words = set(" ".join(captions).replace(",", " ").replace(".", " ").split())
    assert set(tw.LABELS) <= words and "scene" in words
    for twin, seen in tw.TWINS.items():  # both words name the same object, about equally often
        n_twin, n_seen = (sum(f" {w} " in f" {c[:-1]} " for c in captions) for w in (twin, seen))
        assert 0.5 < n_twin / n_seen < 2, (twin, n_twin, seen, n_seen)
    image, scene, objects, caption = tw.draw_example(0, tw.PRETRAIN, 7)
    assert image.size == (tw.RES, tw.RES) and image.mode == "RGB"
    assert any(o in caption for o in objects)


def test_nuswide_view_loads_with_data_py(world):
    nus = load_nuswide(world)
    assert (nus.seen, nus.unseen, nus.layout) == (tw.SEEN, tw.UNSEEN, "prepared")
    assert nus.train_labels.shape == (240, 27) and nus.test_labels.shape == (160, 35)
    assert nus.train_labels.dtype == np.int8 and set(np.unique(nus.test_labels)) == {-1, 1}
    assert (nus.train_labels == 1).any(0).all() and (nus.test_labels == 1).any(0).all()  # every label occurs
    good, bad, _ = check_images(nus.train_paths + nus.test_paths)
    assert good.all() and not bad
    assert any("/Flickr/city_street/" in p for p in nus.train_paths)  # a folder name holding "_"
    names = open(world / "sigrl_nuswide" / "test_names.txt").read().split()
    assert len(set(names)) == 160 and all(n.count("_") >= 2 for n in names)
    # the test rows' labels are the drawn scene + objects, seen columns then unseen
    _, scene, objects, _ = tw.draw_example(0, tw.TEST, 5)
    twins = [t for t, o in tw.TWINS.items() if o in objects]
    assert sorted(np.array(tw.SEEN + tw.UNSEEN)[nus.test_labels[5] == 1]) == sorted([scene] + objects + twins)
    columns = tw.SEEN + tw.UNSEEN
    for twin, seen in tw.TWINS.items():  # a twin label is true exactly where its seen object is
        assert (nus.test_labels[:, columns.index(twin)] == nus.test_labels[:, columns.index(seen)]).all()


def test_spml_view(world):
    spml = tw.load_spml_view(world)
    assert spml.classes == tw.LABELS
    assert (len(spml.train_paths), len(spml.val_paths), len(spml.test_paths)) == (192, 48, 160)
    assert (spml.train_obs.sum(1) == 1).all() and (spml.train_obs <= spml.train_true).all()
    assert all(os.path.isfile(p) for p in spml.train_paths[:5] + spml.test_paths[:5])


def test_prefix_text_encoding_is_exact():
    torch.manual_seed(0)
    clip = build_clip(PretrainConfig(vision_layers=1, text_layers=2), vocab_size=600).eval()
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate([5, 9, 2]):
        tokens[row, :n] = torch.randint(1, 598, (n,))
        tokens[row, n] = 599                                   # EOT = the largest id
    torch.testing.assert_close(encode_text_prefix(clip, tokens), clip.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_saved_layout_matches_openai(tmp_path):
    """Key names, shapes and the fp16 subset of an open_clip model of the same size (the independent oracle)."""
    oc = need("open_clip.model")  # the comparison skips, naming it, without open_clip
    OpenClip, CLIPTextCfg, CLIPVisionCfg = oc.CLIP, oc.CLIPTextCfg, oc.CLIPVisionCfg
    from fixtures_clip import fp16_subset
    cfg = PretrainConfig(vision_layers=2, text_layers=2)
    ours = build_clip(cfg, vocab_size=600).eval()
    path = tmp_path / "x.pt"
    save_official(ours, path)
    sd = torch.load(path, weights_only=True)
    oracle = OpenClip(cfg.embed_dim, CLIPVisionCfg(layers=2, width=cfg.vision_width, patch_size=cfg.patch,
                                                   image_size=tw.RES),
                      CLIPTextCfg(context_length=77, vocab_size=600, width=cfg.text_width, heads=2, layers=2),
                      quick_gelu=True)
    ints = {"input_resolution": tw.RES, "context_length": 77, "vocab_size": 600}
    assert set(sd) == set(oracle.state_dict()) | set(ints)
    for k, v in oracle.state_dict().items():
        assert sd[k].shape == v.shape, k
        assert sd[k].dtype == (torch.float16 if k in fp16_subset(oracle) else torch.float32), k
    assert {k: (sd[k].item(), sd[k].dtype, sd[k].dim()) for k in ints} == {k: (v, torch.int64, 0)
                                                                          for k, v in ints.items()}


def test_toyclip_loads_from_the_repository_alone(tmp_path):
    """Load the committed tiny CLIP with HOME elsewhere and $SIGRL_BPE unset, recording every file opened:
    nothing outside the repository and the Python installation may be read."""
    script = f"""
import json, os, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and
                 isinstance(args[0], (str, bytes, os.PathLike)) else None)
sys.path.insert(0, {REPO!r})
from toy import world as toyworld
from support.clip_files import load_clip
from clip_text import encode_labels
clip = load_clip(toyworld.TOYCLIP)
emb = encode_labels(clip, toyworld.LABELS, cache_dir={str(tmp_path / 'cache')!r})
ids = clip.tokenizer.encode("snowman")
allowed = ({REPO!r}, sys.prefix, sys.base_prefix, {str(tmp_path)!r}, "/proc", "/sys", "/dev", "/etc")
outside = sorted({{p for p in opened if os.path.isabs(p) and not p.startswith(allowed)}})
print(json.dumps([clip.bpe, list(emb.shape), ids, clip.resolution, outside, sorted(set(opened))]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("SIGRL_BPE", "SIGRL_CACHE")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    bpe, shape, ids, resolution, outside, opened = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(bpe) == os.path.realpath(os.path.join(REPO, "toy", "toyclip.bpe.txt.gz"))
    assert bpe in opened and tw.TOYCLIP in opened                       # the hook does see the files read
    assert shape[0] == 35 and len(ids) == 1 and resolution == tw.RES  # "snowman" is one learned token
    assert outside == []


def test_toyclip_text_tower_knows_each_twin_as_its_seen_word():
    """Pre-training used the two words interchangeably: each twin's prompt embedding is nearer its seen twin's
    than any other label's."""
    from support.clip_files import load_clip
    from clip_text import encode_labels
    emb = torch.nn.functional.normalize(encode_labels(load_clip(tw.TOYCLIP), tw.LABELS), dim=-1)  # (C, D)
    cos = (emb @ emb.T).fill_diagonal_(-2)                                                        # (C, C)
    nearest = {name: tw.LABELS[int(cos[i].argmax())] for i, name in enumerate(tw.LABELS)}
    assert {t: nearest[t] for t in tw.TWINS} == tw.TWINS


def test_toyclip_recognises_unseen_labels_zero_shot():
    """Fresh test images (world seed 1: never drawn in pre-training): unseen mAP far above chance."""
    r = tw.zeroshot(tw.TOYCLIP, n=400, seed=1)
    assert r["zsl"]["map"] > 2.5 * r["chance"]["zsl"], r
    assert r["gzsl"]["map"] > 2.5 * r["chance"]["gzsl"], r
