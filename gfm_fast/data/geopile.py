"""GeoPile shard builder: image folders and GeoTIFF scenes -> WebDataset shards + manifest.json.

Run as ``python -m gfm_fast.data build NAME=PATH ... --out DIR`` (see ``__main__.py``). Never
imported by training code; torch-free. A build goes, by file:

1. **Scan** (build_scan.py) every source into items with a stable key ``<source>/<relpath>``
   (tiles: ``<source>/<relpath>/y<top>_x<left>``).
2. **Plan** (build_scan.py): shuffle all items of all sources with ``seed`` and pack them into
   shards of at most ``shard_size`` bytes (estimated) and ``max_samples_per_shard``. The plan's
   fingerprint goes to ``build.json``; a re-run with the same sources and options resumes, a
   different one is refused.
3. **Write** (build_write.py) each shard atomically (tmp file, record, rename), in parallel
   processes; complete shards are skipped on a re-run.
4. **Manifest** (here; format in manifest.py): per-shard counts/bytes/sha256/sources, per-source
   counts, all failures.

Each sample has a ``.json`` with source, label, gsd, width, height, bands, dtype, format, path
(and window for tiles). Unreadable files are reported, counted and skipped; tiles with more than
``max_nodata`` nodata pixels are skipped and counted. docs/architecture.md places the builder in
the data layer.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
from dataclasses import asdict
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from gfm_fast.data.build_scan import (SOURCE_NAME, BuildOptions, ScanResult, Source, check_sources, plan_fingerprint,
                                      plan_shards, scan_source)
from gfm_fast.data.build_write import ShardTask, remove_partial_shards, shard_done, write_shard
from gfm_fast.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, read_manifest, write_json_atomic
from gfm_fast.errors import BuildError

__all__ = ["build_shards", "BuildOptions", "Source", "BuildError"]
BUILD_FILE = "build.json"


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
    remove_partial_shards(out, prefix)
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
    check_sources(sources)
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
             for name, items in zip(names, shards) if shard_done(out, name) is None]
    resumed = len(shards) - len(tasks)
    if resumed:
        log(f"resuming: {resumed} of {len(shards)} shards are already complete")
    _run_tasks(tasks, options.workers, progress)
    records = [shard_done(out, name) for name in names]
    if any(r is None for r in records):
        raise RuntimeError(f"shards missing after the build in {out}; re-run the same command to complete it")
    manifest = _manifest(sources, scan, options, fingerprint, records)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    _summary(manifest, sum(len(t.items) for t in tasks), time.perf_counter() - start, log)
    read_manifest(out)  # what the loader will read back
    return manifest


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

# Command-line parsing helpers (used by __main__)

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
    if "=" in text and SOURCE_NAME.match(text.split("=", 1)[0]):
        name, path = text.split("=", 1)
    else:
        path = text
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(text.rstrip("/")).stem.lower()) or "images"
    return Source(name=name, path=path)


