"""Frozen teacher: pruning, freezing, z_t values, bands, resize and precision."""
import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import gfm_fast

from gfm_fast.models.checkpoint import load_teacher_weights
from gfm_fast.models.pretrainer import param_groups
from gfm_fast.models.teacher import FrozenTeacher, resolve_teacher_dtype
from model_helpers import TINY_IMG, full_teacher, manual_teacher_feature, tiny_config, tiny_pretrainer


def make_teacher(**kwargs) -> FrozenTeacher:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FrozenTeacher(tiny_config(**kwargs))


def test_random_teacher_warns_loudly():
    with pytest.warns(UserWarning, match="distillation loss is meaningless"):
        FrozenTeacher(tiny_config())


def test_last_stage_is_pruned_not_skipped():
    teacher = make_teacher()
    keys = list(teacher.state_dict())
    assert not any(k.startswith(("layers.3.blocks", "norm.", "head")) for k in keys)
    assert any(k.startswith("layers.3.downsample") for k in keys)  # the third merging stays
    assert len(teacher.layers[3].blocks) == 0
    full = full_teacher()
    pruned_params = sum(p.numel() for p in teacher.parameters())
    last_stage = sum(p.numel() for p in full.layers[3].blocks.parameters())
    assert pruned_params == sum(p.numel() for p in full.parameters()) - last_stage - 2 * 128 - full.head.fc.weight.numel() - 5


def test_frozen_and_always_eval():
    teacher = make_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    z_t = teacher(torch.randn(2, 3, TINY_IMG, TINY_IMG, requires_grad=True))
    assert z_t.grad_fn is None and not z_t.requires_grad
    assert not z_t.is_inference()  # no_grad, not inference_mode: the cosine loss may save it for backward


def test_teacher_is_outside_training_and_unchanged_by_a_step():
    model = tiny_pretrainer()
    model.train()
    assert not model.teacher.training
    trainable = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not trainable & {id(p) for p in model.teacher.parameters()}
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    model(torch.randn(2, 3, TINY_IMG, TINY_IMG)).loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not opt.state.keys() & set(model.teacher.parameters())  # no optimizer state for the teacher
    for key, value in model.teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("bands, chans", [((0, 1, 2), 3), ((3, 1, 0), 4)])
def test_z_t_against_a_step_by_step_forward(bands, chans):
    full = full_teacher().eval()
    teacher = make_teacher(student={"in_chans": chans}, teacher_bands=bands, mean=(0.5,) * chans, std=(0.2,) * chans)
    load_teacher_weights(teacher, full.state_dict())
    images = torch.randn(2, chans, TINY_IMG, TINY_IMG)
    z_t = teacher(images)
    assert z_t.shape == (2, 128) and z_t.dtype == torch.float32
    with torch.no_grad():
        expected = manual_teacher_feature(full, images, bands)  # 128 -> 96 px resize inside
    torch.testing.assert_close(z_t, expected)


def test_low_precision_teacher_returns_fp32_close_to_fp32():
    full = full_teacher().eval()
    teachers = {}
    for dtype in ("fp32", "bf16"):
        teachers[dtype] = make_teacher(teacher_dtype=dtype)
        load_teacher_weights(teachers[dtype], full.state_dict())
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    exact, low = teachers["fp32"](images), teachers["bf16"](images)
    assert low.dtype == torch.float32
    assert not torch.equal(exact, low)  # it really ran in bf16
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.05)
    # bf16 images are accepted by an fp32 teacher
    torch.testing.assert_close(teachers["fp32"](images.bfloat16()), exact, rtol=0.05, atol=0.05)


def test_dtype_follows_the_run_precision():
    assert resolve_teacher_dtype("auto", "fp32") == torch.float32
    assert resolve_teacher_dtype("auto", "bf16") == torch.bfloat16
    assert resolve_teacher_dtype("auto", "bf16-mixed") == torch.bfloat16  # on CPU as on GPU
    assert resolve_teacher_dtype("auto", "fp16") == torch.float16
    assert resolve_teacher_dtype("fp32", "bf16-mixed") == torch.float32  # an explicit choice wins
    with pytest.raises(ValueError, match="teacher_dtype"):
        resolve_teacher_dtype("int8", "fp32")


def test_weights_cast_once_for_the_run_and_no_casts_per_step():
    teacher = make_teacher()
    assert teacher.patch_embed.proj.weight.dtype == torch.float32  # auto: the run decides
    assert teacher.set_run_precision("bf16-mixed") == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    teacher(images)  # the first call also caches the attention biases
    with torch.profiler.profile(record_shapes=True) as prof:
        z_t = teacher(images)
    assert z_t.dtype == torch.float32 and not z_t.requires_grad
    # No weight is cast during the forward (the input and the pooled output are; on a CPU without
    # bf16 instructions also the activations around each linear's widened GEMM, gfm_fast.models.linear).
    casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[0]]
    size = list(teacher.patch_embed.img_size)
    assert casts[0] == [2, 3, *size] and casts[-1] == [2, 3, 3, 128], casts  # images in, (B, h, w, T) out
    weight_shapes = {tuple(p.shape) for p in teacher.parameters()}
    assert not [c for c in casts if tuple(c) in weight_shapes], casts


def test_auto_follows_the_callers_autocast():
    full = full_teacher().eval()
    teacher = make_teacher()
    load_teacher_weights(teacher, full.state_dict())
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    assert teacher.compute_dtype(images.device) == torch.float32
    exact = teacher(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher.compute_dtype(images.device) == torch.bfloat16
        low = teacher(images)
    assert not torch.equal(exact, low)
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.05)
    # Weights cast to the autocast dtype run as they are: the same numbers as a plain bf16 run.
    teacher.set_run_precision("bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_once = teacher(images)
    torch.testing.assert_close(cast_once, teacher(images), rtol=0, atol=0)


def test_a_teacher_cast_to_bf16_by_hand_runs_quietly_in_bf16():
    """model.to(bfloat16) with model.teacher_dtype=fp32: the weights run as they are, without
    autocast's "only bf16/fp16" warning on every forward (autocast has no fp32 mode)."""
    full = full_teacher().eval()
    teacher = make_teacher(teacher_dtype="fp32")
    load_teacher_weights(teacher, full.state_dict())
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    exact = teacher(images)
    teacher.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = teacher(images)
    assert low.dtype == torch.float32 and not torch.equal(exact, low)
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.05)


def test_bad_inputs():
    teacher = make_teacher()
    with pytest.raises(ValueError, match="teacher_bands"):
        teacher(torch.randn(1, 2, TINY_IMG, TINY_IMG))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        teacher(torch.randn(3, TINY_IMG, TINY_IMG))


def test_bf16_teacher_features_match_fp32_on_real_images():
    """The teacher cast to bf16 for a bf16 run gives the fp32 teacher's stage-3 features (cosine >=
    0.999) on real aerial tiles, at GFM's Swin-B/224 architecture."""
    from PIL import Image

    from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, SwinConfig

    sample = Path(gfm_fast.__file__).parent / "data" / "sample" / "images" / "neon_yell"
    files = sorted(sample.glob("*.jpg"))[:2]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((192, 192), Image.BILINEAR)) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random teacher
        exact = FrozenTeacher(ModelConfig(teacher=SwinConfig(window_size=7, img_size=224)))
    low = copy.deepcopy(exact)
    low.set_run_precision("bf16")
    cosine = torch.nn.functional.cosine_similarity(low(images), exact(images), dim=-1)
    assert (cosine >= 0.999).all(), cosine


def test_cuda_graph_option_leaves_cpu_inputs_eager():
    """run.teacher_cuda_graph on a CPU run: the forward stays the eager one (graphs are CUDA only)."""
    teacher = make_teacher()
    images = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    eager = teacher(images)
    teacher.use_cuda_graph()
    torch.testing.assert_close(teacher(images), eager, rtol=0, atol=0)
    assert teacher._graph.graph is None  # nothing was captured
