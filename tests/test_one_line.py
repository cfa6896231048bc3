"""One line, never a traceback, for the inputs a user gets wrong: a label that does not fit the prompt template,
a damaged thresholds file (checked entry by entry before any image is scored), JSON nested too deep, and Ctrl-C
in every command."""
import argparse
import importlib
import json

import numpy as np
import pytest

import eval as eval_cli
import predict
import train as train_cli
from support import thresholds
from test_entry_points import COMMANDS
from test_untrusted import called, one_line_in, untrained  # noqa: F401  (untrained: the module's fixture)
from tools import ablation
from toy import world as toyworld
from toy import world as toy_world_cli


def test_labels_are_checked_inside_the_prompt_template(untrained, tmp_path, capsys):
    """A label that fits CLIP's 77 tokens alone but not inside the template, and a --template too long for any
    label (predict.py, train.py): one line each (predict.py's were ValueError
    tracebacks)."""
    clip, photos = untrained["clip"], untrained["photos"]
    n = 1
    while len(clip.tokenizer.encode(" ".join(["car"] * (n + 1)))) + 2 <= 77:
        n += 1  # the longest run of "car" that fits alone
    label = " ".join(["car"] * n)
    assert len(clip.tokenizer.encode(f"There is a {label} in the scene")) + 2 > 77
    rc, out, err = called(predict.main, capsys, "--clip", toyworld.TOYCLIP, "--labels", f"sun,{label}", photos)
    one_line_in(rc, err, "car car", "77")
    long = "a photo of " + "very " * 80 + "{}"
    rc, out, err = called(predict.main, capsys, "--clip", toyworld.TOYCLIP, "--labels", "sun,mug", "--template", long,
                          photos)
    one_line_in(rc, err, "--template", "77")
    assert out == ""
    data = ["--data", "nuswide", "--data-root", untrained["cfg"].data_root, "--clip", toyworld.TOYCLIP, "--workers", 0]
    rc, out, err = called(train_cli.main, capsys, "--task", "zsl", *data, "--template", long, "--out", tmp_path / "run")
    one_line_in(rc, err, "--template", "77")
    assert not (tmp_path / "run").exists()


def thresholds_file(untrained, path, drop=None):
    names = untrained["names"]
    fitted = {"threshold": np.zeros(len(names)), "f1": np.zeros(len(names)), "positives": np.zeros(len(names)),
              "source": ["global"] * len(names), "global_threshold": 0.0, "global_f1": 0.0}
    rec = thresholds.record(names, fitted, thresholds.checkpoint_entry(untrained["ckpt"], 0), {"about": "a test"})
    if drop:
        del rec[drop]
    path.write_text(json.dumps(rec))
    return path


@pytest.mark.parametrize("damage", ["checkpoint", "split", "deep"])
def test_thresholds_file_is_validated_before_scoring(untrained, tmp_path, capsys, damage):
    """A thresholds file without its "checkpoint" or "split" entry (KeyError tracebacks; "split" only after the
    whole test split was scored), or nested 100,000 deep (RecursionError): one line before any image is scored."""
    path = tmp_path / "t.json"
    if damage == "deep":
        path.write_text("[" * 100000)
    else:
        thresholds_file(untrained, path, drop=damage)
    needle = "t.json" if damage == "deep" else f'"{damage}"'
    rc, out, err = called(predict.main, capsys, "--ckpt", untrained["ckpt"], "--thresholds", path, untrained["photos"])
    one_line_in(rc, err, needle)
    rc, out, err = called(eval_cli.main, capsys, "--ckpt", untrained["ckpt"], "--thresholds", path, "--workers", 0)
    one_line_in(rc, err, needle)
    assert "%|" not in err and out == ""  # nothing was scored


def test_whole_thresholds_file_still_reads(untrained, tmp_path):
    table, rec = thresholds.read(thresholds_file(untrained, tmp_path / "t.json"))
    assert list(table) == untrained["names"] and rec["split"]["about"] == "a test"


def test_deeply_nested_toyworld_json_is_written_again(tmp_path, capsys):
    root = tmp_path / "world"
    assert called(toy_world_cli.main, capsys, "make", "--root", root, "--n-train", 2, "--n-test", 2)[0] == 0
    (root / "toyworld.json").write_text("[" * 100000)
    rc, _, err = called(toy_world_cli.main, capsys, "make", "--root", root, "--n-train", 2, "--n-test", 2)
    assert rc == 0 and "Traceback" not in err, err
    assert json.loads((root / "toyworld.json").read_text())["n_train"] == 2


def test_ctrl_c_while_ablation_writes_the_world(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(toyworld, "_write_world", interrupted)
    rc, _, err = called(ablation.main, capsys, "--out", tmp_path / "abl", "--data-root", tmp_path / "world",
                        "--workers", 0)
    one_line_in(rc, err, "interrupted")


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_is_one_line_in_every_command(command, capsys, monkeypatch):
    """Ctrl-C at the first thing each command does (reading its flags): one line, exit 2."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", interrupted)
    argv = ["--help"] if command == "data" else []  # data.py with no argument is a demo that reads no flag
    rc, _, err = called(importlib.import_module(command).main, capsys, *argv)
    one_line_in(rc, err, "interrupted")


