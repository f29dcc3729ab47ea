"""The shard manifest (``manifest.json``) written by the builder and read by the loader and tests.

Torch-free. Layout of a build directory::

    DIR/manifest.json           format, options, per-source and per-shard counts, sha256, failures
    DIR/<prefix>-000000.tar     the shards (written as .tmp, then renamed: a .tar is always complete)
    DIR/<prefix>-000000.json    per-shard record, the unit of resumption
    DIR/build.json              the build plan's fingerprint (a re-run must match it to resume)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Union

from gfm_fast.errors import ManifestError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gfm_fast.geopile.v1"
_HASH_CHUNK = 1 << 20




def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and check ``manifest.json`` (``path`` may be the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; build shards with `python -m gfm_fast.data build ... --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise ManifestError(f"{path} is not readable JSON ({exn}); rebuild it with `python -m gfm_fast.data build`")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path} has format {found!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def shard_paths(manifest_dir: Union[str, Path], manifest: Dict[str, Any]) -> List[str]:
    """Absolute paths of the manifest's shards (names are stored relative to its directory)."""
    root = Path(manifest_dir).resolve()
    return [str(root / shard["name"]) for shard in manifest["shards"]]


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_build(directory: Union[str, Path], checksums: bool = True) -> List[str]:
    """Check that every shard of a build exists with the recorded size (and sha256).

    Returns:
        A list of problems, empty when the build is intact.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif checksums and sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
