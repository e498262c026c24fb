"""The one exception the exporter raises for anything the user can fix."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(Exception):
    """An export cannot be done; the message is one line that says what was wrong and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    lines = _ANSI.sub("", str(e)).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from ...`` chain (where the real reason usually is)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e
