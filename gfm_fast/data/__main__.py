"""``python -m gfm_fast.data``: build GeoPile shards, verify a build, or peek at a shard stream.

    python -m gfm_fast.data build resisc45=/data/NWPU-RESISC45 naip=/data/naip --layout naip=tiles \\
        --gsd resisc45=0.2-30 --gsd naip=1 --out /data/geopile --shard-size 1GB --workers 8
    python -m gfm_fast.data verify /data/geopile
    python -m gfm_fast.data show /data/geopile -n 5

Problems the user can fix (a missing source, a damaged manifest, shards that are not tars) print
one line, ``error: <message>``, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

from gfm_fast.errors import ConfigError, ShardError, exit_status


def _pairs(values: Optional[List[str]], option: str) -> Dict[str, str]:
    pairs = {}
    for value in values or []:
        if "=" not in value:
            raise ConfigError(f"{option} expects NAME=VALUE with NAME one of the sources, got {value!r}")
        name, text = value.split("=", 1)
        pairs[name] = text
    return pairs


def _build(args: argparse.Namespace) -> int:
    from gfm_fast.data.geopile import (BuildError, BuildOptions, build_shards, parse_bands, parse_gsd, parse_size,
                                       parse_source)

    sources = [parse_source(s) for s in (args.sources or []) + (args.name or [])]
    names = {s.name for s in sources}
    for option, values in (("--gsd", _pairs(args.gsd, "--gsd")), ("--layout", _pairs(args.layout, "--layout")),
                           ("--bands", _pairs(args.bands, "--bands"))):
        unknown = sorted(set(values) - names)
        if unknown:
            raise BuildError(f"{option} names unknown source(s) {unknown}; sources are {sorted(names)}")
    gsd, layouts, bands = _pairs(args.gsd, "--gsd"), _pairs(args.layout, "--layout"), _pairs(args.bands, "--bands")
    for source in sources:
        source.gsd = parse_gsd(gsd[source.name]) if source.name in gsd else None
        source.layout = layouts.get(source.name, "auto")
        source.bands = parse_bands(bands[source.name]) if source.name in bands else None
    options = BuildOptions(shard_size=parse_size(args.shard_size), max_samples_per_shard=args.max_per_shard,
                           seed=args.seed, tile_size=args.tile_size, max_nodata=args.max_nodata,
                           nodata=args.nodata, prefix=args.prefix, tile_format=args.tile_format,
                           jpeg_quality=args.jpeg_quality, workers=args.workers)
    manifest = build_shards(sources, args.out, options, overwrite=args.overwrite, progress=not args.no_progress)
    return 0 if manifest["samples"] > 0 else 1


def _verify(args: argparse.Namespace) -> int:
    from gfm_fast.data.manifest import verify_build

    problems = verify_build(args.dir, checksums=not args.no_checksums)
    for problem in problems:
        print(problem)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _show(args: argparse.Namespace) -> int:
    import webdataset as wds

    from gfm_fast.data.shards import SHARD_READ_ERRORS, resolve_shards, unreadable_shard

    urls = resolve_shards(args.spec).urls
    dataset = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())  # in order, no shuffle
    try:
        for i, sample in enumerate(dataset):
            if i >= args.n:
                break
            meta = json.loads(sample["json"]) if "json" in sample else {}
            files = {k: len(v) for k, v in sample.items() if not k.startswith("__") and k != "json"}
            print(sample["__key__"], files, meta)
    except SHARD_READ_ERRORS as exc:  # show is how a remote spec is tried: say why
        raise ShardError(unreadable_shard(exc)) from None
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfm_fast.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build WebDataset shards + manifest.json from image sources")
    build.add_argument("sources", nargs="*", metavar="NAME=PATH",
                       help="a source: class folders (root/<class>/<img>), a flat folder, or GeoTIFF scenes")
    build.add_argument("--name", action="append", metavar="NAME=PATH", help="another source (same as positional)")
    build.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    build.add_argument("--shard-size", default="1GB", help="max shard size, e.g. 1GB, 500MB, 300KiB (default 1GB)")
    build.add_argument("--max-per-shard", type=int, default=100_000, help="max samples per shard")
    build.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    build.add_argument("--seed", type=int, default=0, help="seed of the cross-source shuffle")
    build.add_argument("--gsd", action="append", metavar="NAME=METRES", help="GSD of a source: 0.3 or 0.1-10")
    build.add_argument("--layout", action="append", metavar="NAME=LAYOUT",
                       help="classes | flat | tiles | auto (default: auto; GeoTIFF scenes need tiles)")
    build.add_argument("--tile-size", type=int, default=512, help="tile side in pixels for tiles sources")
    build.add_argument("--bands", action="append", metavar="NAME=1,2,3",
                       help="tiles sources: 1-based bands to keep (default: all), e.g. naip=1,2,3 for RGB")
    build.add_argument("--max-nodata", type=float, default=0.25, help="skip tiles with more nodata than this")
    build.add_argument("--nodata", type=float, default=None, help="nodata value (default: the GDAL_NODATA tag)")
    build.add_argument("--tile-format", default="raw", choices=("raw", "compressed", "jpeg"),
                       help="how tiles are stored: raw (uncompressed TIFF: lossless, fastest to decode; default), "
                            "compressed (PNG / zlib TIFF: lossless, compact; the loader reads 512 px PNG tiles ~7x "
                            "slower, benchmarks/results/loader_cpu.json), jpeg (lossy, "
                            "8-bit RGB/gray tiles only; for storage-bound setups)")
    build.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --tile-format jpeg")
    build.add_argument("--prefix", default="geopile", help="shard file name prefix")
    build.add_argument("--overwrite", action="store_true", help="replace a different earlier build in --out")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
    verify = commands.add_parser("verify", help="check a build's shards against manifest.json (size, sha256)")
    verify.add_argument("dir")
    verify.add_argument("--no-checksums", action="store_true", help="check sizes only")
    verify.set_defaults(func=_verify)
    show = commands.add_parser("show", help="print the first samples' keys and metadata")
    show.add_argument("spec", help="build directory, brace pattern or URL list")
    show.add_argument("-n", type=int, default=5)
    show.set_defaults(func=_show)
    args = parser.parse_args(argv)
    return exit_status(lambda: args.func(args))  # OSError: an --out where nothing can be written


if __name__ == "__main__":
    sys.exit(main())
