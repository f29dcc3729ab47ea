"""load_pretrainer (a whole GFM pretrainer from a release or a run) and load_student_weights (a run's
starting student): the losses and weights they give against the originals."""
import warnings

import pytest
import torch

from gfm_fast.config import SwinConfig
from gfm_fast.models.checkpoint import CheckpointError
from gfm_fast.models.io import load_model, save_model
from gfm_fast.models.pretrainer_io import load_pretrainer, load_student_weights
from model_helpers import (TINY_IMG, TINY_TEACHER, full_teacher, random_block_mask, tiny_pretrainer,
                           to_official_layout, with_prefix, write_release, write_training_run)


@pytest.fixture
def pretrainer():
    return tiny_pretrainer()


def assert_same_weights(module, reference):
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0, msg=key)


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
        assert_same_weights(load_model(path), pretrainer.encoder)


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


# --------------------------------------------------------------------------------------------
# load_student_weights: a run's starting student
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["release", "run", "model dir"])
def test_a_student_starts_from_saved_weights(tmp_path, pretrainer, source):
    """Encoder, projector and decoder from a GFM release or a run; the encoder alone from an
    encoder-only model directory (projector and decoder keep their initialisation)."""
    path = {"release": lambda: write_release(tmp_path / "gfm.pth", pretrainer),
            "run": lambda: write_training_run(tmp_path / "run", pretrainer),
            "model dir": lambda: save_model(pretrainer, tmp_path / "model")}[source]()
    torch.manual_seed(1)
    fresh = tiny_pretrainer(ops_backend="reference")
    initial_decoder = {k: v.clone() for k, v in fresh.student.decoder.state_dict().items()}
    parts = load_student_weights(fresh.student, path)
    assert_same_weights(fresh.student.encoder, pretrainer.student.encoder)
    if source == "model dir":
        assert parts == ("encoder",)
        assert all(torch.equal(v, initial_decoder[k]) for k, v in fresh.student.decoder.state_dict().items())
    else:
        assert parts == ("encoder", "projector", "decoder")
        assert_same_weights(fresh.student, pretrainer.student)


def test_a_12_band_student_starts_from_an_rgb_release(tmp_path, pretrainer):
    """The RGB patch embedding widened into the student's RGB bands (the others start at zero); the
    3-channel decoder does not fit a 12-channel one and keeps its initialisation."""
    path = write_release(tmp_path / "gfm.pth", pretrainer)
    student = tiny_pretrainer(student=dict(in_chans=12), teacher_bands=(3, 2, 1), mean=(0.5,) * 12,
                              std=(0.2,) * 12, ops_backend="reference").student
    assert load_student_weights(student, path, rgb_bands=(3, 2, 1)) == ("encoder", "projector")
    rgb = pretrainer.student.encoder.patch_embed.proj.weight
    wide = student.encoder.patch_embed.proj.weight
    torch.testing.assert_close(wide[:, [3, 2, 1]], rgb[:, [0, 1, 2]])
    assert not wide[:, [0, 4, 5, 6, 7, 8, 9, 10, 11]].any()


def test_a_student_of_another_architecture_is_refused_by_name(tmp_path, pretrainer):
    path = save_model(pretrainer, tmp_path / "model")
    wider = tiny_pretrainer(student=dict(embed_dim=32), ops_backend="reference").student
    with pytest.raises(CheckpointError, match="size mismatch|shape"):
        load_student_weights(wider, path)
