"""8-bit batches travel as uint8 and are normalised after the copy to the device (loader.normalize)."""
import numpy as np
import pytest
import torch

from data_helpers import jpeg, png16, small_cfg, textured, tiff, write_tar
from gfm_fast.data import DataWarning, make_loader

IMG = 24
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _loader(shard, batch_size=4, **kwargs):
    cfg = small_cfg(shard, shuffle_buffer=0, batch_size=batch_size, samples_per_epoch=batch_size, **kwargs)
    return make_loader(cfg, img_size=IMG, mean=MEAN, std=STD, seed=3)


def _by_hand(uint8_batch):
    """(x / 255 - mean) / std per channel, in float64: an independent reference."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, -1, 1, 1)
    return ((uint8_batch.double() / 255 - mean) / std).float()


def _jpegs(count):
    return [(f"u8/img{i}", {"jpg": jpeg(40, 52, seed=i)}) for i in range(count)]


def test_uint8_batches_normalise_as_the_formula_and_as_the_workers_would(tmp_path):
    """The same three JPEGs (same stream indices, so the same crops) in an all-8-bit batch and in a batch
    that a 16-bit sample turns into the workers' float32 path: the device path gives the same rows."""
    gray = ("u8/gray", {"jpg": jpeg(40, 52, seed=9, mode="L")})
    eight_bit = _loader(write_tar(tmp_path / "u8.tar", _jpegs(3) + [gray]))
    mixed = _loader(write_tar(tmp_path / "mixed.tar", _jpegs(3) + [("u16/deep", {"png": png16(40, 52)})]))
    (raw,) = list(eight_bit)
    (worker,) = list(mixed)
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, IMG, IMG) and raw.is_contiguous()
    assert worker.dtype == torch.float32  # one 16-bit sample: the whole batch is normalised in the worker
    assert torch.equal(raw[3, 0], raw[3, 1]) and torch.equal(raw[3, 0], raw[3, 2])  # gray broadcast to RGB
    assert raw.float().std(dim=(1, 2, 3)).min() > 1  # real pixels in every row
    images = eight_bit.normalize(raw)
    assert images.dtype == torch.float32 and images.shape == raw.shape and images.is_contiguous()
    torch.testing.assert_close(images, _by_hand(raw))
    torch.testing.assert_close(images[:3], worker[:3], rtol=1.3e-6, atol=1e-6)


def test_16_bit_and_float_sources_still_give_worker_normalised_float32(tmp_path):
    deep = [(f"u16/t{i}", {"png": png16(32, 32, seed=i)}) for i in range(2)]
    floats = [(f"f32/t{i}", {"tif": tiff(textured(32, 32, seed=i, dtype=np.float32))}) for i in range(2)]
    for name, samples in (("deep", deep), ("float", floats)):
        loader = _loader(write_tar(tmp_path / f"{name}.tar", samples), batch_size=2)
        (batch,) = list(loader)
        assert batch.dtype == torch.float32, name
        assert loader.normalize(batch) is batch  # already normalised: nothing to do on the device
        assert -3 < batch.min() and batch.max() < 3 and batch.std() > 0.05, name


def test_uint8_batches_keep_positions_and_stats(tmp_path):
    """Each uint8 batch carries its stream position (corrupt samples included) and counters, as before."""
    shard = write_tar(tmp_path / "u8.tar", _jpegs(5) + [("bad/zero", {"jpg": b""})] + _jpegs(5)[:2])
    loader = make_loader(small_cfg(shard, shuffle_buffer=0, batch_size=3, samples_per_epoch=9), img_size=IMG)
    batches, positions = iter(loader), []
    with pytest.warns(DataWarning, match="bad/zero"):
        for _ in range(2):
            assert next(batches).dtype == torch.uint8
            positions.append(loader.state_dict()["positions"])
    assert positions == [[3], [7]]  # samples 0-2, then 3, 4 and 6 (5 is corrupt)
    assert loader.stats["samples"] == 6 and loader.stats["corrupt_samples"] == 1


@pytest.mark.parametrize("name", ["u8", "u16"])
def test_batch_stream_yields_normalised_float32_on_the_device(tmp_path, name):
    from gfm_fast.training.step import BatchStream

    samples = _jpegs(4) if name == "u8" else [(f"u16/t{i}", {"png": png16(32, 32, seed=i)}) for i in range(4)]
    shard = write_tar(tmp_path / f"{name}.tar", samples)
    expected = []
    for epoch in (0, 1):
        reference = _loader(shard)
        reference.set_epoch(epoch)
        (raw,) = list(reference)
        assert raw.dtype == (torch.uint8 if name == "u8" else torch.float32)
        expected.append(_by_hand(raw) if name == "u8" else raw)
    stream = BatchStream(_loader(shard), 0, torch.device("cpu"))
    got = [stream(), stream()]  # one batch per epoch: the second call starts epoch 1
    stream.close()
    assert stream.epoch == 1 and all(g.dtype == torch.float32 for g in got)
    assert not torch.equal(got[0], got[1])  # epoch 1 draws other crops
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU cases run on a GPU machine")
def test_cuda_pinned_copy_then_normalise_matches_the_cpu(tmp_path):
    """What BatchStream does on a GPU: the pinned uint8 batch copied non-blocking, normalised there."""
    loader = _loader(write_tar(tmp_path / "u8.tar", _jpegs(4)))
    (raw,) = list(loader)
    pinned = raw.pin_memory()
    on_device = loader.normalize(pinned.to("cuda", non_blocking=True))
    assert on_device.device.type == "cuda" and on_device.dtype == torch.float32
    torch.testing.assert_close(on_device.cpu(), _by_hand(raw))
