"""Small image and shard factories for the data tests (tiny sizes: the suite must stay fast)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "gfm_fast" / "data" / "sample"
SAMPLE_IMAGES = SAMPLE_ROOT / "images"


def textured(height: int, width: int, bands: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Smooth gradients + noise: compresses like imagery, and crops differ from each other."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * (b + 1) + yy * (bands - b)) for b in range(bands)], axis=-1).astype(np.float64)
    base = base / max(base.max(), 1) * 0.8 + rng.random((height, width, bands)) * 0.2
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    array = (base * top).astype(dtype)
    return array[..., 0] if bands == 1 else array


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg(height=48, width=64, seed=0, mode="RGB") -> bytes:
    image = Image.fromarray(textured(height, width, 3, seed))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png16(height=40, width=40, seed=0) -> bytes:
    array = textured(height, width, 1, seed, np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # mode I;16
    return buffer.getvalue()


def tiff(array: np.ndarray, **kwargs) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    bands = array.shape[-1] if array.ndim == 3 else 1
    tifffile.imwrite(buffer, array, photometric="rgb" if bands == 3 else "minisblack", planarconfig="contig",
                     metadata=None, **kwargs)
    return buffer.getvalue()


def write_files(root: Path, files: Dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_tar(path: Path, samples: Iterable[Tuple[str, Dict[str, bytes]]]) -> str:
    """A webdataset shard written by hand (so tests can put anything in it)."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_samples(source: str, count: int, start: int = 0, size=(40, 56)) -> List[Tuple[str, Dict[str, bytes]]]:
    return [(f"{source}/img{start + i:04d}", {"jpg": jpeg(*size, seed=start + i),
                                             "json": json.dumps({"source": source}).encode()})
            for i in range(count)]


def read_all(urls: List[str]) -> List[dict]:
    """Every sample of the shards in order (no shuffle), via the loader's own tar reader."""
    from gfm_fast.data.failures import FailureCounter, new_stats
    from gfm_fast.data.pipeline import read_shards

    stats = new_stats()
    return list(read_shards(iter([{"url": url} for url in urls]), FailureCounter(stats, limit=10**9)))


def small_cfg(shards: Optional[str], **overrides):
    from gfm_fast.config import DataConfig

    values = dict(shards=shards, batch_size=4, num_workers=0, shuffle_buffer=8, samples_per_epoch=16,
                  max_consecutive_failures=50)
    values.update(overrides)
    return DataConfig(**values)
