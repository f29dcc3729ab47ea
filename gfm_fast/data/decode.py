"""Decode one stored image into an (H, W, C) array with the band count the model expects.

Decoder choice, by measurement (benchmarks/loader_bench.py, benchmarks/results/loader_cpu.json;
one core, 256 px JPEG): simplejpeg 0.29 ms < torchvision.io.decode_jpeg 0.32 ms < Pillow 0.37 ms
per image (all libjpeg-turbo), which makes the whole loader ~20% faster with simplejpeg. So
plain RGB/gray JPEGs go through simplejpeg when it is installed (optional dependency), else
Pillow; CMYK JPEG, PNG, WebP and BMP through Pillow; TIFF (multi-band, 16-bit) through tifffile.
Large JPEGs are decoded at 1/2, 1/4 or 1/8 size in the DCT domain when the crop that follows
would throw that resolution away anyway (``reduce``).

Band rules (``in_chans``): an image must have exactly ``in_chans`` bands, except that for
``in_chans == 3`` gray (replicated), gray+alpha, RGBA (alpha dropped), palette and CMYK images are
converted to RGB. Anything else raises :class:`CorruptSample` (the loader counts it and moves on).
"""
from __future__ import annotations

import io
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

try:  # optional: the fastest JPEG decoder measured (see above)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised when simplejpeg is not installed
    simplejpeg = None

# Sample keys that hold an image, in order of preference (webdataset lower-cases extensions).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "tif", "tiff", "webp", "bmp")
JPEG_EXTENSIONS = ("jpg", "jpeg")
TIFF_EXTENSIONS = ("tif", "tiff")
# Integer sample types and the value that maps to 1.0 (see to_unit_float).
INTEGER_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Pillow modes convertible to RGB for a 3-channel model; RGB itself needs no conversion.
_RGB_CONVERTIBLE = ("RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_GRAY_MODES = ("L", "LA", "1", "I;16", "I;16L", "I;16B", "I;16N", "F", "I")

Image.MAX_IMAGE_PIXELS = None  # GeoTIFF tiles are large by design; shards are trusted input


class CorruptSample(ValueError):
    """A sample that cannot be turned into an image; the message says why."""


def find_image(sample: Dict[str, object]) -> Tuple[str, bytes]:
    """Return ``(extension, encoded bytes)`` of the image stored in a webdataset sample.

    Raises:
        CorruptSample: when the sample holds no image (e.g. a partial sample from a truncated tar)
            or the image is empty.
    """
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            if len(data) == 0:
                raise CorruptSample(f"empty .{ext} file")
            return ext, bytes(data) if not isinstance(data, bytes) else data
    keys = sorted(k for k in sample if not k.startswith("__"))
    raise CorruptSample(f"no image in sample (has {keys}, expected one of {list(IMAGE_EXTENSIONS)})")


class EncodedImage:
    """A stored image opened lazily: its size is known before any pixel is decoded.

    Args:
        data: the encoded bytes (JPEG, PNG, TIFF, WebP, BMP).
        ext: the sample extension, used to pick the decoder.
    """

    def __init__(self, data: bytes, ext: str):
        self.data = data
        self.ext = ext
        self._pil: Optional[Image.Image] = None
        self._tiff: Optional[np.ndarray] = None
        try:
            if ext in TIFF_EXTENSIONS:  # no reduced decode for TIFF: decode once, right away
                self._tiff = decode_tiff(data)
            else:
                self._pil = Image.open(io.BytesIO(data))
        except CorruptSample:
            raise
        except Exception as exn:  # Pillow/tifffile raise many types for bad headers
            raise CorruptSample(f"unreadable .{ext} header: {exn}") from None

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) in pixels of the full-resolution image."""
        if self._pil is not None:
            return self._pil.size
        height, width = self._tiff.shape[:2]
        return width, height

    @property
    def mode(self) -> str:
        """Pillow mode ('RGB', 'L', 'CMYK', ...), or 'TIFF' for images read with tifffile."""
        return self._pil.mode if self._pil is not None else "TIFF"

    @property
    def is_plain_jpeg(self) -> bool:
        """True for an RGB or gray JPEG (what fast JPEG decoders, incl. nvjpeg, handle)."""
        return self._pil is not None and self._pil.format == "JPEG" and self._pil.mode in ("RGB", "L")

    def decode(self, in_chans: int, reduce: int = 1) -> np.ndarray:
        """Decode to an (H, W, C) array with C == in_chans or C == 1 when in_chans == 3 (gray).

        Args:
            in_chans: the number of channels the model expects.
            reduce: JPEG only: decode at roughly 1/reduce of the size (1, 2, 4 or 8); other
                formats ignore it. The caller rescales its crop box by the returned shape.

        Returns:
            The pixels, dtype uint8, uint16 or float32, C-contiguous HWC.

        Raises:
            CorruptSample: the data does not decode or its bands do not fit ``in_chans``.
        """
        try:
            if self._tiff is not None:
                array = self._tiff
            elif self.is_plain_jpeg and simplejpeg is not None and (in_chans == 3 or self._pil.mode == "L"):
                array = _decode_simplejpeg(self.data, self._pil, in_chans, reduce)
            else:
                array = _decode_pil(self._pil, in_chans, reduce)
        except CorruptSample:
            raise
        except Exception as exn:  # truncated data, bad Huffman tables, zlib errors, ...
            raise CorruptSample(f"cannot decode .{self.ext}: {exn}") from None
        return _match_bands(array, in_chans)


def _decode_pil(image: Image.Image, in_chans: int, reduce: int) -> np.ndarray:
    if reduce > 1 and image.format == "JPEG":
        width, height = image.size
        image.draft(image.mode, (-(-width // reduce), -(-height // reduce)))
    image.load()  # raises on truncated files (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
    mode = image.mode
    if mode == "RGB" or (mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "F")):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "I":
        return _int32_to_uint16(np.asarray(image))
    if mode == "LA":
        return np.asarray(image.getchannel(0))
    if in_chans == 3 and mode in _RGB_CONVERTIBLE:
        return np.asarray(image.convert("RGB"))
    if in_chans == 4 and mode == "RGBA":
        return np.asarray(image)
    raise CorruptSample(f"image mode {mode} cannot feed a {in_chans}-channel model")


def _decode_simplejpeg(data: bytes, header: Image.Image, in_chans: int, reduce: int) -> np.ndarray:
    width, height = header.size
    gray = header.mode == "L"
    kwargs = {}
    if reduce > 1:
        # simplejpeg picks the smallest DCT scale that still covers min_width x min_height.
        kwargs = {"min_width": -(-width // reduce), "min_height": -(-height // reduce)}
    array = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", **kwargs)
    return array[..., 0] if gray else array


def _int32_to_uint16(array: np.ndarray) -> np.ndarray:
    # Pillow opens some 16-bit images as 32-bit "I"; values outside uint16 are not imagery.
    if array.min() < 0 or array.max() > 65535:
        raise CorruptSample("32-bit integer image outside the 16-bit range")
    return array.astype(np.uint16)


def decode_tiff(data: bytes) -> np.ndarray:
    """All bands of the first image of a TIFF as a C-contiguous (H, W, C) array."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and axes[-1] not in "SC" and axes[0] in "SCQI":
        array = np.moveaxis(array, 0, -1)  # planar (bands first) -> bands last
    elif array.ndim != 3:
        raise CorruptSample(f"TIFF with shape {array.shape} (axes {axes}) is not a 2-D image with bands")
    if array.dtype not in INTEGER_FULL_SCALE and array.dtype not in FLOAT_TYPES:
        raise CorruptSample(f"unsupported TIFF sample type {array.dtype} (store uint8, uint16 or float32)")
    return np.ascontiguousarray(array)


def _match_bands(array: np.ndarray, in_chans: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if not array.dtype.isnative:  # big-endian 16-bit PNG/TIFF
        array = array.astype(array.dtype.newbyteorder("="))
    bands = array.shape[-1]
    if bands == in_chans or (bands == 1 and in_chans == 3):
        return array
    raise CorruptSample(f"image has {bands} bands but the model expects in_chans={in_chans}")


def to_unit_scale(dtype: np.dtype) -> float:
    """Factor that maps stored values to [0, 1]: 1/255 for uint8, 1/65535 for uint16, 1 for float.

    16-bit imagery is scaled by its full range (1/65535), not by its sensor's range: any linear
    scale is absorbed by the mean/std normalisation, so pick mean/std in the same units (e.g.
    Sentinel-2 reflectance x 10000 / 65535) rather than rescaling the data.
    """
    dtype = np.dtype(dtype)
    if dtype in INTEGER_FULL_SCALE:
        return 1.0 / INTEGER_FULL_SCALE[dtype]
    if dtype in FLOAT_TYPES:
        return 1.0
    raise CorruptSample(f"unsupported sample type {dtype}")
