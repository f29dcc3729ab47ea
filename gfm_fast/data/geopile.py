"""GeoPile shard builder: image folders and GeoTIFF scenes -> WebDataset shards + manifest.json.

Run as ``python -m gfm_fast.data build NAME=PATH ... --out DIR`` (see ``__main__.py``). Never
imported by training code.

How a build goes:

1. **Scan** every source (``classes``: ``root/<class>/<image>``, ``flat``: images anywhere under
   root, ``tiles``: GeoTIFF scenes cut into ``tile_size`` tiles) into items with a stable key
   ``<source>/<relpath>`` (tiles: ``<source>/<relpath>/y<top>_x<left>``).
2. **Plan**: shuffle all items of all sources with ``seed`` and pack them into shards of at most
   ``shard_size`` bytes (estimated: file size, or raw tile size) and ``max_samples_per_shard``.
   The plan's fingerprint goes to ``build.json``; a re-run with the same sources and options
   resumes, a different one is refused.
3. **Write** each shard as ``.<name>.tmp-<pid>``, then its record ``<name>.json``, then rename to
   ``<name>.tar``: a ``.tar`` on disk is always complete. Shards with a record and a tar of the
   recorded size are skipped on a re-run.
4. **Manifest**: per-shard counts/bytes/sha256/sources, per-source counts, all failures.

Samples keep the original bytes of JPEG/PNG files (verified by a full decode, never re-encoded);
other formats are stored losslessly (8-bit gray/RGB as PNG, everything else - multi-band, 16-bit,
float - as zlib TIFF); tiles as uncompressed TIFF by default (lossless and ~30x faster to decode
than PNG; see encode_tile for the other --tile-format choices). Each sample has a ``.json`` with source, label, gsd, width, height,
bands, dtype, format, path (and window for tiles). Unreadable files are reported, counted and
skipped; tiles with more than ``max_nodata`` nodata pixels are skipped and counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from gfm_fast.data.decode import decode_tiff
from gfm_fast.data.geotiff import TiffWindowReader, nodata_fraction, tile_windows
from gfm_fast.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, read_manifest, write_json_atomic
from gfm_fast.errors import BuildError

LAYOUTS = ("auto", "classes", "flat", "tiles")
TILE_FORMATS = ("raw", "compressed", "jpeg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # stored as the original bytes
SAMPLE_OVERHEAD_BYTES = 3072  # two tar headers + 512-byte padding + metadata JSON, for shard-size planning
TAR_TAIL_BYTES = 2 * tarfile.BLOCKSIZE  # the end-of-archive marker
TAR_MTIME = 0  # fixed member mtime: the same inputs give byte-identical shards
TAR_MODE = 0o444
BUILD_FILE = "build.json"
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_OPEN_SCENES = 4  # per-process cache of open GeoTIFF readers (items of a scene are spread out)




@dataclass
class Source:
    """One named input dataset.

    Args:
        name: source name, the first component of every key (letters, digits, ``_``, ``-``).
        path: its root directory (or a single GeoTIFF for ``tiles``).
        layout: ``classes``, ``flat``, ``tiles`` or ``auto`` (classes when the root holds only
            folders, flat when it holds images, tiles for a single TIFF file).
        gsd: ground sample distance in metres, a number or a (min, max) range; stored as metadata.
        bands: ``tiles`` only: 1-based bands to keep, in order (e.g. (1, 2, 3) for the RGB of
            4-band NAIP); None keeps every band.
    """

    name: str
    path: str
    layout: str = "auto"
    gsd: Optional[Union[float, Tuple[float, float]]] = None
    bands: Optional[Tuple[int, ...]] = None


@dataclass
class BuildOptions:
    """Shard layout and tiling options (all of them are part of the plan fingerprint but ``workers``)."""

    shard_size: int = 1 << 30
    max_samples_per_shard: int = 100_000
    seed: int = 0
    tile_size: int = 512
    max_nodata: float = 0.25  # skip tiles with a larger fraction of nodata pixels
    nodata: Optional[float] = None  # overrides the GeoTIFF's GDAL_NODATA tag
    prefix: str = "geopile"
    tile_format: str = "raw"  # raw | compressed | jpeg (see encode_tile)
    jpeg_quality: int = 95  # tile_format == "jpeg" only
    workers: int = 1

    def validate(self) -> None:
        if self.shard_size <= SAMPLE_OVERHEAD_BYTES + TAR_TAIL_BYTES:
            raise BuildError(f"--shard-size {self.shard_size} is too small (bytes; e.g. 1GB or 300KB)")
        if self.max_samples_per_shard <= 0:
            raise BuildError("--max-per-shard must be positive")
        if self.tile_size <= 0:
            raise BuildError("--tile-size must be positive")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise BuildError("--max-nodata is a fraction in [0, 1]")
        if not _SOURCE_NAME.match(self.prefix):
            raise BuildError(f"--prefix {self.prefix!r} may only hold letters, digits, '_' and '-'")
        if self.workers <= 0:
            raise BuildError("--workers must be positive")
        if self.tile_format not in TILE_FORMATS:
            raise BuildError(f"--tile-format {self.tile_format!r} is not one of {', '.join(TILE_FORMATS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BuildError("--jpeg-quality lies in [1, 100]")


@dataclass(frozen=True)
class Item:
    """One future sample: a file, or a window of a GeoTIFF scene."""

    source: str
    relpath: str  # posix path relative to the source root
    key: str
    label: Optional[str]
    est_bytes: int
    window: Optional[Tuple[int, int, int, int]] = None  # (top, left, height, width) for tiles

    @property
    def where(self) -> str:
        tile = f" window {list(self.window)}" if self.window else ""
        return f"{self.source}/{self.relpath}{tile}"


@dataclass
class ShardTask:
    name: str
    items: List[Item]
    roots: Dict[str, str]
    gsd: Dict[str, Any]
    bands: Dict[str, Optional[Tuple[int, ...]]]
    options: BuildOptions
    out: str


@dataclass
class ScanResult:
    items: List[Item] = field(default_factory=list)
    failures: List[Dict[str, str]] = field(default_factory=list)
    layouts: Dict[str, str] = field(default_factory=dict)
    classes: Dict[str, List[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# 1. Scan
# --------------------------------------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if _is_image(p))


def _detect_layout(root: Path) -> str:
    if root.is_file():
        return "tiles" if root.suffix.lower() in TIFF_SUFFIXES else "flat"
    entries = list(root.iterdir())
    if any(_is_image(p) for p in entries):
        return "flat"
    if any(p.is_dir() for p in entries):
        return "classes"
    raise BuildError(f"source {root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")


def _key_stem(relpath: str) -> str:
    """Key for a relative path: extension dropped, dots in the file name replaced (webdataset
    splits a member name into key and extension at the first dot of its last component)."""
    parent, _, name = relpath.rpartition("/")
    stem = name.rsplit(".", 1)[0].replace(".", "_")
    return f"{parent}/{stem}" if parent else stem


def _unique_keys(source: str, relpaths: Sequence[str]) -> List[str]:
    """Stable unique keys: clashes (a.jpg + a.png, a.b.jpg + a_b.jpg) get the extension appended."""
    stems = [_key_stem(r) for r in relpaths]
    counts: Dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    keys, seen = [], set()
    for relpath, stem in zip(relpaths, stems):
        key = stem if counts[stem] == 1 else f"{stem}_{relpath.rsplit('.', 1)[-1].lower()}"
        base, n = key, 1
        while key in seen:  # still clashing (same name, same extension case-folded)
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(f"{source}/{key}")
    return keys


def _file_items(source: Source, root: Path, files: List[Path], labels: List[Optional[str]]) -> List[Item]:
    relpaths = [p.relative_to(root).as_posix() for p in files]
    keys = _unique_keys(source.name, relpaths)
    return [Item(source.name, rel, key, label, path.stat().st_size + SAMPLE_OVERHEAD_BYTES)
            for path, rel, key, label in zip(files, relpaths, keys, labels)]


def _scene_items(source: Source, root: Path, scenes: List[Path], options: BuildOptions,
                 result: ScanResult) -> List[Item]:
    items = []
    base = root if root.is_dir() else root.parent
    relpaths = [p.relative_to(base).as_posix() for p in scenes]
    for path, relpath, key in zip(scenes, relpaths, _unique_keys(source.name, relpaths)):
        try:
            with TiffWindowReader(str(path)) as reader:
                info = reader.info
            if source.bands and max(source.bands) > info.bands:
                raise ValueError(f"--bands {','.join(map(str, source.bands))} but the scene has {info.bands} bands")
        except Exception as exn:
            result.failures.append({"path": f"{source.name}/{relpath}", "reason": f"{type(exn).__name__}: {exn}"})
            continue
        tile = options.tile_size
        bands = len(source.bands) if source.bands else info.bands
        raw = tile * tile * bands * np.dtype(info.dtype).itemsize + SAMPLE_OVERHEAD_BYTES
        for top, left in tile_windows(info.height, info.width, tile):
            items.append(Item(source.name, relpath, f"{key}/y{top:06d}_x{left:06d}", None, raw,
                              (top, left, tile, tile)))
    return items


def scan_source(source: Source, options: BuildOptions, result: ScanResult) -> None:
    """Add a source's items (and unreadable scenes) to ``result``."""
    root = Path(source.path).expanduser()
    if not root.exists():
        raise BuildError(f"source {source.name}: {root} does not exist")
    layout = _detect_layout(root) if source.layout == "auto" else source.layout
    result.layouts[source.name] = layout
    if layout == "tiles":
        scenes = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                       and p.suffix.lower() in TIFF_SUFFIXES)
        result.items += _scene_items(source, root, scenes, options, result)
    elif root.is_file():
        result.items += _file_items(source, root.parent, [root], [None])
    elif layout == "classes":
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files, labels = [], []
        for folder in classes:
            images = _images_under(folder)
            files += images
            labels += [folder.name] * len(images)
        result.classes[source.name] = [c.name for c in classes]
        result.items += _file_items(source, root, files, labels)
    else:
        files = _images_under(root)
        result.items += _file_items(source, root, files, [None] * len(files))


# --------------------------------------------------------------------------------------------
# 2. Plan
# --------------------------------------------------------------------------------------------

def plan_shards(items: Sequence[Item], options: BuildOptions) -> List[List[Item]]:
    """Shuffle all items (seeded) and pack them into consecutive shards by size and count."""
    ordered = sorted(items, key=lambda item: item.key)
    random.Random(options.seed).shuffle(ordered)
    capacity = options.shard_size - TAR_TAIL_BYTES
    shards: List[List[Item]] = []
    current: List[Item] = []
    size = 0
    for item in ordered:
        full = size + item.est_bytes > capacity or len(current) >= options.max_samples_per_shard
        if current and full:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.est_bytes
    if current:
        shards.append(current)
    return shards


def plan_fingerprint(sources: Sequence[Source], shards: Sequence[Sequence[Item]], options: BuildOptions) -> str:
    settings = {k: v for k, v in asdict(options).items() if k != "workers"}
    described = [{"name": s.name, "layout": s.layout, "gsd": s.gsd, "bands": s.bands} for s in sources]
    digest = hashlib.sha256(json.dumps([settings, described], sort_keys=True).encode())
    for shard in shards:
        digest.update(b"\x00shard")
        for item in shard:
            digest.update(json.dumps([item.key, item.relpath, item.window, item.est_bytes, item.label]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# 3. Write
# --------------------------------------------------------------------------------------------

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

    ``raw`` (default): uncompressed TIFF: lossless and the fastest to decode (~0.2 ms for a
    512 px RGB tile on one core), ~1.4x the bytes of PNG for aerial imagery.
    ``compressed``: encode_lossless (PNG / zlib TIFF): lossless and compact, but inflating a
    512 px PNG costs ~6-7 ms per image, so the loader needs ~10x the cores for such tiles.
    ``jpeg``: lossy JPEG (``jpeg_quality``, 4:4:4) for 8-bit gray/RGB tiles; other tiles stay
    lossless (``compressed``). ~4x smaller than PNG; decodes in ~1.7 ms, less with the loader's
    DCT-domain downscaling; the right choice when storage bandwidth is the limit.
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


def write_shard(task: ShardTask, progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Write one shard (tmp file, record, rename) and return its record."""
    out = Path(task.out)
    tmp = out / f".{task.name}.tmp-{os.getpid()}"
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
        record["failures"].append({"path": item.where, "reason": f"{type(exn).__name__}: {exn}"})
        return
    meta = {"source": item.source, "label": item.label, "gsd": task.gsd.get(item.source), "path": item.relpath,
            "format": ext, **info}
    tar.write(item.key, {ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
    record["samples"] += 1
    record["sources"][item.source] = record["sources"].get(item.source, 0) + 1


def _shard_done(out: Path, name: str) -> Optional[Dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------
# 4. Build = scan + plan + write + manifest
# --------------------------------------------------------------------------------------------

_progress_counter = None


def _init_pool(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _pool_write(task: ShardTask) -> Dict[str, Any]:
    def tick(n: int) -> None:
        with _progress_counter.get_lock():
            _progress_counter.value += n

    return write_shard(task, tick)


def _prepare_out(out: Path, fingerprint: str, prefix: str, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build_file = out / BUILD_FILE
    if build_file.is_file():
        previous = json.loads(build_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            if not overwrite:
                raise BuildError(f"{out} holds a different build (sources, files or options changed); use a new "
                                 "--out, or --overwrite to delete it and start again")
            for path in out.glob(f"{prefix}-*"):
                path.unlink()
            for name in (MANIFEST_NAME, BUILD_FILE):
                if (out / name).exists():
                    (out / name).unlink()
    write_json_atomic(build_file, {"fingerprint": fingerprint})


def build_shards(sources: Sequence[Source], out: Union[str, Path], options: Optional[BuildOptions] = None, *,
                 overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Build (or resume building) shards for ``sources`` under ``out``.

    Args:
        sources: the named inputs (unique names).
        out: output directory (created).
        options: shard size, seed, tiling; defaults to BuildOptions().
        overwrite: discard a different earlier build in ``out`` instead of refusing.
        progress: show a progress bar (images/s).
        log: where the summary goes.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    options = options or BuildOptions()
    options.validate()
    _check_sources(sources)
    start = time.perf_counter()
    scan = ScanResult()
    for source in sources:
        scan_source(source, options, scan)
    shards = plan_shards(scan.items, options)
    names = [f"{options.prefix}-{i:06d}" for i in range(len(shards))]
    fingerprint = plan_fingerprint(sources, shards, options)
    out = Path(out)
    _prepare_out(out, fingerprint, options.prefix, overwrite)
    roots = {s.name: str(Path(s.path).expanduser().resolve()) for s in sources}
    gsd = {s.name: s.gsd for s in sources}
    bands = {s.name: s.bands for s in sources}
    tasks = [ShardTask(name, items, roots, gsd, bands, options, str(out))
             for name, items in zip(names, shards) if _shard_done(out, name) is None]
    resumed = len(shards) - len(tasks)
    if resumed:
        log(f"resuming: {resumed} of {len(shards)} shards are already complete")
    _run_tasks(tasks, options.workers, progress)
    records = [_shard_done(out, name) for name in names]
    if any(r is None for r in records):
        raise RuntimeError(f"shards missing after the build in {out}; re-run the same command to complete it")
    manifest = _manifest(sources, scan, options, fingerprint, records)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    _summary(manifest, sum(len(t.items) for t in tasks), time.perf_counter() - start, log)
    read_manifest(out)  # what the loader will read back
    return manifest


def _check_sources(sources: Sequence[Source]) -> None:
    if not sources:
        raise BuildError("no sources given; pass NAME=PATH arguments")
    names = [s.name for s in sources]
    for source in sources:
        if not _SOURCE_NAME.match(source.name):
            raise BuildError(f"source name {source.name!r} may only hold letters, digits, '_' and '-'")
        if source.layout not in LAYOUTS:
            raise BuildError(f"source {source.name}: layout {source.layout!r} is not one of {', '.join(LAYOUTS)}")
        if source.bands is not None and (not source.bands or min(source.bands) < 1):
            raise BuildError(f"source {source.name}: --bands are 1-based band numbers, got {source.bands}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BuildError(f"source names must be unique, got {duplicates} more than once")


def _run_tasks(tasks: List[ShardTask], workers: int, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(len(t.items) for t in tasks)
    with tqdm(total=total, unit="img", disable=not progress or total == 0, smoothing=0.1, file=sys.stderr) as bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                write_shard(task, bar.update)
            return
        context = multiprocessing.get_context("spawn")  # no forked copies of the caller's state
        counter = context.Value("q", 0)
        with context.Pool(min(workers, len(tasks)), initializer=_init_pool, initargs=(counter,)) as pool:
            result = pool.map_async(_pool_write, tasks, chunksize=1)
            while not result.ready():
                result.wait(0.25)
                bar.update(counter.value - bar.n)
            result.get()  # re-raises a worker's error
            bar.update(counter.value - bar.n)


def _manifest(sources: Sequence[Source], scan: ScanResult, options: BuildOptions, fingerprint: str,
              records: List[Dict[str, Any]]) -> Dict[str, Any]:
    from gfm_fast import __version__

    failures = list(scan.failures) + [f for r in records for f in r["failures"]]
    per_source = {}
    for source in sources:
        per_source[source.name] = {
            "path": source.path, "layout": scan.layouts[source.name], "gsd": source.gsd, "bands": source.bands,
            "samples": sum(r["sources"].get(source.name, 0) for r in records),
            "failures": sum(1 for f in failures if f["path"].startswith(source.name + "/")),
            "skipped_nodata": sum(r["skipped_nodata"].get(source.name, 0) for r in records),
        }
        if source.name in scan.classes:
            per_source[source.name]["classes"] = scan.classes[source.name]
    shards = [{k: r[k] for k in ("name", "samples", "bytes", "sha256", "sources")} for r in records if r["samples"]]
    for shard in shards:
        shard["name"] = shard["name"] + ".tar"
    return {
        "format": MANIFEST_FORMAT, "created_by": f"gfm_fast {__version__}", "fingerprint": fingerprint,
        "options": {k: v for k, v in asdict(options).items() if k != "workers"},
        "samples": sum(s["samples"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
        "sources": per_source, "shards": shards, "failures": failures,
    }


def _summary(manifest: Dict[str, Any], written_items: int, seconds: float, log: Callable[[str], None]) -> None:
    log(f"built {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"({manifest['bytes'] / 1e6:.1f} MB) in {seconds:.1f} s ({written_items / max(seconds, 1e-9):.0f} img/s)")
    for name, source in manifest["sources"].items():
        log(f"  {name:<16} {source['layout']:<8} {source['samples']:>9} samples  {source['failures']:>6} failed  "
            f"{source['skipped_nodata']:>6} nodata tiles skipped")
    failures = manifest["failures"]
    if failures:
        log(f"{len(failures)} unreadable or corrupt file(s) were skipped (all listed in manifest.json):")
        for failure in failures[:20]:
            log(f"  {failure['path']}: {failure['reason']}")
        if len(failures) > 20:
            log(f"  ... and {len(failures) - 20} more")


# --------------------------------------------------------------------------------------------
# Command-line parsing helpers (used by __main__)
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '300KiB' -> 307200, '5e8' -> 500000000."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise BuildError(f"cannot read size {text!r}; use e.g. 1GB, 500MB, 300KiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_gsd(text: str) -> Union[float, Tuple[float, float]]:
    """'0.3' -> 0.3 metres; '0.1-10' -> (0.1, 10.0)."""
    try:
        if "-" in text.strip().lstrip("-"):
            low, high = text.split("-", 1)
            return (float(low), float(high))
        return float(text)
    except ValueError:
        raise BuildError(f"cannot read GSD {text!r}; use metres, e.g. 0.3 or a range 0.1-10") from None


def parse_bands(text: str) -> Tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3) (1-based, like GDAL)."""
    try:
        bands = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise BuildError(f"cannot read bands {text!r}; use 1-based numbers, e.g. 1,2,3") from None
    if not bands or min(bands) < 1:
        raise BuildError(f"bands are 1-based, got {text!r}")
    return bands


def parse_source(text: str) -> Source:
    """'resisc45=/data/RESISC45' -> Source('resisc45', ...); a bare path is named after its folder."""
    if "=" in text and _SOURCE_NAME.match(text.split("=", 1)[0]):
        name, path = text.split("=", 1)
    else:
        path = text
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(text.rstrip("/")).stem.lower()) or "images"
    return Source(name=name, path=path)

