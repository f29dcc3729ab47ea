"""Checkpoint reading (tensors only), layout mapping, rel-pos resizing, widening and strict loading."""
import argparse
import os
import warnings

import numpy as np
import pytest
import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.swin_transformer import SwinTransformer

from gfm_fast.config import SwinConfig
from gfm_fast.models.checkpoint import (CheckpointError, checkpoint_filter_fn, infer_swin_config,
                                        load_state_dict_strict, load_teacher_weights, read_checkpoint,
                                        unwrap_state_dict)
from gfm_fast.models.swin import build_student, swin_kwargs
from gfm_fast.models.teacher import FrozenTeacher
from model_helpers import (TINY_IMG, TINY_STUDENT, full_teacher, manual_teacher_feature, tiny_config, to_official_layout,
                           with_prefix)


class YacsLikeConfig(dict):
    """Pickled like yacs' CfgNode (a dict subclass with attributes): not loadable with weights_only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["immutable"] = True


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w')",))


def make_teacher() -> FrozenTeacher:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FrozenTeacher(tiny_config())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def test_reads_tensors_only_and_never_runs_code(tmp_path):
    marker = tmp_path / "code_ran"
    state = {"w": torch.randn(2, 3)}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "config": YacsLikeConfig(LR=1e-3, MODEL=YacsLikeConfig(TYPE="swin")),
                "args": argparse.Namespace(lr=0.1), "rng": np.random.get_state(), "payload": RunsCode(str(marker))},
               path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what a plain safe load says about this file
    checkpoint = read_checkpoint(str(path))
    assert not marker.exists()
    torch.testing.assert_close(unwrap_state_dict(checkpoint), state)
    assert checkpoint["config"]["LR"] == 1e-3  # plain data survives, as plain dicts
    assert type(checkpoint["config"]) is not YacsLikeConfig


class WritesWithNumpy:
    """A NumPy callable that is not an array reconstructor: it writes a file when called."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (np.save, (self.marker, np.zeros(1)))


def test_numpy_functions_other_than_reconstructors_never_run(tmp_path):
    marker = tmp_path / "numpy_ran.npy"
    path = tmp_path / "ckpt.pth"
    state = {"w": torch.randn(2)}
    torch.save({"model": state, "metrics": np.arange(3.0), "x": WritesWithNumpy(str(marker))}, path)
    checkpoint = read_checkpoint(str(path))
    assert not marker.exists()
    np.testing.assert_array_equal(checkpoint["metrics"], np.arange(3.0))  # real arrays still load
    torch.testing.assert_close(unwrap_state_dict(checkpoint), state)


def test_blocked_globals_are_a_clear_error(tmp_path):
    class CallsSystem:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": CallsSystem()}, path)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_checkpoint(str(path))


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth does not exist"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        read_checkpoint(str(corrupt))
    for name, data in (("text.pth", b"hello"), ("opcodes.pth", b"a")):  # KeyError / IndexError in pickle
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            read_checkpoint(str(tmp_path / name))
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.randn(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_checkpoint(str(truncated))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(str(bad_st))
    with pytest.raises(CheckpointError, match="no weights"):
        unwrap_state_dict({"epoch": 3})


# --------------------------------------------------------------------------------------------
# Teacher weights: official and timm layouts
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["official", "timm"])
def test_teacher_weights_in_both_layouts(tmp_path, layout):
    full = full_teacher().eval()
    state = to_official_layout(full.state_dict(), full) if layout == "official" else full.state_dict()
    if layout == "official":
        assert "layers.0.downsample.reduction.weight" in state and "head.weight" in state
    path = tmp_path / "teacher.pth"
    torch.save({"model": state}, path)
    teacher = make_teacher()
    load_teacher_weights(teacher, str(path))
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), manual_teacher_feature(full, x, (0, 1, 2)))


def test_teacher_weights_from_config_path(tmp_path):
    full = full_teacher()
    path = tmp_path / "teacher.pth"
    torch.save(full.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loaded teacher does not warn
        teacher = FrozenTeacher(tiny_config(teacher_weights=str(path)))
    torch.testing.assert_close(teacher.layers[3].downsample.reduction.weight, full.layers[3].downsample.reduction.weight)


def test_missing_and_mismatched_teacher_weights_are_named(tmp_path):
    full = full_teacher()
    state = full.state_dict()
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers\.1\.blocks\.0\.mlp\.fc1\.weight"):
        load_teacher_weights(make_teacher(), state)
    wider = full_teacher(embed_dim=24).state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatches.*attn\.proj\.bias: checkpoint \(24,\) vs model \(16,\)"):
        load_teacher_weights(make_teacher(), wider)
    extra = {**full.state_dict(), "layers.0.blocks.0.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): layers\.0\.blocks\.0\.extra"):
        load_teacher_weights(make_teacher(), extra)
    with pytest.raises(CheckpointError, match="does not exist"):
        FrozenTeacher(tiny_config(teacher_weights=str(tmp_path / "nope.pth")))


# --------------------------------------------------------------------------------------------
# checkpoint_filter_fn
# --------------------------------------------------------------------------------------------

def test_filter_maps_gfm_release_encoder_to_timm_keys():
    encoder = build_student(SwinConfig(**TINY_STUDENT), ops_backend="reference")
    release = {**with_prefix(to_official_layout(encoder.state_dict(), encoder), "encoder."),
               "decoder.0.weight": torch.zeros(1), "teacher.patch_embed.proj.weight": torch.zeros(1)}
    mapped = checkpoint_filter_fn({"model": release}, encoder)
    assert set(mapped) == set(encoder.state_dict())
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(mapped[key], value, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")
def test_rel_pos_tables_are_interpolated_for_a_new_window():
    source = build_student(SwinConfig(**TINY_STUDENT), ops_backend="reference")  # window 4: 7x7 tables
    target = build_student(SwinConfig(**{**TINY_STUDENT, "window_size": 8}), ops_backend="reference")  # 15x15
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    mapped = checkpoint_filter_fn(source.state_dict(), target)
    assert mapped[key].shape == (15 * 15, 1) == target.state_dict()[key].shape
    expected = resize_rel_pos_bias_table(source.state_dict()[key], new_window_size=(8, 8), new_bias_shape=(225, 1))
    torch.testing.assert_close(mapped[key], expected)
    # the centre (zero offset) keeps its value; a constant table stays constant
    torch.testing.assert_close(mapped[key].view(15, 15)[7, 7], source.state_dict()[key].view(7, 7)[3, 3])
    constant = {key: torch.full((49, 1), 0.25)}
    torch.testing.assert_close(checkpoint_filter_fn(constant, target)[key], torch.full((225, 1), 0.25))
    load_state_dict_strict(target, mapped)  # everything else fits as is


def test_rgb_patch_embed_is_widened_into_bands():
    rgb = build_student(SwinConfig(**TINY_STUDENT), ops_backend="reference").eval()
    wide = build_student(SwinConfig(**{**TINY_STUDENT, "in_chans": 5}), ops_backend="reference").eval()
    mapped = checkpoint_filter_fn(rgb.state_dict(), wide, rgb_bands=(3, 1, 0))
    weight = mapped["patch_embed.proj.weight"]
    assert weight.shape == (16, 5, 4, 4)
    torch.testing.assert_close(weight[:, [3, 1, 0]], rgb.patch_embed.proj.weight, rtol=0, atol=0)
    assert not weight[:, [2, 4]].any()
    load_state_dict_strict(wide, mapped)
    x = torch.randn(1, 5, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        torch.testing.assert_close(wide.forward_features(x), rgb.forward_features(x[:, [3, 1, 0]]))
    with pytest.raises(CheckpointError, match="only widening"):
        checkpoint_filter_fn(wide.state_dict(), rgb)


def test_patch_embed_is_resampled_for_another_patch_size():
    p4 = build_student(SwinConfig(**TINY_STUDENT), ops_backend="reference")
    p2 = build_student(SwinConfig(**{**TINY_STUDENT, "patch_size": 2, "img_size": 64}), ops_backend="reference")
    mapped = checkpoint_filter_fn(p4.state_dict(), p2)
    assert mapped["patch_embed.proj.weight"].shape == (16, 3, 2, 2)


def test_infer_architecture_from_shapes():
    cfg = SwinConfig(embed_dim=24, depths=(2, 1, 3, 1), num_heads=(2, 3, 6, 12), window_size=3, img_size=96,
                     in_chans=4, mlp_ratio=2.0)
    encoder = build_student(cfg, ops_backend="reference")
    official = to_official_layout(encoder.state_dict(), encoder)
    assert infer_swin_config(checkpoint_filter_fn(official, encoder), img_size=96) == cfg
    # img_size is not in the weights: the size whose last stage is one window (96 px here), so the
    # model is rebuilt as saved (at another size timm would shrink that stage's window).
    assert infer_swin_config(encoder.state_dict()) == cfg
    teacher_like = SwinTransformer(**swin_kwargs(SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                            window_size=7, img_size=224)))
    assert infer_swin_config(teacher_like.state_dict()).img_size == 224  # the 22k teacher's window 7
    assert infer_swin_config(build_student(SwinConfig(), ops_backend="reference").state_dict()).img_size == 192
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        infer_swin_config({"norm.weight": torch.ones(3)})
    with pytest.raises(TypeError, match="unknown architecture override"):
        infer_swin_config(encoder.state_dict(), depth=3)


def test_timm_pretrained_loading_uses_our_filter(tmp_path):
    import timm

    source = timm.create_model("gfm_swin_test_patch4_window2_64")
    path = tmp_path / "official.pth"
    torch.save({"model": to_official_layout(source.state_dict(), source)}, path)
    loaded = timm.create_model("gfm_swin_test_patch4_window2_64", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Layouts: GFM release, Microsoft Swin, timm, mmseg backbone -> the same features
# --------------------------------------------------------------------------------------------

def concat_to_unfold(value):
    """A patch merging's (out, 4C) weight or (4C,) norm from Swin's concat order (neighbour n =
    2 * dw + dh, then channel c) to mmseg's nn.Unfold order (channel c, then neighbour 2 * dh + dw)."""
    chans = value.shape[-1] // 4
    out = torch.empty_like(value)
    for c in range(chans):
        for dh in (0, 1):
            for dw in (0, 1):
                out[..., c * 4 + dh * 2 + dw] = value[..., (dw * 2 + dh) * chans + c]
    return out


def to_mmseg_layout(model):
    """mmseg's Swin backbone checkpoint (as its swin2mmseg converter and its training write them)."""
    last = len(model.layers) - 1
    out = {}
    for key, value in to_official_layout(model.state_dict(), model).items():
        if key.startswith("head.") or key.endswith("attn_mask"):
            continue
        if key.startswith("norm."):
            out[f"backbone.norm{last}.{key[len('norm.'):]}"] = value
            continue
        new = (key.replace("layers.", "stages.").replace(".attn.", ".attn.w_msa.")
               .replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
               .replace("patch_embed.proj.", "patch_embed.projection."))
        if "downsample.reduction." in key or "downsample.norm." in key:
            value = concat_to_unfold(value)
        out["backbone." + new] = value
    out["backbone.norm0.weight"] = torch.randn(16)  # output norms only mmseg's decoders use
    out["decode_head.conv_seg.weight"] = torch.randn(5, 8, 1, 1)
    return {"meta": {"mmseg_version": "1.2.2"}, "state_dict": out}


def test_mmseg_merging_order_matches_unfold():
    """The test's own mmseg conversion computes what an Unfold-based merging computes."""
    model = SwinTransformer(**swin_kwargs(SwinConfig(**TINY_STUDENT)))
    merge = model.layers[1].downsample
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
        x = torch.randn(2, 8, 8, 16)  # NHWC
        reference = merge(x).reshape(2, -1, 32)
        unfolded = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
        normed = torch.nn.functional.layer_norm(unfolded, (64,), concat_to_unfold(merge.norm.weight),
                                                concat_to_unfold(merge.norm.bias), merge.norm.eps)
        torch.testing.assert_close(normed @ concat_to_unfold(merge.reduction.weight).t(), reference)


@pytest.mark.parametrize("layout", ["timm", "microsoft", "gfm_release", "mmseg"])
def test_every_layout_gives_the_same_features(tmp_path, layout):
    from gfm_fast import extract_features, load_model

    model = SwinTransformer(**{**swin_kwargs(SwinConfig(**TINY_STUDENT)), "num_classes": 5}).eval()
    with torch.no_grad():
        for norm in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)  # non-trivial norms, so a misplaced one shows
    files = {"timm": lambda: {"state_dict": model.state_dict()},
             "microsoft": lambda: {"model": to_official_layout(model.state_dict(), model)},
             "gfm_release": lambda: {"model": with_prefix(to_official_layout(model.state_dict(), model), "encoder.")},
             "mmseg": lambda: to_mmseg_layout(model)}
    path = tmp_path / f"{layout}.pth"
    torch.save(files[layout](), path)
    loaded = load_model(path)
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    torch.testing.assert_close(extract_features(loaded, x), extract_features(model, x), rtol=1e-5, atol=1e-5)
    maps, expected = extract_features(loaded, x, stages=[0, 1, 2, 3]), extract_features(model, x, stages=[0, 1, 2, 3])
    for stage in range(4):
        torch.testing.assert_close(maps[stage], expected[stage], rtol=1e-5, atol=1e-5)
