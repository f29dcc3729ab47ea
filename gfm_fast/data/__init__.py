"""GeoPile data: the streaming WebDataset loader (train.py) and, separately, the shard builder.

Training code imports only the loader surface::

    from gfm_fast.data import make_loader, sample_shards

Loader files: shards.py (shard specs and order), pipeline.py (one worker's webdataset stages),
failures.py (skipped shards and samples), loader.py (epochs, resume), decode.py and augment.py
(one image). The builder (geopile.py, build_scan.py, build_write.py, manifest.py) runs as
``python -m gfm_fast.data build``; nothing here imports it. Names resolve lazily, so the builder
(and its worker processes) do not pay for importing torch and the loader.
"""
from __future__ import annotations

from gfm_fast._lazy import lazy_attributes

_LAZY = {
    "make_loader": "gfm_fast.data.loader",
    "GeoPileLoader": "gfm_fast.data.loader",
    "sample_shards": "gfm_fast.data.shards",
    "resolve_shards": "gfm_fast.data.shards",
    "DataWarning": "gfm_fast.data.failures",
    "TooManyFailures": "gfm_fast.errors",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
