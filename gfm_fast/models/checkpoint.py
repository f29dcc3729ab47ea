"""Checkpoint reading and key mapping for GFM's Swin encoders (official Swin, timm, GFM release, mmseg).

Three rules (the ones the GFM reference code breaks; see docs/architecture.md):

* Read tensors only. Files are opened with ``torch.load(weights_only=True)`` (or safetensors);
  a file that also pickles other objects (a yacs/argparse config, DeepSpeed metadata) is read
  by substituting an inert placeholder for each non-allowlisted class, so no code from the file
  ever runs and only the tensors are kept.
* One ``checkpoint_filter_fn(state_dict, model)`` maps any supported layout onto timm's.
* Strict loading: every key must load, except an explicit allow-list; anything else is an error
  naming the missing/unexpected/mis-shaped keys.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

import torch
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table
from torch import nn

from gfm_fast.config import SwinConfig
from gfm_fast.errors import CheckpointError

__all__ = ["CheckpointError", "read_checkpoint", "tensors_only", "unwrap_state_dict", "split_prefix",
           "is_official_layout", "is_mmseg_layout", "normalize_swin_keys", "checkpoint_filter_fn", "infer_swin_config",
           "load_state_dict_strict", "load_teacher_weights", "teacher_allowed_unexpected"]

CONTAINER_KEYS = ("model", "state_dict", "module")  # GFM/official, timm/lightning, DeepSpeed
GFM_ENCODER_PREFIX = "encoder."
MMSEG_BACKBONE_PREFIX = "backbone."  # mmseg / mmdet checkpoints: backbone.*, decode_head.*, neck.*
NON_PERSISTENT = ("relative_position_index", "attn_mask")  # buffers rebuilt by timm, never loaded
REL_POS_TABLE = "relative_position_bias_table"
DEFAULT_RGB_BANDS = (0, 1, 2)




# --------------------------------------------------------------------------------------------
# Reading files (tensors only)
# --------------------------------------------------------------------------------------------

class _InertObject(OrderedDict):
    """Stand-in for a non-allowlisted class found in a checkpoint (a yacs/argparse config, metadata).

    ``torch.load(weights_only=True)`` lets an allowlisted class be called (REDUCE/NEWOBJ), filled
    (SETITEMS) and given state (BUILD). Registered under the class's name, this placeholder turns
    every such object into a plain ``OrderedDict``: nothing from the file runs, and
    ``tensors_only`` later drops it.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # noqa: D102 - see class docstring
        return OrderedDict()


def _numpy_globals(names: Iterable[str]) -> list:
    """The NumPy array/dtype/scalar reconstructors among the ``numpy.*`` names in a checkpoint (RNG
    states and metrics are often NumPy), under the 1.x and 2.x module names. These rebuild plain data
    only; any other NumPy callable (``numpy.save``, ``numpy.testing``'s ``runstring``...) could write
    files or run code from the file, so it becomes a placeholder like every other class."""
    names = set(names)
    if not any(n.startswith("numpy.") for n in names):
        return []
    import numpy as np
    import numpy.dtypes

    reconstruct, scalar = np.zeros(0).__reduce__()[0], np.float32(0).__reduce__()[0]
    known = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        known.update({f"{module}._reconstruct": reconstruct, f"{module}.scalar": scalar})
    allowed: list = [getattr(numpy.dtypes, n) for n in numpy.dtypes.__all__]  # types of unpickled dtypes
    allowed += [(obj, name) for name, obj in known.items() if name in names]
    return allowed


def _load_tensors(path: str) -> Any:
    """``torch.load(weights_only=True)``; non-allowlisted objects become inert placeholders."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # non-tensor objects: retry with placeholders below
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    numpy_allowed = _numpy_globals(unsafe)
    numpy_names = {item[1] for item in numpy_allowed if isinstance(item, tuple)}
    placeholders = [(_InertObject, name) for name in unsafe if name not in numpy_names]
    try:
        with torch.serialization.safe_globals(numpy_allowed + placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects that cannot be read safely ({type(exc).__name__}: {exc}); "
            f"gfm_fast reads tensors only (torch.load(weights_only=True)). Re-save just the weights, e.g. "
            f"torch.save({{'model': model.state_dict()}}, path), or convert them to safetensors.") from exc


def read_checkpoint(path: str) -> Any:
    """Read a checkpoint file (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) without running code from it.

    Raises:
        CheckpointError: missing, truncated or corrupt file (the message names the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; expected a file (.pth, .pt, .bin, .safetensors)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read safetensors file {path} (corrupt or truncated?): {exc}") from exc
    try:
        return _load_tensors(path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError,
            KeyError, IndexError) as exc:  # the last two: bytes that are not a pickle (e.g. a text file)
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, truncated or not a PyTorch file?): "
                              f"{type(exc).__name__}: {exc}") from exc


def tensors_only(obj: Any) -> Any:
    """Keep the tensors of a nested dict (placeholders, numbers, strings and configs are dropped)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        kept = {k: tensors_only(v) for k, v in obj.items() if isinstance(k, str)}
        return {k: v for k, v in kept.items() if isinstance(v, torch.Tensor) or (isinstance(v, dict) and v)}
    return None


def unwrap_state_dict(checkpoint: Any, *, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict inside ``checkpoint`` (unwraps ``model`` / ``state_dict`` /
    ``module`` containers, as GFM, timm and DeepSpeed write them)."""
    state = tensors_only(checkpoint) if not isinstance(checkpoint, torch.Tensor) else None
    while isinstance(state, dict):
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    flat = {k: v for k, v in (state or {}).items() if isinstance(v, torch.Tensor)}
    if not flat:
        raise CheckpointError(f"{source} holds no weights (expected a state dict, possibly under "
                              f"{' / '.join(CONTAINER_KEYS)})")
    return flat


def split_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix`` with it stripped (e.g. ``encoder.`` of the GFM release)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# Mapping layouts onto timm's
# --------------------------------------------------------------------------------------------

def is_official_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Official Swin (and GFM/SimMIM) put each patch merging at the *end* of a stage, so stage 0 has
    one; timm puts it at the start of the next stage (``layers.0.downsample`` is an Identity)."""
    return any(k.startswith("layers.0.downsample.") for k in state_dict)


def _official_to_timm_key(key: str) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)


def _resize_rel_pos_table(key: str, table: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Interpolate a rel-pos-bias table to the window of ``model``'s matching attention (window change)."""
    try:
        attn = model.get_submodule(key[: -len(REL_POS_TABLE) - 1])
    except AttributeError:
        return table  # the model has no such block (e.g. a pruned teacher); the loader decides
    target = attn.relative_position_bias_table
    if table.shape == target.shape:
        return table
    if table.dim() != 2 or table.shape[1] != target.shape[1]:
        raise CheckpointError(f"{key}: checkpoint table {tuple(table.shape)} has a different number of heads than "
                              f"the model's {tuple(target.shape)}")
    with warnings.catch_warnings():  # timm's interpolation internals warn about torch indexing style
        warnings.filterwarnings("ignore", message=".*(non-contiguous|non-tuple sequence).*", category=UserWarning)
        resized = resize_rel_pos_bias_table(table.float(), new_window_size=attn.window_size,
                                            new_bias_shape=tuple(target.shape))
    return resized.to(table.dtype)


def _adapt_patch_embed(weight: torch.Tensor, model: nn.Module, rgb_bands: Sequence[int]) -> torch.Tensor:
    """Fit a patch-embedding conv weight (D, C, p, p) to the model: resample the kernel for another
    patch size (timm's ``resample_patch_embed``) and widen RGB weights to multispectral inputs.

    Widening (docs/method.md, multispectral input): the model's filters for bands ``rgb_bands`` get the
    checkpoint's R, G, B filters, every other band's filters are zero, so a widened model computes
    exactly the RGB model's embedding from those three bands at initialisation.
    """
    target = model.patch_embed.proj.weight
    if weight.shape[-2:] != target.shape[-2:]:
        weight = resample_patch_embed(weight.float(), list(target.shape[-2:]), verbose=False).to(weight.dtype)
    src_chans, dst_chans = weight.shape[1], target.shape[1]
    if src_chans == dst_chans:
        return weight
    if src_chans > dst_chans or src_chans != len(rgb_bands):
        raise CheckpointError(f"patch_embed.proj.weight: checkpoint has {src_chans} input channels but the model has "
                              f"{dst_chans}; only widening {len(rgb_bands)}-channel (RGB) weights into the bands "
                              f"{tuple(rgb_bands)} is supported")
    if max(rgb_bands) >= dst_chans:
        raise CheckpointError(f"RGB bands {tuple(rgb_bands)} do not exist in the model's {dst_chans} input channels")
    wide = weight.new_zeros(weight.shape[0], dst_chans, *weight.shape[2:])
    wide[:, list(rgb_bands)] = weight
    return wide


def is_mmseg_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """mmseg / mmdet's Swin backbone: ``stages.N``, ``attn.w_msa``, ``ffn.layers``, ``patch_embed.projection``."""
    return any(k.startswith("stages.") or k.startswith("patch_embed.projection.") for k in state_dict)


def _unfold_to_concat_order(value: torch.Tensor) -> torch.Tensor:
    """A patch merging's reduction weight (out, 4C) or norm (4C,) from mmseg's ``nn.Unfold`` order
    (channel-major, then the 2x2 neighbours row by row) to Swin's concat order (neighbours
    (0,0), (1,0), (0,1), (1,1), each C channels), the inverse of mmseg's ``swin2mmseg`` converter."""
    lead = value.shape[:-1]
    grouped = value.reshape(*lead, -1, 4).transpose(-1, -2)  # (..., 4 neighbours row-major, C)
    return grouped[..., [0, 2, 1, 3], :].reshape(*lead, -1)


def _mmseg_to_official(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmseg Swin backbone keys -> official Swin keys. mmseg's per-output norms ``norm0..norm{n-1}``
    have one counterpart in Swin, the final ``norm`` (after the last stage); the others exist only for
    mmseg's decoders and are dropped."""
    stages = {int(m.group(1)) for k in state for m in [re.match(r"^stages\.(\d+)\.", k)] if m}
    last_norm = f"norm{max(stages)}." if stages else None
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if re.match(r"^norm\d+\.", key):
            if key.startswith(last_norm):
                out["norm." + key[len(last_norm):]] = value
            continue
        new = key.replace("stages.", "layers.", 1).replace("attn.w_msa.", "attn.")
        new = new.replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
        new = new.replace("patch_embed.projection.", "patch_embed.proj.")
        if re.search(r"downsample\.(reduction\.weight|norm\.(weight|bias))$", new):
            value = _unfold_to_concat_order(value)
        out[new] = value
    return out


def normalize_swin_keys(state_dict: Any) -> Dict[str, torch.Tensor]:
    """Unwrap containers, keep GFM's ``encoder.*`` or mmseg's ``backbone.*`` (prefix stripped) when
    present, map mmseg's and the official layout's names to timm's, and drop non-persistent
    buffers and classifier heads."""
    state = unwrap_state_dict(state_dict)
    for prefix in (GFM_ENCODER_PREFIX, MMSEG_BACKBONE_PREFIX):
        if any(k.startswith(prefix) for k in state):
            state = split_prefix(state, prefix)
            break
    if is_mmseg_layout(state):
        state = _mmseg_to_official(state)
    official = is_official_layout(state)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in NON_PERSISTENT or key.startswith("head."):
            continue
        out[_official_to_timm_key(key) if official else key] = value
    return out


def checkpoint_filter_fn(state_dict: Any, model: nn.Module, *,
                         rgb_bands: Sequence[int] = DEFAULT_RGB_BANDS) -> Dict[str, torch.Tensor]:
    """Map a Swin checkpoint in any supported layout onto ``model``'s timm keys.

    Handles: ``model``/``state_dict``/``module`` containers; GFM's ``encoder.`` prefix (only the
    encoder is kept); the official Swin layout (``layers.N.downsample`` -> ``layers.N+1.downsample``);
    non-persistent buffers (``relative_position_index``, ``attn_mask``) and classifier heads
    (``head.*``) are dropped; rel-pos-bias tables are interpolated to the model's windows; patch
    embeddings are resampled to its patch size and widened from RGB to its input bands.

    Args:
        state_dict: a state dict or checkpoint object.
        model: the timm Swin (``GFMSwinTransformer``, ``FrozenTeacher`` or ``SwinTransformer``) to load.
        rgb_bands: model input bands that receive RGB patch-embedding filters when widening.

    Returns:
        A state dict with ``model``'s key names (still to be loaded strictly).
    """
    out = normalize_swin_keys(state_dict)
    for key, value in out.items():
        if key.endswith(REL_POS_TABLE):
            out[key] = _resize_rel_pos_table(key, value, model)
        elif key == "patch_embed.proj.weight":
            out[key] = _adapt_patch_embed(value, model, rgb_bands)
    return out


def infer_swin_config(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> SwinConfig:
    """The Swin architecture of a (normalised, timm-layout) encoder state dict.

    Shapes tell embed dim, input channels and patch size (patch embedding), depths (block
    indices), heads (rel-pos tables' second dim), window (table side 2w - 1, from stage 0) and MLP
    ratio. The image size cannot be read off weights: it comes from ``overrides`` (default 192,
    GFM's). Any SwinConfig field in ``overrides`` wins (e.g. ``window_size`` to interpolate tables).
    """
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4:
        raise CheckpointError("cannot infer the Swin architecture: no patch_embed.proj.weight (D, C, p, p) in the "
                              "checkpoint; is it a Swin encoder?")
    depth_of: Dict[int, int] = {}
    for key in state_dict:
        match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depth_of[stage] = max(depth_of.get(stage, 0), block + 1)
    if not depth_of or sorted(depth_of) != list(range(len(depth_of))):
        raise CheckpointError(f"cannot infer the Swin depths: stages with blocks {sorted(depth_of)} are not 0..n-1")
    depths = tuple(depth_of[i] for i in range(len(depth_of)))
    tables = [state_dict.get(f"layers.{i}.blocks.0.attn.{REL_POS_TABLE}") for i in range(len(depths))]
    if any(t is None or t.dim() != 2 for t in tables):
        raise CheckpointError(f"cannot infer the attention heads: a layers.i.blocks.0.attn.{REL_POS_TABLE} is missing")
    side = round(tables[0].shape[0] ** 0.5)
    if side * side != tables[0].shape[0] or side % 2 == 0:
        raise CheckpointError(f"cannot infer the window size from a {tuple(tables[0].shape)} rel-pos table "
                              f"(expected (2w-1)^2 rows)")
    embed_dim = int(proj.shape[0])
    fc1 = state_dict.get("layers.0.blocks.0.mlp.fc1.weight")
    window, patch = (side + 1) // 2, int(proj.shape[-1])
    # The size a Swin is built for: its last stage is one window (192 px for GFM's window 6, 224 for
    # window 7, 384 for 12). Built smaller, timm would shrink that stage's window, drop its shift and
    # resize its tables: the loaded model would not be the saved one.
    img_size = window * patch * 2 ** (len(depths) - 1)
    arch = dict(embed_dim=embed_dim, depths=depths, num_heads=tuple(int(t.shape[1]) for t in tables),
                window_size=window, patch_size=patch, in_chans=int(proj.shape[1]),
                mlp_ratio=float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0, img_size=img_size)
    unknown = sorted(set(overrides) - set(arch) - {"drop_path_rate"})
    if unknown:
        raise TypeError(f"unknown architecture override(s) {', '.join(unknown)}; valid: {', '.join(sorted(arch))}, "
                        f"drop_path_rate")
    arch.update(overrides)
    return SwinConfig(**arch)


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------

def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.match(p, key) for p in patterns)


def _preview(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                           allowed_missing: Iterable[str] = (), allowed_unexpected: Iterable[str] = (),
                           source: str = "checkpoint") -> None:
    """``model.load_state_dict`` that fails on anything not explicitly allowed.

    Args:
        model: the module to fill.
        state_dict: tensors with ``model``'s key names (after ``checkpoint_filter_fn``).
        allowed_missing: regexes of model keys that may be absent (they keep their initial values).
        allowed_unexpected: regexes of checkpoint keys that are ignored by design (e.g. the
            teacher's never-run last stage).
        source: the file name, for messages.

    Raises:
        CheckpointError: naming missing keys, unexpected keys and shape mismatches.
    """
    allowed_missing, allowed_unexpected = tuple(allowed_missing), tuple(allowed_unexpected)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _matches(k, allowed_missing)]
    unexpected = [k for k in state_dict if k not in expected and not _matches(k, allowed_unexpected)]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
                              + ". Check that the file holds this architecture (embed dim, depths, heads, channels)")
    usable = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(usable, strict=False)


def teacher_allowed_unexpected(model: nn.Module) -> Tuple[str, ...]:
    """Checkpoint keys a pruned teacher ignores by design: last-stage blocks and the final norm."""
    last = len(model.layers) - 1
    return (rf"^layers\.{last}\.blocks\.", r"^norm\.")


def load_teacher_weights(teacher: nn.Module, path_or_state: Any, *,
                         rgb_bands: Sequence[int] = DEFAULT_RGB_BANDS) -> None:
    """Load ImageNet-22k Swin weights (official ``swin_base_patch4_window7_224_22k.pth`` layout, timm's
    layout, or a GFM release's ``teacher.*`` entries already split off) into a pruned teacher.

    Args:
        teacher: ``FrozenTeacher`` (or any timm Swin pruned with ``prune_to_trunk``).
        path_or_state: a file path, or an already-read state dict.
        rgb_bands: passed to ``checkpoint_filter_fn``.
    """
    source = os.fspath(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else "teacher state dict"
    raw = read_checkpoint(source) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    state = checkpoint_filter_fn(raw, teacher, rgb_bands=rgb_bands)
    load_state_dict_strict(teacher, state, allowed_unexpected=teacher_allowed_unexpected(teacher),
                           source=f"teacher weights {source}")
