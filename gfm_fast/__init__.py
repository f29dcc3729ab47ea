"""gfm_fast: fast GFM (geospatial foundation model) pretraining and feature extraction.

Public surface (imported lazily so that ``import gfm_fast`` stays light):
``GFMPretrainer``, ``load_pretrainer``, ``save_model``, ``load_model``, ``extract_features``,
``evaluate``, ``train``, ``ops``, ``losses``, ``masking``, ``__version__``.

The ``gfm_swin_*`` names join timm's registry (``timm.create_model``) as soon as timm is imported:
now if it already is, else right after its own import (timm 1.0 offers no plugin entry point).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from gfm_fast._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "GFMPretrainer": "gfm_fast.models.pretrainer",
    "load_pretrainer": "gfm_fast.models.pretrainer_io",
    "save_model": "gfm_fast.models.io",
    "load_model": "gfm_fast.models.io",
    "extract_features": "gfm_fast.features",
    "evaluate": "gfm_fast.eval",
    "train": "gfm_fast.training",
    "ops": "gfm_fast.ops",
    "losses": "gfm_fast.losses",
    "masking": "gfm_fast.masking",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, extra=["__version__"])


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Registers the ``gfm_swin_*`` names once timm has been imported, without importing it first
    (timm and torch take seconds; ``import gfm_fast`` stays light)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module("gfm_fast.models.registry")

        spec.loader.exec_module = exec_then_register
        return spec


def _register_with_timm() -> None:
    if "timm" in sys.modules:
        importlib.import_module("gfm_fast.models.registry")
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


_register_with_timm()
