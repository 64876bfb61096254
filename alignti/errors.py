"""The one error type for bad configuration or input.

The CLI turns an `AlignTIError` into a single line on stderr and exit code 2, so a user
never sees a traceback for something that is their input's fault. Raise it at boundaries
(config, cache open, corpus rows); inside, trust the data.
"""

from __future__ import annotations


class AlignTIError(Exception):
    """Bad configuration or input: reported as one line, exit code 2, nothing touched."""

    exit_code = 2


def check_min(minimum: int, **options: int | float | None) -> None:
    """An AlignTIError naming every option (a config field name) below `minimum`; None is an option
    left unset, which is fine."""
    bad = [f"--{name.replace('_', '-')} {v}" for name, v in options.items() if v is not None and v < minimum]
    if bad:
        raise AlignTIError(f"must be >= {minimum}: {', '.join(bad)}")
