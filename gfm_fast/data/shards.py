"""Shard specs and shard order: what ``data.shards`` names, and which shard each loader slot reads next.

``resolve_shards`` turns the spec (a build directory, brace patterns, URLs) into a list of URLs
and checks the local ones before any worker starts: a spec whose shards do not exist or are not
tar files fails at once, in one line naming the path (:class:`~gfm_fast.errors.ShardError`).
``shard_stream`` is the first stage of every slot's pipeline (see pipeline.py), and
``acceptance_rates`` turns per-source mixing weights into keep probabilities.

Seeds come from :func:`mix_seed` (SplitMix64), the same in every process and Python version, so
every rank and worker derives its random streams from (seed, epoch, rank, worker, ...) alone.
docs/architecture.md shows where the loader sits in the data layer.
"""
from __future__ import annotations

import itertools
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import webdataset as wds

from gfm_fast.data.failures import DataWarning
from gfm_fast.data.manifest import MANIFEST_NAME, read_manifest, shard_paths
from gfm_fast.errors import ConfigError, ShardError

SHARD_READ_ERRORS = (OSError, tarfile.TarError, ValueError)  # what webdataset raises for a shard it cannot read

SAMPLE_SHARDS_DIR = Path(__file__).resolve().parent / "sample" / "shards"
# Independent random streams per purpose, mixed into every seed.
TAG_SHARDS, TAG_SELECT, TAG_SHUFFLE, TAG_AUGMENT = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http(s):, gs:, file:, ...
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile reads them ("r:*")


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
        raise ShardError(f"embedded sample shards are missing ({SAMPLE_SHARDS_DIR}); reinstall gfm_fast "
                         "with its package data (pip install -e .) or pass data.shards explicitly")
    return str(SAMPLE_SHARDS_DIR)


@dataclass
class ShardSet:
    """Resolved shard URLs plus what the manifest (if any) says about them."""

    urls: List[str]
    spec: str
    source_counts: Optional[Dict[str, int]] = None  # per-source sample counts from manifest.json


def _split_top_level(spec: str) -> List[str]:
    """Split on commas outside braces: 'a-{0,1}.tar,b.tar' -> 2 items (webdataset splits on '::' only)."""
    parts, depth, current = [], 0, []
    for char in spec:
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
    if _URL_SCHEME.match(item):
        return item
    return os.path.expanduser(item)


def resolve_shards(spec: Optional[str]) -> ShardSet:
    """Turn ``DataConfig.shards`` into a list of shard URLs.

    Args:
        spec: None (embedded sample), a build directory (or its manifest.json), or a comma
            separated list of brace patterns / URLs (file, pipe:, http(s):, gs:, s3:// via the
            AWS CLI); webdataset's ``::`` separator works too.

    Returns:
        The expanded :class:`ShardSet`.

    Raises:
        ShardError: no local shard exists or is a tar file (the message names the first path);
            some of them only: a :class:`DataWarning`, and the loader counts them as failed shards.
        ConfigError: the spec names no shard at all.
    """
    if spec is None:
        spec = sample_shards()
    spec = spec.strip()
    local = Path(os.path.expanduser(spec))
    if local.is_dir() or local.name == MANIFEST_NAME:
        if local.is_dir() and not (local / MANIFEST_NAME).is_file():
            raise ShardError(f"data.shards={spec!r} is a directory without {MANIFEST_NAME} (written by "
                             "`python -m gfm_fast.data build`); pass a brace pattern of its .tar files instead")
        root = local if local.is_dir() else local.parent
        manifest = read_manifest(root)
        counts = {name: int(src["samples"]) for name, src in manifest["sources"].items()}
        shards = ShardSet(shard_paths(root, manifest), spec, counts)
    else:
        # wds.shardlists.expand_urls: '::' lists, ${VAR} substitution and brace expansion.
        urls = [_to_url(url) for item in _split_top_level(spec) for url in wds.shardlists.expand_urls(item)]
        shards = ShardSet(urls, spec)
    _check_local_shards(shards)
    return shards


def _local_problem(path: str) -> Optional[str]:
    """Why a local shard cannot be read (None when its first block is a tar header or compressed)."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    with open(path, "rb") as file:
        block = file.read(tarfile.BLOCKSIZE)
    if block.startswith(_COMPRESSED_MAGIC):
        return None
    if len(block) < tarfile.BLOCKSIZE:
        return f"{path} is not a tar file ({len(block)} bytes)"
    if block == bytes(tarfile.BLOCKSIZE):
        return None  # an empty archive: read, then counted as a shard without samples
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks the header checksum
    except tarfile.HeaderError:
        return f"{path} is not a tar file (no tar header at its start)"
    return None


def _check_local_shards(shards: ShardSet) -> None:
    """Fail fast when no local shard is readable; warn about the unreadable ones (counted as failed)."""
    urls, spec = shards.urls, shards.spec
    if not urls:
        raise ConfigError(f"data.shards={spec!r} names no shards")
    local_paths = [u for u in urls if not _URL_SCHEME.match(u)]
    problems = [p for p in map(_local_problem, local_paths) if p is not None]
    if local_paths and len(problems) == len(urls):
        missing = sum(p.endswith("does not exist") for p in problems)
        what = "exist" if missing == len(urls) else "is a readable tar file"
        raise ShardError(f"none of the {len(urls)} shards of data.shards={spec!r} {what} (first: {problems[0]}); "
                         "pass a build directory, or a brace pattern of .tar shards built by "
                         "`python -m gfm_fast.data build`")
    if problems:
        warnings.warn(f"{len(problems)} of {len(urls)} shards cannot be read (first: {problems[0]}); they will be "
                      "counted as failed shards", DataWarning)


def unreadable_shard(exc: BaseException) -> str:
    """One line for a shard webdataset could not open or read (it appends the shard's URL to ``exc.args``)."""
    url = exc.args[-1] if len(exc.args) > 1 and isinstance(exc.args[-1], str) else "a shard"
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    status = re.search(r": exit (\d+) \(read\)", detail)  # webdataset's Pipe: the reader command failed
    if status:
        detail = f"its reader command exited with status {status.group(1)}"
    detail = re.sub(r" @ <.*>$", "", detail)  # tarfile's message names the stream object, not the file
    if "aws s3" in url or url.startswith("s3://"):
        hint = "the AWS CLI must be installed and have credentials (try `aws s3 ls` on the path)"
    elif url.startswith(("http://", "https://")):
        hint = "curl must be installed and reach the server (try `curl -fI` on the URL)"
    elif url.startswith("pipe:"):
        hint = "run the command yourself to see its error"
    else:
        hint = "it may be damaged or not a tar file (`python -m gfm_fast.data verify` checks a build)"
    return f"cannot read {url}: {detail}; {hint}"


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

    Raises:
        ConfigError: a weight names a source the shards do not hold, or every weight is 0.
    """
    if not weights:
        return {}, 1.0
    if known is not None:
        known = set(known)
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(f"data.source_weights names unknown source(s) {unknown}; the shards hold "
                              f"{sorted(known)}")
        has_unlisted = bool(known - set(weights))
    else:
        has_unlisted = True
    top = max(list(weights.values()) + ([1.0] if has_unlisted else []))
    if top <= 0:
        raise ConfigError("data.source_weights drops every source (all weights are 0)")
    return {name: w / top for name, w in weights.items()}, 1.0 / top


def shard_stream(urls: Sequence[str], *, seed: int, epoch: int) -> Iterator[Dict[str, str]]:
    """Endless shard order (webdataset shard-list samples ``{"url": ...}``): every pass is
    ``wds.SimpleShardList`` shuffled with its own seed from (seed, epoch, pass), the same on every
    rank. The pipeline then gives position g of this sequence to slot g % num_slots (``wds.slice``),
    so within a pass no two slots read the same shard when there are at least num_slots shards.
    """
    for pass_index in itertools.count():
        yield from wds.SimpleShardList(list(urls), seed=mix_seed(seed, epoch, pass_index, TAG_SHARDS))
