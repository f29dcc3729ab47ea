"""GeoPile data: the streaming WebDataset loader (train.py) and, separately, the shard builder.

Training code imports only this module's loader surface::

    from gfm_fast.data import make_loader, sample_shards

The builder lives in ``gfm_fast.data.geopile`` and is run as ``python -m gfm_fast.data build``;
it is never imported from here, so training does not load it.
"""
from gfm_fast.data.shards import (DataWarning, GeoPileLoader, TooManyFailures, make_loader, resolve_shards,
                                  sample_shards)

__all__ = ["DataWarning", "GeoPileLoader", "TooManyFailures", "make_loader", "resolve_shards", "sample_shards"]
