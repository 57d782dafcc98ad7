"""What a long loop shows while it runs: a tqdm bar on a terminal, plain lines in a log.

``Progress(total, desc, unit, enabled)``: ``enabled`` True = a tqdm bar, False = nothing, None =
a bar when stderr is a terminal, else plain lines on stderr (a log never stays silent for
more than ``LINE_SECONDS`` while the loop advances): one at the first step, then one whenever
``LINE_SECONDS`` have passed since the last, and one at the end, e.g.

    extract test mobilenet_v2: 320/538 img (59%), 12.3 img/s, elapsed 0:26, about 0:18 left
    fit demo: 60/60 epoch (100%), 1.9 epoch/s, elapsed 0:31, done (loss=0.024, val_R=0.591)
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

LINE_SECONDS = 20.0  # longest gap between two plain progress lines while the loop advances, seconds


def clock_text(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A progress display over ``total`` steps (see the module docstring); a context manager.

    ``update(n)`` advances, ``set_postfix(**values)`` attaches values (loss, recall) to the bar or
    to the next line, ``close()`` ends (and prints the last line)."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool | None = None, initial: int = 0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 every: float = LINE_SECONDS):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.clock, self.every = clock, every
        self.start = self.last = clock()
        self.first_done = initial
        self.postfix = ""
        self.bar = None
        self.lines = False
        if enabled or (enabled is None and _is_terminal(self.stream)):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)
        elif enabled is None:
            self.lines = True
        self.printed = False
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.done < self.total and (not self.printed or self.clock() - self.last >= self.every):
            self._line()  # the last step's line is printed by close()

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.done > self.first_done:
            self._line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self, final: bool = False) -> None:
        now = self.clock()
        elapsed = now - self.start
        steps = self.done - self.first_done
        rate = steps / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {rate:.3g} {self.unit}/s, " \
               f"elapsed {clock_text(elapsed)}"
        if final:
            text += ", done" if self.done >= self.total else ", stopped"
        elif rate > 0 and self.total:
            text += f", about {clock_text((self.total - self.done) / rate)} left"
        if self.postfix:
            text += f" ({self.postfix})"
        print(text, file=self.stream, flush=True)
        self.last, self.printed = now, True


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
