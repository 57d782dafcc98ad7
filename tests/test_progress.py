"""Progress in a log: plain lines at the first step, at least every LINE_SECONDS while the loop
advances, and at the end; a bar only on a terminal; nothing when switched off."""

from __future__ import annotations

import io

from pipeline.progress import LINE_SECONDS, Progress, clock_text


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_when_stderr_is_not_a_terminal():
    out, clock = io.StringIO(), Clock()
    with Progress(10, "extract test enc", "img", stream=out, clock=clock) as bar:
        for _ in range(10):
            clock.t += 5.0  # 5 s per step: a line at the first step, then every LINE_SECONDS
            bar.update()
            bar.set_postfix(loss="0.100")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("extract test enc: 1/10 img (10%), 0.2 img/s, elapsed 0:05, about 0:45 left")
    assert lines[-1].startswith("extract test enc: 10/10 img (100%)") and ", done (loss=0.100)" in lines[-1]
    assert len(lines) == 2 + int(45 // LINE_SECONDS)  # first, every 20 s of the 45 s after it, last
    assert "\r" not in out.getvalue()  # no bar control characters in a log


def test_no_output_when_switched_off_and_a_stopped_loop_says_so():
    out = io.StringIO()
    with Progress(5, "fit run", "epoch", enabled=False, stream=out) as bar:
        bar.update(5)
    assert out.getvalue() == ""
    out, clock = io.StringIO(), Clock()
    bar = Progress(5, "fit run", "epoch", stream=out, clock=clock)
    clock.t += 1
    bar.update(2)
    bar.close()
    bar.close()  # closing twice prints once
    assert out.getvalue().splitlines()[-1].endswith("elapsed 0:01, stopped")
    assert len(out.getvalue().splitlines()) == 2


def test_clock_text():
    assert clock_text(75.2) == "1:15" and clock_text(3725) == "1:02:05" and clock_text(-3) == "0:00"
