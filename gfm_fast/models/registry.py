"""The ``gfm_swin_*`` names in timm's registry, so ``timm.create_model`` builds and loads GFM encoders.

Light on purpose: this module imports timm and ``gfm_fast.config`` only. The encoder classes
(``gfm_fast.models.swin``, which pulls in the fused ops and Triton) and the checkpoint readers are
imported when a model is built. ``import gfm_fast`` registers the names as soon as timm is imported
(timm 1.0 has no plugin entry point that would find them on its own).

What the names add to timm's usual behaviour:

* ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` reads anything ``gfm_fast.load_model``
  reads (GFM release, official / timm / mmseg Swin files, training runs, ``save_model`` directories,
  3- or 12-band); the channel count comes from the weights, widths and depths from the name (or
  ``embed_dim``/``depths``/``num_heads`` arguments; a file of others is an error naming them), mean/std
  from the file when it has them, and ``pretrained_cfg`` carries them (``timm.data.resolve_data_config`` works).
* ``features_only=True`` gives NCHW maps at strides 4/8/16/32, the last with the final norm, as
  ``gfm_fast.extract_features(..., stages=...)`` (timm's ``FeatureGetterNet`` over
  ``forward_intermediates``); ``out_indices`` picks stages.
* ``num_classes=N`` adds a fresh classifier head on top of the loaded encoder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, SwinConfig

__all__ = ["VARIANTS", "ARCH_FIELDS", "default_cfgs"]

# Registered architectures (names encode patch/window/size as timm's do).
VARIANTS: Dict[str, SwinConfig] = {
    "gfm_swin_test_patch4_window2_64": SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                  window_size=2, img_size=64),
    "gfm_swin_base_patch4_window6_192": SwinConfig(),
    "gfm_swin_large_patch4_window6_192": SwinConfig(embed_dim=192, num_heads=(6, 12, 24, 48)),
    "gfm_swin_base_patch4_window7_224": SwinConfig(window_size=7, img_size=224),
}
# What a name fixes; the input channels are not in names (any checkpoint's count is accepted).
ARCH_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "img_size", "patch_size", "mlp_ratio")
_WEIGHT_FIELDS = ("embed_dim", "depths", "num_heads", "patch_size", "mlp_ratio")  # cannot change on load


def _cfg(size: int, **kwargs: Any) -> Dict[str, Any]:
    return {"url": "", "num_classes": 0, "input_size": (3, size, size), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg(cfg.img_size) for name, cfg in VARIANTS.items()})


def _load_pretrained(variant: str, file: Any, kwargs: Dict[str, Any]):
    """Read ``file`` with ``load_model``, sized as ``variant`` (its image size and window; tables are
    interpolated) unless ``kwargs`` say otherwise; the channel count is the file's unless
    ``in_chans`` asks to widen RGB weights."""
    from gfm_fast.models.checkpoint import CheckpointError
    from gfm_fast.models.io import load_model
    from gfm_fast.models.swin import variant_name

    arch = VARIANTS[variant]
    overrides = {k: kwargs[k] for k in ("in_chans", "mean", "std", "rgb_bands") if k in kwargs}
    encoder = load_model(file, img_size=kwargs.get("img_size", arch.img_size),
                         window_size=kwargs.get("window_size", arch.window_size), **overrides)
    saved = encoder.gfm_config.swin
    differ = [k for k in _WEIGHT_FIELDS if _as_tuple(getattr(saved, k)) != _as_tuple(kwargs.get(k, getattr(arch, k)))]
    if differ:
        wrong = ", ".join(f"{k} {getattr(saved, k)} (the name has {getattr(arch, k)})" for k in differ)
        fitting = variant_name(saved)
        if fitting in VARIANTS:
            fix = f"create {fitting!r} instead"
        else:  # no registered name fits: the name's builder takes the file's widths as arguments
            args = ", ".join(f"{k}={_as_tuple(getattr(saved, k))}" for k in differ)
            fix = f"pass them to timm.create_model({variant!r}, {args}, ...)"
        raise CheckpointError(f"{file} does not hold a {variant}: {wrong}; {fix}, or use "
                              f"gfm_fast.load_model({str(file)!r})")
    return encoder


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _keep_model_keys(state_dict: Dict[str, Any], model: Any) -> Dict[str, Any]:
    """Weights from ``load_model`` already have the model's names; a plain Swin has no mask token."""
    return {k: v for k, v in state_dict.items() if k != "mask_token" or hasattr(model, "mask_token")}


def _create_gfm_swin(variant: str, pretrained: bool = False, *, student: bool = True, **kwargs: Any):
    """Build a registered variant with timm's builder.

    Args:
        variant: a name in ``VARIANTS``.
        pretrained: load ``pretrained_cfg_overlay['file']`` (anything ``gfm_fast.load_model`` reads).
        student: a ``GFMSwinTransformer`` (mask token) or, False, a plain timm ``SwinTransformer``.
        **kwargs: timm ``create_model`` arguments (``features_only``, ``out_indices``,
            ``num_classes``, ``in_chans``, ``img_size``...) plus ``mean``/``std``/``rgb_bands`` for
            loading files without them.
    """
    from timm.models.swin_transformer import SwinTransformer

    from gfm_fast.models.checkpoint import CheckpointError
    from gfm_fast.models.swin import EncoderConfig, GFMSwinTransformer, pad_before_shift, swin_kwargs

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    load = {k: kwargs.pop(k) for k in ("mean", "std", "rgb_bands") if k in kwargs}
    encoder: Optional[Any] = None
    if pretrained:
        file = overlay.pop("file", None)
        if not file:
            raise CheckpointError(f"{variant} has no downloadable weights: pass pretrained_cfg_overlay=dict(file=PATH) "
                                  f"with a GFM checkpoint, training run or gfm_fast model directory")
        encoder = _load_pretrained(variant, file, {**kwargs, **load})
        config = encoder.gfm_config
        kwargs.setdefault("in_chans", config.swin.in_chans)
        size = kwargs.get("img_size", config.swin.img_size)
        overlay.update(state_dict=encoder.state_dict(), mean=config.mean, std=config.std,
                       input_size=(config.swin.in_chans, size, size), file=str(file))
    args = {**swin_kwargs(VARIANTS[variant]), **kwargs}
    feature_cfg: Dict[str, Any] = dict(flatten_sequential=True, out_indices=tuple(range(len(args["depths"]))))
    if args.pop("features_only", False):
        args["features_only"] = True
        if args.setdefault("feature_cls", "getter") == "getter":
            feature_cfg["norm"] = True  # the last map gets the final norm, as extract_features(stages=...)
    model = build_model_with_cfg(GFMSwinTransformer if student else SwinTransformer, variant, pretrained,
                                 pretrained_cfg_overlay=overlay, pretrained_filter_fn=_keep_model_keys,
                                 feature_cfg=feature_cfg, **args)
    swin = model.model if hasattr(model, "model") else model  # FeatureGetterNet wraps the encoder
    for holder in {id(model): model, id(swin): swin}.values():
        holder.pretrained_cfg.pop("state_dict", None)  # the weights are in the model; keep the cfg printable
    if not student:
        pad_before_shift(swin)  # GFMSwinTransformer does it itself
    if encoder is not None and hasattr(swin, "layers"):
        cfg = encoder.gfm_config
        swin.gfm_config = EncoderConfig(dataclasses.replace(cfg.swin, img_size=size), cfg.mean, cfg.std)
    return model


@register_model
def gfm_swin_test_patch4_window2_64(pretrained: bool = False, **kwargs: Any):
    """A tiny masked student for tests (embed 16, depths 1-1-2-1, 64 px, window 2)."""
    return _create_gfm_swin("gfm_swin_test_patch4_window2_64", pretrained, student=True, **kwargs)


@register_model
def gfm_swin_base_patch4_window6_192(pretrained: bool = False, **kwargs: Any):
    """GFM's student: masked Swin-B, 192 px, window 6."""
    return _create_gfm_swin("gfm_swin_base_patch4_window6_192", pretrained, student=True, **kwargs)


@register_model
def gfm_swin_large_patch4_window6_192(pretrained: bool = False, **kwargs: Any):
    """A larger masked student (Swin-L widths, embed 192), for ZeRO runs."""
    return _create_gfm_swin("gfm_swin_large_patch4_window6_192", pretrained, student=True, **kwargs)


@register_model
def gfm_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any):
    """GFM's teacher architecture: plain headless Swin-B, 224 px, window 7 (ImageNet-22k weights)."""
    return _create_gfm_swin("gfm_swin_base_patch4_window7_224", pretrained, student=False, **kwargs)
