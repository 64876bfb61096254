"""The one error type for bad configuration or input.

The CLI turns an `AlignTIError` into a single line on stderr and exit code 2, so a user
never sees a traceback for something that is their input's fault. Raise it at boundaries
(config, cache open, corpus rows); inside, trust the data.
"""

from __future__ import annotations


class AlignTIError(Exception):
    """Bad configuration or input: reported as one line, exit code 2, nothing touched."""

    exit_code = 2
