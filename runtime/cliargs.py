"""What the command lines share: the number types of their arguments and the one-line form of an error.

``number(cast, minimum, strict)`` is an argparse ``type`` that reads ``cast(text)`` and refuses a value below
``minimum`` (``strict``: at or below it) and a non-finite one, in argparse's words (``argument --top-k: must be
>= 1, got 0``). The CLIs use the four instances below.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(cast: type = int, minimum: float = 1, strict: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``cast(text)``, refused unless ``>= minimum`` (``> minimum`` when ``strict``) and finite."""
    kind = "a whole number" if cast is int else "a number"
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind} {bound}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{cast.__name__} {bound}"  # argparse names the type in some messages
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, strict=True)
non_negative_float = number(float, 0)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


__all__ = ["non_negative_float", "non_negative_int", "number", "one_line", "positive_float", "positive_int"]
