"""The one image decoder: training shards (the loader) and image files (``extract_features``) both use it.

Decoder choice, by measurement (benchmarks/loader_bench.py, benchmarks/results/loader_cpu.json;
one core, 256 px JPEG): simplejpeg 0.40 ms < torchvision.io.decode_jpeg 0.44 ms < Pillow 0.58 ms
per image (all libjpeg-turbo), which makes the whole loader ~15% faster with simplejpeg (1,054
against 914 images/s). So
plain RGB/gray JPEGs go through simplejpeg when it is installed (optional dependency), else
Pillow; CMYK JPEG, PNG, WebP and BMP through Pillow, except 16-bit colour PNG (Pillow keeps only
its high bytes) through imagecodecs; TIFF (multi-band, 16-bit, float) through tifffile. Large
JPEGs are decoded at 1/2, 1/4 or 1/8 size in the DCT domain when the crop that follows would
throw that resolution away anyway (``reduce``; the loader only).

The rule, the same for every format and both callers (``in_chans``: the model's input channels;
None keeps the bands the rule gives):

* the sample type is kept: uint8 stays uint8, 16-bit PNG/TIFF stays uint16 (Pillow's 32-bit
  integer gray becomes uint16 when its values fit), float TIFF becomes float32; other types are
  refused. :func:`to_unit_scale` maps them to [0, 1] (1/255, 1/65535, 1).
* gray (also 1-bit, and gray + alpha, alpha dropped) is one band; a 3-channel model sees it
  replicated to RGB (the loader replicates after the resize, :func:`decode_image` at once).
* RGBA (8 or 16 bit) drops its alpha, unless the model takes 4 channels.
* palette, CMYK, YCbCr, LAB and HSV images become RGB (Pillow's conversion).
* TIFF keeps all its bands, bands last (band-sequential files are transposed; a stack of pages
  without band metadata has its bands on the shorter of its first and last axes).
* the band count must then equal ``in_chans``; otherwise :class:`BandMismatch` (the loader
  counts and skips the sample; ``extract_features`` raises, naming the file).
"""
from __future__ import annotations

import io
import re
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
# Integer sample types and the value that maps to 1.0 (see full_scale).
INTEGER_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Pillow modes that become RGB; those with alpha keep it as RGBA for a 4-channel model.
_RGB_CONVERTIBLE = ("RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "PA")
_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "F")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RGB, _PNG_RGBA = 2, 6  # IHDR colour types

Image.MAX_IMAGE_PIXELS = None  # GeoTIFF tiles are large by design; shards are trusted input


class CorruptSample(ValueError):
    """A sample that cannot be turned into an image; the message says why."""


class BandMismatch(CorruptSample):
    """An image that decodes, but whose band count does not fit the model's input channels."""


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


def error_message(exn: BaseException) -> str:
    """``str(exn)`` without the in-memory stream Pillow names (``<_io.BytesIO object at 0x...>``): the
    caller names the file, and a report (a build's manifest) stays the same from run to run."""
    return re.sub(r" ?<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exn))


class EncodedImage:
    """A stored image opened lazily: its size is known before any pixel is decoded.

    Args:
        data: the encoded bytes (JPEG, PNG, TIFF, WebP, BMP).
        ext: the sample extension (lower case), used to pick the decoder.
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
            raise CorruptSample(f"unreadable .{ext} header: {error_message(exn)}") from None

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
        """True for an RGB or gray JPEG (what simplejpeg decodes)."""
        return self._pil is not None and self._pil.format == "JPEG" and self._pil.mode in ("RGB", "L")

    def decode(self, in_chans: Optional[int], reduce: int = 1) -> np.ndarray:
        """Decode to an (H, W, C) array by the module's rule (gray stays one band here: C == 1).

        Args:
            in_chans: the number of channels the model expects (None: the bands the rule gives).
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
            elif _is_16bit_color_png(self.data):
                array = _decode_png16(self.data, in_chans)
            elif self.is_plain_jpeg and simplejpeg is not None:
                array = _decode_simplejpeg(self.data, self._pil, reduce)
            else:
                array = _decode_pil(self._pil, in_chans, reduce)
        except CorruptSample:
            raise
        except Exception as exn:  # truncated data, bad Huffman tables, zlib errors, ...
            raise CorruptSample(f"cannot decode .{self.ext}: {exn}") from None
        return _match_bands(array, in_chans)


def decode_image(data: bytes, ext: str, in_chans: Optional[int] = None) -> np.ndarray:
    """Decode a whole image by the module's rule, gray replicated for a 3-channel model.

    Args:
        data: the encoded bytes.
        ext: the file extension without the dot (TIFF goes to tifffile, the rest to Pillow).
        in_chans: the model's input channels (None: the bands the rule gives).

    Returns:
        (H, W, C) uint8, uint16 or float32 writable array; C == in_chans when given.

    Raises:
        CorruptSample: the bytes do not decode or the bands do not fit ``in_chans``.
    """
    array = EncodedImage(data, ext.lower()).decode(in_chans)
    if in_chans is not None and array.shape[-1] != in_chans:  # gray for an RGB model
        return np.repeat(array, in_chans, axis=-1)
    return array if array.flags.writeable else array.copy()  # Pillow's arrays are read-only


def _decode_pil(image: Image.Image, in_chans: Optional[int], reduce: int) -> np.ndarray:
    if reduce > 1 and image.format == "JPEG":
        width, height = image.size
        image.draft(image.mode, (-(-width // reduce), -(-height // reduce)))
    image.load()  # raises on truncated files (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
    mode = image.mode
    if mode == "RGB" or mode in _GRAY_MODES:
        return np.asarray(image)
    if mode in ("1", "LA"):
        return np.asarray(image.convert("L"))
    if mode == "I":
        return _int32_to_uint16(np.asarray(image))
    if in_chans == 4 and mode in _ALPHA_MODES:
        return np.asarray(image.convert("RGBA"))
    if mode in _RGB_CONVERTIBLE:
        if in_chans not in (None, 3):
            raise BandMismatch(f"image mode {mode} becomes RGB, which cannot feed a {in_chans}-channel model")
        return np.asarray(image.convert("RGB"))
    raise CorruptSample(f"unsupported image mode {mode}")


def _is_16bit_color_png(data: bytes) -> bool:
    """A 16-bit RGB(A) PNG, which Pillow would read as 8-bit RGB (only the high bytes)."""
    # signature, IHDR length and type, width, height, then bit depth (byte 24) and colour type (25)
    return (len(data) > 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 16
            and data[25] in (_PNG_RGB, _PNG_RGBA))


def _decode_png16(data: bytes, in_chans: Optional[int]) -> np.ndarray:
    import imagecodecs

    array = imagecodecs.png_decode(data)  # (H, W, 3 or 4) uint16
    return array if in_chans == 4 else np.ascontiguousarray(array[..., :3])  # alpha dropped, as for 8 bits


def _decode_simplejpeg(data: bytes, header: Image.Image, reduce: int) -> np.ndarray:
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
    """All bands of the first image of a TIFF as a C-contiguous (H, W, C) array (float as float32)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and axes[-1] not in "SC" and axes[0] in "SCQI" and (
            axes[0] in "SC" or array.shape[0] <= array.shape[-1]):
        # Planar (bands first) -> bands last. A page stack ('Q'/'I': no band metadata) is bands
        # first only when that axis is the shorter end one: bands are few, pixels many.
        array = np.moveaxis(array, 0, -1)
    elif array.ndim != 3:
        raise CorruptSample(f"TIFF with shape {array.shape} (axes {axes}) is not a 2-D image with bands")
    if array.dtype not in INTEGER_FULL_SCALE and array.dtype not in FLOAT_TYPES:
        raise CorruptSample(f"unsupported TIFF sample type {array.dtype} (store uint8, uint16 or float32)")
    return np.ascontiguousarray(array, dtype=np.float32 if array.dtype.kind == "f" else None)


def _match_bands(array: np.ndarray, in_chans: Optional[int]) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if not array.dtype.isnative:  # big-endian 16-bit PNG/TIFF
        array = array.astype(array.dtype.newbyteorder("="))
    bands = array.shape[-1]
    if in_chans is None or bands == in_chans or (bands == 1 and in_chans == 3):
        return array
    raise BandMismatch(f"{bands} channels but the model takes {in_chans}; select or stack the model's bands")


def full_scale(dtype: np.dtype) -> float:
    """The stored value that means 1.0: 255 for uint8, 65535 for uint16, 1 for float."""
    dtype = np.dtype(dtype)
    if dtype in INTEGER_FULL_SCALE:
        return INTEGER_FULL_SCALE[dtype]
    if dtype in FLOAT_TYPES:
        return 1.0
    raise CorruptSample(f"unsupported sample type {dtype}")


def to_unit_scale(dtype: np.dtype) -> float:
    """Factor that maps stored values to [0, 1]: 1/255 for uint8, 1/65535 for uint16, 1 for float.

    16-bit imagery is scaled by its full range (1/65535), not by its sensor's range: any linear
    scale is absorbed by the mean/std normalisation, so pick mean/std in the same units (e.g.
    Sentinel-2 reflectance x 10000 / 65535) rather than rescaling the data.
    """
    return 1.0 / full_scale(dtype)
