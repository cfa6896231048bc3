"""support/progress.py: what a redirected log shows of a long loop (a line each 10% and at least once a minute)."""
import io
import time

from support import progress
from support.progress import Lines


class FakeClock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_a_line_each_tenth_with_rate_and_eta():
    out = io.StringIO()
    bar = Lines(range(20), "epoch 1/2", unit="step", out=out, clock=FakeClock(0.5))  # 2 steps/s
    bar.quiet = 0.0  # a line from the first 10% on, however short the loop
    for i in bar:
        bar.set_postfix({"loss": f"{1 / (i + 1):.2f}"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # after steps 2, 4, ..., 20
    assert lines[0] == "epoch 1/2: 2/20 steps (10%), loss 0.50, 2.00 step/s, ETA 0:09"
    assert lines[-1].startswith("epoch 1/2: 20/20 steps (100%), loss 0.05, 2.00 step/s, ETA 0:00")


def test_a_slow_loop_still_reports_every_minute():
    out = io.StringIO()
    for _ in Lines(range(1000), "eval", unit="batch", out=out, clock=FakeClock(30.0)):  # 30 s a batch
        pass
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval: 2/1000 batches (0%), 0.03 batch/s, ETA 8:19:00")
    assert len(lines) == 500  # every second batch: a minute has passed


def test_no_length_no_percent():
    out = io.StringIO()
    for _ in Lines(iter(range(3)), "images", out=out, clock=FakeClock(61.0)):
        pass
    assert out.getvalue().splitlines()[0].startswith("images: 1 its, 0.02 it/s")


def test_a_short_loop_says_nothing():
    """Before QUIET_SECONDS (5 s) nothing is printed: a few photos checked, or a one-line error, stay uncluttered."""
    out = io.StringIO()
    for _ in Lines(range(10), "checking images", out=out, clock=FakeClock(0.4)):  # 4 s in all
        pass
    assert out.getvalue() == ""
    out = io.StringIO()
    for _ in Lines(range(20), "epoch 1/2", unit="step", out=out, clock=FakeClock(0.5)):  # 10 s: the second half
        pass
    assert [line.split(":")[1].split("(")[0].strip() for line in out.getvalue().splitlines()] == \
        ["10/20 steps", "12/20 steps", "14/20 steps", "16/20 steps", "18/20 steps", "20/20 steps"]


def wait_for(condition, limit=5.0):
    """Poll until condition() holds (True) or `limit` seconds pass (False)."""
    end = time.monotonic() + limit
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_a_long_first_item_and_a_long_step_are_not_silent(monkeypatch):
    """An item that outlasts the line interval (a slow first batch), and a step that is no loop, each print a line
    saying what is still running before they end; a step that ends within the interval prints nothing."""
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.05)
    out = io.StringIO()
    for i in Lines(range(3), "test", unit="batch", out=out):
        if i == 0:
            wait_for(out.getvalue)  # the first batch's work lasts until a line has come
    assert out.getvalue().startswith("test: 0/3 batches done, still working after 0:00"), out.getvalue()
    out = io.StringIO()
    with progress.working("encoding 5 labels", out=out):
        assert wait_for(out.getvalue)
    assert out.getvalue().startswith("encoding 5 labels, still working after 0:00"), out.getvalue()
    monkeypatch.setattr(progress, "EVERY_SECONDS", 60.0)
    out = io.StringIO()
    with progress.working("loading", out=out):
        pass
    assert out.getvalue() == ""
