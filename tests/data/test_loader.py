"""Streaming loader: epochs, determinism, resume, node/worker splits, corrupt input, bands, mixing."""
import itertools
import json
import random
import warnings

import numpy as np
import pytest
import torch

from data_helpers import (encode, good_samples, jpeg, png16, read_all, small_cfg, textured, tiff, write_files,
                          write_tar)
from gfm_fast.data import DataWarning, TooManyFailures, make_loader, sample_shards
from gfm_fast.data.geopile import BuildOptions, Source, build_shards
from gfm_fast.data.manifest import read_manifest, shard_paths
from gfm_fast.data.pipeline import SourceMixer
from gfm_fast.data.shards import acceptance_rates, mix_seed, resolve_shards, shard_stream
from gfm_fast.errors import ConfigError, GFMError, ShardError

IMG = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two sources (30 + 12 small JPEG/PNG images) in 7 shards, via the builder."""
    root = tmp_path_factory.mktemp("src")
    files = {f"aa/c{i % 3}/img{i:03d}.jpg": jpeg(40, 52, seed=i) for i in range(30)}
    files.update({f"bb/pic{i:03d}.png": encode(textured(36, 44, seed=100 + i), "PNG") for i in range(12)})
    write_files(root, files)
    out = tmp_path_factory.mktemp("shards")
    build_shards([Source("aa", str(root / "aa")), Source("bb", str(root / "bb"))], out,
                 BuildOptions(shard_size=6 * 4096 + 1024, seed=0), progress=False, log=lambda *_: None)
    assert len(read_manifest(out)["shards"]) >= 6
    return out


@pytest.fixture
def mixed_with_corrupt(built, tmp_path):
    """The built shards plus a hand-made shard holding every kind of corrupt sample."""
    good = jpeg(40, 40, seed=7)
    bad = [
        ("bad/truncated", {"jpg": good[: len(good) // 2]}),
        ("bad/zero", {"jpg": b""}),
        ("bad/text", {"png": b"definitely not a png"}),
        ("bad/no_image", {"json": b"{}"}),
        ("bad/five_bands", {"tif": tiff(textured(20, 20, bands=5))}),
    ]
    samples = good_samples("cc", 3) + bad[:3] + good_samples("cc", 3, start=3) + bad[3:]
    extra = write_tar(tmp_path / "extra.tar", samples)
    return ",".join(shard_paths(built, read_manifest(built)) + [extra])


def _epoch(loader):
    return [batch.clone() for batch in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_epoch_yields_exact_normalised_batches(built):
    loader = make_loader(small_cfg(str(built), samples_per_epoch=42), img_size=IMG, seed=0)
    assert loader.steps_per_epoch == 10 and len(loader) == 10
    first = _epoch(loader)
    assert len(first) == 10 and all(b.shape == (4, 3, IMG, IMG) and b.dtype == torch.uint8 for b in first)  # 8-bit
    assert loader.epoch == 1 and loader.stats["samples"] == 40
    assert loader.stats["shards_read"] >= 4  # 40 of the 42 samples in 7 shards: at least 4 read to their end
    images = torch.stack([loader.normalize(b) for b in first])
    assert images.dtype == torch.float32 and -2.5 < images.mean() < 2.5 and images.std() > 0.1  # normalised imagery
    second = _epoch(loader)  # the loader moved to epoch 1 by itself: a new order
    assert len(second) == 10 and not _same(first, second)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(built, workers):
    cfg = small_cfg(str(built), num_workers=workers)
    a = _epoch(make_loader(cfg, img_size=IMG, seed=5))
    b = _epoch(make_loader(cfg, img_size=IMG, seed=5))
    c = _epoch(make_loader(cfg, img_size=IMG, seed=6))
    assert _same(a, b) and not _same(a, c)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers, 2 cores
@pytest.mark.parametrize("workers, stop", [(0, 1), (0, 3), (2, 1), (2, 4), (3, 2)])
def test_resume_reproduces_the_rest_of_the_epoch(mixed_with_corrupt, workers, stop):
    cfg = small_cfg(mixed_with_corrupt, num_workers=workers, samples_per_epoch=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        uninterrupted = make_loader(cfg, img_size=IMG, seed=1)
        full = _epoch(uninterrupted)
        loader = make_loader(cfg, img_size=IMG, seed=1)
        iterator = iter(loader)
        head = [next(iterator).clone() for _ in range(stop)]
        state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store it as JSON
        del iterator
        resumed = make_loader(cfg, img_size=IMG, seed=1)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the usual call at the top of the epoch loop keeps the position
        tail = _epoch(resumed)
    assert state["batches"] == stop and len(tail) == len(full) - stop
    assert _same(head + tail, full)
    # The counters carry over too (data/corrupt_samples in the training log does not restart at 0), and
    # what the resumed slots read again to reach their positions is not counted twice.
    assert resumed.stats == uninterrupted.stats
    assert uninterrupted.stats["corrupt_samples"] > 0


def test_resume_counts_what_it_reads_again_once(built):
    """Source mixing filters samples before the resume position: the resumed run counts them once."""
    cfg = small_cfg(str(built), num_workers=2, samples_per_epoch=32, source_weights={"aa": 1.0, "bb": 0.3})
    uninterrupted = make_loader(cfg, img_size=IMG, seed=2)
    _epoch(uninterrupted)
    loader = make_loader(cfg, img_size=IMG, seed=2)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    del iterator
    resumed = make_loader(cfg, img_size=IMG, seed=2)
    resumed.load_state_dict(state)
    _epoch(resumed)
    assert resumed.stats == uninterrupted.stats and uninterrupted.stats["filtered_samples"] > 0


def test_set_epoch(built):
    cfg = small_cfg(str(built))
    loader = make_loader(cfg, img_size=IMG, seed=0)
    epoch0 = _epoch(loader)
    loader.set_epoch(3)
    epoch3 = _epoch(loader)
    fresh = make_loader(cfg, img_size=IMG, seed=0)
    fresh.set_epoch(3)
    assert _same(_epoch(fresh), epoch3) and not _same(epoch0, epoch3)
    fresh.set_epoch(0)
    assert _same(_epoch(fresh), epoch0)


def test_every_rank_yields_the_same_number_of_batches(built):
    cfg = small_cfg(str(built), samples_per_epoch=40, num_workers=2)
    loaders = [make_loader(cfg, img_size=IMG, seed=0, rank=r, world_size=3) for r in range(3)]
    assert {l.steps_per_epoch for l in loaders} == {3}  # 40 // (4 * 3)
    epochs = [_epoch(l) for l in loaders]
    assert [len(e) for e in epochs] == [3, 3, 3]
    assert not _same(epochs[0], epochs[1])


def _slot_stream(urls, *, seed, epoch, slot, num_slots):
    """Shard URLs of one slot, split as build_pipeline splits them (wds.slice)."""
    return (shard["url"] for shard in itertools.islice(shard_stream(urls, seed=seed, epoch=epoch), slot, None,
                                                        num_slots))


def test_shard_stream_splits_nodes_and_workers_without_overlap():
    urls = [f"s{i}.tar" for i in range(11)]
    num_slots = 4  # e.g. 2 ranks x 2 workers
    streams = [_slot_stream(urls, seed=0, epoch=2, slot=s, num_slots=num_slots) for s in range(num_slots)]
    taken = [[next(stream) for _ in range(11)] for stream in streams]  # 44 draws = 4 passes
    flat = [None] * 44
    for slot, shards in enumerate(taken):
        flat[slot::num_slots] = shards
    passes = [flat[i * 11:(i + 1) * 11] for i in range(4)]
    assert all(sorted(p) == sorted(urls) for p in passes)  # each pass: every shard exactly once
    assert passes[0] != passes[1]  # reshuffled every pass
    again = _slot_stream(urls, seed=0, epoch=2, slot=1, num_slots=num_slots)
    assert [next(again) for _ in range(11)] == taken[1]


def test_samples_split_by_node_and_worker_without_overlap(built):
    urls = shard_paths(built, read_manifest(built))
    all_keys = {s["__key__"] for s in read_all(urls)}
    num_slots = 2 * 2
    seen = []
    for slot in range(num_slots):
        per_pass = len(urls) // num_slots + (slot < len(urls) % num_slots)
        stream = _slot_stream(urls, seed=0, epoch=0, slot=slot, num_slots=num_slots)
        seen.append({s["__key__"] for s in read_all([next(stream) for _ in range(per_pass)])})
    assert sum(len(keys) for keys in seen) == len(all_keys) == 42
    assert set().union(*seen) == all_keys


def test_corrupt_samples_are_counted_and_warned(tmp_path):
    samples = good_samples("cc", 2) + [
        ("cc/truncated", {"jpg": jpeg(64, 64)[:300]}),
        ("cc/zero", {"jpg": b""}),
        ("cc/text", {"jpg": b"<html>not an image</html>"}),
        ("cc/no_image", {"json": b"{}"}),
        ("cc/five_bands", {"tif": tiff(textured(16, 16, bands=5))}),
        ("cc/cmyk", {"jpg": jpeg(40, 40, mode="CMYK")}),  # fine: converted
        ("cc/gray", {"jpg": jpeg(40, 40, mode="L")}),  # fine: replicated
        ("cc/deep", {"png": png16()}),  # fine: 16-bit scaled to [0, 1]
    ]
    shard = write_tar(tmp_path / "s.tar", samples)
    loader = make_loader(small_cfg(shard, shuffle_buffer=0, samples_per_epoch=5, batch_size=5), img_size=IMG)
    with pytest.warns(DataWarning) as caught:
        batches = _epoch(loader)
    skipped = sorted(str(w.message).split("'")[1] for w in caught)
    assert skipped == ["cc/five_bands", "cc/no_image", "cc/text", "cc/truncated", "cc/zero"]
    assert len(batches) == 1 and torch.isfinite(batches[0]).all()
    assert loader.stats["corrupt_samples"] == 5 and loader.stats["samples"] == 5
    assert loader.state_dict()["stats"]["corrupt_samples"] == 5


def test_truncated_empty_and_missing_shards_are_counted(tmp_path):
    whole = tmp_path / "whole.tar"
    write_tar(whole, good_samples("dd", 4))
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: int(len(data) * 0.6)])  # cut inside the third sample's image
    empty = write_tar(tmp_path / "empty.tar", [])
    spec = f"{truncated},{empty},{tmp_path / 'missing.tar'}"
    with pytest.warns(DataWarning, match=r"1 of 3 shards cannot be read \(first: .*missing.tar does not exist\)"):
        loader = make_loader(small_cfg(spec, shuffle_buffer=0, samples_per_epoch=4, batch_size=4), img_size=IMG)
    with pytest.warns(DataWarning, match="skipped shard"):
        assert len(_epoch(loader)) == 1
    stats = loader.stats
    assert stats["failed_shards"] >= 3 and stats["corrupt_samples"] == 0
    assert stats["shards_read"] == 0  # the truncated shard failed, though its complete samples were used


def test_all_corrupt_input_is_a_clear_error(tmp_path):
    shard = write_tar(tmp_path / "bad.tar", [(f"x/{i}", {"jpg": b"garbage"}) for i in range(5)])
    loader = make_loader(small_cfg(shard, max_consecutive_failures=12), img_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(TooManyFailures, match="12 consecutive shard/sample failures"):
            _epoch(loader)


def test_unreachable_shards_are_a_clear_error_in_workers():
    loader = make_loader(small_cfg("pipe:exit 3", num_workers=1, max_consecutive_failures=5), img_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(TooManyFailures, match="input looks unreadable") as error:
            _epoch(loader)
    # the worker's own message, not DataLoader's "Caught ... Original Traceback" around it
    assert str(error.value).startswith("5 consecutive shard/sample failures") and "Traceback" not in str(error.value)


def test_multiband_samples(tmp_path):
    bands = 5
    samples = [(f"s2/t{i}", {"tif": tiff(textured(24, 24, bands=bands, seed=i, dtype=np.uint16))}) for i in range(6)]
    samples.insert(2, ("s2/rgb", {"jpg": jpeg(24, 24)}))  # 3 bands: corrupt for a 5-band model
    shard = write_tar(tmp_path / "ms.tar", samples)
    loader = make_loader(small_cfg(shard, shuffle_buffer=0, samples_per_epoch=6, batch_size=6), img_size=16,
                         in_chans=bands, mean=[0.5] * bands, std=[0.25] * bands)
    with pytest.warns(DataWarning, match="3 channels but the model takes 5"):
        (batch,) = _epoch(loader)
    assert batch.shape == (6, bands, 16, 16) and loader.stats["corrupt_samples"] == 1
    assert -2.0 <= batch.min() and batch.max() <= 2.0  # [0, 1] scaled by 1/65535, then (x - 0.5) / 0.25


def test_source_weights(built):
    rates, default = acceptance_rates({"bb": 2.0}, ["aa", "bb"])
    assert rates == {"bb": 1.0} and default == 0.5
    stream = [{"__key__": f"{'aa' if i % 2 else 'bb'}/{i}"} for i in range(20000)]
    stats = {"filtered_samples": 0}
    kept = list(filter(SourceMixer(rates, default, random.Random(0), stats), stream))
    share_bb = sum(s["__key__"].startswith("bb") for s in kept) / len(kept)
    assert abs(share_bb - 2 / 3) < 0.02 and stats["filtered_samples"] == len(stream) - len(kept)
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['zz'\]"):
        make_loader(small_cfg(str(built), source_weights={"zz": 1.0}), img_size=IMG)
    with pytest.raises(ConfigError, match="drops every source"):
        make_loader(small_cfg(str(built), source_weights={"aa": 0.0, "bb": 0.0}), img_size=IMG)
    loader = make_loader(small_cfg(str(built), source_weights={"bb": 0.0}), img_size=IMG)
    _epoch(loader)
    assert loader.stats["filtered_samples"] > 0


def test_state_dict_across_ranks_and_layouts(built):
    cfg = small_cfg(str(built), num_workers=2, samples_per_epoch=64)
    loaders = [make_loader(cfg, img_size=IMG, seed=0, rank=r, world_size=2) for r in range(2)]
    heads = []
    for loader in loaders:
        iterator = iter(loader)
        heads.append([next(iterator) for _ in range(3)])
        del iterator
    states = [l.state_dict() for l in loaders]
    resumed = make_loader(cfg, img_size=IMG, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(states)  # the list of every rank's state: picks its own
    assert resumed.state_dict()["positions"] == states[1]["positions"]
    other = make_loader(cfg, img_size=IMG, seed=0, rank=0, world_size=2)
    with pytest.warns(DataWarning, match="state of rank 1 loaded on rank 0"):
        other.load_state_dict(states[1])
    assert other.state_dict()["positions"] == [8, 4]  # batches 0, 2 from worker 0; batch 1 from worker 1
    relayout = make_loader(small_cfg(str(built), num_workers=1, samples_per_epoch=64), img_size=IMG, seed=0)
    with pytest.warns(DataWarning, match="data layout changed"):
        relayout.load_state_dict(states[0])
    assert relayout.state_dict()["batches"] == 3 and len(_epoch(relayout)) == relayout.steps_per_epoch - 3
    # Resumed with more ranks than saved: a rank with no saved entry takes rank 0's epoch and count.
    grown = make_loader(cfg, img_size=IMG, seed=0, rank=3, world_size=4)
    with pytest.warns(DataWarning, match="data layout changed"):
        grown.load_state_dict(states)
    assert grown.state_dict()["batches"] == min(3, grown.steps_per_epoch - 1)


def test_configuration_errors(built):
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        make_loader(small_cfg(str(built), samples_per_epoch=7, batch_size=4), world_size=2)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\)"):
        make_loader(small_cfg(str(built)), rank=2, world_size=2)
    with pytest.raises(ConfigError, match="data.decode_device='cuda' is no longer supported"):
        make_loader(small_cfg(str(built), decode_device="cuda"))
    with pytest.raises(ValueError, match="mean and std need 4 entries"):
        make_loader(small_cfg(str(built)), in_chans=4)
    with pytest.raises(ShardError, match="none of the 2 shards"):
        make_loader(small_cfg("/nonexistent/a-{0..1}.tar"))
    with pytest.raises(ShardError, match="without manifest.json"):
        make_loader(small_cfg(str(built.parent)))


def test_shard_specs(built, tmp_path):
    urls = shard_paths(built, read_manifest(built))
    assert resolve_shards(str(built)).urls == urls
    assert resolve_shards(str(built / "manifest.json")).source_counts == {"aa": 30, "bb": 12}
    pattern = str(built / "geopile-{000000..000002}.tar") + "," + urls[3]
    assert resolve_shards(pattern).urls == urls[:4]
    assert resolve_shards("s3://bucket/x-{0,1}.tar").urls == ["pipe:aws s3 cp s3://bucket/x-0.tar -",
                                                              "pipe:aws s3 cp s3://bucket/x-1.tar -"]
    assert resolve_shards(f"pipe:cat {urls[0]}::http://host/a.tar").urls == [f"pipe:cat {urls[0]}",
                                                                             "http://host/a.tar"]
    piped = make_loader(small_cfg(",".join(f"pipe:cat {u}" for u in urls)), img_size=IMG)
    assert len(_epoch(piped)) == piped.steps_per_epoch


def test_embedded_sample_is_the_default():
    loader = make_loader(small_cfg(None, samples_per_epoch=8), img_size=IMG)
    assert loader.shards.spec == sample_shards() and len(_epoch(loader)) == 2


# The published SplitMix64 outputs for seed 1234567 (Vigna's reference splitmix64.c): the state
# advances by the golden gamma before each output.
SPLITMIX64_SEED, SPLITMIX64_GAMMA = 1234567, 0x9E3779B97F4A7C15
SPLITMIX64_OUTPUTS = (6457827717110365317, 3203168211198807973, 9817491932198370423)


def test_seed_mixing_is_stable():
    """Seeds come from SplitMix64 (same value in every process and Python version, unlike hash())."""
    for step, expected in enumerate(SPLITMIX64_OUTPUTS):
        state = (SPLITMIX64_SEED + step * SPLITMIX64_GAMMA) & ((1 << 64) - 1)
        assert mix_seed(state) == expected >> 1  # one value: one SplitMix64 step, kept to 63 bits
    assert mix_seed(0, 1, 2) != mix_seed(0, 2, 1)  # order matters
    assert 0 <= mix_seed(-1, 2**70) < 2**63


def test_training_import_surface_stays_upstream():
    """data never imports models, and the loader surface does not load the builder."""
    import subprocess
    import sys

    code = ("import sys; from gfm_fast.data import make_loader, sample_shards; "
            "bad = [m for m in ('gfm_fast.models', 'gfm_fast.data.geopile') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or result.stdout


def test_shards_that_are_missing_or_not_tars_fail_when_the_loader_is_made(tmp_path):
    """One GFMError naming the path, before any worker starts (the training CLI prints it as one line)."""
    with pytest.raises(ShardError, match=r"none of the 1 shards .* exist \(first: .*nowhere.tar does not exist\)"):
        make_loader(small_cfg(str(tmp_path / "nowhere.tar")))
    zipped = tmp_path / "images.zip"
    zipped.write_bytes(b"PK\x03\x04" + bytes(600))
    with pytest.raises(ShardError, match=r"is a readable tar file \(first: .*images.zip is not a tar file"):
        make_loader(small_cfg(str(zipped)))
    tiny = tmp_path / "tiny.tar"
    tiny.write_bytes(b"abc")
    with pytest.raises(GFMError, match=r"tiny.tar is not a tar file \(3 bytes\)"):
        make_loader(small_cfg(str(tiny)))
    good = write_tar(tmp_path / "good.tar", good_samples("gg", 4))
    with pytest.warns(DataWarning, match=r"1 of 2 shards cannot be read \(first: .*images.zip is not a tar file"):
        loader = make_loader(small_cfg(f"{good},{zipped}", samples_per_epoch=4), img_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert len(_epoch(loader)) == 1
    assert loader.stats["failed_shards"] >= 1  # the zip, counted when a worker reads it


def _copies(tmp_path, array, count):
    """A shard of ``count`` samples holding the same lossless image."""
    return write_tar(tmp_path / "copies.tar", [(f"cp/img{i:03d}", {"png": encode(array, "PNG")}) for i in range(count)])


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_configured_recipe_and_statistics_reach_the_batches(tmp_path, hflip):
    """data.crop_scale / crop_ratio / hflip and the model's mean/std are the ones the batches get: a
    full-image crop at the image's own size is the image itself (flipped when hflip=1), and
    loader.normalize applies the given statistics, written out by hand."""
    array = textured(IMG, IMG, seed=4)
    cfg = small_cfg(_copies(tmp_path, array, 8), batch_size=8, samples_per_epoch=8, shuffle_buffer=0,
                    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=hflip)
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.1, 0.6)
    loader = make_loader(cfg, img_size=IMG, mean=mean, std=std)
    (batch,) = _epoch(loader)
    image = torch.from_numpy(array).permute(2, 0, 1)
    want = image.flip(-1) if hflip else image
    assert batch.dtype == torch.uint8 and all(torch.equal(row, want) for row in batch)
    by_hand = (want.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(loader.normalize(batch), by_hand.float().expand(8, -1, -1, -1))


def test_every_sample_draws_its_own_crop_and_flip(tmp_path):
    """16 copies of one image through the default recipe: each sample's crop and flip are its own
    draw, so the rows differ (one draw per slot would give 16 equal rows)."""
    cfg = small_cfg(_copies(tmp_path, textured(48, 48, seed=5), 16), batch_size=16, samples_per_epoch=16,
                    shuffle_buffer=0)
    (batch,) = _epoch(make_loader(cfg, img_size=IMG))
    distinct = {bytes(row.flatten().tolist()) for row in batch}
    assert len(distinct) >= 12


def test_only_failures_in_a_row_stop_the_loader(tmp_path):
    """data.max_consecutive_failures counts failures with no good sample between them: 6 corrupt
    samples, never 2 in a row, pass a limit of 2; the same 6 in a row stop the loader at the 2nd."""
    good, bad = good_samples("cc", 6), [(f"cc/bad{i}", {"jpg": b"garbage"}) for i in range(6)]
    spread = write_tar(tmp_path / "spread.tar", [s for pair in zip(bad, good) for s in pair])
    loader = make_loader(small_cfg(spread, shuffle_buffer=0, batch_size=6, samples_per_epoch=6,
                                   max_consecutive_failures=2), img_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert len(_epoch(loader)) == 1
        assert loader.stats["corrupt_samples"] == 6
        in_a_row = write_tar(tmp_path / "in_a_row.tar", bad + good)
        loader = make_loader(small_cfg(in_a_row, shuffle_buffer=0, batch_size=6, samples_per_epoch=6,
                                       max_consecutive_failures=2), img_size=IMG)
        with pytest.raises(TooManyFailures, match="^2 consecutive shard/sample failures"):
            _epoch(loader)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    """2 ranks x 2 workers over 8 shards of 4 one-colour images (the colour names the sample, and
    survives any crop): one epoch of both ranks sees every sample exactly once."""
    def one_colour(value):
        return {"png": encode(np.full((40, 40, 3), 7 * value, np.uint8), "PNG")}

    shards = [write_tar(tmp_path / f"s{s}.tar", [(f"cc/s{s}_{i}", one_colour(4 * s + i)) for i in range(4)])
              for s in range(8)]
    cfg = small_cfg(",".join(shards), num_workers=2, shuffle_buffer=0, samples_per_epoch=32)
    seen = []
    for rank in range(2):
        rows = [row for batch in _epoch(make_loader(cfg, img_size=IMG, seed=3, rank=rank, world_size=2))
                for row in batch]
        assert len(rows) == 16 and all(int(row.min()) == int(row.max()) for row in rows)
        seen += [int(row[0, 0, 0]) // 7 for row in rows]
    assert sorted(seen) == list(range(32))


def test_ranks_draw_their_own_crops(tmp_path):
    """Every shard holds copies of one image: rank 0 and rank 1 read different shards of the same
    pixels, so only their own crop and flip draws tell their batches apart (ranks that shared the
    draws would train on the same augmented batch)."""
    image = {"png": encode(textured(48, 48, seed=6), "PNG")}
    shards = [write_tar(tmp_path / f"s{s}.tar", [(f"cc/s{s}_{i}", image) for i in range(8)]) for s in range(2)]
    cfg = small_cfg(",".join(shards), batch_size=8, samples_per_epoch=16, shuffle_buffer=0)
    first, second = (_epoch(make_loader(cfg, img_size=IMG, seed=0, rank=r, world_size=2))[0] for r in range(2))
    assert sum(torch.equal(a, b) for a, b in zip(first, second)) <= 2
