"""Progress on long loops, for a terminal and for a log file alike.

On a terminal, stderr shows tqdm's bar, which redraws itself in place. A redirected log (`python train.py >
log.txt`, a cluster job's output file) cannot use a bar: it would hold thousands of carriage-return updates, or
nothing at all. So whenever stdout or stderr is not a terminal, a plain line goes to stdout every 10% of the loop
and at least once a minute: where it is, the last numbers the loop reported (set_postfix), the rate and the ETA.

    for step in progress(plan, "epoch 1/2", unit="step"):
        ...
        bar.set_postfix({"local": 0.41})

A single item can take longer than a minute (a batch of ViT-B/16 on a busy CPU), and a step that is no loop
(loading a CLIP file, encoding the label prompts) says nothing while it works; in both, a line that says what is
still running comes at least once a minute (`working(desc)` for a step that is no loop).
"""
import contextlib
import os
import sys
import threading
import time

from tqdm import tqdm

EVERY_FRACTION = 0.1  # a line at each 10% of the loop ...
EVERY_SECONDS = 60.0  # ... and at least once a minute between them,
# but none before the loop has run this long: a loop of a few seconds (checking a handful of photos, a test's
# one-step epoch) says nothing, so a command's output, or its one-line error, is not buried in progress lines.
# SIGRL_PROGRESS_AFTER=0 in the environment prints every line however short the loop (the tests use it).
QUIET_SECONDS = float(os.environ.get("SIGRL_PROGRESS_AFTER", "5"))


def _plural(unit):
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _clock(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Lines:
    """Iterates like its iterable and, after each item's work is done, prints a line when 10% more of the
    loop is done or a minute has passed since the last line, once the loop has run QUIET_SECONDS. `clock` and
    `out` are for the tests."""

    def __init__(self, iterable, desc, total=None, unit="it", out=None, clock=time.monotonic):
        self.iterable, self.desc, self.unit, self.clock = iterable, desc, unit, clock
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.out = out if out is not None else sys.stdout
        self.postfix, self.quiet = {}, QUIET_SECONDS

    def set_postfix(self, values):
        self.postfix = dict(values)

    def line(self, done, now, start):
        rate = done / max(now - start, 1e-9)  # items per second since the loop started
        units = _plural(self.unit)
        where = f"{done}/{self.total} {units} ({100 * done / self.total:.0f}%)" if self.total else f"{done} {units}"
        numbers = "".join(f", {k} {v}" for k, v in self.postfix.items())
        eta = f", ETA {_clock((self.total - done) / rate)}" if self.total and rate > 0 else ""
        return f"{self.desc}: {where}{numbers}, {rate:.2f} {self.unit}/s{eta}"

    def __iter__(self):
        start = last = self.clock()
        step = max(1, round(self.total * EVERY_FRACTION)) if self.total else None
        finished, printed = [0], [time.monotonic()]  # items done, when the last line was printed

        where = lambda: f"{self.desc}: {finished[0]}/{self.total or '?'} {_plural(self.unit)} done"  # noqa: E731
        # an item that takes more than a minute is not silent either
        with working(where, out=self.out, last_line=lambda: printed[0]):
            for done, item in enumerate(self.iterable, 1):
                yield item  # the caller does the item's work (and set_postfix) before the loop comes back here
                finished[0] = done
                now = self.clock()
                at_mark = step is not None and (done % step == 0 or done == self.total)
                if (at_mark or now - last >= EVERY_SECONDS) and now - start >= self.quiet:
                    print(self.line(done, now, start), file=self.out, flush=True)
                    last, printed[0] = now, time.monotonic()


@contextlib.contextmanager
def working(desc, out=None, last_line=None):
    """Around a step that may take minutes: whenever EVERY_SECONDS pass without a line, until it ends, a line `desc,
    still working after M:SS` (desc: a string, or a function giving one then). Nothing for a step that ends within
    the first. last_line: when (time.monotonic) the caller last printed a line of its own (a loop's progress)."""
    out, start, stop = out if out is not None else sys.stderr, time.monotonic(), threading.Event()
    own = [start]

    def beat():
        while not stop.wait(EVERY_SECONDS / 12):  # checked often, so the gap never grows past a minute
            latest = max(own[0], last_line() if last_line is not None else own[0])
            if time.monotonic() - latest >= EVERY_SECONDS:
                text = desc() if callable(desc) else desc
                print(f"{text}, still working after {_clock(time.monotonic() - start)}", file=out, flush=True)
                own[0] = time.monotonic()

    thread = threading.Thread(target=beat, daemon=True)  # daemon: a crash in the step is never held up by it
    thread.start()
    try:
        yield
    finally:
        stop.set()


class Progress:
    """tqdm's bar on a terminal's stderr, plain lines on a stdout or stderr that is not a terminal (both when
    only one of them is: the log gets the lines, the terminal the bar)."""

    def __init__(self, iterable, desc, total=None, unit="it", out=None):
        bar = tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, disable=None)
        self.bar = bar
        logged = not (sys.stdout.isatty() and sys.stderr.isatty())
        self.lines = Lines(bar, desc, total=total if total is not None else getattr(bar, "total", None),
                           unit=unit, out=out) if logged else None

    def set_postfix(self, values):
        self.bar.set_postfix(values)
        if self.lines is not None:
            self.lines.set_postfix(values)

    def __iter__(self):
        return iter(self.lines if self.lines is not None else self.bar)


def progress(iterable, desc, total=None, unit="it", out=None):
    """out: where the plain lines go (default stdout; stderr for a loop whose command prints its results on stdout)."""
    return Progress(iterable, desc, total=total, unit=unit, out=out)
