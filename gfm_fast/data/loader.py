"""The GeoPile loader train.py uses: one rank's epochs of augmented batches, resumable mid-epoch.

``make_loader`` builds a :class:`GeoPileLoader`; each epoch runs one webdataset pipeline per
DataLoader worker (pipeline.py) over the shards ``data.shards`` names (shards.py). The loader
keeps the epoch, the batch count and every worker's stream position, so ``state_dict`` /
``load_state_dict`` resume exactly where a checkpoint left off, and it sums the workers' counters
(``loader.stats``: samples, corrupt samples, failed shards, ...). Batches of 8-bit images travel
as uint8 and ``loader.normalize`` turns them into the normalised float32 batch after the copy to
the device (a quarter of the bytes through worker shared memory, pinning and the host-to-device
copy). docs/architecture.md shows where it sits: data -> models/ops -> training.
"""
from __future__ import annotations

import signal
import warnings
from typing import Any, Dict, Iterator, Sequence, Tuple, Union

import numpy as np
import torch

from gfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from gfm_fast.data.augment import normalization_affine
from gfm_fast.data.failures import STAT_KEYS, DataWarning, new_stats
from gfm_fast.data.pipeline import EpochStream, StreamPlan
from gfm_fast.data.shards import acceptance_rates, resolve_shards
from gfm_fast.errors import ConfigError, GFMError

STATE_VERSION = 1


class GeoPileLoader:
    """Epoch-based iterator over GeoPile shards for one rank (see module docstring).

    ``for images in loader`` yields the rest of the current epoch: exactly ``steps_per_epoch``
    (B, C, H, W) batches from a fresh epoch, the same number on every rank; each is uint8 (the
    stored 8-bit pixels, augmented) or float32 (already normalised, when a sample of the batch was
    16-bit or float), and ``normalize(images)`` gives the normalised float32 batch either way.
    When an epoch is complete the loader moves to the next one by itself; ``set_epoch(e)`` jumps
    to epoch ``e`` (a no-op when ``e`` is the current epoch, so a resumed position survives the
    usual ``set_epoch`` at the top of the epoch loop). Build it with :func:`make_loader`.
    """

    def __init__(self, cfg: DataConfig, *, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 seed: int, rank: int, world_size: int):
        cfg.validate("data")  # also rejects the retired data.decode_device=cuda
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        global_batch = cfg.batch_size * world_size
        self.steps_per_epoch = cfg.samples_per_epoch // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.samples_per_epoch={cfg.samples_per_epoch} is smaller than one global batch "
                              f"(batch_size {cfg.batch_size} x world_size {world_size} = {global_batch})")
        self.cfg = cfg
        self.shards = resolve_shards(cfg.shards)
        rates, default_rate = acceptance_rates(cfg.source_weights, self.shards.source_counts)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers = cfg.num_workers
        self._workers = max(1, cfg.num_workers)
        self._template = StreamPlan(
            urls=self.shards.urls, spec=self.shards.spec, seed=self.seed, epoch=0, rank=self.rank,
            world_size=self.world_size, workers=self._workers, batch_size=cfg.batch_size,
            steps_per_epoch=self.steps_per_epoch, start_batch=0, positions=[0] * self._workers, img_size=img_size,
            in_chans=in_chans, mean=tuple(mean), std=tuple(std), crop_scale=tuple(cfg.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, shuffle_buffer=cfg.shuffle_buffer,
            max_consecutive_failures=cfg.max_consecutive_failures, rates=rates, default_rate=default_rate)
        self._template.augment()  # validates mean/std against in_chans now, not in a worker
        self._pin_memory = torch.cuda.is_available() and cfg.num_workers > 0  # async host-to-device copies
        self._uint8_affine: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}  # normalize's, per device
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
            for images, meta in source:
                self._advance(meta)
                yield images
        except GFMError as exc:  # raised in a worker: DataLoader put the worker's traceback in the message
            raise _worker_message(exc) from None
        finally:
            self._fold_stats()
            # Stop the workers now: left to the garbage collector (an exception's traceback keeps
            # the iterator alive), DataLoader's shutdown can wait out its 5 s join timeout.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised float32 batch of one of this loader's batches, on the batch's device.

        Args:
            images: a batch as the loader yields it, on any device (move it there first:
                normalising after the copy keeps the copy at one byte per pixel).

        Returns:
            float32 ``(images / 255 - mean) / std`` per channel for a uint8 batch, with the
            workers' own constants (``normalization_affine``); a float32 batch (normalised by the
            worker) as it is.
        """
        if images.dtype != torch.uint8:
            return images
        affine = self._uint8_affine.get(images.device)
        if affine is None:  # once per device: a per-step copy of pageable constants would sync the stream
            mean, std = self._template.mean, self._template.std
            affine = tuple(t.to(images.device) for t in normalization_affine(mean, std, np.uint8))
            self._uint8_affine[images.device] = affine
        scale, bias = affine
        # One fused pass reading uint8 and writing float32 (one CPU core, B=64 at 192 px: 13 ms, against
        # 20 ms for float().mul_().add_() and 35 ms for x * scale + bias); it may round the last bit
        # differently from the workers' separate multiply and add.
        return torch.addcmul(bias, images, scale)

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


def _worker_message(exc: GFMError) -> GFMError:
    """``exc`` with its own one-line message again. A DataLoader re-raises a worker's exception as the same
    type built from "Caught X in DataLoader worker N. Original Traceback ... module.X: <message>"."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if not text.startswith("Caught ") or marker not in text:
        return exc
    return type(exc)(text.rsplit(marker, 1)[1].strip())


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
        A :class:`GeoPileLoader` yielding uint8 or normalised float32 CPU batches (pinned when CUDA
        is available); ``loader.normalize`` turns either into the normalised float32 batch.

    Raises:
        ShardError: the shards do not exist or are not tar files (before any worker starts).
        ConfigError: an invalid data setting (e.g. samples_per_epoch below one global batch).
    """
    return GeoPileLoader(cfg, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, rank=rank,
                         world_size=world_size)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM, SIGINT, SIGUSR1 and SIGHUP: a scheduler, Ctrl-C or a hangup
    signals every process of the job or the terminal's group, and the main process owns the shutdown
    (it saves a checkpoint, then stops the workers)."""
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
