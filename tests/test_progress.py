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


def test_fast_bar_in_a_log_is_one_final_line(clock):
    log = io.StringIO()
    bar = progress_bar(total=10_000, desc="fast", unit="step", file=log)
    for _ in range(10_000):
        clock.t += 2 ** -9  # 19.5 s in all, under LINE_SECONDS
        bar.update(1)
        bar.set_postfix(loss="0.1")  # extract and distill set a postfix on every update
    bar.close()
    (line,) = lines(log.getvalue())
    assert line.startswith("fast: 100% 10000/10000 [00:19<00:00") and "loss=0.1" in line


def test_slow_bar_in_a_log_writes_a_line_per_tenth(clock):
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="slow", file=log):
        clock.t += 1.0  # 1,000 s in all: a tenth every 100 s, past LINE_SECONDS
    out = lines(log.getvalue())
    assert len(out) == 11, out  # after LINE_SECONDS, then a line per tenth, then the end
    assert "30/1000" in out[0] and "130/1000" in out[1] and "930/1000" in out[-2] and "1000/1000" in out[-1]
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
    assert n * step / QUIET_SECONDS - 1 <= len(out) <= n * step / QUIET_SECONDS + 2, len(out)


def test_bar_without_total_in_a_log_writes_every_line_seconds(clock):
    log = io.StringIO()
    bar = progress_bar(desc="stream", unit="sample", file=log)
    for _ in range(300):
        clock.t += 1.0
        bar.update(1)
    bar.close()
    out = lines(log.getvalue())
    assert len(out) == 300 / LINE_SECONDS and "300sample" in out[-1], out


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
