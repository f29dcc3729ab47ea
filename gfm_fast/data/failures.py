"""Failure accounting for the streaming loader: every skipped shard or sample is warned about and counted.

The loader never stops on one bad shard or sample (large crawled datasets always hold some); it
counts them in ``loader.stats`` and stops only when failures follow each other without a good
sample between them (:class:`FailureCounter`), which means the input itself is broken.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

from gfm_fast.errors import TooManyFailures

STAT_KEYS = ("samples", "corrupt_samples", "failed_shards", "shards_read", "filtered_samples")
_WARN_FIRST = 10  # warnings per worker before rate limiting (counts are always exact)
_WARN_EVERY = 1000


class DataWarning(UserWarning):
    """A shard or sample was skipped (the loader counts it in ``loader.stats``)."""


def new_stats() -> Dict[str, int]:
    """Zeroed counters, one per ``STAT_KEYS`` entry."""
    return {key: 0 for key in STAT_KEYS}


class FailureCounter:
    """Warns about and counts every failed shard and corrupt sample; never fatal on its own.

    After ``limit`` failures in a row with no good sample between them it raises
    :class:`TooManyFailures`: all-corrupt input or unreachable shards must not spin forever.

    Args:
        stats: the counters to update (``failed_shards``, ``corrupt_samples``).
        limit: DataConfig.max_consecutive_failures.
        spec: the shard spec, quoted in the error.
    """

    def __init__(self, stats: Dict[str, int], limit: int, spec: str = ""):
        self.stats = stats
        self.limit = limit
        self.spec = spec
        self.consecutive = 0
        self._warned = 0

    def shard_failed(self, url: str, reason: Any) -> None:
        self._fail("failed_shards", f"shard {url}: {_describe(reason)}")

    def sample_corrupt(self, key: str, url: str, reason: Any) -> None:
        self._fail("corrupt_samples", f"sample {key!r} in {url}: {_describe(reason)}")

    def ok(self) -> None:
        self.consecutive = 0

    def _fail(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        self.consecutive += 1
        self._warned += 1
        if self._warned <= _WARN_FIRST or self._warned % _WARN_EVERY == 0:
            more = " (further warnings are rate-limited; loader.stats has exact counts)" if self._warned == _WARN_FIRST else ""
            warnings.warn(f"gfm_fast.data skipped {message}{more}", DataWarning, stacklevel=3)
        if self.consecutive >= self.limit:
            raise TooManyFailures(
                f"{self.consecutive} consecutive shard/sample failures (last: {message}); the input looks "
                f"unreadable or all-corrupt. Check data.shards={self.spec!r} (paths/URLs reachable? shards built "
                "by `python -m gfm_fast.data build`?) or raise data.max_consecutive_failures")


def _describe(reason: Any) -> str:
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
