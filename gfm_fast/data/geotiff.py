"""Windowed reads from large (Geo)TIFF scenes (e.g. NAIP) for the builder; torch-free.

A scene is cut into fixed-size tiles; decoding the whole scene for every tile would cost
O(scene) per tile, so :class:`TiffWindowReader` decodes only the strips or internal tiles a
window touches (tifffile's per-segment decoder, no zarr needed). Bands stay as stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np

GDAL_NODATA_TAG = 42113  # ASCII tag GDAL writes for the nodata value


@dataclass(frozen=True)
class TiffInfo:
    width: int
    height: int
    bands: int
    dtype: str
    nodata: Optional[float]


class TiffWindowReader:
    """Read (H, W, bands) windows of the first image of a TIFF without decoding the rest.

    Args:
        path: the TIFF file.
    """

    def __init__(self, path: str):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        try:
            page = self._tif.pages.first
            planes, _depth, height, width, _contig = page.shaped
            if page.dtype is None:
                raise ValueError(f"unsupported TIFF sample format ({page.bitspersample}-bit)")
            self.page = page
            self.info = TiffInfo(width=int(width), height=int(height), bands=int(page.samplesperpixel),
                                 dtype=str(np.dtype(page.dtype)), nodata=_nodata(page))
            self._planes = int(planes)
        except Exception:
            self._tif.close()
            raise

    def __enter__(self) -> "TiffWindowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tif.close()

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels of rows [top, top+height) x cols [left, left+width) as (height, width, bands)."""
        info = self.info
        if top < 0 or left < 0 or top + height > info.height or left + width > info.width:
            raise ValueError(f"window {(top, left, height, width)} is outside the {info.height}x{info.width} image")
        out = np.zeros((height, width, info.bands), dtype=self.page.dtype)
        handle = self._tif.filehandle
        offsets, counts = self.page.dataoffsets, self.page.databytecounts
        for index in self._segments(top, left, height, width):
            data = None
            if counts[index] > 0:
                handle.seek(offsets[index])
                data = handle.read(counts[index])
            segment, (plane, _d, seg_top, seg_left, _c), _shape = self.page.decode(
                data, index, jpegtables=self.page.jpegtables)
            if segment is None:  # an empty (sparse) segment reads as zeros
                continue
            _paste(out, segment[0], plane, seg_top - top, seg_left - left)
        return out

    def _segments(self, top: int, left: int, height: int, width: int) -> Iterator[int]:
        """Indices (into StripOffsets/TileOffsets) of the segments that intersect the window."""
        page, info = self.page, self.info
        if page.is_tiled:
            across, down = math.ceil(info.width / page.tilewidth), math.ceil(info.height / page.tilelength)
            rows = range(top // page.tilelength, (top + height - 1) // page.tilelength + 1)
            cols = range(left // page.tilewidth, (left + width - 1) // page.tilewidth + 1)
            for plane in range(self._planes):
                for row in rows:
                    for col in cols:
                        yield plane * across * down + row * across + col
        else:
            rows_per_strip = min(page.rowsperstrip, info.height)
            per_plane = math.ceil(info.height / rows_per_strip)
            for plane in range(self._planes):
                for strip in range(top // rows_per_strip, (top + height - 1) // rows_per_strip + 1):
                    yield plane * per_plane + strip


def _paste(out: np.ndarray, segment: np.ndarray, plane: int, dy: int, dx: int) -> None:
    """Copy the part of one decoded segment (L, W, c) that falls inside ``out`` (offset dy, dx)."""
    src_top, src_left = max(0, -dy), max(0, -dx)
    dst_top, dst_left = max(0, dy), max(0, dx)
    h = min(segment.shape[0] - src_top, out.shape[0] - dst_top)
    w = min(segment.shape[1] - src_left, out.shape[1] - dst_left)
    if h <= 0 or w <= 0:
        return
    bands = segment.shape[-1]  # all bands (contiguous) or one (planar: band == plane)
    out[dst_top:dst_top + h, dst_left:dst_left + w, plane * bands:(plane + 1) * bands] = \
        segment[src_top:src_top + h, src_left:src_left + w]


def _nodata(page) -> Optional[float]:
    tag = page.tags.get(GDAL_NODATA_TAG)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip().rstrip("\x00"))
    except ValueError:
        return None


def nodata_fraction(tile: np.ndarray, nodata: Optional[float]) -> float:
    """Fraction of pixels whose every band equals ``nodata`` (NaN matches NaN)."""
    if nodata is None:
        return 0.0
    if math.isnan(nodata):
        empty = np.isnan(tile).all(axis=-1)
    else:
        empty = (tile == nodata).all(axis=-1)
    return float(empty.mean())


def tile_windows(height: int, width: int, tile: int) -> Iterator[Tuple[int, int]]:
    """(top, left) of every full tile on a regular grid; the partial remainder is dropped."""
    for top in range(0, height - tile + 1, tile):
        for left in range(0, width - tile + 1, tile):
            yield top, left
