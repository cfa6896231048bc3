"""predict.py, tools.figure3, plot.py and the pictures (draw.py): tagging a folder of images end to end, its
outputs against SigRL.forward and against open_clip, label lists that are odd or wrong, the explain maps against
the local score, Fig. 3's colours, and every PNG's size.

The run checkpoint is SigRL on the committed tiny CLIP (64 px, 8 px patches: an 8 x 8 grid, top-16 of 64) at
its initial weights, saved in train.py's format without training (train.py's own tests train)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures_run

from support import checkpoints
from support import draw
import eval as evaluation
from support import curves as plot
import predict
from tools import figure3
from support import runs
from toy import world as toyworld
from clip_text import encode_labels
from data import build_transform
from protocol.metrics import nus_metrics
from sigrl import SigRL
from optional import need

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGRL_CACHE", str(d / "cache"))  # label embeddings cached here, not in the home folder
        yield from _setup(d)


def _setup(d):
    ckpt, cfg, data, clip, names = fixtures_run.untrained_run(d)
    root = cfg.data_root
    # the folder a user points predict.py at: nested folders, a PNG, a text file and a damaged JPEG
    photos, truth, created = d / "photos", {}, []
    for k, (path, row) in enumerate(zip(data.test_paths[:6], data.test_labels[:6])):
        sub = photos / ["", "a", "a/b"][k % 3]
        sub.mkdir(parents=True, exist_ok=True)
        name = os.path.basename(path) if k != 4 else os.path.basename(path)[:-4] + ".png"
        Image.open(path).save(sub / name)
        truth[name] = row
        created.append(os.path.relpath(sub / name, photos))
    (photos / "a" / "notes.txt").write_text("not an image")
    (photos / "a" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    yield {"dir": d, "ckpt": ckpt, "photos": photos, "truth": truth, "created": created, "clip": clip,
           "names": names, "data_root": root, "model": checkpoints.model_from_checkpoint(torch.load(ckpt, weights_only=True)), "data": data}


def forward_scores(model, paths, H, task="zsl"):
    """SigRL.forward on the images as the evaluation preprocessing gives them: (N, C)."""
    transform = build_transform(task, False, model.student.resolution)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])  # (N, 3, R, R)
        return model(x, H).scores.numpy()


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("checking images")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_folder_end_to_end_outputs_agree_with_forward(setup, tmp_path):
    out = tmp_path / "s.npy"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), "--ckpt", str(setup["ckpt"]),
                           str(setup["photos"]), "--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv"),
                           "--save-scores", str(out), "--workers", "0", "--batch-size", "4"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {setup['photos'] / 'a' / 'notes.txt'}: not an image" in proc.stderr
    assert f"skipped {setup['photos'] / 'a' / 'b' / 'broken.jpg'}: cannot be read" in proc.stderr
    assert "depend" in proc.stderr or "change when the label list changes" in proc.stderr  # the Eq. 13 note
    images = (tmp_path / "s.images.txt").read_text().splitlines()
    names = (tmp_path / "s.label_names.txt").read_text().splitlines()
    walk_order = sorted(setup["created"], key=lambda r: (os.path.dirname(r), os.path.basename(r)))
    assert [os.path.relpath(p, setup["photos"]) for p in images] == walk_order and names == setup["names"]
    want = forward_scores(setup["model"], images, torch.load(setup["ckpt"], weights_only=True)["label_emb"])
    scores = np.load(out)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    tagged = json.loads((tmp_path / "t.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "t.csv", encoding="utf-8")))
    assert [t["image"] for t in tagged] == images and len(rows) == 5 * len(images)
    for i, t in enumerate(tagged):
        top = np.argsort(-want[i], kind="stable")[:5]
        assert [n for n, _ in t["labels"]] == [names[c] for c in top]
        np.testing.assert_allclose([s for _, s in t["labels"]], want[i, top], atol=1e-5)
        mine = [r for r in rows if r["image"] == t["image"]]
        assert [(r["label"], float(r["score"])) for r in mine] == [tuple(x) for x in t["labels"]]
        assert f"{t['image']}: {t['labels'][0][0]} " in proc.stdout
    # the saved scores go straight into eval.py --scores, with labels built in the order written beside them
    labels = np.stack([setup["truth"][os.path.basename(p)] for p in images])
    np.save(tmp_path / "y.npy", labels)
    assert evaluation.main(["--scores", str(out), "--labels", str(tmp_path / "y.npy"), "--protocol", "nuswide",
                            "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["test"]["map"] == pytest.approx(
        nus_metrics(scores, labels)["map"])


def test_new_labels_with_odd_characters(setup, tmp_path, capsys):
    names = ["fish", "café au lait", "rock 'n' roll", "C++", "東京", "t-shirt", "a, b", "night"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n", encoding="utf-8")
    code = predict.main(["--ckpt", str(setup["ckpt"]), "--labels-file", str(tmp_path / "names.txt"),
                         str(setup["photos"] / "a"), "--save-scores", str(tmp_path / "s"), "--workers", "0",
                         "--threshold", "-1"])
    assert code == 0
    assert (tmp_path / "s.label_names.txt").read_text(encoding="utf-8").splitlines() == names
    images = (tmp_path / "s.images.txt").read_text().splitlines()
    H = encode_labels(setup["clip"], names, template="There is a {} in the scene")
    np.testing.assert_allclose(np.load(tmp_path / "s"), forward_scores(setup["model"], images, H), atol=1e-5)
    assert all(len(line.split(", ")) >= len(names) for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("labels, needle", [("fish,cat,fish", "'fish' repeats 'fish'"),
                                            ("fish,Fish", "'Fish' reads as the same tokens as 'fish'"),
                                            ("fish,,cat", "empty label")])
def test_bad_label_lists_are_one_line(setup, tmp_path, capsys, labels, needle):
    code = predict.main(["--ckpt", str(setup["ckpt"]), "--labels", labels, str(setup["photos"]),
                         "--json", str(tmp_path / "t.json")])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "t.json").exists()


def test_bad_inputs_are_one_line(setup, tmp_path, capsys):
    code = predict.main(["--ckpt", str(setup["ckpt"]), str(tmp_path / "nowhere")])
    one_line_error(capsys, code, str(tmp_path / "nowhere"))
    code = predict.main(["--ckpt", str(setup["ckpt"]), str(setup["photos"]), "--json", str(tmp_path / "no/t.json")])
    one_line_error(capsys, code, "--json")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, predict.main(["--ckpt", str(setup["ckpt"]), str(tmp_path / "empty")]), "no readable")
    # new labels need the text tower the run was trained with, not another CLIP file
    sd = {k: v.clone() for k, v in setup["clip"].state_dict().items()}
    sd["ln_final.bias"] += 0.1
    torch.save(sd, tmp_path / "other.pt")
    code = predict.main(["--ckpt", str(setup["ckpt"]), "--clip", str(tmp_path / "other.pt"), "--labels", "fish",
                         str(setup["photos"])])
    one_line_error(capsys, code, "other.pt", "sha256")
    one_line_error(capsys, predict.main(["--ckpt", str(setup["ckpt"]), "--clip", str(setup["ckpt"]), "--labels",
                                         "a", str(setup["photos"])]), str(setup["ckpt"]))


def test_coop_run_tags_its_own_labels(setup, tmp_path, capsys):
    """A CoOp run's checkpoint also holds its prompt; tagging uses the label embeddings it saved."""
    from clip_text import PromptLearner
    cfg = runs.parse_args(["--task", "zsl", "--data", "nuswide", "--data-root", str(setup["data_root"]),
                           "--clip", toyworld.TOYCLIP, "--prompt", "coop", "--n-ctx", "4"])
    model = SigRL.from_clip(setup["clip"])
    model.prompt = PromptLearner(setup["clip"], setup["names"], n_ctx=4)
    with torch.no_grad():
        H = model.prompt()  # (C, D)
    state = {"step": 0, "epoch": 0, "best": None, "clip_sha256": setup["clip"].sha256}
    checkpoints.save_checkpoint(checkpoints.make_checkpoint(cfg, model, torch.optim.AdamW(model.parameters()), state,
                                              checkpoints.rng_state(), None, setup["names"], 24, H), tmp_path / "c.pt")
    assert predict.main(["--ckpt", str(tmp_path / "c.pt"), str(setup["photos"] / "a" / "b"), "--save-scores",
                         str(tmp_path / "s.npy"), "--workers", "0"]) == 0
    images = (tmp_path / "s.images.txt").read_text().splitlines()
    del model.prompt
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), forward_scores(model.eval(), images, H), atol=1e-5)
    capsys.readouterr()
    code = predict.main(["--ckpt", str(tmp_path / "c.pt"), "--labels", "fish", str(setup["photos"])])
    one_line_error(capsys, code, "CoOp")


def test_zero_shot_clip_equals_open_clip(setup, tmp_path):
    """--clip alone: the cosine of open_clip's image and text embeddings, same weights, CLIP's preprocessing."""
    oc = need("open_clip.model")  # the comparison skips, naming it, without open_clip
    OpenClip, CLIPTextCfg, CLIPVisionCfg = oc.CLIP, oc.CLIPTextCfg, oc.CLIPVisionCfg
    from torchvision import transforms as T
    clip = setup["clip"]
    c, v = clip.config, clip.config.vision
    oracle = OpenClip(c.embed_dim, CLIPVisionCfg(width=v.width, layers=v.layers, patch_size=v.patch,
                                                 image_size=v.resolution),
                      CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                                  heads=c.text_heads, layers=c.text_layers), quick_gelu=True).eval()
    oracle.load_state_dict(clip.state_dict())
    names = ["fish", "beach", "forest", "snowman"]
    assert predict.main(["--clip", toyworld.TOYCLIP, "--labels", ",".join(names), str(setup["photos"]),
                         "--json", str(tmp_path / "t.json"), "--top-k", "4", "--workers", "0"]) == 0
    tagged = json.loads((tmp_path / "t.json").read_text())
    R = v.resolution
    pre = T.Compose([T.Resize(R, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(R), T.ToTensor(),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    with torch.no_grad():
        image = oracle.encode_image(torch.stack([pre(Image.open(t["image"]).convert("RGB")) for t in tagged]))
        text = oracle.encode_text(clip.tokenizer([f"There is a {n} in the scene" for n in names]))
        want = (torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).numpy()
    for t, row in zip(tagged, want):
        got = dict(t["labels"])
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)


def test_toy_clip_says_what_it_knows_on_other_images(setup, tmp_path, capsys):
    """A run on the toy world's tiny CLIP tagging a photo-sized image prints one warning line (what the CLIP knows,
    the image, where to get a real CLIP); on the toy world's own 64 x 64 images it says nothing of the kind."""
    assert predict.main(["--ckpt", str(setup["ckpt"]), str(setup["photos"]), "--workers", "0"]) == 0
    assert "tiny CLIP" not in capsys.readouterr().err
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(photo)
    for argv in (["--ckpt", str(setup["ckpt"])], ["--clip", toyworld.TOYCLIP, "--labels", "fish,cat"]):
        assert predict.main([*argv, str(setup["photos"]), str(photo), "--workers", "0"]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "tiny CLIP" in line]
        assert len(lines) == 1 and lines[0].startswith("warning:"), lines
        assert f"1 of {len(setup['created']) + 1} images" in lines[0] and f"{photo}, 320 x 240" in lines[0]
        assert f"vocabulary of {setup['clip'].config.vocab_size} tokens" in lines[0] and "--clip ViT-B-16.pt" in lines[0]


def test_explain_pngs(setup, tmp_path, capsys):
    """One PNG per image: the input and, per top label, the similarity map over the attention map."""
    out = tmp_path / "maps"
    assert predict.main(["--ckpt", str(setup["ckpt"]), str(setup["photos"]), "--explain", str(out), "--top-k", "3",
                         "--workers", "0"]) == 0
    pngs = sorted(os.listdir(out))
    assert len(pngs) == 6 and pngs[0].startswith("0000_") and pngs[-1].startswith("0005_")
    side = 3 * 64  # the 64 px input enlarged 3 x, so that each of its 8 x 8 patches is 24 x 24 pixels
    for name in pngs:
        width, height = Image.open(out / name).size
        assert width == draw.PAD + 4 * (side + draw.PAD) and 2 * side < height < 3 * side  # image + 3 labels
    capsys.readouterr()
    code = predict.main(["--clip", toyworld.TOYCLIP, "--labels", "fish", str(setup["photos"]), "--explain", str(out)])
    one_line_error(capsys, code, "--explain needs a SigRL checkpoint")


def test_figure_marks_follow_the_rule(tmp_path):
    """Known case: truth {cat, dog, sky}, top-3 (dog, car, sky): dog and sky blue, car red, cat struck."""
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    assert draw.marks(["cat", "dog", "sky"], ["dog", "car", "sky"]) == [
        ("dog", draw.BLUE, False), ("car", draw.RED, False), ("sky", draw.BLUE, False), ("cat", draw.BLACK, True)]
    picture, boxes = draw.figure_grid([(image, "x.jpg", ["cat", "dog", "sky"], ["dog", "car", "sky"])], "title")
    draw.save(picture, tmp_path / "f.png")
    pixels = np.asarray(Image.open(tmp_path / "f.png").convert("RGB")).astype(int)
    assert [(b[1], b[2], b[3]) for b in boxes] == [("dog", draw.BLUE, False), ("car", draw.RED, False),
                                                   ("sky", draw.BLUE, False), ("cat", draw.BLACK, True)]
    for _, name, colour, struck, (x0, y0, x1, y1) in boxes:
        patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
        near = lambda c: (np.abs(patch - np.array(c)).sum(1) < 60).sum()  # noqa: E731
        others = [c for c in (draw.BLUE, draw.RED) if c != colour]
        assert near(colour) >= 5 and all(near(c) == 0 for c in others), name
        mid = pixels[(y0 + y1) // 2, x0:x1]
        dark = (np.abs(mid - np.array(colour)).sum(1) < 60).mean()
        assert (dark > 0.9) == struck, (name, dark)  # a line right across the word only when struck


def test_eval_figure_png(setup, tmp_path):
    out = tmp_path / "fig.png"
    assert figure3.main(["--ckpt", str(setup["ckpt"]), "--out", str(out), "--n", "5", "--workers", "0"]) == 0
    side = 192
    assert Image.open(out).size[0] == 4 * (side + 2 * draw.PAD)  # 4 columns, 2 rows
    assert Image.open(out).size[1] > 2 * side
    wanted = [os.path.basename(setup["data"].test_paths[i]) for i in (3, 1)]
    assert figure3.main(["--ckpt", str(setup["ckpt"]), "--out", str(out), "--images", *wanted, "--workers", "0"]) == 0
    width, height = Image.open(out).size
    assert width >= 2 * (side + 2 * draw.PAD) and side < height < 2 * side  # one row (the title may be wider)


def test_plot_curves(tmp_path, capsys):
    records = [{"epoch": 0, "loss": {}, "zsl": {"map": 50.0}, "gzsl": {"map": 60.0}}] + [
        {"epoch": e, "loss": {"local": 1.0 / e, "global": 0.01 * e}, "zsl": {"map": 50.0 + e},
         "gzsl": {"map": 60.0 + e}, "branch_map": {"zsl": {"local": 30.0 + e, "global": 66.0}}} for e in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.main([str(tmp_path)]) == 0
    picture = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert picture.shape[:2] == (300 + 2 * (plot.draw.font(12).size + 6), 3 * 460)  # 2 loss panels + mAP
    colours = {tuple(p) for p in picture.reshape(-1, 3)}
    assert all(tuple(c) in colours for c in plot.PALETTE[:4])  # every mAP series drawn
    (tmp_path / "log.jsonl").write_text("{not json\n")
    one_line_error(capsys, plot.main([str(tmp_path)]), "log.jsonl:1")


def test_rows_chart_puts_each_row_at_its_value():
    """One dot per row and setting, at the row's mAP: the dot of the highest value is drawn highest."""
    rows = {"zero-shot CLIP": {"zsl": {"map": 61.0}, "gzsl": {"map": 65.0}},
            "SigRL, epoch 2": {"zsl": {"map": 59.0}, "gzsl": {"map": 70.0}}}
    picture = np.asarray(plot.rows_chart(rows).convert("RGB")).astype(int)
    mid = picture.shape[1] // 2  # ZSL's column is left of the middle, GZSL's right of it

    def dot_height(colour, columns):
        hits = np.argwhere((np.abs(picture[:, columns] - colour).sum(-1) == 0))
        return hits[:, 0].min()  # the top row of the dot (its label, drawn in the same colour, sits above it)

    blue, orange = plot.PALETTE[0], plot.PALETTE[1]
    assert dot_height(blue, slice(0, mid)) < dot_height(orange, slice(0, mid))  # ZSL: 61 above 59
    assert dot_height(orange, slice(mid, None)) < dot_height(blue, slice(mid, None))  # GZSL: 70 above 65


def test_offline_demo_writes_the_pictures(setup, monkeypatch, capsys):
    """`python predict.py` with no arguments, on a run that exists (the default one would be trained first)."""
    monkeypatch.setattr(predict, "DEMO_CKPT", str(setup["ckpt"]))
    assert predict.main(["--workers", "0"]) == 0
    run = setup["ckpt"].parent
    assert len(os.listdir(run / "explain")) == predict.DEMO_IMAGES and (run / "figure.png").is_file()
    out = capsys.readouterr().out
    assert out.count(": ") >= predict.DEMO_IMAGES and (run / "gallery" / "index.html").is_file()
    assert out.count(" [right]") + out.count(" [wrong]") == 5 * predict.DEMO_IMAGES  # each top-5 tag is marked
