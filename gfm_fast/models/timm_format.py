"""timm's own model-directory format (``config.json`` + ``model.safetensors``), both ways.

``save_model(model, path, layout="timm")`` writes what timm's Hugging Face Hub exports hold, so
plain timm builds the encoder without gfm_fast: ``timm.create_model("local-dir:" + path)``. The
architecture is one of timm's Swin names with ``model_args`` carrying GFM's sizes (window 6 at
192 px, any embed dim, depths, heads and input channels); ``pretrained_cfg`` carries input size and
mean/std. The weights are the encoder's timm-layout tensors without GFM's mask token (plain
Swin has none). ``load_model`` reads such a directory back.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from gfm_fast.config import SwinConfig
from gfm_fast.errors import CheckpointError

__all__ = ["timm_config_json", "is_timm_config", "read_timm_config", "timm_state_dict"]

# timm's Swin name for each embed dim (sets only timm's defaults; model_args fix the architecture).
_TIMM_SWIN = {96: "swin_small_patch4_window7_224", 128: "swin_base_patch4_window7_224",
              192: "swin_large_patch4_window7_224"}
_DEFAULT_TIMM_SWIN = "swin_base_patch4_window7_224"
GFM_KEY = "gfm_fast"  # our marker inside timm's config.json (format and model name)


def timm_config_json(swin: SwinConfig, mean: Any, std: Any, *, model_name: str, format_tag: str) -> Dict[str, Any]:
    """timm's ``config.json`` for a Swin encoder (headless: ``num_classes`` 0)."""
    args = dict(img_size=swin.img_size, patch_size=swin.patch_size, in_chans=swin.in_chans, embed_dim=swin.embed_dim,
                depths=list(swin.depths), num_heads=list(swin.num_heads), window_size=swin.window_size,
                mlp_ratio=swin.mlp_ratio)
    pretrained_cfg = dict(input_size=[swin.in_chans, swin.img_size, swin.img_size], fixed_input_size=True,
                          interpolation="bicubic", crop_pct=1.0, crop_mode="center", mean=list(mean), std=list(std),
                          num_classes=0, pool_size=None, first_conv="patch_embed.proj", classifier="head.fc")
    return {"architecture": _TIMM_SWIN.get(swin.embed_dim, _DEFAULT_TIMM_SWIN), "num_classes": 0,
            "num_features": swin.num_features, "global_pool": "avg", "model_args": args,
            "pretrained_cfg": pretrained_cfg, GFM_KEY: {"format": format_tag, "model_name": model_name}}


def is_timm_config(meta: Any) -> bool:
    """True for a timm model-directory ``config.json`` (``architecture`` + ``pretrained_cfg``)."""
    return isinstance(meta, dict) and "architecture" in meta and "pretrained_cfg" in meta


def read_timm_config(meta: Mapping[str, Any], source: str):
    """``(SwinConfig, mean, std)`` from a timm ``config.json``; shapes that ``model_args`` leave out are
    read from the weights by the caller (``infer_swin_config``), so only sizes are taken here.

    Raises:
        CheckpointError: the architecture is not a Swin.
    """
    if "swin" not in str(meta["architecture"]):
        raise CheckpointError(f"{source} holds a timm {meta['architecture']!r}, not a Swin; gfm_fast reads Swin "
                              f"encoders only")
    args, cfg = dict(meta.get("model_args") or {}), meta["pretrained_cfg"]
    size = args.get("img_size", (cfg.get("input_size") or [3, 224, 224])[-1])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
              if k in ("patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio")}
    swin = SwinConfig(**{**fields, "img_size": int(size[-1] if isinstance(size, (list, tuple)) else size)})
    return swin, cfg.get("mean"), cfg.get("std")


def timm_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder's tensors that a plain timm ``SwinTransformer`` has (all but GFM's mask token)."""
    return {k: v for k, v in state.items() if k != "mask_token"}
