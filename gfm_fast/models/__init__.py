"""GFM models on timm's Swin: masked student, frozen teacher, pretrainer, checkpoints and model files.

Importing this package registers the ``gfm_swin_*`` variants with timm (``timm.create_model``).
"""
from gfm_fast.models.checkpoint import CheckpointError, checkpoint_filter_fn
from gfm_fast.models.io import load_model, load_pretrainer, save_model
from gfm_fast.models.pretrainer import GFMOutput, GFMPretrainer, GFMStudent, param_groups
from gfm_fast.models.swin import (EncoderConfig, GFMSwinTransformer, MaskedPatchEmbed, build_student,
                                  split_at_last_merging)
from gfm_fast.models.teacher import FrozenTeacher

__all__ = ["GFMOutput", "GFMPretrainer", "GFMStudent", "param_groups", "GFMSwinTransformer", "MaskedPatchEmbed",
           "EncoderConfig", "build_student", "split_at_last_merging", "FrozenTeacher", "CheckpointError",
           "checkpoint_filter_fn", "save_model", "load_model", "load_pretrainer"]
