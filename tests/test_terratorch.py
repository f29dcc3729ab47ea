"""TerraTorch (optional extra [terratorch]): the docs' segmentation YAML builds and trains with a GFM backbone
whose features are extract_features' numbers. Skipped where TerraTorch is not installed, unless
GFM_REQUIRE_TERRATORCH=1 (CI installs the extra and sets it: a broken install fails here, never skips)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import timm
import torch
import yaml

import gfm_fast
from gfm_fast import extract_features, save_model

matmul_precision = torch.get_float32_matmul_precision()
try:
    import terratorch  # noqa: F401
except ImportError as exc:
    if os.environ.get("GFM_REQUIRE_TERRATORCH", "0") in ("", "0"):
        pytest.skip(f"the [terratorch] extra is not installed ({exc})", allow_module_level=True)
    raise ImportError(f"GFM_REQUIRE_TERRATORCH is set (as in CI) but terratorch does not import ({exc}); install "
                      "it with GFM_EXTRAS=terratorch bash scripts/install.sh") from exc
finally:
    # Importing terratorch sets torch's float32 matmul precision to "medium" for the whole process (bf16 matmuls
    # on CPUs that have them); this import runs at collection, before every test of the session.
    torch.set_float32_matmul_precision(matmul_precision)

EXAMPLE = Path(__file__).parents[1] / "docs" / "terratorch_segmentation.yaml"
VARIANT = "gfm_swin_test_patch4_window2_64"


def tiny_config(model_dir, data_root=None):
    """The docs' example with the tiny test variant, its file, and (optionally) a tiny data set."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    args = cfg["model"]["init_args"]["model_args"]
    args.update(backbone=f"timm_{VARIANT}", decoder_channels=16)
    args["backbone_pretrained_cfg_overlay"]["file"] = str(model_dir)
    if data_root is not None:
        cfg["trainer"].update(precision="32", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                              default_root_dir=str(data_root / "out"))
        data = cfg["data"]["init_args"]
        data.update(batch_size=2, num_workers=0, img_grep="*_img.tif", label_grep="*_mask.tif")
        for key in ("train_data_root", "train_label_data_root", "val_data_root", "val_label_data_root"):
            data[key] = str(data_root / data[key])
    return cfg


@pytest.fixture
def model_dir(tmp_path):
    return save_model(timm.create_model(VARIANT).eval(), tmp_path / "gfm")


def test_example_model_features_are_extract_features(model_dir):
    from terratorch.tasks import SemanticSegmentationTask

    init_args = tiny_config(model_dir)["model"]["init_args"]
    task = SemanticSegmentationTask(**init_args).eval()
    x = torch.randn(2, 3, 96, 160)  # not the model's 64 px: backbone_dynamic_img_size
    with torch.no_grad():
        maps = task.model.encoder(x)
        logits = task.model(x).output
    expected = extract_features(model_dir, x, stages=[0, 1, 2, 3], device="cpu")
    for stage, got in enumerate(maps):
        torch.testing.assert_close(got, expected[stage], rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 2, 96, 160)


def test_terratorch_fit_runs_the_example(tmp_path, model_dir):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            (tmp_path / "data" / split / kind).mkdir(parents=True)
        for i in range(2):
            tifffile.imwrite(tmp_path / "data" / split / "images" / f"t{i}_img.tif",
                             rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            tifffile.imwrite(tmp_path / "data" / split / "masks" / f"t{i}_mask.tif",
                             rng.integers(0, 2, (64, 64), dtype=np.uint8))
    config = tmp_path / "segmentation.yaml"
    config.write_text(yaml.safe_dump(tiny_config(model_dir, tmp_path)))
    package = Path(gfm_fast.__file__).parent
    env = {**os.environ, "TERRATORCH_CUSTOM_MODULE_PATH": str(package),
           "PYTHONPATH": os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "terratorch", "fit", "-c", str(config), "--trainer.fast_dev_run",
                             "true"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps=1` reached" in result.stdout + result.stderr
