"""Shard builder, part 1: the sources, their scan into items, and the plan that packs items into shards.

Scan: every source (``classes``: ``root/<class>/<image>``, ``flat``: images anywhere under root,
``tiles``: GeoTIFF scenes cut into ``tile_size`` tiles) becomes items with a stable key
``<source>/<relpath>`` (tiles: ``<source>/<relpath>/y<top>_x<left>``). Plan: all items of all
sources are shuffled with ``seed`` and packed into shards by estimated size and count; the plan's
fingerprint decides whether a re-run resumes (see geopile.py for the whole build).
Torch-free, like the rest of the builder.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gfm_fast.data.geotiff import TiffWindowReader, tile_windows
from gfm_fast.errors import BuildError

LAYOUTS = ("auto", "classes", "flat", "tiles")
TILE_FORMATS = ("raw", "compressed", "jpeg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
SAMPLE_OVERHEAD_BYTES = 3072  # two tar headers + 512-byte padding + metadata JSON, for shard-size planning
TAR_TAIL_BYTES = 2 * tarfile.BLOCKSIZE  # the end-of-archive marker
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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
        if not SOURCE_NAME.match(self.prefix):
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



def check_sources(sources: Sequence[Source]) -> None:
    if not sources:
        raise BuildError("no sources given; pass NAME=PATH arguments")
    names = [s.name for s in sources]
    for source in sources:
        if not SOURCE_NAME.match(source.name):
            raise BuildError(f"source name {source.name!r} may only hold letters, digits, '_' and '-'")
        if source.layout not in LAYOUTS:
            raise BuildError(f"source {source.name}: layout {source.layout!r} is not one of {', '.join(LAYOUTS)}")
        if source.bands is not None and (not source.bands or min(source.bands) < 1):
            raise BuildError(f"source {source.name}: --bands are 1-based band numbers, got {source.bands}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BuildError(f"source names must be unique, got {duplicates} more than once")

