"""Streaming GeoPile loader: one webdataset pipeline per (rank, worker) slot, and the loader train.py uses.

``build_pipeline`` lists the stages in order, like ``nn.Sequential``::

    shard_stream      infinite shard order, reshuffled every pass, split by node and worker (disjoint)
    read_shards       tar -> samples; unreachable/truncated/empty shards are counted, never fatal
    select_sources    per-source mixing weights (acceptance by the key's source prefix), pre-decode
    shuffle           sample shuffle buffer (encoded bytes: cheap to hold)
    skip_consumed     resume: drop the samples a checkpoint already consumed, before any decode
    decode_augment    decode + GFM RandomResizedCrop/flip; corrupt samples are counted and dropped
    batch_samples     normalise into a float32 (B, C, H, W) batch, tagged with the stream position
    .with_epoch(n)    every slot yields a fixed number of batches, so every rank yields steps_per_epoch

Determinism: every random choice comes from a seed mixed from (seed, epoch, rank, worker, ...):
the shard order from (seed, epoch, pass) (identical on all ranks, then split), the selection and
shuffle from (seed, epoch, rank, worker), and each sample's crop/flip from (seed, epoch, rank,
worker, index in the shuffled stream). So a resumed slot can skip consumed samples without
decoding them and still draw the same augmentation for everything after.
"""
from __future__ import annotations

import os
import random
import re
import signal
import tarfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import braceexpand
import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from gfm_fast.data.augment import CropBox, GFMAugment
from gfm_fast.data.decode import JPEG_EXTENSIONS, EncodedImage, find_image
from gfm_fast.data.manifest import MANIFEST_NAME, read_manifest, shard_paths
from gfm_fast.errors import TooManyFailures

SAMPLE_SHARDS_DIR = Path(__file__).resolve().parent / "sample" / "shards"
STATE_VERSION = 1
STAT_KEYS = ("samples", "corrupt_samples", "failed_shards", "shards_read", "filtered_samples")
# Independent random streams per purpose, mixed into every seed.
_TAG_SHARDS, _TAG_SELECT, _TAG_SHUFFLE, _TAG_AUGMENT = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1
_WARN_FIRST = 10  # warnings per worker before rate limiting (counts are always exact)
_WARN_EVERY = 1000


class DataWarning(UserWarning):
    """A shard or sample was skipped (the loader counts it in ``loader.stats``)."""




# --------------------------------------------------------------------------------------------
# Seeds and shard specs
# --------------------------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 fold): stable across runs, unlike ``hash()``."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    return state >> 1


def sample_shards() -> str:
    """Shard spec (a build directory with manifest.json) of the embedded NEON sample imagery.

    The shards are committed under ``gfm_fast/data/sample/shards`` (built from
    ``gfm_fast/data/sample/images`` by ``python -m gfm_fast.data build``; see sample/README.md),
    so the quick start needs no download and no build step.
    """
    if not (SAMPLE_SHARDS_DIR / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"embedded sample shards are missing ({SAMPLE_SHARDS_DIR}); reinstall gfm_fast "
                                "with its package data (pip install -e .) or pass data.shards explicitly")
    return str(SAMPLE_SHARDS_DIR)


@dataclass
class ShardSet:
    """Resolved shard URLs plus what the manifest (if any) says about them."""

    urls: List[str]
    spec: str
    source_counts: Optional[Dict[str, int]] = None  # per-source sample counts from manifest.json


def _split_top_level(spec: str) -> List[str]:
    """Split on commas (and webdataset's '::') outside braces: 'a-{0,1}.tar,b.tar' -> 2 items."""
    parts, depth, current = [], 0, []
    for char in spec.replace("::", ","):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _to_url(item: str) -> str:
    if item.startswith("s3://"):  # webdataset has no s3 handler: stream through the AWS CLI
        return f"pipe:aws s3 cp {item} -"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", item):  # pipe:, http(s):, gs:, file:, ...
        return item
    return os.path.expanduser(item)


def resolve_shards(spec: Optional[str]) -> ShardSet:
    """Turn ``DataConfig.shards`` into a list of shard URLs.

    Args:
        spec: None (embedded sample), a build directory (or its manifest.json), or a comma
            separated list of brace patterns / URLs (file, pipe:, http(s):, gs:, s3:// via the
            AWS CLI).

    Returns:
        The expanded :class:`ShardSet`.
    """
    if spec is None:
        spec = sample_shards()
    spec = spec.strip()
    local = Path(os.path.expanduser(spec))
    if local.is_dir() or local.name == MANIFEST_NAME:
        if local.is_dir() and not (local / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"data.shards={spec!r} is a directory without {MANIFEST_NAME} (written by "
                                    "`python -m gfm_fast.data build`); pass a brace pattern of its .tar files instead")
        root = local if local.is_dir() else local.parent
        manifest = read_manifest(root)
        counts = {name: int(src["samples"]) for name, src in manifest["sources"].items()}
        shards = ShardSet(shard_paths(root, manifest), spec, counts)
    else:
        urls = [_to_url(url) for item in _split_top_level(spec) for url in braceexpand.braceexpand(item)]
        shards = ShardSet(urls, spec)
    _check_local_shards(shards)
    return shards


def _check_local_shards(shards: ShardSet) -> None:
    """Fail fast when no local shard exists; warn about missing ones (they count as failed)."""
    urls, spec = shards.urls, shards.spec
    if not urls:
        raise ValueError(f"data.shards={spec!r} names no shards")
    local_paths = [u for u in urls if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", u)]
    missing = [u for u in local_paths if not os.path.exists(u)]
    if local_paths and len(missing) == len(urls):
        raise FileNotFoundError(f"none of the {len(urls)} shards of data.shards={spec!r} exist (first: {missing[0]})")
    if missing:
        warnings.warn(f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); they will be "
                      "counted as failed shards", DataWarning)


def source_of(key: str) -> str:
    """The source name of a sample key ``<source>/<relpath>`` ('' when the key has no source)."""
    return key.split("/", 1)[0] if "/" in key else ""


def acceptance_rates(weights: Dict[str, float], known: Optional[Iterable[str]]) -> Tuple[Dict[str, float], float]:
    """Per-source keep probabilities for relative mixing weights.

    ``weights`` multiply each source's natural frequency (unlisted sources: 1.0, 0 drops a
    source): source s then makes up n_s * w_s / sum(n * w) of the stream. Implemented as
    acceptance w_s / max(w), so the busiest weighted source is never thinned.

    Returns:
        (rates per listed source, rate of unlisted sources).
    """
    if not weights:
        return {}, 1.0
    if known is not None:
        known = set(known)
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"data.source_weights names unknown source(s) {unknown}; the shards hold "
                             f"{sorted(known)}")
        has_unlisted = bool(known - set(weights))
    else:
        has_unlisted = True
    top = max(list(weights.values()) + ([1.0] if has_unlisted else []))
    if top <= 0:
        raise ValueError("data.source_weights drops every source (all weights are 0)")
    return {name: w / top for name, w in weights.items()}, 1.0 / top


# --------------------------------------------------------------------------------------------
# Failure accounting (the named, counting handler)
# --------------------------------------------------------------------------------------------

def new_stats() -> Dict[str, int]:
    return {key: 0 for key in STAT_KEYS}


class FailureCounter:
    """Warns about and counts every failed shard and corrupt sample; never fatal on its own.

    After ``limit`` failures in a row with no good sample between them it raises
    :class:`TooManyFailures`: all-corrupt input or unreachable shards must not spin forever.

    Args:
        stats: the counters to update (``failed_shards``, ``corrupt_samples``).
        limit: DataConfig.max_consecutive_failures.
        spec: the shard spec, quoted in the error.
    """

    def __init__(self, stats: Dict[str, int], limit: int, spec: str = ""):
        self.stats = stats
        self.limit = limit
        self.spec = spec
        self.consecutive = 0
        self._warned = 0

    def shard_failed(self, url: str, reason: Any) -> None:
        self._fail("failed_shards", f"shard {url}: {_describe(reason)}")

    def sample_corrupt(self, key: str, url: str, reason: Any) -> None:
        self._fail("corrupt_samples", f"sample {key!r} in {url}: {_describe(reason)}")

    def ok(self) -> None:
        self.consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        """webdataset handler protocol: count the failure as a failed shard, keep going."""
        self.shard_failed(exn.args[-1] if exn.args else "?", exn)
        return True

    def _fail(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        self.consecutive += 1
        self._warned += 1
        if self._warned <= _WARN_FIRST or self._warned % _WARN_EVERY == 0:
            more = " (further warnings are rate-limited; loader.stats has exact counts)" if self._warned == _WARN_FIRST else ""
            warnings.warn(f"gfm_fast.data skipped {message}{more}", DataWarning, stacklevel=3)
        if self.consecutive >= self.limit:
            raise TooManyFailures(
                f"{self.consecutive} consecutive shard/sample failures (last: {message}); the input looks "
                f"unreadable or all-corrupt. Check data.shards={self.spec!r} (paths/URLs reachable? shards built "
                "by `python -m gfm_fast.data build`?) or raise data.max_consecutive_failures")


def _describe(reason: Any) -> str:
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


# --------------------------------------------------------------------------------------------
# Pipeline stages (each takes an iterator and returns one)
# --------------------------------------------------------------------------------------------

def shard_stream(urls: Sequence[str], *, seed: int, epoch: int, slot: int, num_slots: int) -> Iterator[str]:
    """Infinite shard order for one slot: every pass is a fresh permutation (same on all ranks),
    and position g of the endless sequence goes to slot g % num_slots (split by node, then worker).
    Within a pass, no two slots read the same shard when there are at least num_slots shards."""
    urls = list(urls)
    position = 0
    for pass_index in range(1 << 62):
        order = list(range(len(urls)))
        random.Random(mix_seed(seed, epoch, pass_index, _TAG_SHARDS)).shuffle(order)
        for index in order:
            if position % num_slots == slot:
                yield urls[index]
            position += 1


def tar_members(stream: Any, url: str) -> Iterator[Dict[str, Any]]:
    """Regular files of a tar stream as webdataset file samples ({fname, data, __url__}).

    Local shards are read in tarfile's random-access mode: its stream mode copies data through
    10 KiB buffers, which costs ~1.5 ms per 0.8 MB member (a raw 512 px tile) against ~0.1 ms
    here (measured). Pipes and URLs (not seekable) use stream mode; both detect compression.
    """
    seekable = getattr(stream, "seekable", None)
    mode = "r:*" if seekable is not None and seekable() else "r|*"
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        for info in tar:
            name = info.name
            if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue  # directories, links, webdataset's own __meta__ files
            yield {"fname": name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # long shards: do not keep every header in memory


def read_shards(urls: Iterator[str], counter: FailureCounter) -> Iterator[Dict[str, Any]]:
    """Open each shard (any webdataset URL) and yield its samples (dicts of extension -> bytes).

    A shard that cannot be opened, is truncated/corrupt or holds no sample counts once as a
    failed shard; the complete samples read before a truncation are kept, the partial one is not.
    """
    for url in urls:
        stream, samples = None, 0
        try:
            stream = gopen(url, "rb")
            for sample in group_by_keys(tar_members(stream, url), handler=reraise_exception):
                samples += 1
                yield sample
            stream, closing = None, stream
            closing.close()  # pipe: URLs report their command's exit status here
        except Exception as exn:  # unreachable, truncated, not a tar, failed pipe command
            counter.shard_failed(url, exn)
            continue
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # already counted as a failed shard above
                    pass
        if samples == 0:
            counter.shard_failed(url, "shard holds no samples")
        else:
            counter.stats["shards_read"] += 1


def select_sources(samples: Iterator[Dict[str, Any]], *, rates: Dict[str, float], default_rate: float,
                   rng: random.Random, stats: Dict[str, int]) -> Iterator[Dict[str, Any]]:
    """Keep each sample with its source's acceptance rate (see acceptance_rates)."""
    for sample in samples:
        rate = rates.get(source_of(sample["__key__"]), default_rate)
        if rate >= 1.0 or rng.random() < rate:
            yield sample
        else:
            stats["filtered_samples"] += 1


def shuffle(samples: Iterator[Any], *, bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: once ``bufsize`` samples are held, emit a random one per new sample."""
    if bufsize <= 1:
        yield from samples
        return
    buffer: List[Any] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        pick = rng.randrange(bufsize)
        yield buffer[pick]
        buffer[pick] = sample
    rng.shuffle(buffer)
    yield from buffer


def skip_consumed(samples: Iterator[Any], *, start: int) -> Iterator[Tuple[int, Any]]:
    """Number the shuffled stream and drop the first ``start`` samples (resume) before decoding."""
    for index, sample in enumerate(samples):
        if index >= start:
            yield index, sample


@dataclass
class Decoded:
    """One augmented sample, or (deferred device decode) the JPEG bytes and its crop."""

    pixels: Optional[torch.Tensor]  # (C or 1, S, S) uint8/float32, None when deferred
    dtype: np.dtype
    jpeg: Optional[bytes] = None
    box: Any = None
    full_size: Tuple[int, int] = (0, 0)


def decode_augment(indexed: Iterator[Tuple[int, Dict[str, Any]]], *, augment: GFMAugment, seed_prefix: Tuple[int, ...],
                   counter: FailureCounter, defer_jpeg: bool = False) -> Iterator[Tuple[int, Decoded]]:
    """Decode and crop/flip each sample with its own generator seeded by its stream index.

    Corrupt samples (no image, undecodable bytes, wrong band count) are counted and dropped.
    With ``defer_jpeg`` plain RGB/gray JPEGs are not decoded here: their bytes and crop go on to
    the device decoder (nvjpeg) in the main process.
    """
    generator = torch.Generator()
    for index, sample in indexed:
        try:
            ext, data = find_image(sample)
            image = EncodedImage(data, ext)
            full_size = image.size
            generator.manual_seed(mix_seed(*seed_prefix, index, _TAG_AUGMENT))
            box = augment.sample_box(full_size[0], full_size[1], generator)
            if defer_jpeg and image.is_plain_jpeg and (augment.in_chans == 3 or image.mode == "L"):
                item = Decoded(None, np.dtype(np.uint8), jpeg=data, box=box, full_size=full_size)
            else:
                reduce = augment.draft_reduction(box) if ext in JPEG_EXTENSIONS else 1
                array = image.decode(augment.in_chans, reduce)
                item = Decoded(augment.crop_resize(array, box, full_size), array.dtype)
        except Exception as exn:  # CorruptSample, or anything a malformed file provokes
            counter.sample_corrupt(sample.get("__key__", "?"), sample.get("__url__", "?"), exn)
            continue
        counter.ok()
        yield index, item


def batch_samples(items: Iterator[Tuple[int, Decoded]], *, batch_size: int, augment: GFMAugment, worker: int,
                  stats: Dict[str, int]) -> Iterator[Tuple[Any, Dict[str, Any]]]:
    """Normalise ``batch_size`` samples into a float32 (B, C, S, S) batch (NCHW).

    Each batch carries its slot's stream position (samples consumed, corrupt ones included) and
    cumulative counters, so the main process can checkpoint exactly what it has received.
    """
    shape = (batch_size, augment.in_chans, augment.img_size, augment.img_size)
    while True:
        images = torch.empty(shape, dtype=torch.float32)
        deferred: List[Tuple[int, Decoded]] = []
        index = -1
        for row in range(batch_size):
            index, item = next(items)
            if item.pixels is None:
                deferred.append((row, item))
            else:
                augment.normalize_into(images[row], item.pixels, item.dtype)
        stats["samples"] += batch_size
        meta = {"worker": worker, "position": index + 1, "stats": dict(stats)}
        yield (_pack_deferred(images, deferred) if deferred else images), meta


def _pack_deferred(images: torch.Tensor, deferred: List[Tuple[int, Decoded]]) -> Dict[str, torch.Tensor]:
    """One buffer of concatenated JPEG bytes + offsets (few tensors cross the worker queue)."""
    blobs = [item.jpeg for _, item in deferred]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    boxes = [[i.box.top, i.box.left, i.box.height, i.box.width, int(i.box.flip), *i.full_size] for _, i in deferred]
    return {
        "images": images,
        "jpeg": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8),
        "offsets": torch.from_numpy(offsets.astype(np.int64)),
        "rows": torch.tensor([row for row, _ in deferred], dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.int64),
    }


# --------------------------------------------------------------------------------------------
# One slot's pipeline
# --------------------------------------------------------------------------------------------

@dataclass
class StreamPlan:
    """Everything a worker needs to rebuild its slot's stream (picklable)."""

    urls: List[str]
    spec: str
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (>= 1)
    batch_size: int
    steps_per_epoch: int
    start_batch: int  # batches of this epoch already delivered
    positions: List[int]  # per logical worker: shuffled samples already consumed
    img_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float]
    hflip: float
    shuffle_buffer: int
    max_consecutive_failures: int
    rates: Dict[str, float] = field(default_factory=dict)
    default_rate: float = 1.0
    defer_jpeg: bool = False

    def batches_for(self, worker: int) -> int:
        """Batches left this epoch for a logical worker: batch j belongs to worker j % workers."""
        first = self.start_batch + (worker - self.start_batch) % self.workers
        return 0 if first >= self.steps_per_epoch else (self.steps_per_epoch - 1 - first) // self.workers + 1

    def augment(self) -> GFMAugment:
        return GFMAugment(self.img_size, self.in_chans, self.mean, self.std, self.crop_scale, self.crop_ratio,
                          self.hflip)


def build_pipeline(plan: StreamPlan, worker: int, stats: Dict[str, int]) -> wds.DataPipeline:
    """The webdataset pipeline of slot (plan.rank, worker) for plan.epoch, resumed at its position."""
    slot, num_slots = plan.rank * plan.workers + worker, plan.world_size * plan.workers
    slot_seed = (plan.seed, plan.epoch, plan.rank, worker)
    counter = FailureCounter(stats, plan.max_consecutive_failures, plan.spec)
    stages = [
        partial(shard_stream, plan.urls, seed=plan.seed, epoch=plan.epoch, slot=slot, num_slots=num_slots),
        partial(read_shards, counter=counter),
    ]
    if plan.rates or plan.default_rate < 1.0:
        stages.append(partial(select_sources, rates=plan.rates, default_rate=plan.default_rate,
                              rng=random.Random(mix_seed(*slot_seed, _TAG_SELECT)), stats=stats))
    augment = plan.augment()
    stages += [
        partial(shuffle, bufsize=plan.shuffle_buffer, rng=random.Random(mix_seed(*slot_seed, _TAG_SHUFFLE))),
        partial(skip_consumed, start=plan.positions[worker]),
        partial(decode_augment, augment=augment, seed_prefix=slot_seed, counter=counter,
                defer_jpeg=plan.defer_jpeg),
        partial(batch_samples, batch_size=plan.batch_size, augment=augment, worker=worker, stats=stats),
    ]
    return wds.DataPipeline(*stages).with_epoch(plan.batches_for(worker))


class EpochStream(torch.utils.data.IterableDataset):
    """The rest of one epoch for one rank; each DataLoader worker runs one logical slot.

    Batch j of the epoch comes from logical worker j % W. DataLoader hands out batches round
    robin starting at physical worker 0, so after a resume at batch k physical worker i plays
    logical worker (i + k) % W: the batch order is then exactly the uninterrupted one.
    """

    def __init__(self, plan: StreamPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.plan.start_batch) % self.plan.workers
        if self.plan.batches_for(worker) == 0:
            return iter(())
        return iter(build_pipeline(self.plan, worker, new_stats()))


# --------------------------------------------------------------------------------------------
# Device decode (DataConfig.decode_device == "cuda")
# --------------------------------------------------------------------------------------------

class DeviceDecoder:
    """Finishes deferred batches: nvjpeg decode, crop/resize, flip and normalise on ``device``.

    Workers still read, shuffle and draw the crops (so results do not depend on where decoding
    happens), and decode on CPU what nvjpeg cannot (PNG, TIFF, CMYK). A JPEG that only fails on
    the device (it passed the worker's header check) is counted as corrupt and its row is filled
    with another image of the batch, so the batch keeps its size.
    """

    def __init__(self, augment: GFMAugment, device: torch.device, stats: Dict[str, int]):
        with warnings.catch_warnings():
            # TODO(#5): torchvision 0.29 deprecates its image codecs in favour of torchcodec; move the
            # nvjpeg path there once torchcodec is part of the pinned stack.
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

        self.augment = augment
        self.device = torch.device(device)
        self.stats = stats
        self._decode_jpeg = decode_jpeg
        self._mode = ImageReadMode.RGB if augment.in_chans == 3 else ImageReadMode.GRAY

    def __call__(self, payload: Union[torch.Tensor, Dict[str, torch.Tensor]]) -> torch.Tensor:
        if isinstance(payload, torch.Tensor):  # nothing was deferred
            return payload.to(self.device, non_blocking=True)
        images = payload["images"].to(self.device, non_blocking=True)
        offsets = payload["offsets"].tolist()
        blobs = [payload["jpeg"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        decoded = self._decode_all(blobs)
        failed = []
        for row, pixels, box in zip(payload["rows"].tolist(), decoded, payload["boxes"].tolist()):
            if pixels is None:
                failed.append(row)
                continue
            crop = _box_from_row(box)
            out = self.augment.crop_resize_tensor(pixels.unsqueeze(0), crop, (box[5], box[6]))
            self.augment.normalize_into(images[row], out, np.dtype(np.uint8))
        if failed:
            self.stats["corrupt_samples"] += len(failed)
            good = sorted(set(range(images.shape[0])) - set(failed))
            if not good:
                raise TooManyFailures("every image of a batch failed to decode on the device")
            images[failed] = images[good[0]]
        return images

    def _decode_all(self, blobs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see TODO(#5) in __init__
            try:
                return list(self._decode_jpeg(blobs, mode=self._mode, device=self.device))
            except RuntimeError:  # one bad JPEG fails the batched call: find it
                results = [self._decode_one(blob) for blob in blobs]
        return results

    def _decode_one(self, blob: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return self._decode_jpeg(blob, mode=self._mode, device=self.device)
        except RuntimeError as exn:
            warnings.warn(f"gfm_fast.data skipped a JPEG that fails on {self.device}: {exn}", DataWarning)
            return None


def _box_from_row(row: Sequence[int]) -> CropBox:
    return CropBox(row[0], row[1], row[2], row[3], bool(row[4]))


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------

class GeoPileLoader:
    """Epoch-based iterator over GeoPile shards for one rank (see module docstring).

    ``for images in loader`` yields the rest of the current epoch: exactly ``steps_per_epoch``
    float32 (B, C, H, W) normalised batches from a fresh epoch, the same number on every rank.
    When an epoch is complete the loader moves to the next one by itself; ``set_epoch(e)`` jumps
    to epoch ``e`` (a no-op when ``e`` is the current epoch, so a resumed position survives the
    usual ``set_epoch`` at the top of the epoch loop). Build it with :func:`make_loader`.
    """

    def __init__(self, cfg: DataConfig, *, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 seed: int, rank: int, world_size: int, decode_device: Optional[Union[str, torch.device]] = None):
        cfg.validate("data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        global_batch = cfg.batch_size * world_size
        self.steps_per_epoch = cfg.samples_per_epoch // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.samples_per_epoch={cfg.samples_per_epoch} is smaller than one global batch "
                             f"(batch_size {cfg.batch_size} x world_size {world_size} = {global_batch})")
        self.cfg = cfg
        self.shards = resolve_shards(cfg.shards)
        rates, default_rate = acceptance_rates(cfg.source_weights, self.shards.source_counts)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers = cfg.num_workers
        self._workers = max(1, cfg.num_workers)
        device = torch.device(decode_device if decode_device is not None else cfg.decode_device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("data.decode_device='cuda' but no CUDA device is visible; use data.decode_device=cpu")
        self._template = StreamPlan(
            urls=self.shards.urls, spec=self.shards.spec, seed=self.seed, epoch=0, rank=self.rank,
            world_size=self.world_size, workers=self._workers, batch_size=cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch, start_batch=0, positions=[0] * self._workers, img_size=img_size,
            in_chans=in_chans, mean=tuple(mean), std=tuple(std), crop_scale=tuple(cfg.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, shuffle_buffer=cfg.shuffle_buffer,
            max_consecutive_failures=cfg.max_consecutive_failures, rates=rates, default_rate=default_rate,
            defer_jpeg=decode_device is not None or cfg.decode_device == "cuda")
        self._template.augment()  # validates mean/std against in_chans now, not in a worker
        self._device_stats = new_stats()
        self._finish = (DeviceDecoder(self._template.augment(), device, self._device_stats)
                        if self._template.defer_jpeg else None)
        self._pin_memory = torch.cuda.is_available() and cfg.num_workers > 0  # async host-to-device copies
        self._epoch, self._batches = 0, 0
        self._positions = [0] * self._workers
        self._stats_base = new_stats()
        self._stats_live: Dict[int, Dict[str, int]] = {}

    # ---------------------------------------------------------------- epochs
    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless it is already the current epoch."""
        if int(epoch) != self._epoch:
            self._epoch, self._batches = int(epoch), 0
            self._positions = [0] * self._workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        plan = StreamPlan(**{**self._template.__dict__, "epoch": self._epoch, "start_batch": self._batches,
                             "positions": list(self._positions)})
        dataset = EpochStream(plan)
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self._pin_memory,
                persistent_workers=False, worker_init_fn=_ignore_stop_signals))
        try:
            for payload, meta in source:
                images = self._finish(payload) if self._finish is not None else payload
                self._advance(meta)
                yield images
        finally:
            self._fold_stats()
            # Stop the workers now: left to the garbage collector (an exception's traceback keeps
            # the iterator alive), DataLoader's shutdown can wait out its 5 s join timeout.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _advance(self, meta: Dict[str, Any]) -> None:
        self._positions[meta["worker"]] = meta["position"]
        self._stats_live[meta["worker"]] = meta["stats"]
        self._batches += 1
        if self._batches == self.steps_per_epoch:
            self._fold_stats()
            self._epoch, self._batches = self._epoch + 1, 0
            self._positions = [0] * self._workers

    def _fold_stats(self) -> None:
        for worker_stats in self._stats_live.values():
            for key in STAT_KEYS:
                self._stats_base[key] += worker_stats.get(key, 0)
        self._stats_live = {}

    @property
    def stats(self) -> Dict[str, int]:
        """Cumulative counters: samples, corrupt_samples, failed_shards, shards_read, filtered_samples."""
        total = dict(self._stats_base)
        for worker_stats in self._stats_live.values():
            for key in STAT_KEYS:
                total[key] += worker_stats.get(key, 0)
        for key in STAT_KEYS:
            total[key] += self._device_stats[key]
        return total

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able position of this rank's stream (save one per rank; see load_state_dict)."""
        return {
            "version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.num_workers, "batch_size": self.cfg.batch_size,
            "steps_per_epoch": self.steps_per_epoch, "epoch": self._epoch, "batches": self._batches,
            "positions": list(self._positions), "stats": self.stats,
        }

    def load_state_dict(self, state: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> None:
        """Resume: the next batches equal those an uninterrupted run would have yielded.

        Args:
            state: this rank's ``state_dict()``, or a list of every rank's states (indexed by
                rank, e.g. from ``all_gather_object``). Given another rank's state, the stream
                positions are recomputed from the batch count, which is exact unless corrupt samples
                were skipped before the checkpoint (a warning says so). With a different
                world_size / num_workers / batch_size the epoch and batch count are kept but the
                streams restart (samples may repeat within that epoch; a warning says so).
        """
        if isinstance(state, (list, tuple)):
            if not state:
                raise ValueError("loader state list is empty")
            # More ranks than when saved: a new rank starts from rank 0's epoch and batch count
            # (the world size changed, so the streams restart below anyway).
            state = state[self.rank] if self.rank < len(state) else state[0]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["seed"] != self.seed:
            warnings.warn(f"resuming the data stream of seed {state['seed']} (this run was built with seed "
                          f"{self.seed})", DataWarning)
            self.seed = self._template.seed = int(state["seed"])
        self._stats_base, self._stats_live = {k: int(state["stats"].get(k, 0)) for k in STAT_KEYS}, {}
        self._device_stats.update(new_stats())  # already part of the restored counts
        self._epoch = int(state["epoch"])
        same_layout = all(state[k] == v for k, v in (("world_size", self.world_size), ("batch_size", self.cfg.batch_size),
                                                      ("num_workers", self.num_workers),
                                                      ("steps_per_epoch", self.steps_per_epoch)))
        if not same_layout:
            warnings.warn("data layout changed since the checkpoint (world_size/num_workers/batch_size/"
                          "samples_per_epoch); keeping epoch and batch count, restarting the streams", DataWarning)
            self._batches = min(int(state["batches"]), self.steps_per_epoch - 1)
            self._positions = [0] * self._workers
            return
        self._batches = int(state["batches"])
        if state["rank"] == self.rank:
            self._positions = [int(p) for p in state["positions"]]
        else:
            warnings.warn(f"loader state of rank {state['rank']} loaded on rank {self.rank}: positions are "
                          "recomputed from the batch count (exact unless corrupt samples were skipped); save "
                          "every rank's state_dict() to resume exactly", DataWarning)
            self._positions = [self._template.batch_size * _batches_before(self._batches, w, self._workers)
                               for w in range(self._workers)]


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM, SIGINT and SIGUSR1: a scheduler or Ctrl-C signals every
    process of the job or the terminal's group, and the main process owns the shutdown (it saves a
    checkpoint, then stops the workers)."""
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _batches_before(batches: int, worker: int, workers: int) -> int:
    """How many of the first ``batches`` batches belong to ``worker`` (batch j -> j % workers)."""
    return max(0, (batches - worker + workers - 1) // workers)


def make_loader(cfg: DataConfig, *, img_size: int = 192, in_chans: int = 3,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> GeoPileLoader:
    """Build the GeoPile loader for one rank.

    Args:
        cfg: the data section of the config (shards, batch size, workers, augmentation, ...).
        img_size: output side (192 for the GFM student).
        in_chans: image channels (3 for RGB GeoPile; e.g. 12 for Sentinel-2 shards).
        mean: per-channel mean of [0, 1]-scaled pixels.
        std: per-channel std of [0, 1]-scaled pixels.
        seed: the run seed; with (rank, world_size, epoch, num_workers) it fixes every batch.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.

    Returns:
        A :class:`GeoPileLoader`; batches are on the GPU when cfg.decode_device == "cuda".
    """
    return GeoPileLoader(cfg, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, rank=rank,
                         world_size=world_size)
