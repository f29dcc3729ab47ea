"""Decoding stored images: formats, colour modes, bit depths, band rules and corrupt inputs."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import encode, jpeg, png16, textured, tiff
from gfm_fast.data import decode
from gfm_fast.data.decode import CorruptSample, EncodedImage, find_image


def _pil_pixels(data: bytes, mode: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def test_rgb_jpeg_matches_pillow():
    data = jpeg(48, 64)
    image = EncodedImage(data, "jpg")
    assert image.size == (64, 48) and image.is_plain_jpeg
    out = image.decode(in_chans=3)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    # simplejpeg (when installed) and Pillow are both libjpeg-turbo: allow one grey level.
    assert np.abs(out.astype(int) - _pil_pixels(data, "RGB").astype(int)).max() <= 1


def test_grayscale_is_one_band_for_rgb_models_and_single_band_models():
    data = encode(textured(30, 20, bands=1), "PNG")
    assert EncodedImage(data, "png").decode(in_chans=3).shape == (30, 20, 1)  # replicated later, after resize
    assert EncodedImage(data, "png").decode(in_chans=1).shape == (30, 20, 1)
    gray_jpeg = jpeg(32, 32, mode="L")
    assert EncodedImage(gray_jpeg, "jpg").decode(in_chans=3).shape == (32, 32, 1)


def test_cmyk_jpeg_is_converted_to_rgb_like_pillow():
    data = jpeg(32, 40, mode="CMYK")
    image = EncodedImage(data, "jpg")
    assert not image.is_plain_jpeg  # nvjpeg / simplejpeg paths must not take it
    out = image.decode(in_chans=3)
    np.testing.assert_array_equal(out, _pil_pixels(data, "RGB"))
    with pytest.raises(CorruptSample, match="mode CMYK becomes RGB, which cannot feed a 4-channel model"):
        EncodedImage(data, "jpg").decode(in_chans=4)


def test_rgba_and_palette_png_become_rgb():
    rgba = np.concatenate([textured(16, 16), np.full((16, 16, 1), 7, np.uint8)], axis=-1)
    out = EncodedImage(encode(rgba, "PNG"), "png").decode(in_chans=3)
    np.testing.assert_array_equal(out, rgba[..., :3])
    palette = Image.fromarray(textured(16, 16)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    np.testing.assert_array_equal(EncodedImage(buffer.getvalue(), "png").decode(3), np.asarray(palette.convert("RGB")))


def test_16bit_png_keeps_its_values():
    data = png16()
    out = EncodedImage(data, "png").decode(in_chans=1)
    assert out.dtype == np.uint16 and out.shape == (40, 40, 1)
    np.testing.assert_array_equal(out[..., 0], np.asarray(Image.open(io.BytesIO(data))))
    assert decode.to_unit_scale(out.dtype) == pytest.approx(1 / 65535)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_multiband_tiff_round_trips(dtype):
    array = textured(24, 20, bands=5, dtype=dtype)
    image = EncodedImage(tiff(array, compression="zlib"), "tif")
    assert image.size == (20, 24)
    out = image.decode(in_chans=5)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, array)


def test_planar_tiff_is_returned_bands_last():
    import tifffile

    array = textured(12, 10, bands=4, dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.moveaxis(array, -1, 0), photometric="minisblack", planarconfig="separate",
                     metadata=None)
    np.testing.assert_array_equal(EncodedImage(buffer.getvalue(), "tif").decode(in_chans=4), array)


def test_band_count_mismatch_is_corrupt():
    with pytest.raises(CorruptSample, match="5 channels but the model takes 3"):
        EncodedImage(tiff(textured(8, 8, bands=5)), "tif").decode(in_chans=3)
    with pytest.raises(CorruptSample, match="3 channels but the model takes 12"):
        EncodedImage(jpeg(16, 16), "jpg").decode(in_chans=12)
    with pytest.raises(CorruptSample, match="unsupported TIFF sample type int16"):
        EncodedImage(tiff(textured(8, 8, bands=1, dtype=np.int16)), "tif").decode(in_chans=1)


def test_truncated_jpeg_is_corrupt():
    data = jpeg(64, 64)
    image = EncodedImage(data[: len(data) // 2], "jpg")  # the header still parses
    with pytest.raises(CorruptSample, match="cannot decode .jpg"):
        image.decode(in_chans=3)


@pytest.mark.parametrize("data, ext", [(b"this is not an image", "jpg"), (b"\x89PNG\r\n\x1a\n garbage", "png"),
                                       (b"II*\x00 garbage", "tif")])
def test_non_image_bytes_are_corrupt(data, ext):
    with pytest.raises(CorruptSample, match="unreadable") as error:
        EncodedImage(data, ext)
    assert " object at 0x" not in str(error.value)  # Pillow's message names its BytesIO: dropped


def test_find_image_rejects_empty_and_missing_images():
    with pytest.raises(CorruptSample, match="empty .jpg"):
        find_image({"__key__": "a/b", "jpg": b"", "json": b"{}"})
    with pytest.raises(CorruptSample, match=r"no image in sample \(has \['json'\]"):
        find_image({"__key__": "a/b", "json": b"{}"})
    assert find_image({"__key__": "a/b", "png": b"x", "json": b"{}"}) == ("png", b"x")


@pytest.mark.parametrize("reduce", [2, 4])
def test_jpeg_draft_decodes_smaller(reduce):
    data = jpeg(256, 192)
    out = EncodedImage(data, "jpg").decode(in_chans=3, reduce=reduce)
    assert out.shape == (256 // reduce, 192 // reduce, 3)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").reduce(reduce)).astype(int)
    assert np.abs(out.astype(int) - reference).mean() < 3  # DCT scaling ~ box filter


def test_pillow_path_matches_when_simplejpeg_is_disabled(monkeypatch):
    data = jpeg(40, 40)
    fast = EncodedImage(data, "jpg").decode(3)
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = EncodedImage(data, "jpg").decode(3)
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------
# One decoder for training and extract_features
# --------------------------------------------------------------------------------------------

SIDE = 16  # square files, so a full-size crop needs no resize: the loader's output is the decode


def _save(array: np.ndarray, fmt: str, mode=None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _files_and_expected():
    """(name, bytes, in_chans, expected HWC pixels in [0, 1] or None where lossy) per kind of file."""
    import imagecodecs

    rgb8 = textured(SIDE, SIDE, 3, seed=1)
    rgb16 = textured(SIDE, SIDE, 3, seed=2, dtype=np.uint16) | 1  # odd values: low bytes matter
    gray8 = textured(SIDE, SIDE, 1, seed=3)
    gray16 = textured(SIDE, SIDE, 1, seed=4, dtype=np.uint16)
    alpha8 = np.full((SIDE, SIDE, 1), 9, np.uint8)
    bands5 = textured(SIDE, SIDE, 5, seed=5, dtype=np.uint16)
    unit5 = textured(SIDE, SIDE, 5, seed=6, dtype=np.float32)
    palette = Image.fromarray(rgb8).convert("P")
    three = lambda a: np.repeat(a[..., None], 3, axis=-1)  # noqa: E731
    rgba16 = np.concatenate([rgb16, np.full((SIDE, SIDE, 1), 65535, np.uint16)], axis=-1)
    return [
        ("rgb8.png", _save(rgb8, "PNG"), 3, rgb8 / 255),
        ("rgb16.png", imagecodecs.png_encode(rgb16), 3, rgb16 / 65535),
        ("rgba16.png", imagecodecs.png_encode(rgba16), 3, rgb16 / 65535),
        ("gray8.png", _save(gray8, "PNG"), 3, three(gray8) / 255),
        ("gray16.png", _save(gray16, "PNG"), 3, three(gray16) / 65535),
        ("gray16_1band.png", _save(gray16, "PNG"), 1, gray16[..., None] / 65535),
        ("rgba8.png", _save(np.concatenate([rgb8, alpha8], -1), "PNG"), 3, rgb8 / 255),
        ("rgba8_4band.png", _save(np.concatenate([rgb8, alpha8], -1), "PNG"), 4,
         np.concatenate([rgb8, alpha8], -1) / 255),
        ("palette.png", _save(rgb8, "PNG", mode="P"), 3, np.asarray(palette.convert("RGB")) / 255),
        ("cmyk.jpg", _save(rgb8, "JPEG", mode="CMYK", quality=95), 3, None),
        ("rgb.jpg", _save(rgb8, "JPEG", quality=95), 3, None),
        ("bands5.tif", tiff(bands5), 5, bands5 / 65535),
        ("bands5_planar.tif", _planar_tiff(bands5), 5, bands5 / 65535),
        ("float5.tif", tiff(unit5), 5, unit5.astype(np.float64)),
    ]


def _planar_tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.moveaxis(array, -1, 0), photometric="minisblack", planarconfig="separate",
                     metadata=None)
    return buffer.getvalue()


def _loader_pixels(tmp_path, name: str, data: bytes, in_chans: int) -> torch.Tensor:
    """The training loader's batch for one file, undone to [0, 1] (full-size crop, no flip, mean 0, std 1)."""
    from data_helpers import small_cfg, write_tar
    from gfm_fast.data import make_loader

    shard = write_tar(tmp_path / f"{name}.tar", [("files/x", {name.rsplit(".", 1)[1]: data})])
    cfg = small_cfg(shard, batch_size=1, samples_per_epoch=1, shuffle_buffer=0, crop_scale=(1.0, 1.0),
                    crop_ratio=(1.0, 1.0), hflip=0.0)
    loader = make_loader(cfg, img_size=SIDE, in_chans=in_chans, mean=[0.0] * in_chans, std=[1.0] * in_chans)
    (batch,) = list(loader)
    return loader.normalize(batch)[0]


def test_training_loader_and_extract_features_decode_every_file_kind_alike(tmp_path):
    """8/16-bit, gray, RGBA, palette, CMYK, JPEG and multi-band TIFF: the same tensor through both paths,
    and (for lossless files) the pixels that were stored."""
    from gfm_fast.features import read_image

    for name, data, in_chans, expected in _files_and_expected():
        path = tmp_path / name
        path.write_bytes(data)
        array, divisor = read_image(path, in_chans)
        features = torch.from_numpy(array.astype(np.float64) / divisor).permute(2, 0, 1).float()
        loader = _loader_pixels(tmp_path, name, data, in_chans)
        assert features.shape == loader.shape == (in_chans, SIDE, SIDE), name
        torch.testing.assert_close(loader, features, rtol=0, atol=1e-6, msg=name)
        if expected is not None:
            reference = torch.from_numpy(np.ascontiguousarray(expected)).permute(2, 0, 1).float()
            torch.testing.assert_close(features, reference, rtol=0, atol=1e-6, msg=name)
    assert read_image(tmp_path / "rgb16.png", 3)[0].dtype == np.uint16  # not truncated to 8 bits
