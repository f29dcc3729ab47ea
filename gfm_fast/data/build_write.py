"""Shard builder, part 2: encode each item (file or GeoTIFF tile) and write one shard atomically.

Each shard is written as ``.<name>.tmp-<pid>``, then its record ``<name>.json``, then renamed to
``<name>.tar``: a ``.tar`` on disk is always complete, and a shard with a record and a tar of the
recorded size is skipped on a re-run (:func:`shard_done`). JPEG/PNG files keep their original
bytes (verified by a full decode, never re-encoded); other formats are stored losslessly; tiles
as chosen by ``--tile-format`` (:func:`encode_tile`). Torch-free.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from gfm_fast.data.build_scan import TAR_TAIL_BYTES, TIFF_SUFFIXES, BuildOptions, Item
from gfm_fast.data.decode import decode_tiff, error_message
from gfm_fast.data.geotiff import TiffWindowReader, nodata_fraction
from gfm_fast.data.manifest import write_json_atomic

PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # stored as the original bytes
TAR_MTIME = 0  # fixed member mtime: the same inputs give byte-identical shards
TAR_MODE = 0o444
_OPEN_SCENES = 4  # per-process cache of open GeoTIFF readers (items of a scene are spread out)


@dataclass
class ShardTask:
    name: str
    items: List[Item]
    roots: Dict[str, str]
    gsd: Dict[str, Any]
    bands: Dict[str, Optional[Tuple[int, ...]]]
    options: BuildOptions
    out: str


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class _SampleTarWriter:
    """Writes webdataset samples (``<key>.<ext>`` members, extensions sorted) with fixed headers.

    Members are written directly (header, data, padding to 512 bytes; two zero blocks at the end),
    without tarfile's padding of the archive to 10 KiB records, so small shards stay small.
    Plain tar rather than ``wds.TarWriter``: same layout, but importing webdataset pulls in torch,
    which every builder process would then pay for.
    """

    def __init__(self, fileobj):
        self._file = fileobj

    def write(self, key: str, files: Dict[str, bytes]) -> None:
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(files[ext]), TAR_MTIME, TAR_MODE
            self._file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))  # long names: pax
            self._file.write(files[ext])
            self._file.write(b"\0" * (-len(files[ext]) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._file.write(b"\0" * TAR_TAIL_BYTES)

    def __enter__(self) -> "_SampleTarWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


class _SkipTile(Exception):
    """A tile with too much nodata: skipped and counted, not a failure."""


def encode_lossless(array: np.ndarray) -> Tuple[str, bytes]:
    """8-bit gray/RGB -> PNG; anything else (multi-band, 16-bit, float) -> zlib TIFF, bands last."""
    if array.ndim == 2:
        array = array[..., None]
    bands = array.shape[-1]
    if array.dtype == np.uint8 and bands in (1, 3):
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if bands == 1 else array).save(buffer, format="PNG")
        return "png", buffer.getvalue()
    import tifffile

    buffer = io.BytesIO()
    predictor = np.issubdtype(array.dtype, np.integer)  # horizontal differencing shrinks imagery
    tifffile.imwrite(buffer, np.ascontiguousarray(array), photometric="rgb" if bands == 3 else "minisblack",
                     planarconfig="contig", compression="zlib", predictor=predictor, metadata=None)
    return "tif", buffer.getvalue()


def encode_tile(array: np.ndarray, tile_format: str, jpeg_quality: int) -> Tuple[str, bytes]:
    """Encode a GeoTIFF tile as chosen by --tile-format (benchmarks/results/loader_cpu.json).

    ``raw`` (default): uncompressed TIFF: lossless, larger than PNG, and the fastest to decode
    (the loader reads 512 px raw tiles at ~820 images/s per core).
    ``compressed``: encode_lossless (PNG / zlib TIFF): lossless and compact, but decoding a
    512 px PNG takes ~7-8 ms, so the loader reads ~110 images/s per core: ~7x the cores of raw tiles.
    ``jpeg``: lossy JPEG (``jpeg_quality``, 4:4:4) for 8-bit gray/RGB tiles; other tiles stay
    lossless (``compressed``). Smaller than PNG; the loader reads quality-95 tiles at ~370
    images/s per core, helped by its DCT-domain downscaling; the right choice when storage
    bandwidth is the limit.
    """
    bands = array.shape[-1] if array.ndim == 3 else 1
    if tile_format == "jpeg" and array.dtype == np.uint8 and bands in (1, 3):
        buffer = io.BytesIO()
        # 4:4:4 (no chroma subsampling): remote sensing needs each band's detail, not a photo's.
        Image.fromarray(array[..., 0] if array.ndim == 3 and bands == 1 else array).save(
            buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
        return "jpg", buffer.getvalue()
    if tile_format == "raw":
        import tifffile

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, np.ascontiguousarray(array), photometric="rgb" if bands == 3 else "minisblack",
                         planarconfig="contig", metadata=None)
        return "tif", buffer.getvalue()
    return encode_lossless(array)


def _describe_array(array: np.ndarray) -> Dict[str, Any]:
    height, width = array.shape[:2]
    return {"width": int(width), "height": int(height), "bands": int(array.shape[2] if array.ndim == 3 else 1),
            "dtype": str(array.dtype)}


def _encode_file(path: Path) -> Tuple[str, bytes, Dict[str, Any]]:
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        array = decode_tiff(data)
        ext, encoded = encode_lossless(array)
        return ext, encoded, _describe_array(array)
    image = Image.open(io.BytesIO(data))
    image.load()  # a full decode: truncated or corrupt files fail here, not in training
    info = {"width": image.width, "height": image.height, "bands": len(image.getbands()), "mode": image.mode}
    if image.format in PASSTHROUGH_FORMATS:
        return PASSTHROUGH_FORMATS[image.format], data, info
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGB")  # e.g. CMYK/YCbCr BMP or WebP: PNG has no such mode
        info.update(bands=3, mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue(), info


class _SceneCache:
    """A few open GeoTIFF readers per process (a shard touches many scenes, each several times)."""

    def __init__(self):
        self._open: "OrderedDict[str, TiffWindowReader]" = OrderedDict()

    def get(self, path: str) -> TiffWindowReader:
        if path in self._open:
            self._open.move_to_end(path)
        else:
            self._open[path] = TiffWindowReader(path)
            if len(self._open) > _OPEN_SCENES:
                self._open.popitem(last=False)[1].close()
        return self._open[path]

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


def _encode_tile(item: Item, path: Path, scenes: _SceneCache, options: BuildOptions,
                 bands: Optional[Tuple[int, ...]]) -> Tuple[str, bytes, Dict]:
    reader = scenes.get(str(path))
    tile = reader.read(*item.window)
    if bands:
        tile = np.ascontiguousarray(tile[..., [b - 1 for b in bands]])
    nodata = options.nodata if options.nodata is not None else reader.info.nodata
    if nodata_fraction(tile, nodata) > options.max_nodata:
        raise _SkipTile()
    ext, encoded = encode_tile(tile, options.tile_format, options.jpeg_quality)
    info = _describe_array(tile)
    info["window"] = list(item.window)
    if bands:
        info["scene_bands"] = list(bands)
    return ext, encoded, info


def _item_path(item: Item, root: Path) -> Path:
    return root if root.is_file() else root / item.relpath


def _partial_shard(out: Path, name: str, pid: object) -> Path:
    """Where process ``pid`` writes shard ``name`` before the rename that completes it (hidden)."""
    return out / f".{name}.tmp-{pid}"


def remove_partial_shards(out: Path, prefix: str) -> None:
    """Remove what builds killed outright (SIGKILL, the OOM killer: no cleanup ran) were writing in
    ``out``: a re-run writes under its own pid, so nothing else would."""
    for partial in out.glob(_partial_shard(out, f"{prefix}-*", "*").name):
        partial.unlink()


def write_shard(task: ShardTask, progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Write one shard (tmp file, record, rename) and return its record."""
    out = Path(task.out)
    tmp = _partial_shard(out, task.name, os.getpid())
    record = {"name": task.name, "planned": len(task.items), "samples": 0, "bytes": 0, "sha256": None,
              "sources": {}, "failures": [], "skipped_nodata": {}}
    scenes = _SceneCache()
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            with _SampleTarWriter(hashing) as tar:
                for item in task.items:
                    _write_item(tar, item, task, scenes, record)
                    if progress is not None:
                        progress(1)
            raw.flush()
            os.fsync(raw.fileno())
        record["bytes"], record["sha256"] = hashing.bytes, hashing.sha256.hexdigest()
        write_json_atomic(out / f"{task.name}.json", record)
        if record["samples"]:
            os.replace(tmp, out / f"{task.name}.tar")  # the commit point: a .tar is always complete
    finally:
        scenes.close()
        if tmp.exists():
            tmp.unlink()
    return record


def _write_item(tar, item: Item, task: ShardTask, scenes: _SceneCache, record: Dict[str, Any]) -> None:
    path = _item_path(item, Path(task.roots[item.source]))
    try:
        if item.window is not None:
            ext, data, info = _encode_tile(item, path, scenes, task.options, task.bands.get(item.source))
        else:
            ext, data, info = _encode_file(path)
    except _SkipTile:
        record["skipped_nodata"][item.source] = record["skipped_nodata"].get(item.source, 0) + 1
        return
    except Exception as exn:  # unreadable/corrupt source file: report, count, never write, never fatal
        record["failures"].append({"path": item.where, "reason": f"{type(exn).__name__}: {error_message(exn)}"})
        return
    meta = {"source": item.source, "label": item.label, "gsd": task.gsd.get(item.source), "path": item.relpath,
            "format": ext, **info}
    tar.write(item.key, {ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
    record["samples"] += 1
    record["sources"][item.source] = record["sources"].get(item.source, 0) + 1


def shard_done(out: Path, name: str) -> Optional[Dict[str, Any]]:
    """The shard's record when the shard is complete on disk, else None."""
    record_path = out / f"{name}.json"
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("samples", 0) == 0:
        return record
    tar = out / f"{name}.tar"
    return record if tar.is_file() and tar.stat().st_size == record.get("bytes") else None

