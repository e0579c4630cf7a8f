"""The one exception type users see.

Every mistake a user can make (a bad key, a missing file, an impossible batch layout) is raised as
:class:`FlatlmError` with a message that names the problem and the fix. The CLI prints it on one
line and exits with status 2; nothing else is caught, so real bugs keep their tracebacks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlatlmError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
