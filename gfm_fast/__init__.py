"""gfm_fast: fast GFM (geospatial foundation model) pretraining and feature extraction.

Public surface (imported lazily so that ``import gfm_fast`` stays light):
``GFMPretrainer``, ``load_pretrainer``, ``save_model``, ``load_model``, ``extract_features``,
``evaluate``, ``train``, ``ops``, ``__version__``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GFMPretrainer": "gfm_fast.models.pretrainer",
    "load_pretrainer": "gfm_fast.models.io",
    "save_model": "gfm_fast.models.io",
    "load_model": "gfm_fast.models.io",
    "extract_features": "gfm_fast.features",
    "evaluate": "gfm_fast.eval",
    "train": "gfm_fast.training",
    "ops": "gfm_fast.ops",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gfm_fast' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module.endswith("." + name) else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
