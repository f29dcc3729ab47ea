"""On-disk feature cache: a second evaluation of the same models on the same data skips extraction.

An entry is keyed by a digest of everything the features depend on: the model file (path, size,
modification time; for baselines their architecture, seed or teacher file), the data listing
(names, labels, file sizes and times), the input size, the stage, the device type (bf16 on CUDA)
and the feature format version. Entries are ``<key>.pt`` files read with
``torch.load(weights_only=True)``; a damaged entry is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["FeatureCache", "default_cache_dir"]

FEATURE_VERSION = 1  # bump when preprocessing or pooling changes, so old entries are not reused
# A write's temporary file older than this was left by a killed process (a write takes seconds),
# not one another evaluation is writing now.
STALE_TEMPORARY_S = 3600


def default_cache_dir() -> Path:
    """``$GFM_FAST_CACHE/eval``, else ``$XDG_CACHE_HOME/gfm_fast/eval``, else ``~/.cache/gfm_fast/eval``."""
    if os.environ.get("GFM_FAST_CACHE"):
        return Path(os.environ["GFM_FAST_CACHE"]) / "eval"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gfm_fast" / "eval"


class FeatureCache:
    """Features by key in ``directory``; ``directory=None`` disables caching.

    Args:
        directory: where entries live (created on the first write).
    """

    def __init__(self, directory: Optional[Union[str, os.PathLike]]):
        self.directory = Path(directory) if directory is not None else None

    @staticmethod
    def key(**parts: Any) -> str:
        """A digest of ``parts`` (JSON-serialisable) and the feature format version."""
        text = json.dumps({"version": FEATURE_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: Optional[str]) -> Optional[torch.Tensor]:
        """The cached features, or None (disabled, no key, absent or unreadable)."""
        if self.directory is None or key is None or not self._path(key).is_file():
            return None
        try:
            entry = torch.load(self._path(key), map_location="cpu", weights_only=True)
            return entry["features"]
        except Exception as exc:  # truncated or foreign file: recompute rather than fail
            warnings.warn(f"ignoring unreadable feature cache entry {self._path(key)}: {exc}", UserWarning)
            return None

    def save(self, key: Optional[str], features: torch.Tensor) -> None:
        """Store ``features`` atomically (write to a temporary file, then rename). A cache that cannot
        be written (a read-only home, a full disk) is a warning, then no cache: it only saves time."""
        if self.directory is None or key is None:
            return
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
            handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
            os.close(handle)
            torch.save({"features": features.contiguous()}, temporary)
            os.replace(temporary, self._path(key))
        except OSError as exc:
            warnings.warn(f"feature cache {self.directory} cannot be written ({exc}); continuing without it "
                          f"(choose another with --cache-dir, or --no-cache)", UserWarning)
            self.directory = None
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writes a SIGKILL cut short (a whole feature matrix each)."""
        for path in self.directory.glob(".*.tmp"):
            try:
                if time.time() - path.stat().st_mtime > STALE_TEMPORARY_S:
                    path.unlink()
            except FileNotFoundError:  # another evaluation removed it first
                pass
