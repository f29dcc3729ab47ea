"""Shard builder: layouts, keys, metadata, manifest, shard bounds, determinism, resumption, bad inputs."""
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import encode, jpeg, png16, read_all, textured, tiff, write_files
from gfm_fast.data import build_write
from gfm_fast.data.__main__ import main as cli
from gfm_fast.data.decode import decode_tiff
from gfm_fast.data.geopile import BuildError, BuildOptions, Source, build_shards, parse_gsd, parse_size
from gfm_fast.data.manifest import read_manifest, sha256_file, shard_paths, verify_build


def _quiet(*_):
    pass


def _build(sources, out, **options):
    return build_shards(sources, out, BuildOptions(**options), progress=False, log=_quiet)


def _samples(out: Path):
    return {s["__key__"]: s for s in read_all(shard_paths(out, read_manifest(out)))}


@pytest.fixture
def folders(tmp_path):
    classes = write_files(tmp_path / "classes", {
        "forest/a.jpg": jpeg(40, 48, seed=1),
        "forest/b.v2.jpg": jpeg(40, 48, seed=2),  # dot in the stem
        "forest/b_v2.jpg": jpeg(40, 48, seed=3),  # ... whose key would clash
        "river/x.jpg": jpeg(36, 30, seed=4),
        "river/x.png": encode(textured(20, 22, seed=5), "PNG"),  # same stem, other format
        "river/notes.txt": b"ignored: not an image",
    })
    flat = write_files(tmp_path / "flat", {
        "p1.jpg": jpeg(50, 50, seed=6),
        "sub/p2.png": encode(textured(24, 24, seed=7), "PNG"),
        "sub/deeper/p3.jpg": jpeg(30, 60, seed=8),
    })
    return classes, flat


def test_class_and_flat_folders(folders, tmp_path):
    classes, flat = folders
    out = tmp_path / "out"
    manifest = _build([Source("cls", str(classes), gsd=0.5), Source("flat", str(flat), gsd=(1.0, 2.0))], out,
                      shard_size=parse_size("12KB"), seed=1)
    assert manifest["samples"] == 8
    assert manifest["sources"]["cls"]["layout"] == "classes" and manifest["sources"]["flat"]["layout"] == "flat"
    assert manifest["sources"]["cls"]["classes"] == ["forest", "river"]
    assert sum(s["samples"] for s in manifest["shards"]) == 8 and len(manifest["shards"]) > 1
    assert all(s["bytes"] <= parse_size("12KB") for s in manifest["shards"])
    assert verify_build(out) == []
    samples = _samples(out)
    assert sorted(samples) == sorted([
        "cls/forest/a", "cls/forest/b_v2_jpg", "cls/forest/b_v2_jpg_1", "cls/river/x_jpg", "cls/river/x_png",
        "flat/p1", "flat/sub/p2", "flat/sub/deeper/p3"])
    meta = json.loads(samples["cls/river/x_png"]["json"])
    assert meta == {"source": "cls", "label": "river", "gsd": 0.5, "path": "river/x.png", "format": "png",
                    "width": 22, "height": 20, "bands": 3, "mode": "RGB"}
    assert json.loads(samples["flat/sub/deeper/p3"]["json"])["gsd"] == [1.0, 2.0]
    assert json.loads(samples["flat/p1"]["json"])["label"] is None
    # JPEG/PNG are stored as the original bytes, never re-encoded.
    assert samples["cls/forest/a"]["jpg"] == (classes / "forest/a.jpg").read_bytes()
    assert samples["flat/sub/p2"]["png"] == (flat / "sub/p2.png").read_bytes()


def test_geotiff_scenes_are_tiled_multiband_kept_nodata_skipped(tmp_path):
    scene = textured(130, 200, bands=5, seed=3, dtype=np.uint16)
    scene[:70, :70] = 0  # nodata: tile (0, 0) fully, tile (0, 64) partly (6 of 64 columns -> 9%)
    root = write_files(tmp_path / "naip", {"m_01.tif": tiff(scene, tile=(32, 32), compression="zlib",
                                                             extratags=[(42113, "s", 0, "0", True)])})
    rgb = textured(64, 130, bands=3, seed=4)
    write_files(root, {"rgb/m_02.tif": tiff(rgb, rowsperstrip=7)})
    out = tmp_path / "out"
    manifest = _build([Source("naip", str(root), layout="tiles", gsd=1.0)], out, tile_size=64, max_nodata=0.25)
    # m_01: 2 x 3 full tiles (partial edge tiles dropped), one skipped; m_02: 1 x 2 tiles.
    assert manifest["samples"] == 5 + 2
    assert manifest["sources"]["naip"]["skipped_nodata"] == 1
    samples = _samples(out)
    assert "naip/m_01/y000000_x000000" not in samples
    tile = samples["naip/m_01/y000064_x000128"]
    meta = json.loads(tile["json"])
    assert meta["window"] == [64, 128, 64, 64] and meta["bands"] == 5 and meta["dtype"] == "uint16"
    np.testing.assert_array_equal(decode_tiff(tile["tif"]), scene[64:128, 128:192])
    rgb_tile = samples["naip/rgb/m_02/y000000_x000064"]
    assert json.loads(rgb_tile["json"])["format"] == "tif"  # tiles default to uncompressed TIFF
    np.testing.assert_array_equal(decode_tiff(rgb_tile["tif"]), rgb[0:64, 64:128])


def test_a_nodata_pixel_has_every_band_at_the_nodata_value():
    from gfm_fast.data.geotiff import nodata_fraction

    tile = np.ones((2, 2, 3), np.float32)
    tile[0, 0] = 0  # all bands: nodata
    tile[0, 1, 0] = 0  # one band only: a real (dark) pixel
    assert nodata_fraction(tile, 0.0) == 0.25 and nodata_fraction(tile, None) == 0.0
    tile[1, 1] = np.nan
    tile[1, 0, 2] = np.nan
    assert nodata_fraction(tile, float("nan")) == 0.25


def test_band_selection_for_tiles(tmp_path):
    scene = textured(64, 128, bands=4, seed=5)  # e.g. NAIP: R, G, B, NIR
    root = write_files(tmp_path / "naip", {"m.tif": tiff(scene)})
    assert cli(["build", f"naip={root}", "--layout", "naip=tiles", "--bands", "naip=3,2,1", "--tile-size", "64",
                "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    samples = _samples(tmp_path / "out")
    tile = samples["naip/m/y000000_x000064"]
    assert json.loads(tile["json"])["scene_bands"] == [3, 2, 1] and json.loads(tile["json"])["bands"] == 3
    np.testing.assert_array_equal(decode_tiff(tile["tif"]), scene[:, 64:128, [2, 1, 0]])
    manifest = _build([Source("naip", str(root), layout="tiles", bands=(5,))], tmp_path / "bad", tile_size=64)
    assert manifest["samples"] == 0 and "scene has 4 bands" in manifest["failures"][0]["reason"]


@pytest.mark.parametrize("tile_format, ext", [("raw", "tif"), ("jpeg", "jpg"), ("compressed", "png")])
def test_tile_formats(tmp_path, tile_format, ext):
    scene = textured(64, 64, bands=3, seed=2)
    root = write_files(tmp_path / "s", {"scene.tif": tiff(scene)})
    _build([Source("s", str(root), layout="tiles")], tmp_path / "out", tile_size=64, tile_format=tile_format,
           jpeg_quality=97)
    (sample,) = _samples(tmp_path / "out").values()
    stored = decode_tiff(sample[ext]) if ext == "tif" else np.asarray(Image.open(io.BytesIO(sample[ext])))
    error = np.abs(stored.astype(int) - scene.astype(int))
    if tile_format == "jpeg":  # the only lossy one (4:4:4 keeps every band's detail)
        assert 0 < error.mean() < 3
    else:
        assert error.max() == 0
    if tile_format == "raw":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(sample["tif"])) as tif:
            assert tif.pages.first.compression == 1  # uncompressed: the fastest to decode
    # 16-bit / multi-band tiles stay lossless whatever the format asks for.
    deep = textured(64, 64, bands=4, dtype=np.uint16)
    write_files(root, {"deep.tif": tiff(deep)})
    _build([Source("s", str(root), layout="tiles")], tmp_path / "out2", tile_size=64, tile_format=tile_format)
    np.testing.assert_array_equal(decode_tiff(_samples(tmp_path / "out2")["s/deep/y000000_x000000"]["tif"]), deep)


def test_nodata_option_overrides_a_missing_tag(tmp_path):
    scene = textured(64, 128, bands=3, seed=1)
    scene[:, :64] = 255
    root = write_files(tmp_path / "s", {"scene.tif": tiff(scene)})
    manifest = _build([Source("s", str(root / "scene.tif"))], tmp_path / "out", tile_size=64, nodata=255)
    assert manifest["samples"] == 1 and manifest["sources"]["s"]["layout"] == "tiles"


def test_corrupt_sources_are_reported_counted_and_skipped(tmp_path, capsys):
    good = jpeg(40, 40)
    root = write_files(tmp_path / "bad", {
        "ok.jpg": good,
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.png": b"not an image at all",
        "scene.tif": b"II*\x00 broken tiff",
    })
    scenes = write_files(tmp_path / "scenes", {"broken.tif": b"MM\x00* broken"})
    assert cli(["build", f"bad={root}", f"geo={scenes}", "--layout", "geo=tiles", "--out", str(tmp_path / "out"),
                "--no-progress"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["samples"] == 1
    reasons = {f["path"]: f["reason"] for f in manifest["failures"]}
    assert set(reasons) == {"bad/truncated.jpg", "bad/empty.jpg", "bad/text.png", "bad/scene.tif", "geo/broken.tif"}
    assert "empty file" in reasons["bad/empty.jpg"] and "truncated" in reasons["bad/truncated.jpg"]
    assert reasons["bad/text.png"] == "UnidentifiedImageError: cannot identify image file"  # no object address
    assert manifest["sources"]["bad"]["failures"] == 4 and manifest["sources"]["geo"]["failures"] == 1
    printed = capsys.readouterr().out
    assert "5 unreadable or corrupt file(s) were skipped" in printed and "bad/text.png" in printed


def test_cmyk_16bit_and_gray_pass_through_other_formats_are_lossless(tmp_path):
    bmp_pixels = textured(20, 30, seed=2)
    root = write_files(tmp_path / "misc", {
        "cmyk.jpg": jpeg(32, 32, mode="CMYK"),
        "gray.jpg": jpeg(32, 32, mode="L"),
        "deep.png": png16(),
        "pic.bmp": encode(bmp_pixels, "BMP"),
        "rgb.tif": tiff(textured(16, 16, seed=9)),
        "ms.tif": tiff(textured(16, 16, bands=4, dtype=np.uint16)),
    })
    _build([Source("misc", str(root))], tmp_path / "out")
    samples = _samples(tmp_path / "out")
    for name in ("cmyk", "gray"):
        assert samples[f"misc/{name}"]["jpg"] == (root / f"{name}.jpg").read_bytes()
    assert json.loads(samples["misc/cmyk"]["json"])["mode"] == "CMYK"
    assert samples["misc/deep"]["png"] == (root / "deep.png").read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples["misc/pic"]["png"]))), bmp_pixels)
    assert "png" in samples["misc/rgb"]
    ms = samples["misc/ms"]
    assert json.loads(ms["json"])["bands"] == 4
    np.testing.assert_array_equal(decode_tiff(ms["tif"]), textured(16, 16, bands=4, dtype=np.uint16))


def test_builds_are_deterministic_and_seeded(folders, tmp_path):
    sources = [Source("cls", str(folders[0])), Source("flat", str(folders[1]))]
    first = _build(sources, tmp_path / "a", shard_size=parse_size("12KB"), seed=3)
    second = _build(sources, tmp_path / "b", shard_size=parse_size("12KB"), seed=3)
    other = _build(sources, tmp_path / "c", shard_size=parse_size("12KB"), seed=4)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    assert [s["sha256"] for s in first["shards"]] != [s["sha256"] for s in other["shards"]]
    # The shuffle mixes sources across shards.
    assert any(len(s["sources"]) == 2 for s in first["shards"])


def test_interrupted_build_leaves_no_partial_shard_and_resumes(folders, tmp_path, monkeypatch):
    sources = [Source("cls", str(folders[0])), Source("flat", str(folders[1]))]
    options = dict(shard_size=parse_size("12KB"), seed=0)
    reference = _build(sources, tmp_path / "ref", **options)
    out = tmp_path / "out"
    real_write_item = build_write._write_item
    calls = {"n": 0}

    def dying_write_item(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # somewhere inside the second or third shard
            raise KeyboardInterrupt
        return real_write_item(*args)

    monkeypatch.setattr(build_write, "_write_item", dying_write_item)
    with pytest.raises(KeyboardInterrupt):
        _build(sources, out, **options)
    done = sorted(p.name for p in out.glob("*.tar"))
    assert 0 < len(done) < len(reference["shards"])
    assert not list(out.glob(".*tmp*")) and not (out / "manifest.json").exists()
    finished_mtime = {name: (out / name).stat().st_mtime_ns for name in done}
    monkeypatch.setattr(build_write, "_write_item", real_write_item)
    log = []
    resumed = build_shards(sources, out, BuildOptions(**options), progress=False, log=log.append)
    assert any(line.startswith(f"resuming: {len(done)} of") for line in log)
    assert resumed["shards"] == reference["shards"]
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in finished_mtime.items())


def test_a_rerun_removes_what_a_killed_build_was_writing(folders, tmp_path):
    """SIGKILL (or the OOM killer) skips the cleanup of the shard being written: its temporary file,
    up to --shard-size each, would stay hidden in --out through every later run."""
    sources = [Source("cls", str(folders[0]))]
    _build(sources, tmp_path / "out", shard_size=parse_size("12KB"))
    partial = tmp_path / "out" / ".geopile-000001.tmp-99999999"  # write_shard's name for it, another pid
    partial.write_bytes(b"x" * 5000)
    _build(sources, tmp_path / "out", shard_size=parse_size("12KB"))
    assert not partial.exists()
    assert verify_build(tmp_path / "out") == []

def test_damaged_shard_is_rebuilt_on_rerun(folders, tmp_path):
    sources = [Source("cls", str(folders[0]))]
    manifest = _build(sources, tmp_path / "out", shard_size=parse_size("12KB"))
    victim = tmp_path / "out" / manifest["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:1000])
    assert verify_build(tmp_path / "out") != []
    _build(sources, tmp_path / "out", shard_size=parse_size("12KB"))
    assert verify_build(tmp_path / "out") == []
    assert sha256_file(victim) == manifest["shards"][0]["sha256"]
    damaged = bytearray(victim.read_bytes())
    damaged[600] ^= 0xFF  # one flipped bit pattern, same size: only the checksum sees it
    victim.write_bytes(damaged)
    assert verify_build(tmp_path / "out") == [f"{victim}: sha256 differs from the manifest"]
    assert verify_build(tmp_path / "out", checksums=False) == []


def test_changed_sources_are_not_mixed_into_an_old_build(folders, tmp_path):
    sources = [Source("cls", str(folders[0]))]
    _build(sources, tmp_path / "out")
    (folders[0] / "river" / "new.jpg").write_bytes(jpeg(20, 20))
    with pytest.raises(BuildError, match="holds a different build"):
        _build(sources, tmp_path / "out")
    manifest = build_shards(sources, tmp_path / "out", BuildOptions(), overwrite=True, progress=False, log=_quiet)
    assert manifest["samples"] == 6


def test_parallel_workers_write_the_same_shards(folders, tmp_path):
    sources = [Source("cls", str(folders[0])), Source("flat", str(folders[1]))]
    serial = _build(sources, tmp_path / "a", shard_size=parse_size("12KB"))
    parallel = _build(sources, tmp_path / "b", shard_size=parse_size("12KB"), workers=2)
    assert serial["shards"] == parallel["shards"]


def test_cli_and_option_parsing(folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["build", str(folders[1]), "--name", f"more={folders[0]}", "--gsd", "flat=0.3", "--out", str(out),
                "--shard-size", "1MB", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert set(manifest["sources"]) == {"flat", "more"} and manifest["sources"]["flat"]["gsd"] == 0.3
    assert cli(["verify", str(out)]) == 0
    capsys.readouterr()
    assert cli(["show", str(out), "-n", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and all(line.split()[0].split("/")[0] in ("flat", "more") for line in shown)
    assert cli(["build", f"a={folders[1]}", "--gsd", "nope=1", "--out", str(out)]) == 2
    assert "unknown source(s) ['nope']" in capsys.readouterr().err
    os.remove(out / manifest["shards"][0]["name"])
    assert cli(["verify", str(out)]) == 1
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert cli(["build", f"a={folders[1]}", "--out", str(tmp_path / "a_file" / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: cannot create '{tmp_path / 'a_file' / 'out'}': a file is in the way "
                                       f"of a folder on that path\n")
    assert parse_size("1GB") == 10**9 and parse_size("300KiB") == 307200 and parse_size("5e3") == 5000
    assert parse_gsd("0.3") == 0.3 and parse_gsd("0.1-10") == (0.1, 10.0)
    with pytest.raises(BuildError, match="cannot read size"):
        parse_size("lots")
    with pytest.raises(BuildError, match="does not exist"):
        _build([Source("x", str(tmp_path / "missing"))], tmp_path / "o2")
    with pytest.raises(BuildError, match="unique"):
        _build([Source("x", str(folders[0])), Source("x", str(folders[1]))], tmp_path / "o3")


def test_show_names_a_shard_it_cannot_read(folders, tmp_path, capsys):
    """show is how a remote spec is tried before training: a failing reader or a damaged shard is one line."""
    out = tmp_path / "out"
    assert cli(["build", f"cls={folders[0]}", "--out", str(out), "--shard-size", "1MB", "--no-progress"]) == 0
    good = out / read_manifest(out)["shards"][0]["name"]
    (tmp_path / "s-0.tar").write_bytes(good.read_bytes())
    (tmp_path / "s-1.tar").write_bytes(good.read_bytes()[:3000])  # cut inside its first member
    capsys.readouterr()
    assert cli(["show", str(tmp_path / "s-{0..1}.tar"), "-n", "1000"]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == read_manifest(out)["shards"][0]["samples"]  # the good shard first
    assert captured.err == (f"error: cannot read {tmp_path / 's-1.tar'}: unexpected end of data; it may be damaged "
                            f"or not a tar file (`python -m gfm_fast.data verify` checks a build)\n")
    assert cli(["show", "pipe:exit 3", "-n", "1"]) == 2
    # webdataset sees the reader's exit status, or first its empty output: either way, one line
    assert re.fullmatch(r"error: cannot read pipe:exit 3: (its reader command exited with status 3|empty file); "
                        r"run the command yourself to see its error\n", capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["verify", "{tmp}"], "manifest.json"),
    (["show", "{tmp}/none-{{0..1}}.tar"], "none of the 2 shards"),
    (["show", "{tmp}/not.tar"], "not.tar is not a tar file"),
    (["build", "x={tmp}/missing", "--out", "{tmp}/out"], "missing does not exist"),
    (["build", "x={tmp}", "--gsd", "0.6", "--out", "{tmp}/out"], "--gsd expects NAME=VALUE"),
])
def test_cli_prints_user_errors_as_one_line(tmp_path, capsys, argv, message):
    """Every GFMError (manifest, shard, build) is one `error:` line on stderr, exit status 2, no traceback."""
    (tmp_path / "not.tar").write_text("hello, not a tar" * 100)
    assert cli([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
