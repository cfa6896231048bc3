"""A researcher's first run: a CLIP file with the official 49,408-token vocabulary, in an environment that
holds only requirements.txt (no open_clip, ftfy, transformers, h5py, ... and no $SIGRL_BPE), trains a step
and scores the zero-shot baseline."""
import os
import subprocess
import sys

import fixtures_clip
import fixtures_data

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
