"""Argument types shared by the benchmark commands: a bad value is argparse's one-line usage error
(exit status 2) before anything is built, not a traceback from deep inside a run."""
from __future__ import annotations

import argparse
from typing import Callable

from gfm_fast.errors import ConfigError
from gfm_fast.features import check_device


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (1 for batches and timed runs, 0 for warm-up)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its message
    return parse


def _number(text: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must {rule}, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    return _number(text, lambda value: 0 < value <= 1, "lie in (0, 1]")


def positive_number(text: str) -> float:
    """An argparse type: a number > 0."""
    return _number(text, lambda value: value > 0, "be > 0")


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``), checked
    by the same rule as ``extract_features``."""
    try:
        parsed = check_device(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    return text
