"""The encoders an evaluation compares: the user's models and the baselines beside them.

* ``model``: anything ``gfm_fast.load_model`` reads (or an encoder already in memory);
* ``random-init``: a seeded, randomly initialised encoder of the same architecture and input
  normalisation (what the features are worth without pretraining);
* ``teacher``: a plain Swin checkpoint, e.g. GFM's ImageNet-22k Swin-B teacher, loaded whole
  through ``load_model`` (all four stages and the final norm). For a multi-band student its RGB
  filters go to ``teacher_bands`` (the other bands' filters are zero) and it reads the student's
  normalised bands, as GFM's teacher does during pretraining (docs/method.md).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from gfm_fast.errors import GFMError
from gfm_fast.eval.datasets import EvalError
from gfm_fast.models.io import load_model
from gfm_fast.models.pretrainer import GFMPretrainer, GFMStudent
from gfm_fast.models.swin import EncoderConfig, build_student, encoder_config_of

__all__ = ["EvalModel", "resolve_models", "random_baseline", "load_teacher", "resolve_stage", "encoder_of"]

# Names that say nothing about which run a path is: labels then use the parent folder too.
_GENERIC_NAMES = ("model", "checkpoints", "latest", "mp_rank_00_model_states.pt", "model.safetensors")


@dataclass
class EvalModel:
    """One encoder to evaluate.

    Attributes:
        label: its name in the report (unique within a report).
        kind: ``model``, ``random-init`` or ``teacher``.
        source: the path it came from, or a description.
        config: its architecture and input normalisation.
        fingerprint: identifies its weights for the feature cache; None: not cached (in memory).
        make_encoder: returns the Swin encoder (eval mode); called once, on first use of
            ``encoder``, so a baseline whose features are cached is never built.
    """

    label: str
    kind: str
    source: str
    config: EncoderConfig
    fingerprint: Optional[str]
    make_encoder: Callable[[], nn.Module] = field(repr=False)

    @functools.cached_property
    def encoder(self) -> nn.Module:
        return self.make_encoder()

    @property
    def num_stages(self) -> int:
        return len(self.config.swin.depths)


def _ready(encoder: nn.Module) -> Callable[[], nn.Module]:
    return lambda: encoder


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: Union[str, os.PathLike]) -> str:
    """Path, size and modification time of a model file, or of every file under a model directory."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return _digest([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def encoder_of(model: Any) -> nn.Module:
    """The Swin encoder inside a pretrainer, a student, or the encoder itself."""
    model = getattr(model, "module", model)  # DeepSpeed engine / DDP wrapper
    if isinstance(model, GFMPretrainer):
        return model.student.encoder
    if isinstance(model, GFMStudent):
        return model.encoder
    if isinstance(model, nn.Module) and hasattr(model, "patch_embed") and hasattr(model, "layers"):
        return model
    raise EvalError(f"expected a model path, a Swin encoder, a GFMStudent or a GFMPretrainer, got "
                    f"{type(model).__name__}")


def _load(path: Union[str, os.PathLike], what: str, **overrides: Any) -> nn.Module:
    try:
        return load_model(path, **overrides)
    except (GFMError, ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"{what} {path}: cannot load it as a GFM model ({message}); pass a save_model directory, "
                        f"a training output directory, a GFM release or a Swin checkpoint") from None


def _labels(sources: Sequence[str]) -> List[str]:
    labels = []
    for source in sources:
        path = Path(source)
        label = path.name or str(path)
        if label in _GENERIC_NAMES and path.parent.name:
            label = f"{path.parent.name}/{label}"
        labels.append(label)
    return [f"{label} #{labels[:i + 1].count(label)}" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def resolve_models(models: Union[Any, Sequence[Any]]) -> List[EvalModel]:
    """The user's models, loaded: paths through ``load_model``, modules as they are.

    Raises:
        EvalError: a path that ``load_model`` cannot read (the message names it).
    """
    items = list(models) if isinstance(models, (list, tuple)) else [models]
    if not items:
        raise EvalError("no model given; pass --model MODEL (a model directory, run directory or checkpoint)")
    sources = [os.fspath(m) if isinstance(m, (str, os.PathLike)) else type(encoder_of(m)).__name__ for m in items]
    resolved = []
    for item, source, label in zip(items, sources, _labels(sources)):
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).exists():
                raise EvalError(f"--model {item} does not exist")
            encoder = _load(item, "--model")
            resolved.append(EvalModel(label, "model", source, encoder_config_of(encoder), file_fingerprint(item),
                                      _ready(encoder)))
        else:
            encoder = encoder_of(item)
            resolved.append(EvalModel(label, "model", source, encoder_config_of(encoder), None, _ready(encoder)))
    return resolved


def random_baseline(model: EvalModel, seed: int) -> EvalModel:
    """A randomly initialised encoder with ``model``'s architecture and normalisation (seeded; the
    global RNG is left untouched)."""
    config = EncoderConfig(model.config.swin, model.config.mean, model.config.std)

    def make_encoder() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_student(config.swin, dynamic_img_size=True)
        encoder.gfm_config = config
        return encoder.eval()

    fingerprint = _digest(["random-init", dataclasses.asdict(config.swin), config.mean, config.std, seed])
    return EvalModel("random-init", "random-init", f"seed {seed}", config, fingerprint,
                     make_encoder)


def load_teacher(path: Union[str, os.PathLike], student: EncoderConfig,
                 bands: Sequence[int] = (0, 1, 2)) -> EvalModel:
    """The teacher's own features as a baseline (see the module docstring).

    Args:
        path: a Swin checkpoint (official or timm layout), e.g. swin_base_patch4_window7_224_22k.pth.
        student: the evaluated model's config: its band count and mean/std for multi-band data.
        bands: the student bands the teacher's RGB filters read (multi-band students only).
    """
    if not Path(path).exists():
        raise EvalError(f"--teacher {path} does not exist")
    overrides = {}
    chans = student.swin.in_chans
    if chans != 3:
        bands = tuple(int(b) for b in bands)
        if len(bands) != 3 or not all(0 <= b < chans for b in bands):
            raise EvalError(f"teacher bands {bands} must be 3 indices in [0, {chans}) of the model's bands")
        overrides = dict(in_chans=chans, rgb_bands=bands, mean=student.mean, std=student.std)
    encoder = _load(path, "--teacher", **overrides)
    fingerprint = _digest(["teacher", file_fingerprint(path), overrides])
    return EvalModel(f"teacher {Path(path).name}", "teacher", os.fspath(path), encoder_config_of(encoder), fingerprint,
                     _ready(encoder))


def resolve_stage(stage: Optional[int], model: EvalModel) -> Optional[int]:
    """``stage`` as an index in [0, num_stages), or None for the last stage (the pooled feature).

    Raises:
        EvalError: the stage does not exist in this model.
    """
    count = model.num_stages
    if stage is None:
        return None
    if not -count <= stage < count:
        raise EvalError(f"--stage {stage} does not exist: {model.label} has {count} stages (0 to {count - 1}, or "
                        f"-1 for the last)")
    stage %= count
    return None if stage == count - 1 else stage
