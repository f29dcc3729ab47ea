"""Feature files: ``python -m gfm_fast.features`` writes GFM features of a whole data set to disk.

    python -m gfm_fast.features --model runs/gfm/model --data images/ --out feats.npy
    python -m gfm_fast.features --model gfm.pth --data shards/ --out feats.parquet --image-size 192

The features are the pooled features of ``extract_features``, one row per image, with image ids:
the path relative to ``--data`` for an image directory (searched recursively, sorted), the sample
key for WebDataset shards (a build directory with manifest.json, or a brace pattern / URL list, in
shard order). The suffix of ``--out`` picks the format:

- ``feats.npy``: an (N, F) float32 array, and ``feats.ids.txt`` with one id per line, row for row.
- ``feats.parquet``: one file with an ``id`` string column and a ``features`` column (fixed-size
  list of F float32), and the settings in the schema metadata under ``gfm_fast`` (JSON: model,
  model name, data, image size, pooling, channels, F, mean/std, version); read it with
  ``pyarrow.parquet.read_table``.

Resumable: images are processed in chunks of ``--chunk-size``, each written atomically to
``<out>.parts/`` beside an index of the settings; re-running the same command after an
interruption (Ctrl-C, a killed job, an unreadable file fixed since) skips the finished chunks
without decoding or running their images. The parts are joined into the output at the end (via a
temporary file, renamed into place) and removed; while ``<out>.parts/`` exists the output is not
complete (killed between the ids and the array, an earlier run's ``.npy`` is already gone).
Corrupt samples in shards are skipped and counted; an unreadable file in a directory, or a shard
that cannot be read, stops the run, naming it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import gfm_fast
from gfm_fast.errors import GFMError, exit_status

__all__ = ["write_feature_file", "FeatureFileError", "main"]

IDS_SUFFIX = ".ids.txt"
FORMATS = (".npy", ".parquet")
METADATA_KEY = b"gfm_fast"  # Parquet schema metadata: the settings as JSON
POOLING = "mean over the tokens of the last stage after its norm (extract_features)"
PARTS_SUFFIX = ".parts"
INDEX_FILE = "index.json"
Loader = Callable[[], Optional[Tuple[np.ndarray, float]]]  # -> (pixels, divisor to [0, 1]) or None if corrupt


class FeatureFileError(GFMError, ValueError):
    """The feature file cannot be written (bad input, settings that differ from the parts on disk)."""


# --------------------------------------------------------------------------------------------
# Inputs: (id, loader) in a fixed order; loaders decode only when called
# --------------------------------------------------------------------------------------------

def _directory_items(directory: Path) -> Tuple[int, Iterator[Tuple[str, Loader]]]:
    from gfm_fast.features import IMAGE_SUFFIXES, read_image

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FeatureFileError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")

    def load(path: Path) -> Tuple[np.ndarray, float]:
        try:
            return read_image(path)
        except ValueError as exc:
            raise FeatureFileError(f"{exc}; fix or remove it and run the same command again to resume") from exc

    return len(files), ((f.relative_to(directory).as_posix(), lambda f=f: load(f)) for f in files)


def _shard_items(spec: str, chans: int) -> Tuple[Optional[int], Iterator[Tuple[str, Loader]]]:
    import webdataset as wds

    from gfm_fast.data.decode import CorruptSample, EncodedImage, find_image, to_unit_scale
    from gfm_fast.data.shards import SHARD_READ_ERRORS, resolve_shards, unreadable_shard

    try:
        shards = resolve_shards(spec)
    except (OSError, ValueError) as exc:
        raise FeatureFileError(f"--data {spec}: {exc}") from exc

    def load(sample: Dict[str, Any]) -> Optional[Tuple[np.ndarray, float]]:
        try:
            ext, data = find_image(sample)
            array = EncodedImage(data, ext).decode(chans)
            return array, 1.0 / to_unit_scale(array.dtype)
        except CorruptSample:
            return None

    def samples() -> Iterator[Dict[str, Any]]:
        try:
            yield from wds.DataPipeline(wds.SimpleShardList(shards.urls), wds.tarfile_to_samples())
        except SHARD_READ_ERRORS as exc:  # unreachable, truncated, not a tar: stop (finished chunks are kept)
            raise FeatureFileError(unreadable_shard(exc)) from None

    count = sum(shards.source_counts.values()) if shards.source_counts else None
    return count, ((s["__key__"], lambda s=s: load(s)) for s in samples())


def _items(data: str, chans: int) -> Tuple[Optional[int], Iterator[Tuple[str, Loader]]]:
    path = Path(data)
    if path.is_dir() and not (path / "manifest.json").is_file():
        return _directory_items(path)
    if not path.exists() and "{" not in data and "://" not in data and not data.startswith("pipe:"):
        raise FeatureFileError(f"--data {data} does not exist (expected an image directory or WebDataset shards)")
    return _shard_items(data, chans)


# --------------------------------------------------------------------------------------------
# One chunk: load, scale, resize, normalise, run
# --------------------------------------------------------------------------------------------

def _to_input(array: np.ndarray, divisor: float, chans: int, size: Optional[int], mean_std, what: str) -> torch.Tensor:
    """Pixels -> one normalised (C, H, W) float32 image, as ``extract_features`` prepares them
    (optionally resized to size x size, bilinear with antialiasing, before normalising)."""
    from gfm_fast.features import _to_nchw

    data = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32)) / divisor
    image = _to_nchw(data, chans, what)
    if image.shape[1] == 1 and chans == 3:
        image = image.expand(-1, 3, -1, -1)  # gray into an RGB model
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = mean_std
    return ((image - mean) / std)[0]


def _run_chunk(encoder, items: List[Tuple[str, Loader]], *, size: Optional[int], batch_size: int, device,
               mean_std) -> Tuple[List[str], np.ndarray, int]:
    """(ids kept, features (n, F), corrupt count); consecutive images of one size share a batch."""
    from gfm_fast.features import extract_features

    chans = encoder.gfm_config.swin.in_chans
    ids, images, corrupt = [], [], 0
    for image_id, load in items:
        loaded = load()
        if loaded is None:
            corrupt += 1
            continue
        ids.append(image_id)
        images.append(_to_input(*loaded, chans, size, mean_std, f"image {image_id}"))
    outputs, start = [], 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        try:
            outputs.append(extract_features(encoder, torch.stack(images[start:end]), batch_size=batch_size,
                                            device=device))
        except ValueError as exc:
            hint = "" if size else "; or pass --image-size N to resize every image"
            raise FeatureFileError(f"image {ids[start]}: {exc}{hint}") from exc
        start = end
    dim = encoder.num_features
    return ids, (torch.cat(outputs).numpy() if outputs else np.zeros((0, dim), np.float32)), corrupt


# --------------------------------------------------------------------------------------------
# Chunks on disk, resume, join
# --------------------------------------------------------------------------------------------

def _chunk_paths(parts: Path, index: int) -> Tuple[Path, Path]:
    return parts / f"chunk-{index:06d}.npy", parts / f"chunk-{index:06d}.ids.json"


def _save_chunk(parts: Path, index: int, ids: List[str], features: np.ndarray) -> None:
    """Features then ids, each via a temporary name: a chunk counts as done once its ids file exists."""
    features_path, ids_path = _chunk_paths(parts, index)
    with open(features_path.with_suffix(".tmp"), "wb") as handle:
        np.save(handle, features.astype(np.float32))
    os.replace(features_path.with_suffix(".tmp"), features_path)
    ids_path.with_suffix(".tmp").write_text(json.dumps(ids))
    os.replace(ids_path.with_suffix(".tmp"), ids_path)


def _open_parts(out: Path, settings: Dict[str, Any]) -> Path:
    parts = out.with_name(out.name + PARTS_SUFFIX)
    index = parts / INDEX_FILE
    if index.is_file():
        saved = json.loads(index.read_text())
        finished = any(parts.glob("chunk-*.ids.json"))
        if saved != settings and not finished:
            index.write_text(json.dumps(settings, indent=1))  # nothing done yet: the new settings win
        elif saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise FeatureFileError(f"{parts} holds chunks of a run with other settings ({', '.join(changed)}); "
                                   f"run with the same arguments to resume, or remove {parts} to start over")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps(settings, indent=1))
    return parts


def _chunks(parts: Path, chunks: int) -> Iterator[Tuple[List[str], np.ndarray]]:
    """(ids, features memory-mapped) of each finished chunk, in order."""
    for i in range(chunks):
        features_path, ids_path = _chunk_paths(parts, i)
        yield json.loads(ids_path.read_text()), np.load(features_path, mmap_mode="r")


def _write_npy(parts: Path, chunks: int, out: Path, dim: int) -> int:
    """``out`` (N, dim) float32, filled chunk by chunk through a memory map, and ``<out>.ids.txt``."""
    sizes = [np.load(_chunk_paths(parts, i)[0], mmap_mode="r").shape[0] for i in range(chunks)]
    tmp = out.with_name(out.name + ".tmp.npy")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(sum(sizes), dim))
    ids: List[str] = []
    for chunk_ids, features in _chunks(parts, chunks):
        joined[len(ids):len(ids) + len(chunk_ids)] = features
        ids += chunk_ids
    joined.flush()
    del joined
    ids_path = out.with_name(out.name[: -len(".npy")] + IDS_SUFFIX)
    ids_path.with_suffix(".tmp").write_text("".join(f"{i}\n" for i in ids))
    # Two files cannot be replaced at once: an earlier run's array goes first, so a kill in between
    # leaves the array missing (incomplete, and the parts are still there to rerun), never this
    # run's ids beside another run's rows.
    out.unlink(missing_ok=True)
    os.replace(ids_path.with_suffix(".tmp"), ids_path)
    os.replace(tmp, out)
    return len(ids)


def _write_parquet(parts: Path, chunks: int, out: Path, dim: int, metadata: Dict[str, Any]) -> int:
    """``out`` with columns id (string) and features (fixed-size list of dim float32), one row group
    per chunk (never all features in RAM), and ``metadata`` as JSON in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("features", pa.list_(pa.float32(), dim))],
                       metadata={METADATA_KEY: json.dumps(metadata).encode()})
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for ids, features in _chunks(parts, chunks):
            values = pa.array(features.reshape(-1), pa.float32())
            writer.write_table(pa.table([pa.array(ids, pa.string()), pa.FixedSizeListArray.from_arrays(values, dim)],
                                        schema=schema))
            rows += len(ids)
    os.replace(tmp, out)
    return rows


def write_feature_file(model: str, data: str, out: str, *, batch_size: int = 64, chunk_size: int = 4096,
                       image_size: Optional[int] = None, device: Optional[str] = None,
                       progress: bool = True) -> Tuple[Path, int]:
    """Write the pooled GFM features of every image in ``data``, with their ids, to ``out``.

    Args:
        model: anything ``gfm_fast.load_model`` reads.
        data: an image directory, or WebDataset shards (build directory, brace pattern, URLs).
        out: a ``.npy`` file (ids go to ``<out without .npy>.ids.txt``) or a ``.parquet`` file
            (columns ``id`` and ``features``; see the module docstring).
        batch_size: images per forward pass.
        chunk_size: images per resumable chunk.
        image_size: resize every image to this square size first (default: as stored; sizes must
            then be multiples of 32).
        device: default CUDA when available.
        progress: show a progress bar (the closing summary line is printed either way).

    Returns:
        ``(out, number of rows)``.
    """
    from gfm_fast.features import check_device
    from gfm_fast.models.io import load_model

    out_path = Path(out)
    if out_path.suffix not in FORMATS:
        raise FeatureFileError(f"--out {out} must end in .npy or .parquet (the suffix picks the format)")
    if batch_size <= 0 or chunk_size <= 0:
        raise FeatureFileError("--batch-size and --chunk-size must be positive")
    settings = {"model": str(Path(model).resolve()), "data": str(data), "chunk_size": chunk_size,
                "image_size": image_size}
    encoder = load_model(model)
    config = encoder.gfm_config
    stride = config.swin.total_stride
    if image_size is not None and (image_size <= 0 or image_size % stride):
        raise FeatureFileError(f"--image-size {image_size} is not a positive multiple of {stride} (the model's total "
                               f"stride); e.g. --image-size {max(stride, image_size // stride * stride)}")
    device = check_device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean_std = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (config.mean, config.std))
    count, items = _items(data, config.swin.in_chans)
    parts = _open_parts(out_path, settings)
    chunks, corrupt, done = 0, 0, 0
    with tqdm(total=count, unit="img", disable=not progress, desc="features") as bar:
        while True:
            chunk = [item for _, item in zip(range(chunk_size), items)]
            if not chunk:
                break
            if not _chunk_paths(parts, chunks)[1].is_file():
                ids, features, bad = _run_chunk(encoder, chunk, size=image_size, batch_size=batch_size,
                                                device=device, mean_std=mean_std)
                _save_chunk(parts, chunks, ids, features)
                corrupt += bad
            else:
                done += len(chunk)
            chunks += 1
            bar.update(len(chunk))
    if out_path.suffix == ".npy":
        rows = _write_npy(parts, chunks, out_path, encoder.num_features)
    else:
        metadata = {**settings, "model_name": config.model_name, "pooling": POOLING,
                    "in_chans": config.swin.in_chans, "num_features": encoder.num_features,
                    "mean": list(config.mean), "std": list(config.std), "gfm_fast_version": gfm_fast.__version__}
        rows = _write_parquet(parts, chunks, out_path, encoder.num_features, metadata)
    shutil.rmtree(parts)
    note = f", {done} from finished chunks of an earlier run" if done else ""
    skipped = f", {corrupt} corrupt samples skipped" if corrupt else ""
    beside = f" and {out_path.name[:-4]}{IDS_SUFFIX}" if out_path.suffix == ".npy" else ""
    print(f"wrote {out_path} ({rows} x {encoder.num_features} float32{note}{skipped}){beside}", file=sys.stderr)
    return out_path, rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfm_fast.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="anything gfm_fast.load_model reads")
    parser.add_argument("--data", required=True, help="image directory, shard build directory or brace pattern")
    parser.add_argument("--out", required=True, help="output .npy (ids beside it in .ids.txt) or .parquet "
                        "(columns id and features)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=4096, help="images per resumable chunk")
    parser.add_argument("--image-size", type=int, default=None, help="resize images to this square size first")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def work() -> None:
        write_feature_file(args.model, args.data, args.out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                           image_size=args.image_size, device=args.device, progress=not args.no_progress)

    try:  # OSError: an --out where nothing can be written, an unreadable input file
        return exit_status(work)
    except KeyboardInterrupt:
        print(f"interrupted: finished chunks are kept in {args.out}{PARTS_SUFFIX}; run the same command to resume",
              file=sys.stderr)
        return 130
