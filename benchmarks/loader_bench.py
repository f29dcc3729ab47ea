"""Loader throughput: gfm_fast.data (shards -> decode -> GFM augment -> batch) vs torchvision ImageFolder.

    python benchmarks/loader_bench.py                       # writes benchmarks/results/loader_cpu.json
    python benchmarks/loader_bench.py --images 256 --batch 64 --rounds 7 --workers 0 2

Image sets (IMAGE_SETS; real NEON imagery from the embedded sample, mosaicked and re-cut to
GeoPile's sizes): ``jpeg256``, 256 px JPEG files in class folders like RESISC45 / PatternNet /
MLRSNet / RSD46; ``naip512_*``, 512 px tiles cut by the builder from GeoTIFF scenes like NAIP,
stored with each --tile-format (raw = uncompressed TIFF, compressed = PNG, jpeg = quality 95).
Both loaders read the same images: ours from the builder's shards, the baseline from files.

Cases:
- ``loader``: ms per batch of the full pipeline, ours vs ``ImageFolder + RandomResizedCrop +
  RandomHorizontalFlip + ToTensor + Normalize`` in a DataLoader. ``workers == 0``: both run on
  one core (torch threads = 1), timed in alternating runs: the per-core rate and a fair ratio.
  ``workers > 0``: each loader timed alone at steady state (background prefetch would make
  alternating runs meaningless); on a shared machine these numbers are noisy. ``batch_dtype`` /
  ``batch_bytes``: what one batch carries through worker shared memory, pinning and the copy to
  the device. Ours is uint8 when every image of the batch is 8-bit: its normalisation runs on the
  device after the copy (``GeoPileLoader.normalize``, one pass), outside this timing.
- ``gfm_fast_pillow_jpeg``: our loader with Pillow instead of simplejpeg for JPEG.
- ``decode`` / ``resize``: per-image cost of the candidate decoders and resizers: how the loader's
  choices were made (simplejpeg, else Pillow, for JPEG; torch uint8 antialiased resize).
- ``cores_for_target``: cores to feed TARGET_IMG_PER_S from the per-core rates, per set and for
  the GeoPile mix (NAIP's share of tiles + 256 px JPEG for the rest).
Each record carries median/p20/p80 ms per batch (or per image), img/s, and the environment.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _args import at_least  # noqa: E402
from _timing import _quantile, environment, time_fn  # noqa: E402

TARGET_IMG_PER_S = 3000  # the GPU step target per H100 (see the README's performance goals)
IMG_SIZE = 192
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "gfm_fast" / "data" / "sample" / "images"
# name: (side, how our shards store it, how the baseline's files store it)
IMAGE_SETS = {
    "jpeg256": (256, "passthrough", "JPEG"),  # RESISC45 / PatternNet / MLRSNet / RSD46-like
    "naip512_raw": (512, "raw", "TIFF"),  # GeoTIFF tiles, builder default (uncompressed TIFF)
    "naip512_png": (512, "compressed", "PNG"),  # --tile-format compressed (PNG)
    "naip512_jpeg95": (512, "jpeg", "JPEG"),  # --tile-format jpeg (lossy, quality 95)
}
GEOPILE_SHARE_TILES = 300_000 / 587_954  # NAIP's share of GeoPile (docs/method.md), the rest is ~256 px JPEG
MOSAIC_TILE = 256


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _mosaic(seed: int) -> np.ndarray:
    """All sample tiles resized to 256 px and laid out on a square canvas (real imagery)."""
    from PIL import Image

    tiles = [np.asarray(Image.open(p).convert("RGB").resize((MOSAIC_TILE, MOSAIC_TILE), Image.BILINEAR))
             for p in sorted(SAMPLE_IMAGES.rglob("*")) if p.is_file()]
    rng = np.random.default_rng(seed)
    rng.shuffle(tiles)
    side = int(math.sqrt(len(tiles)))
    rows = [np.concatenate(tiles[r * side:(r + 1) * side], axis=1) for r in range(side)]
    return np.concatenate(rows, axis=0)


def make_image_set(root: Path, name: str, count: int, seed: int = 0) -> Tuple[Path, Path]:
    """``count`` random crops of the mosaic as the baseline's class folders, plus our shards.

    256 px sets are JPEG files, built into shards as they are (passthrough). 512 px sets mimic
    NAIP: each crop is written as an uncompressed GeoTIFF scene and cut by the builder's tiles
    layout with the set's --tile-format; the baseline gets the same tiles as PNG/TIFF/JPEG files.

    Returns:
        (baseline folder, shard directory).
    """
    from PIL import Image

    from gfm_fast.data.geopile import BuildOptions, Source, build_shards

    size, tile_format, file_format = IMAGE_SETS[name]
    canvas = _mosaic(seed)
    rng = np.random.default_rng(seed + 1)
    folder, scenes = root / "images" / name, root / "scenes" / name
    suffix = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif"}[file_format]
    # The builder's jpeg tiles are quality 95, 4:4:4; 256 px sources are ordinary quality-90 JPEGs.
    save_args = {"JPEG": {"quality": 95, "subsampling": 0} if tile_format == "jpeg" else {"quality": 90}}.get(file_format, {})
    for i in range(count):
        top, left = rng.integers(0, canvas.shape[0] - size + 1, size=2)
        crop = np.ascontiguousarray(np.rot90(canvas[top:top + size, left:left + size], k=int(rng.integers(4))))
        path = folder / f"class{i % 4}" / f"img{i:05d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(path, format=file_format, **save_args)
        if tile_format != "passthrough":
            import tifffile

            scenes.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(scenes / f"scene{i:05d}.tif", crop, photometric="rgb", metadata=None)
    if tile_format == "passthrough":
        source = Source(name, str(folder))
    else:
        source = Source(name, str(scenes), layout="tiles")
    shards = root / "shards" / name
    build_shards([source], shards, BuildOptions(shard_size=64 * 2**20, tile_size=size,
                                                tile_format="raw" if tile_format == "passthrough" else tile_format),
                 progress=False, log=lambda *_: None)
    return folder, shards


# --------------------------------------------------------------------------------------------
# Loaders under test
# --------------------------------------------------------------------------------------------

def _ours(shards: Path, batch: int, workers: int, shuffle_buffer: int):
    """(next batch, close) of our loader; close stops its workers."""
    from gfm_fast.config import DataConfig
    from gfm_fast.data import make_loader

    cfg = DataConfig(shards=str(shards), batch_size=batch, num_workers=workers, shuffle_buffer=shuffle_buffer,
                     samples_per_epoch=10**9)
    iterator = iter(make_loader(cfg, img_size=IMG_SIZE, mean=MEAN, std=STD, seed=0))
    return (lambda: next(iterator)), iterator.close


def _baseline(folder: Path, batch: int, workers: int):
    """(next batch, close) of the torchvision ImageFolder + transforms DataLoader."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(IMG_SIZE, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3),
                                               interpolation=T.InterpolationMode.BILINEAR),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    epochs = (iter(loader) for _ in itertools.count())
    current = {"it": next(epochs)}

    def next_batch():
        try:
            return next(current["it"])[0]
        except StopIteration:
            current["it"] = next(epochs)
            return next(current["it"])[0]

    def close():
        shutdown = getattr(current["it"], "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    return next_batch, close


def _ours_without_simplejpeg(shards: Path, batch: int, shuffle_buffer: int):
    """Our loader with Pillow as the JPEG decoder (in-process only): the simplejpeg decision."""
    from gfm_fast.data import decode

    fn, close = _ours(shards, batch, 0, shuffle_buffer)

    def next_batch():
        saved, decode.simplejpeg = decode.simplejpeg, None
        try:
            return fn()
        finally:
            decode.simplejpeg = saved

    return next_batch, close


LOADERS = {
    "gfm_fast": lambda folder, shards, batch, workers, buf: _ours(shards, batch, workers, buf),
    "gfm_fast_pillow_jpeg": lambda folder, shards, batch, workers, buf: _ours_without_simplejpeg(shards, batch, buf),
    "torchvision_imagefolder": lambda folder, shards, batch, workers, buf: _baseline(folder, batch, workers),
}


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------

def _summary(samples: Sequence[float], per: int) -> Dict[str, float]:
    median = statistics.median(samples)
    return {"median_ms": median, "p20_ms": _quantile(list(samples), 0.2), "p80_ms": _quantile(list(samples), 0.8),
            "runs": len(samples), "img_s": per / (median / 1e3)}


def _time_batches(fn: Callable[[], object], batches: int) -> float:
    """ms per batch over ``batches`` consecutive batches (the one shared timer, one run)."""
    return time_fn(lambda: [fn() for _ in range(batches)], device=torch.device("cpu"), warmup=0, runs=1).median_ms / batches


def _batch_format(batch: torch.Tensor) -> Dict[str, object]:
    return {"batch_dtype": str(batch.dtype).replace("torch.", ""), "batch_bytes": batch.nbytes}


def _interleaved(loaders: Dict[str, tuple], rounds: int,
                 batches_per_run: int) -> Tuple[Dict[str, List[float]], Dict[str, Dict]]:
    """In-process loaders (workers == 0), timed in alternating runs: their ratios are fair.
    Returns the ms per batch of each run and the format of a batch (_batch_format), per loader."""
    samples: Dict[str, List[float]] = {name: [] for name in loaders}
    formats = {name: _batch_format(fn()) for name, (fn, _) in loaders.items()}
    for name, (fn, _) in loaders.items():  # warm-up: shuffle buffers fill, caches warm
        _time_batches(fn, 2)
    for _ in range(rounds):
        for name, (fn, _) in loaders.items():
            samples[name].append(_time_batches(fn, batches_per_run))
    return samples, formats


def _sustained(make: Callable[[], tuple], rounds: int, batches_per_run: int,
               workers: int) -> Tuple[List[float], Dict]:
    """One multi-worker loader alone (others stopped: workers prefetch in the background, so
    alternating runs would time queued batches); warm-up fills the prefetch queues first.
    Returns the ms per batch of each run and the format of a batch (_batch_format)."""
    fn, close = make()
    try:
        batch_format = _batch_format(fn())
        _time_batches(fn, 4 * workers)
        return [_time_batches(fn, max(batches_per_run, 2 * workers)) for _ in range(rounds)], batch_format
    finally:
        close()


def _per_image(fn: Callable[[bytes], object], blobs: List[bytes], rounds: int) -> Dict[str, float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for blob in blobs:
            fn(blob)
        times.append((time.perf_counter() - start) * 1e3 / len(blobs))
    return _summary(times, 1)


def bench_codecs(folder: Path, rounds: int) -> List[Dict]:
    """Per-image decode and resize cost of the candidates the loader chose between."""
    import torch.nn.functional as F
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchvision.io as tvio
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    blobs = [p.read_bytes() for p in files]
    is_jpeg = files[0].suffix == ".jpg"
    def pillow(blob):
        image = Image.open(io.BytesIO(blob))
        image.load()
        return np.asarray(image)

    decoders = {"pillow": pillow}
    if is_jpeg:
        decoders["torchvision.io.decode_jpeg"] = lambda b: tvio.decode_jpeg(
            torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
        try:
            import simplejpeg

            decoders["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
        except ImportError:
            pass
    else:
        decoders["torchvision.io.decode_png"] = lambda b: tvio.decode_png(
            torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, decode in decoders.items():
            records.append({"case": "decode", "image_set": folder.name, "impl": name, **_per_image(decode, blobs, rounds)})
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    crop = int(arrays[0].shape[0] * 0.9)

    def pil_resize(array):
        Image.fromarray(array).crop((5, 5, 5 + crop, 5 + crop)).resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR)

    def torch_resize(array):
        image = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)[:, :, 5:5 + crop, 5:5 + crop]
        F.interpolate(image, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", antialias=True, align_corners=False)

    for name, resize in (("pillow crop+resize", pil_resize), ("torch uint8 interpolate (channels-last)", torch_resize)):
        records.append({"case": "resize", "image_set": folder.name, "impl": name, **_per_image(resize, arrays, rounds)})
    return records


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def run_loader(images: int = 192, batch: int = 32, rounds: int = 5, batches_per_run: int = 3,
               workers: Sequence[int] = (0, 2), image_sets: Sequence[str] = tuple(IMAGE_SETS),
               shuffle_buffer: int = 256, codecs: bool = True, workdir: Optional[str] = None) -> List[Dict]:
    """Measure the loader against the ImageFolder baseline; one record per (image set, workers, impl).

    Args:
        images: images per set (written to a temp dir, also built into shards).
        batch: batch size of both loaders.
        rounds: interleaved timed runs per loader.
        batches_per_run: batches per timed run.
        workers: DataLoader workers to try; 0 = single core, which gives the per-core rate.
        image_sets: which of IMAGE_SETS to use.
        shuffle_buffer: our loader's sample shuffle buffer.
        codecs: also record the per-image decoder/resizer measurements.
        workdir: where to write the images and shards (default: a temp dir).

    Returns:
        JSON-able records (environment fields included).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core numbers: one thread in the main process, one per worker
    env = environment(torch.device("cpu"))
    records: List[Dict] = []
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            root = Path(tmp)
            for name in image_sets:
                folder, shards = make_image_set(root, name, images)
                for num_workers in workers:
                    args = (folder, shards, batch, num_workers, shuffle_buffer)
                    if num_workers == 0:
                        loaders = {impl: make(*args) for impl, make in LOADERS.items()}
                        samples, formats = _interleaved(loaders, rounds, batches_per_run)
                        for _, close in loaders.values():
                            close()
                    else:  # the Pillow variant is a per-core number only
                        runs = {impl: _sustained(lambda: LOADERS[impl](*args), rounds, batches_per_run, num_workers)
                                for impl in ("gfm_fast", "torchvision_imagefolder")}
                        samples = {impl: times for impl, (times, _) in runs.items()}
                        formats = {impl: batch_format for impl, (_, batch_format) in runs.items()}
                    base = statistics.median(samples["torchvision_imagefolder"])
                    cores = max(1, num_workers)
                    for impl, times in samples.items():
                        summary = _summary(times, batch)
                        records.append({**env, "case": "loader", "image_set": name, "impl": impl, "workers": num_workers,
                                        "timing": "interleaved" if num_workers == 0 else "sequential",
                                        "batch": batch, "img_size": IMG_SIZE, **formats[impl], **summary,
                                        "img_s_per_core": summary["img_s"] / cores,
                                        "speedup_vs_imagefolder": base / summary["median_ms"]})
                if codecs and name in ("jpeg256", "naip512_png"):
                    records += [{**env, **r} for r in bench_codecs(folder, rounds)]
    finally:
        torch.set_num_threads(threads)
    return records


def cores_needed(records: List[Dict], target: float = TARGET_IMG_PER_S) -> List[Dict]:
    """CPU cores to feed ``target`` img/s, from the single-core rates (workers == 0).

    Per image set, and for the GeoPile mix (NAIP tiles stored each way + the 256 px JPEG
    sources), whose per-image cost is the share-weighted mean of the two.
    """
    rates = {(r["image_set"], r["impl"]): r["img_s_per_core"] for r in records
             if r.get("case") == "loader" and r["workers"] == 0}
    estimates = []

    def add(image_set: str, impl: str, per_core: float) -> None:
        estimates.append({"case": "cores_for_target", "image_set": image_set, "impl": impl, "target_img_s": target,
                          "img_s_per_core": per_core, "cores": math.ceil(target / per_core)})

    for (image_set, impl), per_core in rates.items():
        add(image_set, impl, per_core)
    for (image_set, impl), per_core in rates.items():
        if image_set.startswith("naip") and ("jpeg256", impl) in rates:
            seconds = GEOPILE_SHARE_TILES / per_core + (1 - GEOPILE_SHARE_TILES) / rates[("jpeg256", impl)]
            add(f"geopile_mix({image_set})", impl, 1 / seconds)
    return estimates


def print_table(records: List[Dict]) -> None:
    print(f"{'case':<18} {'set':<34} {'impl':<32} {'workers':>7} {'ms/batch|img':>12} {'p20-p80':>15} "
          f"{'img/s':>8} {'/core':>8} {'speedup':>8} {'batch':>15}")
    for r in records:
        if r["case"] == "cores_for_target":
            print(f"{r['case']:<18} {r['image_set']:<34} {r['impl']:<32} {'':>7} {'':>12} {'':>15} "
                  f"{r['target_img_s']:>8.0f} {r['img_s_per_core']:>8.0f}   -> {r['cores']} cores")
            continue
        spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}"
        print(f"{r['case']:<18} {r['image_set']:<34} {r['impl'][:32]:<32} {r.get('workers', ''):>7} "
              f"{r['median_ms']:>12.3f} {spread:>15} {r['img_s']:>8.0f} {r.get('img_s_per_core', r['img_s']):>8.0f} "
              f"{r.get('speedup_vs_imagefolder', float('nan')):>8.2f} {_format_cell(r):>15}")


def _format_cell(record: Dict) -> str:
    if "batch_dtype" not in record:
        return ""
    return f"{record['batch_dtype']} {record['batch_bytes'] / 2**20:.1f} MiB"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=at_least(1), default=192)
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--batches-per-run", type=at_least(1), default=3)
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 2])
    parser.add_argument("--sets", nargs="+", default=list(IMAGE_SETS), choices=list(IMAGE_SETS))
    parser.add_argument("--no-codecs", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loader_cpu.json"))
    args = parser.parse_args(argv)
    records = run_loader(args.images, args.batch, args.rounds, args.batches_per_run, args.workers, args.sets,
                         codecs=not args.no_codecs)
    records += cores_needed(records)
    print_table(records)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
