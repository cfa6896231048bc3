"""A researcher's first run: a CLIP file with the official 49,408-token vocabulary, in an environment that
holds only requirements.txt (no open_clip, ftfy, transformers, h5py, ... and no $SIGRL_BPE), trains a step
and scores the zero-shot baseline, and docs/using.md's Python example runs on that run; the run folder says what
it used (config.json); --help shows every default; a forgotten --clip is named."""
import hashlib
import json
import os
import platform
import re
import subprocess
import sys

import torch

import fixtures_clip
import fixtures_data
from support import runs
import train
from support.clip_files import OFFICIAL_URL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed here for the tests (requirements-dev.txt), absent after `pip install -r requirements.txt`.
DEV_ONLY = ("open_clip", "open_clip_train", "ftfy", "regex", "torch_geometric", "sklearn", "timm",
            "transformers", "h5py", "safetensors", "pytest")
# Runs in the child: the finder of installed packages no longer sees the DEV_ONLY ones, so importing one fails
# and importlib.util.find_spec returns None, exactly as if they were not installed.
PRELUDE = """
import importlib.machinery, sys
DEV_ONLY = {dev_only!r}
class WithoutDevOnly(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in DEV_ONLY else super().find_spec(name, path, target)
sys.meta_path = [WithoutDevOnly if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.path.insert(0, {repo!r})
import train, eval
codes = [train.main({train_args!r}), eval.main({eval_args!r})]
# docs/using.md's Python example, on this run, this CLIP file and a photo, under the names it uses
import os, shutil
from PIL import Image
os.makedirs("example/runs/zsl-nuswide")
shutil.copy("run/last.pt", "example/runs/zsl-nuswide/last.pt")
os.symlink(os.path.abspath("ViT-tiny.pt"), "example/ViT-B-16.pt")
Image.new("RGB", (90, 60), (200, 120, 40)).save("example/photo.jpg")
os.chdir("example")
readme = open(os.path.join({repo!r}, "docs", "using.md")).read()
start = readme.index("```python", readme.index("Scoring your own images with a trained run"))
exec(readme[start + len("```python"):readme.index("```", start + 3)])
print("exit codes", codes, "dev-only modules loaded:", sorted(m for m in sys.modules if m.split(".")[0] in DEV_ONLY))
"""


def test_full_vocabulary_clip_trains_with_requirements_txt_only(tmp_path):
    fixtures_clip.make_clip_checkpoint(tmp_path / "ViT-tiny.pt", size="tiny", fmt="jit")  # vocab 49,408
    coco = fixtures_data.make_coco(tmp_path / "coco")
    data = ["--task", "spml", "--data", "coco", "--data-root", str(coco), "--clip", str(tmp_path / "ViT-tiny.pt")]
    train_args = [*data, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", "--workers", "0",
                  "--fix-layer", "1"]
    code = PRELUDE.format(dev_only=DEV_ONLY, repo=REPO, train_args=train_args, eval_args=["--baseline", "clip", *data])
    env = {k: v for k, v in os.environ.items() if k != "SIGRL_BPE"}
    env["SIGRL_CACHE"] = str(tmp_path / "cache")  # label embeddings are computed here, not read from a cache
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exit codes [0, 0] dev-only modules loaded: []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").exists() and os.listdir(tmp_path / "cache")
    # output captured = not a terminal: no progress bars, one line per epoch
    assert "\r" not in proc.stderr + proc.stdout and "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert sum(line.startswith("epoch 1:") for line in proc.stdout.splitlines()) == 1
    printed = re.findall(r"^[+-][01]\.\d{3}  (cat|dog|sofa)$", proc.stdout, re.M)  # the example's output
    assert sorted(printed) == ["cat", "dog", "sofa"], proc.stdout[-1500:]

    record = json.loads((tmp_path / "run" / "config.json").read_text())
    names = [line.strip() for line in open(os.path.join(REPO, "labels", "coco_80.txt")) if line.strip()]
    assert record["labels"] == {"count": 80, "train": 80,
                                "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    clip_file = tmp_path / "ViT-tiny.pt"
    assert record["clip"]["sha256"] == hashlib.sha256(clip_file.read_bytes()).hexdigest()
    assert record["clip"]["path"] == str(clip_file) and record["clip"]["official_openai_vit_b16"] is False
    assert record["config"]["batch_size"] == 16 and record["config"]["lr"] == 1e-5  # flag and preset, resolved
    assert record["versions"]["python"] == platform.python_version()
    assert record["versions"]["torch"] == torch.__version__


def test_help_shows_every_default():
    text = runs.parser().format_help()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["flag", "zsl/nuswide"])
    columns = lines[start].split()[1:]
    end = lines.index("", start)
    rows = [line.split() for line in lines[start + 1:end]]
    assert len(columns) == len(runs.PRESETS) and len(rows) >= 10 and {len(r) for r in rows} == {len(columns) + 1}
    for flag, *cells in rows:
        for preset, cell in zip(columns, cells):  # what the help says == what a run with that preset uses
            task, data = preset.split("/")
            cfg = runs.parse_args(["--task", task, "--data", data])
            assert cell == str(getattr(cfg, flag[2:].replace("-", "_"))), (flag, preset, cell)
    assert "--batch-size" in {r[0] for r in rows} and "--seed" not in {r[0] for r in rows}
    assert "random seed (default: 42)" in " ".join(text.split())


def test_missing_clip_names_the_flag(capsys, tmp_path):
    code = train.main(["--task", "spml", "--data", "coco", "--data-root", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--clip" in err and OFFICIAL_URL in err
