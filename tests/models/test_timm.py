"""timm integration: the gfm_swin_* names load every checkpoint kind load_model reads, and each timm path
(pooled forward, features_only, forward_intermediates, a fresh head, pretrained_cfg) gives
extract_features' numbers."""
import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import gfm_fast
from gfm_fast import extract_features, load_model, save_model
from gfm_fast.models.checkpoint import CheckpointError
from gfm_fast.models.io import SENTINEL2_L2A_MEAN, SENTINEL2_L2A_STD
from model_helpers import TINY_STUDENT, tiny_pretrainer, to_official_layout, with_prefix
from test_io import write_training_run

VARIANT = "gfm_swin_test_patch4_window2_64"  # TINY_STUDENT's widths at window 2, 64 px
SIZE = 64
KINDS = ("model_dir", "timm_dir", "timm_file", "release", "run_dir")


class YacsLikeConfig(dict):
    pass


def make_pretrainer(chans):
    extra = {}
    if chans == 12:  # the reference's multispectral GFM: the teacher gets all bands
        extra = dict(teacher=dict(in_chans=12), teacher_bands=tuple(range(12)), mean=SENTINEL2_L2A_MEAN,
                     std=SENTINEL2_L2A_STD)
    return tiny_pretrainer(student=dict(window_size=2, img_size=SIZE, in_chans=chans), **extra)


def write_checkpoint(kind, pretrainer, root):
    encoder = pretrainer.encoder
    if kind == "model_dir":
        return save_model(pretrainer, root / "model")
    if kind == "timm_dir":
        return save_model(pretrainer, root / "timm", layout="timm")
    if kind == "timm_file":  # a plain timm state dict: no mean/std, no mask token
        path = root / "swin.pth"
        torch.save({"state_dict": {k: v for k, v in encoder.state_dict().items() if k != "mask_token"}}, path)
        return path
    if kind == "release":  # the GFM release: official layout under encoder.*, plus pickled non-tensors
        path = root / "gfm.pth"
        model = {**with_prefix(to_official_layout(encoder.state_dict(), encoder), "encoder."),
                 **with_prefix(pretrainer.student.projector.state_dict(), "projector."),
                 **with_prefix(pretrainer.student.decoder.state_dict(), "decoder.")}
        torch.save({"model": model, "config": YacsLikeConfig(TYPE="swin"), "args": argparse.Namespace(lr=1)}, path)
        return path
    return write_training_run(root / "run", pretrainer).parent.parent


def uint16_images(chans, count=3):
    return np.random.default_rng(0).integers(0, 65535, size=(count, chans, SIZE, SIZE), dtype=np.uint16)


def normalise(images, cfg):
    """What a timm user does with ``pretrained_cfg``: scale to [0, 1], then mean/std."""
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return (torch.from_numpy(images.astype(np.float32)) / 65535 - mean) / std


def create(path, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="12-band weights without mean/std")
        return timm.create_model(VARIANT, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def reference(path, images, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="12-band weights without mean/std")
        return extract_features(path, images, device="cpu", **kwargs)


@pytest.mark.parametrize("chans", [3, 12])
@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_gives_extract_features_numbers(tmp_path, kind, chans):
    path = write_checkpoint(kind, make_pretrainer(chans), tmp_path)
    images = uint16_images(chans)
    pooled, maps = reference(path, images), reference(path, images, stages=[0, 1, 2, 3])

    model = create(path)  # channels come from the weights
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (chans, SIZE, SIZE)
    expected_mean = SENTINEL2_L2A_MEAN if chans == 12 else (0.485, 0.456, 0.406)
    np.testing.assert_allclose(cfg["mean"], expected_mean, rtol=1e-6)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (chans, SIZE, SIZE)
    x = normalise(images, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled, rtol=1e-5, atol=1e-5)
        inter = model.forward_intermediates(x, norm=True, intermediates_only=True)
    for i, out in enumerate(inter):
        torch.testing.assert_close(out, maps[i], rtol=1e-5, atol=1e-5)

    features = create(path, features_only=True)
    assert features.feature_info.channels() == [16, 32, 64, 128]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        for i, out in enumerate(features(x)):
            torch.testing.assert_close(out, maps[i], rtol=1e-5, atol=1e-5)


def test_out_indices_and_a_fresh_head(tmp_path):
    path = write_checkpoint("model_dir", make_pretrainer(3), tmp_path)
    images = uint16_images(3)
    maps = reference(path, images, stages=[1, 3])
    picked = create(path, features_only=True, out_indices=(1, 3))
    assert picked.feature_info.channels() == [32, 128] and picked.feature_info.reduction() == [8, 32]
    x = normalise(images, picked.pretrained_cfg)
    with torch.no_grad():
        out = picked(x)
    assert len(out) == 2
    torch.testing.assert_close(out[0], maps[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], maps[3], rtol=1e-5, atol=1e-5)

    wide = np.random.default_rng(2).integers(0, 65535, size=(2, 3, 96, 160), dtype=np.uint16)
    dynamic = create(path, features_only=True, dynamic_img_size=True)  # any size divisible by 32
    expected = reference(path, wide, stages=[0, 1, 2, 3])
    with torch.no_grad():
        for i, out in enumerate(dynamic(normalise(wide, dynamic.pretrained_cfg))):
            torch.testing.assert_close(out, expected[i], rtol=1e-5, atol=1e-5)

    classifier = create(path, num_classes=7)
    assert classifier.head.fc.out_features == 7
    with torch.no_grad():
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        logits = classifier(x)
    torch.testing.assert_close(pooled, reference(path, images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, classifier.head.fc(pooled))


def test_widening_and_saved_statistics(tmp_path):
    path = write_checkpoint("model_dir", make_pretrainer(3), tmp_path)
    wide = create(path, in_chans=5, mean=(0.1,) * 5, std=(0.2,) * 5)
    assert wide.patch_embed.proj.weight.shape[1] == 5 and not wide.patch_embed.proj.weight[:, 3:].any()
    assert wide.pretrained_cfg["mean"] == (0.1,) * 5 and wide.pretrained_cfg["input_size"] == (5, SIZE, SIZE)
    torch.testing.assert_close(wide.patch_embed.proj.weight[:, :3], load_model(path).patch_embed.proj.weight)


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model(VARIANT, pretrained=True)
    other = tiny_pretrainer(student=dict(embed_dim=24, num_heads=(1, 2, 4, 8), window_size=2, img_size=SIZE))
    path = save_model(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="embed_dim 24 .*gfm_fast.load_model") as error:
        create(path)
    # the fix the message names works: no registered name has these widths, so they are arguments
    assert "timm.create_model('gfm_swin_test_patch4_window2_64', embed_dim=24, ...)" in str(error.value)
    images = uint16_images(3)
    built = create(path, embed_dim=24)
    with torch.no_grad():
        torch.testing.assert_close(built(normalise(images, built.pretrained_cfg)), reference(path, images),
                                   rtol=1e-5, atol=1e-5)
    registered = save_model(make_pretrainer(3), tmp_path / "registered")  # fits VARIANT: the message names it
    with pytest.raises(CheckpointError, match=f"create '{VARIANT}' instead"):
        timm.create_model("gfm_swin_base_patch4_window6_192", pretrained=True, img_size=SIZE, window_size=2,
                          pretrained_cfg_overlay=dict(file=str(registered)))


def test_names_register_on_import_gfm_fast_without_heavy_imports():
    code = ("import sys, gfm_fast\n"
            "assert 'timm' not in sys.modules and 'torch' not in sys.modules\n"
            "import timm\n"
            f"assert {VARIANT!r} in timm.list_models('gfm_swin_*')\n"
            "heavy = [m for m in ('gfm_fast.ops', 'gfm_fast.models.swin', 'deepspeed') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(gfm_fast.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    subprocess.run([sys.executable, "-c", "import timm, gfm_fast\n"
                                          f"assert {VARIANT!r} in timm.list_models('gfm_swin_*')"], check=True, env=env)
    assert gfm_fast  # imported here too (by the test module): the names are registered in this process
    assert VARIANT in timm.list_models("gfm_swin_*")


def test_timm_config_keeps_a_non_default_mlp_ratio():
    """config.json's model_args carry mlp_ratio: plain timm builds MLPs of the saved width (timm's
    default is 4), and gfm_fast reads the same ratio back."""
    from gfm_fast.config import SwinConfig
    from gfm_fast.models.timm_format import read_timm_config, timm_config_json

    swin = SwinConfig(**{**TINY_STUDENT, "window_size": 2, "img_size": SIZE, "mlp_ratio": 2.0})
    meta = timm_config_json(swin, (0.5,) * 3, (0.2,) * 3, model_name=VARIANT, format_tag="test")
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=0, **meta["model_args"])
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 2 * TINY_STUDENT["embed_dim"]
    assert read_timm_config(meta, "config.json")[0].mlp_ratio == 2.0
