"""Tiny configs and independent step-by-step computations shared by the model tests."""
from __future__ import annotations

import argparse
import json
import re
import warnings
from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, get_relative_position_index

from gfm_fast.config import ModelConfig, SwinConfig, TrainConfig, to_dict
from gfm_fast.models.io import save_model
from gfm_fast.models.pretrainer import GFMPretrainer
from gfm_fast.models.swin import swin_kwargs

# Tiny but structurally complete: 4 stages, shifted windows, two heads or more from stage 1 on.
TINY_STUDENT = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, img_size=128)
TINY_TEACHER = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=3, img_size=96)
TINY_IMG = TINY_STUDENT["img_size"]
TINY_BLOCKS = TINY_IMG // 32  # 4x4 mask blocks


def tiny_config(student: Dict = None, teacher: Dict = None, **kwargs) -> ModelConfig:
    kwargs.setdefault("ops_backend", "reference")
    return ModelConfig(student=SwinConfig(**{**TINY_STUDENT, **(student or {})}),
                       teacher=SwinConfig(**{**TINY_TEACHER, **(teacher or {})}), **kwargs)


def tiny_pretrainer(**kwargs) -> GFMPretrainer:
    """A tiny pretrainer with a random teacher (its warning silenced: tests know)."""
    teacher_state_dict = kwargs.pop("teacher_state_dict", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return GFMPretrainer(tiny_config(**kwargs), teacher_state_dict=teacher_state_dict)


def full_teacher(num_classes: int = 5, **teacher) -> SwinTransformer:
    """A complete timm Swin with the tiny teacher architecture (last stage, norm and a head)."""
    cfg = SwinConfig(**{**TINY_TEACHER, **teacher})
    return SwinTransformer(**{**swin_kwargs(cfg), "num_classes": num_classes})


def random_block_mask(batch: int, blocks: int = TINY_BLOCKS, count: int = 10, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, blocks * blocks, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(blocks * blocks, generator=gen)[:count]] = True
    return mask.view(batch, blocks, blocks)


# --------------------------------------------------------------------------------------------
# Independent step-by-step computations (timm stages run by hand, reference losses)
# --------------------------------------------------------------------------------------------

def run_through_third_merging(model: SwinTransformer, tokens_nhwc: torch.Tensor) -> torch.Tensor:
    """Stages 1-3 then the third patch merging, spelled out on a timm Swin."""
    x = tokens_nhwc
    for i in range(len(model.layers) - 1):
        x = model.layers[i](x)
    return model.layers[-1].downsample(x)


def manual_teacher_feature(teacher: SwinTransformer, images: torch.Tensor, bands: Sequence[int]) -> torch.Tensor:
    """z_t by hand: bands, bilinear align_corners resize, patch embed, stages 1-3 + merging, mean."""
    x = images[:, list(bands)]
    size = teacher.patch_embed.img_size
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    proj, norm = teacher.patch_embed.proj, teacher.patch_embed.norm
    x = F.layer_norm(F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).permute(0, 2, 3, 1),
                     norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return run_through_third_merging(teacher, x).mean(dim=(1, 2))


def manual_student(pretrainer: GFMPretrainer, images: torch.Tensor, block_mask: torch.Tensor,
                   z_t: torch.Tensor):
    """Student losses by hand: conv -> LayerNorm -> mask-token blend -> timm stages -> heads ->
    the reference losses of ``gfm_fast.losses``. Returns (GFMOutput, recon)."""
    from gfm_fast.losses import cosine_distillation, reconstruction_l1
    from gfm_fast.models.pretrainer import GFMOutput

    student, cfg = pretrainer.student, pretrainer.config
    enc = student.encoder
    proj, norm = enc.patch_embed.proj, enc.patch_embed.norm
    x = F.conv2d(images, proj.weight, proj.bias, stride=cfg.student.patch_size).permute(0, 2, 3, 1)
    x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # (B, h, w, D)
    rep = cfg.mask_block // cfg.student.patch_size
    m = block_mask.float().repeat_interleave(rep, 1).repeat_interleave(rep, 2).unsqueeze(-1)
    x = x * (1 - m) + enc.mask_token.view(1, 1, 1, -1) * m
    h = run_through_third_merging(enc, x)
    z_s = student.projector(h.mean(dim=(1, 2)))
    r = enc.norm(enc.layers[-1].blocks(h)).permute(0, 3, 1, 2)
    conv = student.decoder[0]
    recon = F.pixel_shuffle(F.conv2d(r, conv.weight, conv.bias), cfg.student.total_stride)
    loss_rec, loss_feat = reconstruction_l1(images, recon, block_mask.float()), cosine_distillation(z_s, z_t)
    return GFMOutput(loss_rec + cfg.alpha * loss_feat, loss_rec, loss_feat, recon, block_mask), recon


# --------------------------------------------------------------------------------------------
# Writing checkpoints in other layouts
# --------------------------------------------------------------------------------------------

def to_official_layout(state: Dict[str, torch.Tensor], model: SwinTransformer) -> Dict[str, torch.Tensor]:
    """timm keys -> official Swin keys (as in swin_base_patch4_window7_224_22k.pth): patch mergings at
    the end of the previous stage, ``head.fc`` -> ``head``, plus the persistent buffers the official
    code saves (``relative_position_index``, ``attn_mask``)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value.clone()
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_bias_table"):
            out[f"{name}.relative_position_index"] = get_relative_position_index(*module.window_size)
        if getattr(module, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = module.attn_mask.clone()
    return out


def with_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


# Checkpoint files as train.py and the GFM release write them

class YacsLikeConfig(dict):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["immutable"] = True


def write_training_run(root, pretrainer, *, dtype=torch.float32, with_export=False, tag_export=False, zero3=False):
    """train.py's layout: <root>/checkpoints/{latest, step_00000005/{mp_rank_00_model_states.pt,
    gfm_config.json, model/ if tag_export}}, plus <root>/model/ if with_export. With ``zero3``, DeepSpeed's
    ZeRO-3 layout: one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank whose module holds empty
    placeholders (the weights live in the partitioned optimizer files)."""
    student = pretrainer.student.state_dict()
    module = {k: (torch.empty(0, dtype=dtype) if zero3 else v.to(dtype)) for k, v in student.items()}
    train_cfg = TrainConfig(model=pretrainer.config)
    states = {"module": module, "buffer_names": [], "optimizer": None,
              "param_shapes": [OrderedDict((k, v.shape) for k, v in student.items())],
              "ds_config": {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": dtype == torch.bfloat16}},
              "ds_version": "0.19.8", "global_steps": 5, "gfm_step": 5, "gfm_config": json.dumps(to_dict(train_cfg)),
              "gfm_torch_rng": torch.get_rng_state(), "gfm_loader": json.dumps({"epoch": 0})}
    tag = root / "checkpoints" / "step_00000005"
    tag.mkdir(parents=True)
    torch.save(states, tag / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"))
    (tag / "gfm_config.json").write_text(json.dumps(to_dict(train_cfg)))
    (root / "checkpoints" / "latest").write_text("step_00000005")
    if with_export:
        save_model(pretrainer, root / "model")
    if tag_export:
        save_model(pretrainer, tag / "model")
    return tag


def write_release(path, pretrainer, teacher_full=None):
    """{'model': encoder.* (official Swin layout), decoder.*, projector.*, teacher.*} + non-tensor entries."""
    enc = pretrainer.encoder
    model = {**with_prefix(to_official_layout(enc.state_dict(), enc), "encoder."),
             **with_prefix(pretrainer.student.projector.state_dict(), "projector."),
             **with_prefix(pretrainer.student.decoder.state_dict(), "decoder.")}
    if teacher_full is not None:
        model.update(with_prefix(to_official_layout(teacher_full.state_dict(), teacher_full), "teacher."))
    torch.save({"model": model, "epoch": 99, "config": YacsLikeConfig(MODEL=YacsLikeConfig(TYPE="swin")),
                "args": argparse.Namespace(batch_size=128)}, path)
    return path
