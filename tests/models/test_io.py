"""Model files: save_model/load_model round trips, training and GFM-release checkpoints (load_pretrainer and
load_student_weights: test_pretrainer_io.py)."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from gfm_fast.config import SwinConfig
from gfm_fast.models.checkpoint import CheckpointError
from gfm_fast.models.io import load_model, remove_stale_staging, save_model
from gfm_fast.models.swin import GFMSwinTransformer, swin_kwargs
from model_helpers import TINY_IMG, TINY_STUDENT, tiny_pretrainer, write_release, write_training_run


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


def test_dangling_latest_tag(tmp_path):
    (tmp_path / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="names tag 'step_9'"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------------
# GFM release layout
# --------------------------------------------------------------------------------------------

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
