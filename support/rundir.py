"""The run directory: RUN_DIR/log.jsonl, best.pt and last.pt, written so that a crash loses nothing.

One process at a time: a second train.py on the same --out is refused (safe_io.locked). Every file is
replaced atomically, and at the end of epoch E they are written in this order:

    log.jsonl (records 0..E)  ->  best.pt (epoch E, if it is the best so far)  ->  last.pt (epoch E)

so whatever prefix of these writes a SIGKILL, a power cut or a full disk allows, last.pt holds a whole epoch
E-1 or E, and --resume makes the rest agree with it: log.jsonl is cut back to last.pt's epoch (the epoch after
it is trained again), and the best epoch is read from best.pt itself, so a best.pt written just before the
crash is neither lost nor named wrongly. A log.jsonl with a damaged line refuses the resume in one line and is
left as it is. `--overwrite` removes the old run's files only when everything else
has been checked, just before the first step.
"""
import json
import os

from support import safe_io
from support.checkpoints import load_run_checkpoint
from support.paths import FOLDER, check_outputs
from support.errors import UsageError

FILES = ("last.pt", "best.pt", "log.jsonl", "config.json")  # last.pt first: without it there is no run to resume


class RunDir:
    def __init__(self, path, resume=None):
        self.path = str(path)
        self.saved = None if resume is None else resume["state"]["epoch"]  # the epoch last.pt holds
        self.records = []  # log.jsonl, one dict per evaluated epoch
        self.phase = "before the first epoch"  # for the line printed on Ctrl-C
        self.started = False  # True once start() has changed the folder

    def file(self, name):
        return os.path.join(self.path, name)

    def check(self, resuming, overwrite, inputs=()):
        """Before anything is loaded: --out is (or can become) a writable folder, none of the files written into
        it is one of `inputs` ((what, path): the CLIP file), and a new run does not silently replace an old one."""
        drawn = ("curves.png", "rows.png")
        check_outputs([("--out", self.path, FOLDER)] + [("--out", self.file(name)) for name in FILES + drawn], inputs)
        last = self.file("last.pt")
        if resuming:
            self._read_log()  # a damaged log stops the resume here, before the model is built or a file changed
        if not resuming and os.path.exists(last) and not overwrite:
            raise UsageError(f"{last} exists: pass --resume {last} to continue it, --out NEW_DIR, or --overwrite")

    def locked(self):
        return safe_io.locked(self.path)

    def start(self, resume, overwrite):
        """Under the lock, once everything is validated: clear what dead writers left; a new run with
        --overwrite removes the old run's files; a resumed one cuts the log back to its checkpoint's epoch."""
        safe_io.remove_leftovers(self.path)
        self.started = True
        if resume is None:
            for name in FILES if overwrite else ():
                if os.path.exists(self.file(name)):
                    os.remove(self.file(name))
            return
        on_disk = self._read_log()
        self.records = [r for r in on_disk if r.get("epoch", 0) <= self.saved]
        if self.records != on_disk:
            self._write_log()

    def best_on_disk(self, recorded):
        """The best epoch as best.pt records it (it may be one epoch ahead of last.pt after a crash between
        the two); `recorded` is last.pt's belief."""
        path = self.file("best.pt")
        if not os.path.exists(path):
            if recorded is not None:
                print(f"warning: {path} is missing; the best epoch so far ({recorded['epoch']}) is forgotten")
            return None
        best = load_run_checkpoint(path)["state"]["best"]
        if best != recorded:
            print(f"{path} holds epoch {best['epoch']} (val mAP {best['val_map']:.2f}), written just before the "
                  f"previous run stopped: it stays the best epoch so far")
        return best

    def log(self, record):
        """Write a record that has no checkpoint (epoch 0: the model before any step)."""
        self.records.append(record)
        self._write_log()

    def end_epoch(self, record, ckpt, improved, save):
        """Write epoch E's record, best.pt (when improved), then last.pt; `save(ckpt, path)` writes a checkpoint."""
        self.records.append(record)
        self._write_log()
        if improved:
            save(ckpt, self.file("best.pt"))
        save(ckpt, self.file("last.pt"))
        self.saved = record["epoch"]

    def stopped(self, what, resumable=True):
        """One line for a run that stopped early: what happened and what last.pt holds."""
        last = self.file("last.pt")
        if self.saved is None:
            return f"{what}; no epoch was saved, so there is nothing to resume"
        if not resumable:
            return f"{what}; {last} holds epoch {self.saved}, the last good one"
        return f"{what}; {last} holds epoch {self.saved}; continue with --resume {last}"

    def _read_log(self):
        """The records of log.jsonl. The log is replaced whole at each write, so a line that is not one JSON record
        with an epoch (cut short, a stray byte, edited) is damage: the resume is refused, the log kept as it is,
        and no intact record dropped (they used to be, from the first bad line on)."""
        path, records = self.file("log.jsonl"), []
        if not os.path.exists(path):
            return records
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)):
                    raise ValueError("not a record with an integer 'epoch'")
            except (ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError; nesting too deep
                raise UsageError(f"{path}:{n}: not a whole log record ({' '.join(str(err).split())[:80]}); the log "
                                 f"is left as it is: repair or delete that line (one epoch's JSON record a line), "
                                 f"then --resume again") from None
            records.append(record)
        return records

    def _write_log(self):
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        safe_io.atomic_write(self.file("log.jsonl"), lambda f: f.write(text.encode("utf-8")))
