"""Model files: save_model/load_model round trips, training and GFM-release checkpoints, load_pretrainer."""
import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from gfm_fast.config import SwinConfig, TrainConfig, to_dict
from gfm_fast.models.checkpoint import CheckpointError
from gfm_fast.models.io import load_model, load_pretrainer, remove_stale_staging, save_model
from gfm_fast.models.swin import GFMSwinTransformer, swin_kwargs
from model_helpers import (TINY_IMG, TINY_STUDENT, TINY_TEACHER, full_teacher, random_block_mask, tiny_pretrainer,
                           to_official_layout, with_prefix)


class YacsLikeConfig(dict):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["immutable"] = True


@pytest.fixture
def pretrainer():
    return tiny_pretrainer()


def features(encoder, x):
    with torch.no_grad():
        return encoder.eval().forward_features(x)


def assert_same_encoder(loaded, original):
    reference = original.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[key].to(value.dtype), rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


# --------------------------------------------------------------------------------------------
# save_model / load_model
# --------------------------------------------------------------------------------------------

def test_round_trip(tmp_path, pretrainer):
    path = save_model(pretrainer, tmp_path / "gfm")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["format"] == "gfm_fast.encoder" and meta["architecture"]["embed_dim"] == 16
    assert meta["architecture"]["img_size"] == TINY_IMG and meta["architecture"]["in_chans"] == 3
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["model_name"]
    loaded = load_model(path)
    assert isinstance(loaded, GFMSwinTransformer) and not loaded.training
    assert loaded.gfm_config == pretrainer.encoder.gfm_config
    assert_same_encoder(loaded, pretrainer.encoder)
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    torch.testing.assert_close(features(loaded, x), features(pretrainer.encoder, x))
    assert features(loaded, torch.randn(1, 3, 96, 160)).shape == (1, 3, 5, 128)  # any size divisible by 32
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_model_has_the_umask_permissions(tmp_path, pretrainer, umask):
    """As a plain mkdir and open would make them: readable by colleagues under umask 022."""
    previous = os.umask(umask)
    try:
        path = save_model(pretrainer, tmp_path / "gfm")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    for file in path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_remove_stale_staging_clears_only_what_a_killed_save_left(tmp_path, pretrainer):
    """A save killed outright (SIGKILL: no cleanup runs) leaves a hidden whole model beside the
    target; it goes once the target holds a model, and nothing of another target's goes with it."""
    target = save_model(pretrainer, tmp_path / "model")
    killed_save = ("import os, signal, sys\nimport gfm_fast.models.io as io\n"
                   "io._replace_dir = lambda staging, target: os.kill(os.getpid(), signal.SIGKILL)\n"
                   "io.save_model(io.load_model(sys.argv[1]), sys.argv[1])\n")
    assert subprocess.run([sys.executable, "-c", killed_save, str(target)]).returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".model.*"))
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    (tmp_path / ".model2.tmp-other").mkdir()  # another target's save in progress
    moved = target.rename(tmp_path / "elsewhere")
    assert remove_stale_staging(target) == [] and left[0].is_dir()  # no model at the target: maybe the one copy
    moved.rename(target)
    assert remove_stale_staging(target) == left and not left[0].exists()
    assert (tmp_path / ".model2.tmp-other").is_dir()
    assert_same_encoder(load_model(target), pretrainer.encoder)


def test_save_refuses_to_overwrite_user_files(tmp_path, pretrainer):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_model(pretrainer, user_file)
    user_dir = tmp_path / "data"
    user_dir.mkdir()
    (user_dir / "image.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a gfm_fast model directory"):
        save_model(pretrainer, user_dir)
    assert user_file.read_text() == "mine" and (user_dir / "image.png").exists()
    (tmp_path / "empty").mkdir()
    save_model(pretrainer, tmp_path / "empty")  # an empty directory is fine
    # our own model directory is replaced
    first = save_model(pretrainer, tmp_path / "model")
    with torch.no_grad():
        pretrainer.encoder.norm.weight.add_(1.0)
    save_model(pretrainer.student, first)
    assert_same_encoder(load_model(first), pretrainer.encoder)
    # ...unless someone put their own file in it
    (first / "extra.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_model(pretrainer, first)


def test_a_failed_replace_keeps_the_previous_model(tmp_path, pretrainer, monkeypatch):
    """The new model cannot be moved into place (disk full, say): the model saved before is still
    there and loads, and no staging or retired directory is left beside it."""
    target = save_model(pretrainer, tmp_path / "model")
    before = load_model(target).state_dict()
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".model.tmp-"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    with torch.no_grad():
        pretrainer.encoder.norm.weight.add_(1.0)
    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        save_model(pretrainer, target)
    monkeypatch.setattr(os, "rename", real_rename)
    after = load_model(target).state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_plain_encoder_without_config(tmp_path):
    import timm

    encoder = timm.create_model("gfm_swin_test_patch4_window2_64")
    loaded = load_model(save_model(encoder, tmp_path / "m"))
    assert loaded.gfm_config.swin.img_size == 64 and loaded.gfm_config.model_name == "gfm_swin_test_patch4_window2_64"
    assert_same_encoder(loaded, encoder)
    with pytest.raises(TypeError, match="save_model expects"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")


def test_model_dir_errors(tmp_path, pretrainer):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a gfm_fast model directory"):
        load_model(tmp_path / "empty")
    path = save_model(pretrainer, tmp_path / "m")
    with pytest.raises(TypeError, match="unknown override"):
        load_model(path, windowsize=8)
    (path / "model.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)


# --------------------------------------------------------------------------------------------
# Training checkpoints (DeepSpeed layout written by train.py)
# --------------------------------------------------------------------------------------------

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


def test_load_model_from_training_checkpoints(tmp_path, pretrainer):
    tag = write_training_run(tmp_path / "run", pretrainer)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tag, tag / "mp_rank_00_model_states.pt"):
        loaded = load_model(path)
        assert_same_encoder(loaded, pretrainer.encoder)
        assert loaded.gfm_config.swin == pretrainer.config.student  # image size from the run config


def test_the_newest_complete_checkpoint_wins_over_a_stale_latest(tmp_path, pretrainer):
    """A run stopped between a checkpoint's COMPLETE marker and the latest update: the readers take
    the newest complete checkpoint (step 9), not the older one latest still names (step 5)."""
    older = write_training_run(tmp_path / "run", pretrainer)
    newer = older.parent / "step_00000009"
    newer.mkdir()
    states = torch.load(older / "mp_rank_00_model_states.pt", weights_only=True)
    states["module"] = {k: v + 1 for k, v in states["module"].items()}
    torch.save(states, newer / "mp_rank_00_model_states.pt")
    (newer / "gfm_config.json").write_text((older / "gfm_config.json").read_text())
    for tag in (older, newer):
        (tag / "COMPLETE").write_text("{}")
    assert (older.parent / "latest").read_text() == older.name
    for path in (tmp_path / "run", older.parent):
        loaded = load_model(path)
        torch.testing.assert_close(loaded.patch_embed.proj.weight, pretrainer.encoder.patch_embed.proj.weight + 1)


def test_load_model_prefers_the_export_and_reads_bf16_checkpoints(tmp_path, pretrainer):
    write_training_run(tmp_path / "run", pretrainer, dtype=torch.bfloat16, with_export=True)
    assert_same_encoder(load_model(tmp_path / "run"), pretrainer.encoder)  # the fp32 export
    loaded = load_model(tmp_path / "run" / "checkpoints")
    assert loaded.patch_embed.proj.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.patch_embed.proj.weight, pretrainer.encoder.patch_embed.proj.weight,
                               rtol=1e-2, atol=1e-2)


def test_zero3_partitioned_checkpoint_points_to_the_export(tmp_path, pretrainer):
    tag = write_training_run(tmp_path / "run", pretrainer, zero3=True)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tag):
        with pytest.raises(CheckpointError, match=f"{tag} is a ZeRO-3 checkpoint: .*so no model can be rebuilt "
                                                  f"from it; the encoder train.py gathers at each save is missing"):
            load_model(path)
    with pytest.raises(CheckpointError, match="holds empty \\(ZeRO-3 partitioned\\) weights"):
        load_model(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")  # a rank's shard, named directly


def test_checkpoint_exports_are_preferred_for_encoders(tmp_path, pretrainer):
    tag = write_training_run(tmp_path / "run", pretrainer, zero3=True, tag_export=True)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tag):
        assert_same_encoder(load_model(path), pretrainer.encoder)  # from <tag>/model, not the empty states


def test_load_pretrainer_of_a_zero3_run_says_why_not(tmp_path, pretrainer):
    """DeepSpeed's ZeRO-3 writes only per-rank shards (no mp_rank_00_model_states.pt): the error names
    the ZeRO-3 checkpoint and where the encoder is, not 'encoder-only model directory' of the run."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    (tag / "COMPLETE").write_text("{}")
    (tag.parent / "latest").write_text(tag.name)
    save_model(pretrainer, tag / "model")
    save_model(pretrainer, tmp_path / "run" / "model")
    for path in (tmp_path / "run", tag.parent, tag):
        with pytest.raises(CheckpointError, match=f"{tag} is a ZeRO-3 checkpoint: .* the encoder is in "):
            load_pretrainer(path)
        assert_same_encoder(load_model(path), pretrainer.encoder)


def test_dangling_latest_tag(tmp_path):
    (tmp_path / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="names tag 'step_9'"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------------
# GFM release layout
# --------------------------------------------------------------------------------------------

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


def test_load_model_from_gfm_release(tmp_path, pretrainer):
    path = write_release(tmp_path / "gfm.pth", pretrainer)
    loaded = load_model(path, img_size=TINY_IMG)
    assert_same_encoder(loaded, pretrainer.encoder)
    assert loaded.gfm_config.swin == pretrainer.config.student
    x = torch.randn(1, 3, TINY_IMG, TINY_IMG)
    torch.testing.assert_close(features(loaded, x), features(pretrainer.encoder, x))


def test_load_model_interpolates_for_another_window(tmp_path, pretrainer):
    path = write_release(tmp_path / "gfm.pth", pretrainer)
    loaded = load_model(path, img_size=256, window_size=8)
    table = loaded.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, 1)
    assert features(loaded, torch.randn(1, 3, 256, 256)).shape == (1, 8, 8, 128)


def test_load_model_from_a_plain_swin_checkpoint(tmp_path):
    plain = SwinTransformer(**swin_kwargs(SwinConfig(**TINY_STUDENT)))
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "swin.pth")
    loaded = load_model(tmp_path / "swin.pth", img_size=TINY_IMG)
    x = torch.randn(1, 3, TINY_IMG, TINY_IMG)
    torch.testing.assert_close(features(loaded, x), features(plain, x))


def test_multispectral_load_needs_normalisation(tmp_path, pretrainer):
    path = save_model(pretrainer, tmp_path / "m")
    with pytest.raises(ValueError, match="pass mean=... and std=..."):
        load_model(path, in_chans=5)
    loaded = load_model(path, in_chans=5, mean=(0.1,) * 5, std=(0.2,) * 5)
    assert loaded.patch_embed.proj.weight.shape[1] == 5 and loaded.gfm_config.mean == (0.1,) * 5
    assert not loaded.patch_embed.proj.weight[:, 3:].any()  # widened: extra bands start at zero


# --------------------------------------------------------------------------------------------
# load_pretrainer
# --------------------------------------------------------------------------------------------

def same_losses(a, b, x, mask):
    out_a, out_b = a(x, mask), b(x, mask)
    torch.testing.assert_close(out_a.loss_rec, out_b.loss_rec)
    torch.testing.assert_close(out_a.loss_feat, out_b.loss_feat)
    torch.testing.assert_close(out_a.loss, out_b.loss)


def test_load_pretrainer_from_gfm_release(tmp_path):
    teacher_full = full_teacher()
    original = tiny_pretrainer(teacher_state_dict=teacher_full.state_dict())
    path = write_release(tmp_path / "gfm.pth", original, teacher_full)
    loaded = load_pretrainer(path, img_size=TINY_IMG, teacher=SwinConfig(**TINY_TEACHER), ops_backend="reference")
    assert loaded.config.student == original.config.student and loaded.config.teacher == original.config.teacher
    x, mask = torch.randn(2, 3, TINY_IMG, TINY_IMG), random_block_mask(2)
    same_losses(original, loaded, x, mask)


def test_load_pretrainer_from_training_run(tmp_path):
    teacher_full = full_teacher()
    teacher_file = tmp_path / "teacher.pth"
    torch.save({"model": to_official_layout(teacher_full.state_dict(), teacher_full)}, teacher_file)
    original = tiny_pretrainer(teacher_weights=str(teacher_file))
    tag = write_training_run(tmp_path / "run", original, with_export=True, tag_export=True)
    x, mask = torch.randn(2, 3, TINY_IMG, TINY_IMG), random_block_mask(2)
    for path in (tmp_path / "run", tag):  # the DeepSpeed states win over the encoder-only exports
        loaded = load_pretrainer(path)  # config (incl. teacher_weights) from the run
        assert loaded.config == original.config
        same_losses(original, loaded, x, mask)


@pytest.mark.filterwarnings("ignore:GFM teacher has NO weights")
def test_load_pretrainer_errors(tmp_path, pretrainer):
    with pytest.raises(CheckpointError, match="encoder-only"):
        load_pretrainer(save_model(pretrainer, tmp_path / "m"))
    encoder_only = tmp_path / "enc.pth"
    torch.save({"model": with_prefix(pretrainer.encoder.state_dict(), "encoder.")}, encoder_only)
    with pytest.raises(CheckpointError, match="no projector"):
        load_pretrainer(encoder_only)
    release = write_release(tmp_path / "gfm.pth", pretrainer)
    with pytest.raises(TypeError, match="unknown override"):
        load_pretrainer(release, alpah=2.0)
    with pytest.raises(CheckpointError, match="projector.weight .* teacher has 1024"):
        load_pretrainer(release)  # the default Swin-B teacher does not fit this tiny projector
    broken = torch.load(release, weights_only=False)["model"]
    del broken["decoder.0.bias"]
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 0\.bias"):
        load_pretrainer(tmp_path / "broken.pth", img_size=TINY_IMG, teacher=SwinConfig(**TINY_TEACHER),
                        ops_backend="reference")


# --------------------------------------------------------------------------------------------
# save_model(layout="timm"): a directory plain timm loads
# --------------------------------------------------------------------------------------------

PLAIN_TIMM = """
import json, sys
import timm, torch
from safetensors.torch import load_file
directory, images, out = sys.argv[1:4]
x = torch.load(images)
hub = timm.create_model("local-dir:" + directory, pretrained=True).eval()
args = json.load(open(directory + "/config.json"))["model_args"]
named = timm.create_model("swin_base_patch4_window7_224", num_classes=0, **args).eval()
named.load_state_dict(load_file(directory + "/model.safetensors"))
with torch.no_grad():
    torch.save({"hub": hub(x), "named": named(x), "mean": hub.pretrained_cfg["mean"]}, out)
assert not [m for m in sys.modules if m.startswith("gfm_fast")], "gfm_fast was imported"
"""


def test_timm_layout_loads_in_plain_timm(tmp_path, pretrainer):
    import sys

    from gfm_fast import extract_features

    path = save_model(pretrainer, tmp_path / "timm", layout="timm")
    meta = json.loads((path / "config.json").read_text())
    assert meta["architecture"] == "swin_base_patch4_window7_224" and meta["model_args"]["window_size"] == 4
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    result = torch.load(tmp_path / "y.pt", weights_only=True)
    expected = extract_features(pretrainer.encoder, x)
    torch.testing.assert_close(result["hub"], expected)
    torch.testing.assert_close(result["named"], expected)
    assert tuple(result["mean"]) == pretrainer.config.mean
    loaded = load_model(path)  # and back
    assert loaded.gfm_config.mean == pretrainer.config.mean and loaded.gfm_config.swin == pretrainer.config.student
    reference = pretrainer.encoder.state_dict()
    for key, value in loaded.state_dict().items():  # all but the mask token (plain Swin has none)
        assert key == "mask_token" or torch.equal(value, reference[key]), key
    save_model(pretrainer, path, layout="timm")  # ours: may be replaced
    with pytest.raises(ValueError, match="unknown layout"):
        save_model(pretrainer, tmp_path / "x", layout="onnx")


# --------------------------------------------------------------------------------------------
# 12-band checkpoints load as saved
# --------------------------------------------------------------------------------------------

TEACHER_224 = dict(window_size=7, img_size=224)  # what infer_swin_config reads off a window-7 teacher


def multispectral_release(tmp_path, teacher_chans):
    from gfm_fast.models.io import SENTINEL2_L2A_MEAN, SENTINEL2_L2A_STD

    teacher_full = full_teacher(**TEACHER_224, in_chans=teacher_chans)
    bands = tuple(range(12)) if teacher_chans == 12 else (3, 2, 1)
    original = tiny_pretrainer(student=dict(in_chans=12), teacher={**TEACHER_224, "in_chans": teacher_chans},
                               teacher_bands=bands, mean=SENTINEL2_L2A_MEAN, std=SENTINEL2_L2A_STD,
                               teacher_state_dict=teacher_full.state_dict())
    return original, write_release(tmp_path / "gfm12.pth", original, teacher_full)


def test_12_band_release_loads_as_saved(tmp_path):
    from gfm_fast.models.io import SENTINEL2_L2A_MEAN

    original, path = multispectral_release(tmp_path, teacher_chans=12)
    with pytest.warns(UserWarning, match="Sentinel-2 L2A") as caught:
        loaded = load_pretrainer(path, ops_backend="reference")
    assert len([w for w in caught if "Sentinel-2" in str(w.message)]) == 1
    assert loaded.config.teacher_bands == tuple(range(12)) and loaded.config.mean == SENTINEL2_L2A_MEAN
    assert loaded.config.student == original.config.student and loaded.config.teacher == original.config.teacher
    x, mask = torch.randn(2, 12, TINY_IMG, TINY_IMG), random_block_mask(2)
    same_losses(original, loaded, x, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given mean/std: no warning
        load_pretrainer(path, ops_backend="reference", mean=(0.1,) * 12, std=(0.2,) * 12)


@pytest.mark.filterwarnings("ignore:12-band weights without mean/std")
def test_12_band_student_with_rgb_teacher_names_teacher_bands(tmp_path):
    original, path = multispectral_release(tmp_path, teacher_chans=3)
    with pytest.raises(CheckpointError, match=r"teacher takes 3 of the student's 12 channels: pass teacher_bands="):
        load_pretrainer(path, ops_backend="reference")
    loaded = load_pretrainer(path, ops_backend="reference", teacher_bands=(3, 2, 1))
    same_losses(original, loaded, torch.randn(2, 12, TINY_IMG, TINY_IMG), random_block_mask(2))
