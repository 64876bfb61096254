"""Progress bars that read well both in a terminal and in a log: every bar in alignti is `progress_bar(...)`.

On a terminal it is plain tqdm, redrawn in place. Written to a file or a pipe (`alignti demo > log`,
a batch job's output), tqdm would append every redraw to the log, up to ten a second, each behind a
carriage return. There a bar writes plain lines (counts, rate, ETA; no bar glyphs): the first once
it has run LINE_SECONDS, then one each time another tenth of its total is done, at least
LINE_SECONDS after the previous line, with one at least every QUIET_SECONDS while it advances
(without a total: one every LINE_SECONDS), and always a last one when it ends. A bar that ends
within LINE_SECONDS is that one line; any bar with a total is at most about a dozen lines, however
often it is updated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LINE_SECONDS = 30.0  # the least time between two lines of a bar in a log
QUIET_SECONDS = 600.0  # the most, while the bar advances (a tenth of a long run can take hours)


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             file: TextIO | None = None, **kwargs: Any) -> tqdm:
    """tqdm over `iterable` (or updated by hand) on `file` (stderr by default), for a terminal or a log.

    `kwargs` are tqdm's (`initial`, `disable`, `leave`, `postfix`...); in a log `leave` is ignored:
    a log cannot erase a line, so the bar always ends on its final state.
    """
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True, **kwargs)
    kwargs.pop("leave", None)
    # ncols=0: counts and rates only; mininterval: how often tqdm offers a redraw to LogBar.refresh
    return LogBar(iterable, desc=desc, total=total, unit=unit, file=_Lines(stream), ncols=0, mininterval=1.0,
                  **kwargs)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A log as a bar's output: each redraw one plain line. tqdm starts a redraw with a carriage
    return and pads it with spaces to cover the previous one, and writes bare line ends and
    carriage returns to leave or clear the bar; in a log all of that is noise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        line = s.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class LogBar(tqdm):
    """tqdm that lets a redraw through only when the module docstring's rule says a line is due.

    Every redraw but the last goes through `refresh` (after `update`, `set_postfix`, tqdm's monitor
    thread), so the rule holds however the caller drives the bar; `close` writes the final line
    unless the last line already showed it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._line: tuple[float, float] | None = None  # (n, time) when the last line was written
        super().__init__(*args, **kwargs)

    def refresh(self, nolock: bool = False, lock_args: tuple | None = None) -> bool | None:
        if self.disable or not hasattr(self, "start_t"):  # tqdm's own first redraw, from __init__
            return None
        now = self._time()
        last_n, last_t = self._line if self._line is not None else (self.initial, self.start_t)
        done, waited = self.n - last_n, now - last_t
        tenth = self._line is None or not self.total or done >= self.total / 10 or waited >= QUIET_SECONDS
        if waited < LINE_SECONDS or not tenth or done <= 0:
            return False
        self._line = (self.n, now)
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def close(self) -> None:
        if self._line is not None and self._line[0] == self.n:
            self.leave = False  # nothing new since the last line: write no copy of it
        super().close()  # with leave: the final line
