"""progress_bar(): in a log (a non-TTY stream) a bounded number of plain lines, however often it is updated."""

import io

import pytest
import tqdm.std

from alignti.progress import LINE_SECONDS, QUIET_SECONDS, progress_bar


class Clock:
    """A fake time.time for tqdm: advances only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(tqdm.std, "time", c)  # tqdm reads its clock from here when a bar is made
    return c


def lines(text: str) -> list[str]:
    assert "\r" not in text and text.endswith("\n")
    out = text.splitlines()
    assert all(line.strip() for line in out), out  # no blank lines
    return out


def test_fast_bar_in_a_log_is_a_first_and_a_last_line(clock):
    log = io.StringIO()
    bar = progress_bar(total=10_000, desc="fast", unit="step", file=log)
    for _ in range(10_000):
        bar.update(1)
        bar.set_postfix(loss="0.1")  # extract and distill set a postfix on every update
    bar.close()
    first, last = lines(log.getvalue())
    assert first.startswith("fast:") and "0/10000" in first
    assert "10000/10000" in last and "100%" in last


def test_slow_bar_in_a_log_writes_a_line_per_tenth(clock):
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="slow", file=log):
        clock.t += 1.0  # 1,000 s in all: a tenth every 100 s, past LINE_SECONDS
    out = lines(log.getvalue())
    assert 11 <= len(out) <= 12, out  # first, ten tenths (the last one may be the end)
    assert "1000/1000" in out[-1] and sum("1000/1000" in line for line in out) == 1
    assert all("<" in line for line in out)  # elapsed<remaining: the ETA


def test_long_bar_in_a_log_still_writes_every_quiet_seconds(clock):
    log = io.StringIO()
    n, step = 100_000, 0.5  # 50,000 s: a tenth takes 5,000 s
    bar = progress_bar(total=n, desc="long", file=log)
    for _ in range(n):
        clock.t += step
        bar.update(1)
    bar.close()
    out = lines(log.getvalue())
    assert len(out) <= 2 + n * step / QUIET_SECONDS + 1, len(out)
    assert len(out) >= n * step / QUIET_SECONDS - 1, len(out)


def test_bar_without_total_in_a_log_writes_every_line_seconds(clock):
    log = io.StringIO()
    bar = progress_bar(desc="stream", unit="sample", file=log)
    for _ in range(300):
        clock.t += 1.0
        bar.update(1)
    bar.close()
    out = lines(log.getvalue())
    assert abs(len(out) - (2 + 300 / LINE_SECONDS)) <= 2, out


def test_leave_false_still_ends_a_log_on_the_final_state(clock):
    log = io.StringIO()
    for _ in progress_bar(range(50), desc="corpus", leave=False, file=log):
        pass
    assert "50/50" in lines(log.getvalue())[-1]


def test_terminal_gets_plain_tqdm():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    bar = progress_bar(total=3, desc="tty", file=term)
    assert type(bar) is tqdm.std.tqdm
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()  # redrawn in place
