"""The embedded NEON sample: committed shards are intact, current and small; attribution ships."""
import glob
from pathlib import Path

from data_helpers import SAMPLE_IMAGES, SAMPLE_ROOT, read_all
from gfm_fast.data import sample_shards
from gfm_fast.data.geopile import BuildOptions, Source, build_shards, parse_size
from gfm_fast.data.manifest import read_manifest, shard_paths, verify_build

PACKAGE = SAMPLE_ROOT.parents[1]  # gfm_fast/
MAX_SAMPLE_BYTES = 3 * 10**6


def test_committed_shards_are_intact():
    directory = Path(sample_shards())
    assert directory == SAMPLE_ROOT / "shards"
    assert verify_build(directory) == []
    manifest = read_manifest(directory)
    assert manifest["samples"] == 34 and len(manifest["shards"]) == 4
    assert manifest["sources"]["neon_sites"]["classes"] == ["OSBS", "SOAP", "YELL"]
    samples = read_all(shard_paths(directory, manifest))
    assert len(samples) == 34 and {s["__key__"].split("/")[0] for s in samples} == {"neon_sites", "neon_yell"}


def test_committed_shards_match_a_rebuild_of_the_images(tmp_path):
    """The README's build command reproduces the committed shards byte for byte (none is stale)."""
    committed = read_manifest(sample_shards())
    options = committed["options"]
    rebuilt = build_shards(
        [Source("neon_sites", str(SAMPLE_IMAGES / "neon_sites"), gsd=0.1),
         Source("neon_yell", str(SAMPLE_IMAGES / "neon_yell"), gsd=0.1)],
        tmp_path, BuildOptions(shard_size=parse_size("300KB"), seed=options["seed"], prefix=options["prefix"]),
        progress=False, log=lambda *_: None)
    assert rebuilt["shards"] == committed["shards"]


def test_sample_is_small_attributed_and_packaged():
    files = [p for p in SAMPLE_ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < MAX_SAMPLE_BYTES
    notice = (SAMPLE_ROOT / "NOTICE.md").read_text()
    assert "MIT License" in notice and "National Ecological Observatory Network" in notice
    assert "DeepForest" in notice
    # setup.py ships gfm_fast/data/sample via package_data globs "data/sample/*" and "data/sample/**/*".
    packaged = {Path(p) for pattern in ("data/sample/*", "data/sample/**/*")
                for p in glob.glob(str(PACKAGE / pattern), recursive=True)}
    assert {p for p in files} <= packaged
