"""Pretraining weights: ``load_pretrainer`` rebuilds a whole GFM pretrainer (student, teacher,
projector, decoder) from a GFM release or one of our training checkpoints, and
``load_student_weights`` starts a run's student from saved weights (``model.student_weights``).
Both read every source ``load_model`` reads (``gfm_fast.models.io``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from gfm_fast.config import ModelConfig, SwinConfig
from gfm_fast.models.checkpoint import (DEFAULT_RGB_BANDS, CheckpointError, checkpoint_filter_fn, infer_swin_config,
                                        load_state_dict_strict, normalize_swin_keys, split_prefix)
from gfm_fast.models.io import _SWIN_FIELDS, PathLike, _check_not_partitioned, _read_source, _split_overrides
from gfm_fast.models.normalization import default_normalization
from gfm_fast.models.pretrainer import GFMPretrainer, GFMStudent

__all__ = ["load_pretrainer", "load_student_weights", "STUDENT_HEADS"]

STUDENT_HEADS = ("projector", "decoder")  # the student's parts beside its encoder


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
TEACHER_PREFIX = "teacher."


def load_pretrainer(path: PathLike, **overrides: Any) -> GFMPretrainer:
    """Build a ``GFMPretrainer`` from a GFM release file or one of our training checkpoints.

    The student (any Swin size) and, when ``teacher.*`` weights are present, the teacher are
    inferred from tensor shapes; the projector and decoder must be present.

    Args:
        path: GFM release file, DeepSpeed checkpoint directory/file, or training output directory.
        **overrides: ``ModelConfig`` fields (``teacher_weights`` when the checkpoint has no
            teacher, ``ops_backend``, ``alpha``, ``mean``/``std``, ``teacher``, ...) and student
            ``SwinConfig`` fields (``img_size``, ``window_size``, ...). Without a saved run config,
            each image size is the one its windows were built for (192 for GFM's window-6 student,
            224 for the window-7 teacher), ``teacher_bands`` all bands when student and teacher
            take as many (else it must be given), and mean/std ImageNet's for 3 bands or
            Sentinel-2's for 12 (``default_normalization``).

    Returns:
        The pretrainer, in training mode (the teacher always in eval).
    """
    arch, rest = _split_overrides(overrides)
    unknown = sorted(set(rest) - set(_MODEL_FIELDS))
    if unknown:
        raise TypeError(f"load_pretrainer got unknown override(s) {', '.join(unknown)}; valid: ModelConfig fields "
                        f"({', '.join(_MODEL_FIELDS)}) and student SwinConfig fields ({', '.join(_SWIN_FIELDS)})")
    source = _read_source(path, prefer_training=True)
    if source.encoder_config is not None:
        raise CheckpointError(f"{source.name} is an encoder-only model directory (no projector/decoder); use "
                              f"load_model for it, or pass the training checkpoint")
    state = source.state
    for part in ("encoder.", "projector.", "decoder."):
        if not any(k.startswith(part) for k in state):
            raise CheckpointError(f"{source.name} has no {part}* weights: not a GFM pretraining checkpoint "
                                  f"(expected encoder.*, projector.*, decoder.* and optionally teacher.*)")
    _check_not_partitioned(state, source.name)
    config = _pretrainer_config(state, source.model_config, arch, rest)
    # The checkpoint's teacher wins unless the caller names a teacher file explicitly.
    teacher_state = None if rest.get("teacher_weights") else (split_prefix(state, TEACHER_PREFIX) or None)
    if teacher_state is not None:
        config = dataclasses.replace(config, teacher_weights=None)
    config.validate("model")
    pretrainer = GFMPretrainer(config, teacher_state_dict=teacher_state)
    student = pretrainer.student
    encoder_state = checkpoint_filter_fn(split_prefix(state, "encoder."), student.encoder,
                                         rgb_bands=config.teacher_bands)
    load_state_dict_strict(student.encoder, encoder_state, source=f"{source.name} (encoder)")
    for name in STUDENT_HEADS:
        load_state_dict_strict(getattr(student, name), split_prefix(state, f"{name}."), source=f"{source.name} ({name})")
    return pretrainer


def _pretrainer_config(state: Dict[str, torch.Tensor], saved: Optional[ModelConfig], arch: Dict[str, Any],
                       rest: Dict[str, Any]) -> ModelConfig:
    """ModelConfig: the saved training config (if any), then shapes, then overrides."""
    base = saved if saved is not None else ModelConfig()
    rest = dict(rest)
    student_override = rest.pop("student", None)
    # Shapes decide the architecture; a whole student config or single fields may override it.
    # Without a saved config the image sizes are the ones the windows were built for (infer_swin_config).
    known = (dataclasses.asdict(student_override) if student_override is not None
             else {k: getattr(base.student, k) for k in ("img_size", "drop_path_rate")} if saved is not None else {})
    student = infer_swin_config(normalize_swin_keys(split_prefix(state, "encoder.")), **{**known, **arch})
    teacher = rest.pop("teacher", None)
    teacher_state = split_prefix(state, TEACHER_PREFIX)
    if teacher is None and teacher_state:
        teacher = infer_swin_config(normalize_swin_keys(teacher_state),
                                    **({"img_size": base.teacher.img_size} if saved is not None else {}))
    teacher = teacher if teacher is not None else base.teacher
    projector = state.get("projector.weight")
    if projector is not None and projector.shape[0] != teacher.num_features:
        raise CheckpointError(f"projector.weight {tuple(projector.shape)} maps to {projector.shape[0]} features but the "
                              f"teacher has {teacher.num_features}; pass teacher=SwinConfig(...) for this checkpoint")
    if "teacher_bands" not in rest:
        rest["teacher_bands"] = _teacher_bands(student, teacher, saved)
    if "mean" not in rest or "std" not in rest:
        fits = saved is not None and len(saved.mean) == len(saved.std) == student.in_chans
        mean, std = (saved.mean, saved.std) if fits else default_normalization(student.in_chans)
        rest.setdefault("mean", mean)
        rest.setdefault("std", std)
    return dataclasses.replace(base, student=student, teacher=teacher, **rest)


def _teacher_bands(student: SwinConfig, teacher: SwinConfig, saved: Optional[ModelConfig]) -> Tuple[int, ...]:
    """The student channels the teacher sees: the saved run's, else what the channel counts leave:
    all of them, in order, when both take as many (how GFM's reference runs multispectral input:
    the teacher gets all bands). A teacher taking fewer channels is a choice only the user can make.

    Raises:
        CheckpointError: the teacher takes fewer (or more) channels than the student.
    """
    if saved is not None and len(saved.teacher_bands) == teacher.in_chans and \
            all(0 <= b < student.in_chans for b in saved.teacher_bands):
        return tuple(saved.teacher_bands)
    if teacher.in_chans == student.in_chans:
        return tuple(range(student.in_chans))
    if teacher.in_chans > student.in_chans:
        raise CheckpointError(f"the teacher takes {teacher.in_chans} channels but the student only "
                              f"{student.in_chans}; pass teacher=SwinConfig(in_chans=...) for this checkpoint")
    raise CheckpointError(f"the teacher takes {teacher.in_chans} of the student's {student.in_chans} channels: pass "
                          f"teacher_bands=(...) with {teacher.in_chans} student channel indices (for Sentinel-2 "
                          f"L2A B1..B12, R, G, B are (3, 2, 1))")


def load_student_weights(student: GFMStudent, path: PathLike,
                         rgb_bands: Tuple[int, ...] = DEFAULT_RGB_BANDS) -> Tuple[str, ...]:
    """Start ``student`` from the weights at ``path`` instead of its random initialisation: anything
    ``load_model`` reads (a GFM release, a run or checkpoint of ours, a model directory, a plain
    Swin checkpoint).

    The encoder must fit: relative-position tables are interpolated to the student's window size
    and RGB weights widened into ``rgb_bands`` of a multi-band student; any other difference is an
    error naming the tensors. The projector and decoder are taken where the file has them in the
    student's shapes; otherwise (none saved, another teacher width, another channel count: a
    3-band release under a 12-band student) they keep their initialisation.

    Returns:
        What was loaded, e.g. ``("encoder", "projector", "decoder")``.
    """
    source = _read_source(path, prefer_training=True)
    state = source.state
    _check_not_partitioned(state, source.name)
    encoder_state = checkpoint_filter_fn(normalize_swin_keys(state), student.encoder, rgb_bands=rgb_bands)
    # Plain Swin checkpoints have no mask token; it keeps its initialisation.
    load_state_dict_strict(student.encoder, encoder_state, allowed_missing=(r"^mask_token$",),
                           source=f"{source.name} (encoder)")
    loaded = ["encoder"]
    for name in STUDENT_HEADS:
        part, own = split_prefix(state, f"{name}."), getattr(student, name).state_dict()
        if part.keys() == own.keys() and all(part[k].shape == own[k].shape for k in own):
            getattr(student, name).load_state_dict(part)
            loaded.append(name)
    return tuple(loaded)
