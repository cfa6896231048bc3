"""Every command-line entry point follows the one-line rule: a missing file, a folder where a file is expected, a
corrupt file or a flag out of range is one line on stderr starting "error:", exit code 2, no traceback.

The cases call each command's main(argv) in this process (as its `python -m` line does), so the whole walk costs
about one torch import; a few run as real processes, to see the exit code the shell sees."""
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["train", "eval", "predict", "data", "tools.plot", "tools.figure3", "tools.twins", "tools.bench", "tools.ablation",
            "tools.bench_parallel", "tools.precision_check", "tools.gallery", "toy.pretrain", "toy.world", "toy.shapes", "support.clip_files",
            "support.tasks", "support.torchscript_files"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """missing: a path with nothing there; folder: an empty folder; corrupt.*: bytes of no format; image: a PNG."""
    d = tmp_path_factory.mktemp("bad")
    (d / "folder").mkdir()
    for ext in ("pt", "json", "npy", "png"):
        (d / f"corrupt.{ext}").write_bytes(b"\x00\x13 nothing of the kind \xff" * 7)
    (d / "corrupt.txt").write_bytes(b"\xff\xfe\x00 not UTF-8")
    for name in ("coco/annotations/instances_train2014.json", "coco/annotations/instances_val2014.json",
                 "run/log.jsonl"):
        os.makedirs(d / os.path.dirname(name), exist_ok=True)
        (d / name).write_text("{not json")
    os.makedirs(d / "goodrun")
    (d / "goodrun" / "log.jsonl").write_text(json.dumps({"epoch": 1, "loss": {"local": 1.0}, "test": {"map": 5}}) + "\n")
    (d / "nanrun").mkdir()
    (d / "nanrun" / "log.jsonl").write_text(json.dumps({"epoch": 1, "loss": {"local": "high"}}) + "\n")
    os.makedirs(d / "coco2" / "annotations")
    for split in ("train", "val"):  # JSON, but an id that is no integer
        (d / "coco2" / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"categories": [{"id": [1], "name": "cat"}], "annotations": [{"image_id": "x1", "category_id": 1}]}))
    from PIL import Image
    Image.new("RGB", (8, 8)).save(d / "image.png")
    np.save(d / "s.npy", np.zeros((3, 4), np.float32))
    return d


def cases(d):
    m, f, c = str(d / "missing"), str(d / "folder"), lambda ext: str(d / f"corrupt.{ext}")  # noqa: E731
    img = str(d / "image.png")
    return [
        ("train", ["--clip", m]), ("train", ["--clip", f]), ("train", ["--clip", c("pt")]), ("train", ["--epochs", "0"]),
        ("train", ["--resume", c("pt")]), ("train", ["--resume", f]),
        ("eval", ["--ckpt", m]), ("eval", ["--ckpt", f]), ("eval", ["--ckpt", c("pt")]),
        ("eval", ["--scores", c("npy"), "--labels", c("npy"), "--protocol", "spml"]),
        ("eval", ["--scores", str(d / "s.npy"), "--labels", f, "--protocol", "spml"]),
        ("tools.figure3", ["--ckpt", c("pt"), "--out", str(d / "f.png"), "--n", "0"]),
        ("tools.figure3", ["--ckpt", c("pt"), "--out", str(d / "f.png")]), ("tools.figure3", ["--ckpt", m, "--out", f]),
        ("tools.twins", ["--ckpt", m]), ("tools.twins", ["--ckpt", c("pt")]),
        ("tools.twins", ["--ckpt", c("pt"), "--json", f]),
        ("eval", ["--baseline", "clip", "--clip", c("pt")]),
        ("predict", ["--ckpt", m, img]), ("predict", ["--ckpt", f, img]), ("predict", ["--ckpt", c("pt"), img]),
        ("predict", ["--clip", c("pt"), "--labels", "a,b", img]), ("predict", ["--clip", f, "--labels", "a,b", img]),
        ("predict", ["--ckpt", c("pt"), img, "--top-k", "0"]), ("predict", ["--ckpt", c("pt"), m]),
        ("predict", ["--clip", c("pt"), "--labels-file", f, img]), ("predict", ["--clip", c("pt"), "--labels-file", c("txt"), img]),
        ("data", ["show", "coco", "--root", m]), ("data", ["show", "coco", "--root", c("json")]),
        ("data", ["show", "coco", "--root", str(d / "coco")]),
        ("data", ["show", "coco", "--root", str(d / "coco2")]), ("data", ["show", "voc", "--root", f]),
        ("data", ["show", "nuswide", "--root", f]), ("data", ["prepare", "coco", "--root", f, "--out", c("json")]),
        ("data", ["show", "coco"]), ("data", ["prepare", "voc", "--root", f, "--year", "1999"]),
        ("tools.plot", [m]), ("tools.plot", [c("json")]), ("tools.plot", [str(d / "run")]),
        ("tools.plot", [str(d / "goodrun"), "--out", f]), ("tools.plot", [str(d / "goodrun"), "--out", str(d / "goodrun" / "log.jsonl")]),
        ("tools.plot", [str(d / "nanrun")]),
        ("tools.bench", ["--threads", "0"]), ("tools.bench", ["--json", f]), ("tools.bench", ["--json", str(d / "missing" / "b.json")]),
        ("tools.bench", ["--device", "gpu"]), ("tools.gallery", [c("json")]), ("tools.gallery", ["a", "b"]),
        ("tools.ablation", ["--out", c("json")]), ("tools.ablation", ["--seeds", "-1"]), ("tools.ablation", ["--clip", m]),
        ("tools.precision_check", ["--threads", "0"]), ("tools.precision_check", ["--ckpt", m]),
        ("tools.precision_check", ["--ckpt", c("pt")]),
        ("tools.bench_parallel", ["--worker", "{not json"]), ("tools.bench_parallel", ["--worker", "[1, 2]"]),
        ("toy.pretrain", ["--out", c("json")]), ("toy.pretrain", ["--steps", "0"]), ("toy.pretrain", ["--vision-width", "100"]),
        ("toy.pretrain", ["--lr", "nan"]),
        ("toy.world", ["make", "--root", c("json")]), ("toy.world", ["make", "--root", m, "--n-train", "0"]),
        ("toy.world", ["zeroshot", "--clip", m]), ("toy.world", ["zeroshot", "--clip", c("pt")]),
        ("toy.world", ["zeroshot", "--clip", f]), ("toy.world", ["zeroshot", "--n", "0"]), ("toy.world", []),
        ("toy.shapes", [str(d / "missing" / "sheet.png")]), ("toy.shapes", [f]),
        ("support.clip_files", [m]), ("support.clip_files", [f]), ("support.clip_files", [c("pt")]),
        ("support.clip_files", [c("pt"), "--bpe", m]),
        ("support.torchscript_files", [m]), ("support.torchscript_files", [c("pt")]), ("support.torchscript_files", [f]),
        ("support.tasks", ["--task", "spml", "--data", "coco", "--data-root", m]), ("support.tasks", ["--epochs", "0"]),
        ("support.tasks", ["--task", "spml", "--data", "coco", "--data-root", str(d / "coco")]),
    ]


def test_every_entry_point_is_walked():
    """Every file with a main() run under `if __name__ == "__main__"` is in COMMANDS (a new command is walked too)."""
    found = set()
    for folder in ("", "tools", "toy", "support", "protocol"):
        for name in os.listdir(os.path.join(REPO, folder)):
            path = os.path.join(REPO, folder, name)
            if name.endswith(".py") and re.search(r"__main__.*\n(.*\n)*.*\bmain\(", open(path).read()):
                found.add(".".join(filter(None, (folder, name[:-3]))))
    assert found == set(COMMANDS), found ^ set(COMMANDS)


def test_bad_inputs_are_one_line_in_process(bad, capsys, monkeypatch):
    monkeypatch.setenv("SIGRL_CACHE", str(bad / "cache"))
    monkeypatch.chdir(bad)  # a default output (runs/..., sheet.png) lands here, not in the repository
    failures = []
    for module, argv in cases(bad):
        main = importlib.import_module(module).main
        try:
            rc = main(argv)
        except SystemExit as exit:  # what argparse does when it is not the project's parser
            rc = exit.code
        except Exception as err:  # noqa: BLE001, a traceback on the command line
            failures.append(f"{module} {argv}: raised {type(err).__name__}: {err}")
            capsys.readouterr()
            continue
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and
                 not line.startswith(("warning:", "checking images"))]
        if rc != 2 or len(lines) != 1 or not lines[0].startswith("error:"):
            failures.append(f"{module} {argv}: exit {rc}, stderr {err!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("argv", [["-m", "support.clip_files", "missing.pt"], ["-m", "tools.plot", "missing_run"],
                                  ["data.py", "show", "coco", "--root", "missing_root"]])
def test_bad_inputs_are_one_line_as_processes(argv, tmp_path):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "missing" in lines[0], lines


TOOLS = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "tools")) if name.endswith(".py") and name != "__init__.py")


@pytest.fixture
def unreadable_clip(monkeypatch):
    """Reading any CLIP file or dataset fails the test: what runs before them must not need them."""
    from support import clip_files, tasks

    def refuse(*args, **kw):
        raise AssertionError("a CLIP file or a dataset was read")
    monkeypatch.setattr(clip_files, "read_state_dict", refuse)
    monkeypatch.setattr(tasks, "load_dataset", refuse)


@pytest.mark.parametrize("module", ["train", "eval", "predict"])
def test_help_and_usage_errors_read_no_clip(module, bad, capsys, unreadable_clip):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit:
        main(["--help", "--clip", str(bad / "corrupt.pt")])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith("usage:") and "--clip" in out
    assert main(["--clip", str(bad / "corrupt.pt"), "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, needle", [
    (["--task", "zsl", "--data", "nuswide"], "--data nuswide needs --clip"),
    (["--task", "zsl", "--data", "nuswide", "--clip", "CORRUPT"], "--data nuswide needs --data-root"),
    (["--task", "zsl", "--data", "nuswide", "--clip", "MISSING", "--data-root", "FOLDER"], "MISSING: file not found"),
    (["--task", "spml", "--data", "coco", "--clip", "CORRUPT", "--data-root", "MISSING"], "MISSING: no such directory"),
])
def test_train_checks_clip_and_data_root_before_reading_either(argv, needle, bad, capsys, unreadable_clip):
    """python train.py --task zsl --data nuswide --clip ViT-B-16.pt without --data-root says so at once, without
    loading the CLIP file first (its 600 MB take most of a minute); so does eval.py --baseline."""
    names = {"CORRUPT": str(bad / "corrupt.pt"), "MISSING": str(bad / "missing"), "FOLDER": str(bad / "folder")}
    argv = [names.get(a, a) for a in argv]
    needle = needle.replace("MISSING", names["MISSING"])
    import eval as evaluation
    import train
    for main, args in ((train.main, argv + ["--out", str(bad / "run-out")]), (evaluation.main, ["--baseline", "clip"] + argv)):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not os.path.exists(bad / "run-out")


@pytest.mark.filterwarnings("ignore:'tools.:RuntimeWarning")  # runpy: the module was imported before, by others
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_prints_its_usage_and_writes_nothing(tool, tmp_path, monkeypatch, capsys):
    """python -m tools.NAME --help: its usage on stdout, exit 0, no file or folder written (tools.gallery once wrote
    a folder named --help)."""
    import runpy
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", "--help"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module(f"tools.{tool}", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert exit.value.code in (0, None) and out.startswith("usage:"), (exit.value.code, out[:200])
    assert os.listdir(tmp_path) == []


def test_data_py_alone_shows_the_preprocessing(tmp_path, monkeypatch, capsys):
    import data
    monkeypatch.chdir(tmp_path)
    assert data.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "zsl train:  (3, 224, 224)" in out[1] and "spml eval:  (3, 448, 448)" in out[4], out
    assert out[-1].startswith("datasets: python data.py prepare|show") and os.listdir(tmp_path) == []


def test_a_released_lock_leaves_no_file(tmp_path):
    """safe_io.locked: the lock file exists while held, is gone after (a finished run leaves no .lock with its
    PID), and the folder it created for nothing else is removed."""
    from support import safe_io
    run = tmp_path / "run"
    run.mkdir()
    with safe_io.locked(str(run)):
        assert (run / ".lock").read_text() == str(os.getpid())
        with pytest.raises(safe_io.WriteError, match=f"pid {os.getpid()}"):  # a second holder is refused
            with safe_io.locked(str(run)):
                pass
    assert os.listdir(run) == []
    with safe_io.locked(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()
