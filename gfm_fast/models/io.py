"""Model files: ``save_model`` / ``load_model`` for the student encoder (``load_pretrainer`` for the
whole GFM pretrainer: ``gfm_fast.models.pretrainer_io``).

A model directory holds ``model.safetensors`` (the student encoder's timm-layout weights, mask
token included) and ``config.json`` (architecture, input channels, image size, mean/std, model
name). ``load_model`` also reads, without unpickling code:

* a training run: its output directory with an exported ``model/`` directory, or a DeepSpeed
  checkpoint directory (``<dir>/latest`` naming ``<dir>/<tag>/mp_rank_00_model_states.pt``, whose
  ``module`` holds ``GFMStudent`` keys ``encoder.*``, ``projector.*``, ``decoder.*``), or that file;
* the GFM release layout: a file whose ``model`` holds ``encoder.*`` (official Swin layout),
  ``teacher.*``, ``decoder.*``, ``projector.*`` plus possibly non-tensor entries;
* a plain Swin checkpoint (official or timm layout).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, ModelConfig, SwinConfig, from_dict
from gfm_fast.models.checkpoint import (DEFAULT_RGB_BANDS, CheckpointError, checkpoint_filter_fn, infer_swin_config,
                                        load_state_dict_strict, normalize_swin_keys, read_checkpoint,
                                        unwrap_state_dict)
from gfm_fast.models.pretrainer import GFMPretrainer, GFMStudent
from gfm_fast.models.swin import EncoderConfig, GFMSwinTransformer, build_student, encoder_config_of
from gfm_fast.models.timm_format import (GFM_KEY, is_timm_config, read_timm_config, timm_config_json,
                                         timm_state_dict)
from gfm_fast.models.normalization import SENTINEL2_L2A_MEAN, SENTINEL2_L2A_STD, default_normalization
from gfm_fast.run_dir import CHECKPOINT_CONFIG_FILE, CHECKPOINT_DIR, LATEST_FILE, MODEL_DIR, newest_complete

__all__ = ["save_model", "load_model", "remove_stale_staging", "MODEL_FILE", "CONFIG_FILE",
           "SENTINEL2_L2A_MEAN", "SENTINEL2_L2A_STD"]

PathLike = Union[str, os.PathLike]
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "gfm_fast.encoder"
FORMAT_VERSION = 1
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"
_SWIN_FIELDS = tuple(f.name for f in dataclasses.fields(SwinConfig))
_NORMALIZATION = ("mean", "std")
LAYOUTS = ("gfm_fast", "timm")



# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def _encoder_of(model: nn.Module) -> nn.Module:
    """The student encoder inside a pretrainer, a student, a DeepSpeed engine, or the encoder itself."""
    model = getattr(model, "module", model)  # DeepSpeed engine / DDP wrapper
    if isinstance(model, GFMPretrainer):
        return model.student.encoder
    if isinstance(model, GFMStudent):
        return model.encoder
    if hasattr(model, "patch_embed") and hasattr(model, "layers"):
        return model
    raise TypeError(f"save_model expects a GFMPretrainer, GFMStudent or Swin encoder, got {type(model).__name__}")


def _is_our_model_dir(path: Path) -> bool:
    """True for a directory written by ``save_model`` (and nothing else in it)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    ours = isinstance(config, dict) and (config.get("format") == FORMAT or
                                         (config.get(GFM_KEY) or {}).get("format") == FORMAT)
    return ours and {p.name for p in path.iterdir()} <= {MODEL_FILE, CONFIG_FILE}


def _config_json(config: EncoderConfig) -> Dict[str, Any]:
    from gfm_fast import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_name": config.model_name,
            "architecture": json.loads(json.dumps(dataclasses.asdict(config.swin))),
            "mean": list(config.mean), "std": list(config.std), "gfm_fast_version": __version__}


def save_model(model: nn.Module, path: PathLike, *, layout: str = "gfm_fast") -> Path:
    """Write the student encoder and its config to the directory ``path`` (created atomically).

    Args:
        model: ``GFMPretrainer``, ``GFMStudent`` (or a DeepSpeed engine around it), or an encoder.
        path: target directory. It may not exist yet, be empty, or be a model directory written
            earlier by ``save_model`` (replaced); anything else is refused, never overwritten.
        layout: ``"gfm_fast"`` (our ``config.json``; weights with the mask token) or ``"timm"``
            (timm's model-directory format: plain timm loads it with
            ``timm.create_model("local-dir:" + path)``, no gfm_fast needed; see ``timm_format``).
            ``load_model`` reads both.

    Returns:
        The directory path, holding ``model.safetensors`` and ``config.json``.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"save_model: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    target = Path(path)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or _is_our_model_dir(target))):
        raise FileExistsError(f"{target} exists and is not a gfm_fast model directory; refusing to overwrite it. "
                              f"Choose a new path or remove it first")
    encoder = _encoder_of(model)
    config = encoder_config_of(encoder)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = _config_json(config)
    if layout == "timm":
        state = timm_state_dict(state)
        meta = timm_config_json(config.swin, config.mean, config.std, model_name=config.model_name, format_tag=FORMAT)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "tmp"), dir=target.parent))
    try:
        save_file(state, str(staging / MODEL_FILE), metadata={"format": "pt", "gfm_fast": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _apply_umask(staging)
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _staging_prefix(target: Path, kind: str) -> str:
    """Beside ``target``: ``.<name>.tmp-*`` holds a model being written, ``.<name>.old-*`` the one it replaces."""
    return f".{target.name}.{kind}-"


def remove_stale_staging(path: PathLike) -> List[Path]:
    """Remove what a ``save_model(path)`` killed outright (SIGKILL, the OOM killer) left beside it:
    its staging and retired directories, a whole model each (350 MB for Swin-B). Only while
    ``path`` holds a model, so never the one copy of one, and only for its single writer (a
    training run for its ``model/``): another writer's save in progress would go too.

    Returns:
        The directories removed.
    """
    target = Path(path)
    if not (target / MODEL_FILE).is_file():
        return []
    stale = [p for kind in ("tmp", "old") for p in target.parent.glob(_staging_prefix(target, kind) + "*")]
    for directory in stale:
        shutil.rmtree(directory, ignore_errors=True)
    return stale


def _apply_umask(directory: Path) -> None:
    """The permissions a plain mkdir / open would give under the process umask: mkdtemp makes the
    staging directory 0700 (and safetensors its file 0600), which would keep colleagues on a
    shared cluster from loading the model."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an old target is renamed away first and removed only after."""
    if not target.exists():
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "old"), dir=target.parent))
    os.rename(target, retired / target.name)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired / target.name, target)  # put the old model back
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading any supported source
# --------------------------------------------------------------------------------------------

def _training_tag_dir(directory: Path) -> Optional[Path]:
    """The DeepSpeed checkpoint (tag) directory ``directory`` designates: itself when it holds
    ``mp_rank_00_model_states.pt``, else the newest complete checkpoint of a run or checkpoints
    directory (by its marker, see ``gfm_fast.run_dir``), else the tag its ``latest`` file names
    (DeepSpeed checkpoints written by other tools have no marker)."""
    if (directory / DEEPSPEED_MODEL_STATES).is_file():
        return directory
    complete = newest_complete(directory)
    if complete is not None:
        return complete
    for root in (directory, directory / CHECKPOINT_DIR):
        latest = root / LATEST_FILE
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (root / tag).is_dir():
                raise CheckpointError(f"{latest} names tag {tag!r} but {root / tag} does not exist")
            return root / tag
    return None


def _parse_model_config(data: Any) -> Optional[ModelConfig]:
    """A ModelConfig from a TrainConfig or ModelConfig dict (or its JSON text); None if it is not one."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    data = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(data, dict) or "student" not in data:
        return None
    try:
        return from_dict(ModelConfig, dict(data), prefix="model")
    except (ConfigError, TypeError, ValueError):
        return None


def _training_config(checkpoint: Any, states_file: Path) -> Optional[ModelConfig]:
    """The ModelConfig a training run stored: ``gfm_config.json`` beside the DeepSpeed files, or the
    client state's ``gfm_config`` (JSON text) / ``config`` (dict)."""
    beside = states_file.parent / CHECKPOINT_CONFIG_FILE
    if beside.is_file():
        config = _parse_model_config(beside.read_text())
        if config is not None:
            return config
    if isinstance(checkpoint, dict):
        for key in ("gfm_config", "config"):
            config = _parse_model_config(checkpoint.get(key))
            if config is not None:
                return config
    return None


class _Source:
    """A weights source resolved to a flat state dict, plus any config stored with it."""

    def __init__(self, state: Dict[str, torch.Tensor], name: str, encoder_config: Optional[EncoderConfig] = None,
                 model_config: Optional[ModelConfig] = None):
        self.state, self.name = state, name
        self.encoder_config, self.model_config = encoder_config, model_config


def _is_model_dir(directory: Path) -> bool:
    if not (directory / CONFIG_FILE).is_file():
        return False
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError:
        return True  # ours by name; _read_model_dir reports the broken JSON
    return not isinstance(meta, dict) or meta.get("format") == FORMAT or "architecture" in meta


def _read_model_dir(directory: Path) -> _Source:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from exc
    timm_dir = is_timm_config(meta)
    if not timm_dir and (not isinstance(meta, dict) or meta.get("format") != FORMAT):
        raise CheckpointError(f"{directory / CONFIG_FILE} is neither a gfm_fast model config (format {FORMAT!r}) "
                              f"nor a timm one (architecture + pretrained_cfg)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer gfm_fast (format version "
                              f"{meta['format_version']} > {FORMAT_VERSION}); upgrade gfm_fast")
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no {MODEL_FILE}")
    try:
        if timm_dir:
            swin, mean, std = read_timm_config(meta, str(directory))
            config = EncoderConfig(swin, tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD),
                                   (meta.get(GFM_KEY) or {}).get("model_name", ""))
        else:
            swin = from_dict(SwinConfig, meta["architecture"], prefix="architecture")
            config = EncoderConfig(swin, tuple(meta["mean"]), tuple(meta["std"]), meta.get("model_name", ""))
    except (KeyError, ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is incomplete or invalid: {exc}") from exc
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {weights} (corrupt or truncated?): {exc}") from exc
    return _Source(state, str(directory), encoder_config=config)


def _resolve_dir(directory: Path, prefer_training: bool) -> Union[Path, _Source]:
    """A directory -> our model directory (as a _Source) or a DeepSpeed model-states file.

    Accepted: a ``save_model`` directory; a DeepSpeed checkpoint directory (``latest`` + tags) or
    tag directory; a training output directory (``model/`` and/or ``checkpoints/``). Exported
    model directories (``<run>/model``, ``<tag>/model``: fp32, gathered from ZeRO-3) are preferred
    for encoders; the DeepSpeed states (with projector and decoder) for the pretrainer.
    """
    if _is_model_dir(directory):
        return _read_model_dir(directory)
    tag = _training_tag_dir(directory)
    states = tag / DEEPSPEED_MODEL_STATES if tag is not None and (tag / DEEPSPEED_MODEL_STATES).is_file() else None
    exports = [d / MODEL_DIR for d in (directory, tag) if d is not None]
    export = next((e for e in exports if _is_model_dir(e)), None)
    if states is not None and (prefer_training or export is None):
        return states
    shards = tag if tag is not None else directory
    if (prefer_training or export is None) and any(shards.glob(ZERO3_MODEL_STATES)):
        # ZeRO-3 writes each rank's shard (zero_pp_rank_<r>_mp_rank_00_model_states.pt), no whole model
        wanted = "the pretrainer (projector, decoder)" if prefer_training else "no model"
        where = (f"the encoder is in {export} (gfm_fast.load_model)" if export is not None else
                 f"the encoder train.py gathers at each save is missing ({shards / MODEL_DIR}/ or the run's "
                 f"{MODEL_DIR}/)")
        raise CheckpointError(f"{shards} is a ZeRO-3 checkpoint: its weights are partitioned over the ranks, so "
                              f"{wanted} can be rebuilt from it; {where}")
    if export is not None:
        return _read_model_dir(export)
    raise CheckpointError(f"{directory} is neither a gfm_fast model directory ({CONFIG_FILE} + {MODEL_FILE}), a "
                          f"DeepSpeed checkpoint directory ({LATEST_FILE} or {DEEPSPEED_MODEL_STATES}), nor a "
                          f"training output directory ({MODEL_DIR}/ or {CHECKPOINT_DIR}/)")


def _read_source(path: PathLike, *, prefer_training: bool = False) -> _Source:
    """Resolve ``path`` (model dir, run dir, DeepSpeed dir, or checkpoint file) to weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a gfm_fast model directory, a training output or "
                              f"DeepSpeed checkpoint directory, or a checkpoint file)")
    if path.is_dir():
        resolved = _resolve_dir(path, prefer_training)
        if isinstance(resolved, _Source):
            return resolved
        path = resolved
    checkpoint = read_checkpoint(str(path))
    state = unwrap_state_dict(checkpoint, source=str(path))
    return _Source(state, str(path), model_config=_training_config(checkpoint, path))


def _check_not_partitioned(state: Dict[str, torch.Tensor], source: str) -> None:
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(f"{source} holds empty (ZeRO-3 partitioned) weights, e.g. {empty[0]}; load the "
                              f"exported model directory ({MODEL_DIR}/ in the run's output directory) instead")


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------

def _split_overrides(overrides: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    arch = {k: v for k, v in overrides.items() if k in _SWIN_FIELDS}
    return arch, {k: v for k, v in overrides.items() if k not in _SWIN_FIELDS}


def load_model(path: PathLike, **overrides: Any) -> GFMSwinTransformer:
    """Load a student encoder for feature extraction (eval mode, any input size divisible by 32).

    Args:
        path: a ``save_model`` directory; a training output directory (with ``model/``); a DeepSpeed
            checkpoint directory or its ``mp_rank_00_model_states.pt``; a GFM release file; or a
            plain Swin checkpoint (official or timm layout).
        **overrides: what weights cannot tell, or changes to apply on load: any ``SwinConfig`` field
            (``img_size``; ``window_size`` interpolates rel-pos tables; ``in_chans`` widens RGB
            weights into ``rgb_bands``), ``mean``, ``std``, ``rgb_bands`` (default (0, 1, 2)),
            ``ops_backend`` and ``dynamic_img_size`` (default True).

    Returns:
        A ``GFMSwinTransformer`` in eval mode with ``.gfm_config`` (``EncoderConfig``).
    """
    arch, rest = _split_overrides(overrides)
    mean, std = rest.pop("mean", None), rest.pop("std", None)
    rgb_bands = tuple(rest.pop("rgb_bands", DEFAULT_RGB_BANDS))
    ops_backend = rest.pop("ops_backend", "auto")
    dynamic = bool(rest.pop("dynamic_img_size", True))
    if rest:
        raise TypeError(f"load_model got unknown override(s) {', '.join(sorted(rest))}; valid: "
                        f"{', '.join(_SWIN_FIELDS + _NORMALIZATION)}, rgb_bands, ops_backend, dynamic_img_size")
    source = _read_source(path)
    state = normalize_swin_keys(source.state)
    _check_not_partitioned(state, source.name)
    saved = source.encoder_config
    if saved is None and source.model_config is not None:
        model_cfg = source.model_config
        saved = EncoderConfig(model_cfg.student, model_cfg.mean, model_cfg.std)
    base = dataclasses.asdict(saved.swin) if saved is not None else {}
    swin = infer_swin_config(state, **{**{k: base[k] for k in ("img_size", "drop_path_rate") if k in base}, **arch})
    config = _encoder_config(swin, saved, mean, std)
    encoder = build_student(swin, ops_backend=ops_backend, dynamic_img_size=dynamic)
    weights = checkpoint_filter_fn(state, encoder, rgb_bands=rgb_bands)
    # Plain Swin checkpoints have no mask token; it keeps its init (it is unused for features).
    load_state_dict_strict(encoder, weights, allowed_missing=(r"^mask_token$",), source=source.name)
    encoder.gfm_config = config
    return encoder.eval()


def _encoder_config(swin: SwinConfig, saved: Optional[EncoderConfig], mean: Any, std: Any) -> EncoderConfig:
    """mean/std: overrides, else the saved ones when the channel count is unchanged, else the
    default for the channel count (:func:`default_normalization`)."""
    if mean is None and saved is not None and len(saved.mean) == swin.in_chans:
        mean = saved.mean
    if std is None and saved is not None and len(saved.std) == swin.in_chans:
        std = saved.std
    if mean is None or std is None:
        default_mean, default_std = default_normalization(swin.in_chans)
        mean, std = (default_mean if mean is None else mean), (default_std if std is None else std)
    return EncoderConfig(swin, tuple(mean), tuple(std))
