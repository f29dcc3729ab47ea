"""extract_features: every input kind, per-stage maps, equality with a direct forward, every error path."""
import warnings

import numpy as np
import pytest
import tifffile
import timm
import torch
from PIL import Image

from gfm_fast import extract_features
from gfm_fast.config import ModelConfig, SwinConfig
from gfm_fast.errors import ConfigError
from gfm_fast.features import check_device
from gfm_fast.models.io import save_model
from gfm_fast.models.pretrainer import GFMPretrainer
from gfm_fast.models.swin import EncoderConfig, allow_any_input_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MS_MEAN, MS_STD = (0.1, 0.2, 0.3, 0.4, 0.5), (0.5, 0.4, 0.3, 0.2, 0.1)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return timm.create_model("gfm_swin_test_patch4_window2_64").eval()  # 64 px, 128 features, ImageNet mean/std


@pytest.fixture(scope="module")
def ms_encoder():
    """A 5-band encoder with its own mean/std."""
    torch.manual_seed(1)
    model = timm.create_model("gfm_swin_test_patch4_window2_64", in_chans=5).eval()
    model.gfm_config = EncoderConfig(SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                window_size=2, img_size=64, in_chans=5), MS_MEAN, MS_STD)
    return model


def direct(model, x):
    """Pooled final feature by hand: all stages + final norm (NHWC), then the mean over tokens."""
    with torch.no_grad(), allow_any_input_size(model):
        return model.forward_features(x).mean(dim=(1, 2))


def normalise(pixels_nchw, divisor, mean=MEAN, std=STD):
    x = torch.as_tensor(pixels_nchw).float() / divisor
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------
# Tensors and arrays
# --------------------------------------------------------------------------------------------

def test_float_tensor_equals_direct_forward_in_batches(encoder):
    x = torch.randn(5, 3, 64, 64)
    out = extract_features(encoder, x, batch_size=2)
    assert out.shape == (5, 128) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, direct(encoder, x))
    torch.testing.assert_close(extract_features(encoder, x[0]), out[:1])  # a single (C, H, W) image


def test_stages_are_timms_intermediates(encoder):
    x = torch.randn(3, 3, 64, 64)
    maps = extract_features(encoder, x, stages=[0, 1, 2, 3], batch_size=2)
    assert {i: tuple(m.shape) for i, m in maps.items()} == {
        0: (3, 16, 16, 16), 1: (3, 32, 8, 8), 2: (3, 64, 4, 4), 3: (3, 128, 2, 2)}  # strides 4/8/16/32
    with torch.no_grad():
        expected = encoder.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, intermediates_only=True)
    for i in range(4):
        torch.testing.assert_close(maps[i], expected[i])
    torch.testing.assert_close(maps[3].mean(dim=(2, 3)), extract_features(encoder, x))  # pooled = last map, pooled
    assert list(extract_features(encoder, x, stages=[-1])) == [3]
    # Stages asked out of order, repeated or from the end: each key still holds its own stage's map.
    shuffled = extract_features(encoder, x, stages=[3, 0, -3, 3])
    assert sorted(shuffled) == [0, 1, 3]
    for i in (0, 1, 3):
        torch.testing.assert_close(shuffled[i], expected[i])


def test_uint8_tensors_in_every_layout(encoder):
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected = direct(encoder, normalise(pixels, 255.0))
    layouts = {"NCHW": pixels, "NHWC": pixels.permute(0, 2, 3, 1), "CHW": pixels[0], "HWC": pixels[0].permute(1, 2, 0)}
    for name, data in layouts.items():
        out = extract_features(encoder, data)
        torch.testing.assert_close(out, expected[: out.shape[0]], msg=lambda m: f"{name}: {m}")


def test_numpy_arrays(encoder):
    pixels = np.random.default_rng(0).integers(0, 65536, (2, 64, 64, 3), dtype=np.uint16)
    expected16 = direct(encoder, normalise(pixels.transpose(0, 3, 1, 2).astype(np.float32), 65535.0))
    torch.testing.assert_close(extract_features(encoder, pixels), expected16)
    pixels8 = (pixels >> 8).astype(np.uint8)
    expected8 = direct(encoder, normalise(pixels8.transpose(0, 3, 1, 2).astype(np.float32), 255.0))
    torch.testing.assert_close(extract_features(encoder, pixels8[0]), expected8[:1])
    normalised = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    torch.testing.assert_close(extract_features(encoder, normalised), direct(encoder, torch.from_numpy(normalised)))


# --------------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------------

def write_rgb(path, seed, size=(64, 64)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_png_jpeg_and_tiff_files(encoder, tmp_path):
    png = write_rgb(tmp_path / "a.png", 0)
    write_rgb(tmp_path / "b.jpg", 1)
    jpeg = np.array(Image.open(tmp_path / "b.jpg"))  # what the lossy file decodes to
    tif = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", tif)
    files = [tmp_path / "a.png", str(tmp_path / "b.jpg"), tmp_path / "c.tif"]
    out = extract_features(encoder, files, batch_size=2)
    stacked = np.stack([png, jpeg, tif]).transpose(0, 3, 1, 2)
    torch.testing.assert_close(out, direct(encoder, normalise(stacked, 255.0)))
    # a directory: its images sorted by name, other files ignored
    (tmp_path / "notes.txt").write_text("not an image")
    torch.testing.assert_close(extract_features(encoder, tmp_path), out)
    torch.testing.assert_close(extract_features(encoder, tmp_path / "c.tif"), out[2:])


def test_sixteen_bit_png(encoder, tmp_path):
    gray16 = np.random.default_rng(3).integers(0, 65536, (64, 64), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g.png")
    one_band = timm.create_model("gfm_swin_test_patch4_window2_64", in_chans=1).eval()
    one_band.gfm_config = EncoderConfig(SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                                   window_size=2, img_size=64, in_chans=1), (0.5,), (0.25,))
    out = extract_features(one_band, [tmp_path / "g.png"])
    expected = direct(one_band, normalise(gray16[None, None].astype(np.float32), 65535.0, (0.5,), (0.25,)))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_sixteen_bit_color_png_keeps_its_low_bytes(encoder, tmp_path, alpha):
    """Pillow reads 48/64-bit PNGs as 8-bit RGB; they are read at 16 bits (alpha dropped)."""
    import imagecodecs

    rgb16 = np.random.default_rng(5).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    stored = np.concatenate([rgb16, np.full((64, 64, 1), 65535, np.uint16)], axis=-1) if alpha else rgb16
    (tmp_path / "c.png").write_bytes(imagecodecs.png_encode(stored))
    out = extract_features(encoder, [tmp_path / "c.png"])
    expected = direct(encoder, normalise(rgb16.transpose(2, 0, 1)[None].astype(np.float32), 65535.0, MEAN, STD))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("compression", ["lzw", "zlib"])
def test_compressed_geotiff(ms_encoder, tmp_path, compression):
    """LZW and deflate, the usual GeoTIFF compressions (decoded through imagecodecs)."""
    bands = np.random.default_rng(6).integers(0, 65536, (64, 64, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", bands, compression=compression, photometric="minisblack")
    out = extract_features(ms_encoder, [tmp_path / "c.tif"])
    expected = direct(ms_encoder, normalise(bands.transpose(2, 0, 1)[None].astype(np.float32), 65535.0, MS_MEAN,
                                            MS_STD))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("layout", ["interleaved", "planar"])
def test_multiband_16bit_geotiff(ms_encoder, tmp_path, layout):
    bands = np.random.default_rng(4).integers(0, 65536, (5, 64, 64), dtype=np.uint16)
    data = bands if layout == "planar" else bands.transpose(1, 2, 0)
    tifffile.imwrite(tmp_path / "s2.tif", data, planarconfig="separate" if layout == "planar" else "contig",
                     photometric="minisblack")
    out = extract_features(ms_encoder, [tmp_path / "s2.tif"])
    expected = direct(ms_encoder, normalise(bands[None].astype(np.float32), 65535.0, MS_MEAN, MS_STD))
    torch.testing.assert_close(out, expected)


def test_float_tiff_is_taken_as_unit_range(ms_encoder, tmp_path):
    bands = np.random.default_rng(5).random((5, 64, 64), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", bands, photometric="minisblack")
    out = extract_features(ms_encoder, tmp_path / "f.tif")
    torch.testing.assert_close(out, direct(ms_encoder, normalise(bands[None], 1.0, MS_MEAN, MS_STD)))


# --------------------------------------------------------------------------------------------
# Models, sizes, modes
# --------------------------------------------------------------------------------------------

def tiny_pretrainer():
    student = SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=2, img_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return GFMPretrainer(ModelConfig(student=student, teacher=student, ops_backend="reference"))


def test_pretrainer_and_saved_model_give_the_encoders_features(tmp_path):
    model = tiny_pretrainer()
    model.train()
    x = torch.randn(2, 3, 64, 64)
    expected = direct(model.student.encoder.eval(), x)
    model.train()
    torch.testing.assert_close(extract_features(model, x), expected)
    assert model.student.training  # mode restored
    path = save_model(model, tmp_path / "m")
    torch.testing.assert_close(extract_features(path, x, device="cpu"), expected)
    torch.testing.assert_close(extract_features(str(path), x), expected)


def test_any_size_divisible_by_32_on_a_fixed_size_model():
    model = tiny_pretrainer()
    x = torch.randn(2, 3, 96, 160)
    out = extract_features(model, x)
    torch.testing.assert_close(out, direct(model.student.encoder.eval(), x))
    assert extract_features(model, x, stages=[0])[0].shape == (2, 16, 24, 40)
    assert model.student.encoder.patch_embed.strict_img_size  # the model is left as it was


def test_images_of_mixed_sizes(encoder, tmp_path):
    pixels = [write_rgb(tmp_path / "a.png", 0, (64, 64)), write_rgb(tmp_path / "b.png", 1, (96, 64)),
              write_rgb(tmp_path / "c.png", 2, (64, 64))]
    out = extract_features(encoder, tmp_path, batch_size=3)
    singles = torch.cat([direct(encoder, normalise(p.transpose(2, 0, 1)[None], 255.0)) for p in pixels])
    torch.testing.assert_close(out, singles)
    with pytest.raises(ValueError, match="different sizes"):
        extract_features(encoder, tmp_path, stages=[0, 1])


def test_progress_bar(encoder, capsys):
    extract_features(encoder, torch.randn(2, 3, 64, 64), progress=True)
    assert "extract_features" in capsys.readouterr().err
    extract_features(encoder, torch.randn(2, 3, 64, 64))
    assert "extract_features" not in capsys.readouterr().err  # small inputs: no bar by default


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_wrong_channel_counts(encoder, ms_encoder, tmp_path):
    with pytest.raises(ValueError, match="4 channels but the model takes 3"):
        extract_features(encoder, torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="4 channels but the model takes 3"):
        extract_features(encoder, np.zeros((64, 64, 4), dtype=np.uint8))
    write_rgb(tmp_path / "rgb.png", 0)
    with pytest.raises(ValueError, match=r"rgb\.png: 3 channels but the model takes 5"):
        extract_features(ms_encoder, [tmp_path / "rgb.png"])


def test_unreadable_and_missing_files_are_named(encoder, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        extract_features(encoder, [tmp_path / "broken.png"])
    with pytest.raises(ValueError, match=r"missing\.tif does not exist"):
        extract_features(encoder, [tmp_path / "missing.tif"])


def test_devices_that_cannot_run_are_named(encoder, monkeypatch):
    with pytest.raises(ConfigError, match="device 'gpu' is not a device name; use 'cpu', 'cuda' or 'cuda:N'"):
        extract_features(encoder, torch.zeros(1, 3, 64, 64), device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(ConfigError, match="device 'cuda' is not available: this machine has no CUDA device"):
        extract_features(encoder, torch.zeros(1, 3, 64, 64), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="device 'cuda:2' is not available: this machine has 2 CUDA device"):
        check_device("cuda:2")
    assert check_device("cuda:1") == torch.device("cuda", 1) and check_device("cpu") == torch.device("cpu")


def test_empty_inputs(encoder, tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        extract_features(encoder, [])
    with pytest.raises(ValueError, match="empty"):
        extract_features(encoder, torch.zeros(0, 3, 64, 64))
    with pytest.raises(ValueError, match="no images") as error:
        extract_features(encoder, tmp_path)
    assert "subfolders" not in str(error.value)
    (tmp_path / "class_a").mkdir()  # class folders: the message says they are not searched, and what to do
    with pytest.raises(ValueError, match=r"no images .*\(subfolders are not searched: pass a list of files"):
        extract_features(encoder, tmp_path)


def test_sizes_not_divisible_by_32(encoder, tmp_path):
    with pytest.raises(ValueError, match="size 64x72 is not divisible by 32"):
        extract_features(encoder, torch.randn(1, 3, 64, 72))
    write_rgb(tmp_path / "odd.png", 0, (50, 64))
    with pytest.raises(ValueError, match=r"odd\.png: size 50x64 is not divisible by 32"):
        extract_features(encoder, tmp_path)


def test_bad_arguments(encoder):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="stages must be ints in"):
        extract_features(encoder, x, stages=[4])
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(encoder, x, batch_size=0)
    with pytest.raises(TypeError, match="uint8 or uint16"):
        extract_features(encoder, np.zeros((64, 64, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="file paths"):
        extract_features(encoder, [x])
    with pytest.raises(TypeError, match="images must be"):
        extract_features(encoder, 3.0)
    with pytest.raises(TypeError, match="expects a Swin encoder"):
        extract_features(torch.nn.Linear(2, 2), x)


@pytest.mark.parametrize("size", [192, 224, 256])
def test_windows_stay_local_at_sizes_the_window_does_not_tile(size):
    """GFM's window 6 tiles 192 px but not 224 or 256 (56 and 64 tokens): a change in the top 4 px
    reaches stage-0 token rows 0-8 (one window, then the shifted one) and nothing else. timm's own
    order (shift, then pad) let the rows that wrapped from the top attend to the bottom rows."""
    from gfm_fast.models.swin import build_student

    torch.manual_seed(0)
    model = build_student(SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6,
                                     img_size=192)).eval()
    images = torch.randn(1, 3, size, size).repeat(2, 1, 1, 1)
    images[1, :, :4] += 1
    maps = extract_features(model, images, stages=[0], batch_size=2)[0]  # (2, 16, size/4, size/4)
    changed_rows = ((maps[0] - maps[1]).abs().amax(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    assert changed_rows == list(range(9))


def test_window_attention_equals_timms_where_the_window_tiles_the_map():
    """Without padding, pad-then-shift is timm's shifted-window attention to the bit."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from gfm_fast.models.swin import _attn_pad_then_shift

    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=16, input_resolution=(12, 12), num_heads=2, window_size=6, shift_size=3).eval()
    x = torch.randn(2, 12, 12, 16)
    with torch.no_grad():
        assert torch.equal(_attn_pad_then_shift(block, x), SwinTransformerBlock._attn(block, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_to_another_dtype_takes_its_own_dtype(encoder, dtype):
    """Inputs follow the weights' dtype (no 'Input type (float) and bias type' error); features
    stay float32 and agree with the fp32 model to the dtype's precision."""
    import copy

    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    want = extract_features(encoder, images)
    got = extract_features(copy.deepcopy(encoder).to(dtype), images)
    assert got.dtype == torch.float32
    tolerance = 0.1 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got, want, atol=tolerance * want.abs().max().item())


def test_numpy_stage_indices_and_big_endian_arrays(encoder):
    pixels = np.random.default_rng(7).integers(0, 65536, (1, 64, 64, 3), dtype=np.uint16)
    want = extract_features(encoder, pixels, stages=[1, 3])
    got = extract_features(encoder, pixels.astype(">u2"), stages=np.array([1, 3]))  # np.int64 entries
    assert sorted(got) == [1, 3]
    for stage in (1, 3):
        torch.testing.assert_close(got[stage], want[stage])


def test_a_multiband_model_without_statistics_says_so():
    """A plain timm Swin with 5 bands has no known mean/std: features still come, with a warning."""
    model = timm.create_model("gfm_swin_test_patch4_window2_64", in_chans=5).eval()
    pixels = np.random.default_rng(8).integers(0, 256, (1, 64, 64, 5), dtype=np.uint8)
    with pytest.warns(UserWarning, match="5-band encoder without gfm_config"):
        out = extract_features(model, pixels)
    assert out.shape == (1, 128)


# --------------------------------------------------------------------------------------------
# Non-finite input and the shared decoder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_input_is_refused_naming_the_image(encoder, bad):
    x = torch.randn(5, 3, 64, 64)
    x[3, 1, 10, 20] = bad
    with pytest.raises(ValueError, match=r"images tensor: image 3 holds non-finite pixel values"):
        extract_features(encoder, x, batch_size=2)  # image 3 is the second of the second batch
    array = x.permute(0, 2, 3, 1).numpy().copy()
    with pytest.raises(ValueError, match=r"images array: image 3 holds non-finite pixel values"):
        extract_features(encoder, array, batch_size=4)
    x[3, 1, 10, 20] = 0.0
    torch.testing.assert_close(extract_features(encoder, x), direct(encoder, x))  # finite again: accepted


def test_non_finite_float_tiff_is_refused_naming_the_file(ms_encoder, tmp_path):
    bands = np.random.default_rng(8).random((64, 64, 5), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", bands, photometric="minisblack", planarconfig="contig")
    bands[5, 7, 2] = np.nan  # e.g. a nodata pixel of a float GeoTIFF
    tifffile.imwrite(tmp_path / "b.tif", bands, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ValueError, match=r"image file .*b\.tif holds non-finite pixel values"):
        extract_features(ms_encoder, tmp_path)


def test_gray_file_feeds_an_rgb_model_like_the_training_loader(encoder, tmp_path):
    """The shared decoder replicates gray to RGB for a 3-channel model (as the loader does)."""
    gray = np.random.default_rng(9).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    expected = direct(encoder, normalise(np.repeat(gray[None, None], 3, axis=1), 255.0))
    torch.testing.assert_close(extract_features(encoder, tmp_path / "g.png"), expected)
