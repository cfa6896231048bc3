"""The book reads as a book: one training step runs in the chapters, no module imports another round a circle, the
chapters never import tools/, `import data` loads no CLIP reader, and train.py's first screen shows the recipe
the flags really default to."""
import ast
import os
import subprocess
import sys
import threading

import torch

import train
from support import runs
from support.rundir import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ["vit.py", "clip_text.py", "gat.py", "sigrl.py", "data.py", "train.py", "eval.py"]


def repo_file(path):
    """The repository-relative path of a source file of the project (not its tests), else None."""
    path = os.path.abspath(path)
    if not os.path.isfile(path) or not path.startswith(REPO + os.sep) or path.endswith("test_reading.py"):
        return None
    rel = os.path.relpath(path, REPO)
    if rel.startswith(("tests" + os.sep, ".")) or "site-packages" in rel.split(os.sep):
        return None  # the tests, and a virtual environment inside the checkout (CI's .venv-ci) are not the project
    return rel


def test_one_training_step_runs_in_train_sigrl_gat_vit_and_one_more_file(tmp_path):
    """From the first training forward to the return of the first optimiser step, the Python functions that run
    live in at most 5 repository files (train.py, sigrl.py, gat.py, vit.py and one more), and loss.backward() and
    opt.step() are called from train.py itself."""
    cfg = runs.parse_args(["--world-train", "64", "--world-test", "16", "--epochs", "1", "--data-root",
                           str(tmp_path / "world"), "--out", str(tmp_path / "run")])
    run_dir = RunDir(cfg.out, None)
    with run_dir.locked():
        run = train.build(cfg, None, run_dir, torch.device("cpu"))
    plan = train.epoch_plan(run.train_set.labels, cfg, 0)[:1]
    batches = iter(train.epoch_loader(run.train_set, plan, cfg, 0))
    steps = [[(next(batches), share) for _, share in step] for step in plan]  # loaded before the window opens

    files, callers, window = set(), {}, {"open": False, "closed": False}

    def profile(frame, event, arg):
        if window["closed"] or event != "call":
            return
        code, here = frame.f_code, frame.f_code.co_filename
        if not window["open"]:
            window["open"] = code.co_name == "forward" and here.endswith(os.sep + "sigrl.py")
            if not window["open"]:
                return
        mine = repo_file(here)
        if mine:
            files.add(mine)
        caller = frame.f_back
        if caller is not None and repo_file(caller.f_code.co_filename):
            if here.endswith(os.path.join("torch", "_tensor.py")) and code.co_name == "backward":
                callers.setdefault("backward", set()).add(repo_file(caller.f_code.co_filename))
            if os.sep + os.path.join("torch", "optim") + os.sep in here:
                callers.setdefault("step", set()).add(repo_file(caller.f_code.co_filename))
                window["closed"] = True  # the optimiser step is the last thing in the window

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        train.train_one_epoch(run, steps, 1)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert window["open"] and window["closed"], window
    assert callers == {"backward": {"train.py"}, "step": {"train.py"}}, callers
    assert {"train.py", "sigrl.py", "vit.py", "gat.py"} <= files, files
    assert len(files) <= 5, sorted(files)


def imports_of(path):
    """The repository modules that `path` imports anywhere in it (function-level imports included)."""
    modules = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules |= {f"{node.module}.{a.name}" for a in node.names}
    return modules


def module_graph():
    files = {}
    for folder in ("", "support", "protocol", "tools", "toy"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py") and name != "__init__.py" and not name.startswith("test_"):
                files[".".join(filter(None, (folder, name[:-3])))] = os.path.join(REPO, folder, name)
    return {m: sorted(imports_of(path) & set(files) - {m}) for m, path in files.items()}


def test_no_import_circle():
    graph, state, circles = module_graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                circles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not circles, [" -> ".join(c) for c in circles]


def test_chapters_and_commands_but_predict_import_nothing_of_tools():
    graph = module_graph()
    for chapter in CHAPTERS:
        m = chapter[:-3]
        assert not [n for n in graph[m] if n.startswith("tools.")], (m, graph[m])
    assert graph["support.errors"] == [], "the errors module is a leaf"


def test_import_data_loads_no_clip_reader():
    code = "import sys, data; print(' '.join(sorted(m for m in sys.modules if m.startswith('support'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=120, check=True).stdout.split()
    assert "support.clip_files" not in loaded and "support.tokenizer" not in loaded, loaded


def test_train_py_first_screen_shows_the_recipe_the_flags_default_to():
    """The recipe table in train.py's docstring is what --task/--data give (support/runs.py's Config and PRESETS)."""
    doc = train.__doc__.splitlines()
    head = next(i for i, line in enumerate(doc) if line.split()[:2] == ["flag", "zsl/nuswide"])
    columns = [tuple(c.split("/")) for c in doc[head].split()[1:]]
    rows = 0
    for line in doc[head + 1:]:
        cells = line.split()
        if not cells or not cells[0].startswith("--") or len(cells) != len(columns) + 1:
            break
        flag = cells[0][2:].replace("-", "_")
        for (task, data), shown in zip(columns, cells[1:]):
            cfg = runs.parse_args(["--task", task, "--data", data])
            assert float(shown) == float(getattr(cfg, flag)), (flag, task, data, shown, getattr(cfg, flag))
        rows += 1
    assert rows >= 8 and doc.index(doc[head]) < 25  # on the first screen


def test_one_shape_legend_for_the_book():
    """vit.py, the first chapter, gives the book's legend in full, and README.md gives the same block."""
    def block(text):
        start = text.index("Shape legend (one for the whole book")
        return [line.strip() for line in text[start:].split("not a width.")[0].splitlines()]
    assert block(open(os.path.join(REPO, "vit.py")).read()) == block(open(os.path.join(REPO, "README.md")).read())
    for chapter in ("clip_text.py", "gat.py", "sigrl.py", "data.py"):  # each names the letters it uses
        assert "Shape legend: the book's one legend" in open(os.path.join(REPO, chapter)).read(), chapter
