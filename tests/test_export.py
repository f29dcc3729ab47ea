"""python -m gfm_fast.export: ONNX and torch.export files give extract_features' numbers, for any batch."""
import dataclasses
import json

import numpy as np
import pytest
import timm
import torch

from gfm_fast import extract_features, save_model
from gfm_fast.export import main
from gfm_fast.models.registry import VARIANTS
from gfm_fast.models.swin import EncoderConfig

VARIANT = "gfm_swin_test_patch4_window2_64"


def saved_model(tmp_path, chans):
    encoder = timm.create_model(VARIANT, in_chans=chans).eval()
    if chans != 3:  # the statistics a multispectral model was trained with
        swin = dataclasses.replace(VARIANTS[VARIANT], in_chans=chans)
        encoder.gfm_config = EncoderConfig(swin, tuple(np.linspace(0.1, 0.3, chans)), tuple(np.linspace(0.2, 0.4, chans)))
    return save_model(encoder, tmp_path / f"model{chans}")


def normalised(mean, std, images):
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return (torch.from_numpy(images).float() / 65535 - mean) / std


def test_pt2_12_band_at_another_size(tmp_path, capsys):
    model = saved_model(tmp_path, 12)
    out = tmp_path / "gfm.pt2"
    assert main(["--model", str(model), "--out", str(out), "--image-size", "96"]) == 0
    assert "torch.export.load: max relative difference" in capsys.readouterr().out
    images = np.random.default_rng(0).integers(0, 65535, (5, 12, 96, 96), dtype=np.uint16)
    extra = {"gfm_fast.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    meta = json.loads(extra["gfm_fast.json"])
    assert meta["image_size"] == 96 and meta["in_chans"] == 12 and meta["stages"] is None
    x = normalised(meta["mean"], meta["std"], images)
    expected = extract_features(model, images, device="cpu")
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(program.module()(x[:1]), expected[:1], rtol=1e-4, atol=1e-5)  # batch 1 too


def test_a_file_that_fails_the_check_is_not_left_as_the_output(tmp_path, capsys, monkeypatch):
    """--out holds a checked file or nothing: an export that fails its check (or is killed before
    it) leaves no file a script would take for the export, and keeps an earlier good one."""
    import gfm_fast.export

    model = saved_model(tmp_path, 3)
    out = tmp_path / "gfm.pt2"
    monkeypatch.setattr(gfm_fast.export, "TOLERANCE", -1.0)
    assert main(["--model", str(model), "--out", str(out)]) == 2
    assert "outputs differ from eager PyTorch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model3"]
    monkeypatch.undo()
    assert main(["--model", str(model), "--out", str(out)]) == 0
    monkeypatch.setattr(gfm_fast.export, "TOLERANCE", -1.0)
    assert main(["--model", str(model), "--out", str(out)]) == 2
    assert torch.export.load(str(out))  # the earlier, checked file


def test_onnx_stages(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model = saved_model(tmp_path, 3)
    out = tmp_path / "gfm.onnx"
    assert main(["--model", str(model), "--out", str(out), "--stages", "0", "1", "2", "3"]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["image_size"] == 64 and meta["stages"] == [0, 1, 2, 3] and len(meta["mean"]) == 3
    images = np.random.default_rng(1).integers(0, 65535, (4, 3, 64, 64), dtype=np.uint16)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = normalised(meta["mean"], meta["std"], images)
    maps = session.run(None, {"images": x.numpy()})
    expected = extract_features(model, images, stages=[0, 1, 2, 3], device="cpu")
    for stage, got in enumerate(maps):
        torch.testing.assert_close(torch.from_numpy(got), expected[stage], rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_line(tmp_path, capsys):
    model = saved_model(tmp_path, 3)
    assert main(["--model", str(model), "--out", str(tmp_path / "x.pt2"), "--image-size", "70"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image-size 70 is not a positive multiple of 32") and err.count("\n") == 1
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["--model", str(model), "--out", str(tmp_path / "a_file" / "x.pt2")]) == 2
    assert capsys.readouterr().err == (f"error: cannot create '{tmp_path / 'a_file'}': a file is in the way of a folder "
                                       f"on that path\n")


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_onnx_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, package):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == package else find_spec(name, *args))
    out = tmp_path / "x.onnx"
    assert main(["--model", str(saved_model(tmp_path, 3)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: ONNX export needs onnx, onnxscript, onnxruntime ({package} not installed): "
                   "GFM_EXTRAS=export bash scripts/install.sh in the repository (gfm_fast is not on PyPI)\n")
    assert not out.exists()
