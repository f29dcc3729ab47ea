"""GFM models on timm's Swin: masked student, frozen teacher, pretrainer, checkpoints and model files.

Importing this package registers the ``gfm_swin_*`` variants with timm (``timm.create_model``);
the rest is imported on first use, so that registering stays light (no fused ops, no Triton).
"""
from __future__ import annotations

from gfm_fast._lazy import lazy_attributes

import gfm_fast.models.registry  # noqa: F401  (registers the timm names)

_LAZY = {
    "GFMOutput": "gfm_fast.models.pretrainer",
    "GFMPretrainer": "gfm_fast.models.pretrainer",
    "GFMStudent": "gfm_fast.models.pretrainer",
    "param_groups": "gfm_fast.models.pretrainer",
    "GFMSwinTransformer": "gfm_fast.models.swin",
    "MaskedPatchEmbed": "gfm_fast.models.swin",
    "EncoderConfig": "gfm_fast.models.swin",
    "build_student": "gfm_fast.models.swin",
    "split_at_last_merging": "gfm_fast.models.swin",
    "FrozenTeacher": "gfm_fast.models.teacher",
    "CheckpointError": "gfm_fast.models.checkpoint",
    "checkpoint_filter_fn": "gfm_fast.models.checkpoint",
    "save_model": "gfm_fast.models.io",
    "load_model": "gfm_fast.models.io",
    "load_pretrainer": "gfm_fast.models.pretrainer_io",
    "load_student_weights": "gfm_fast.models.pretrainer_io",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, extra=["registry"])
