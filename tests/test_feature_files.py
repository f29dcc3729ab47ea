"""python -m gfm_fast.features: .npy and .parquet feature files with ids, in chunks, resumable, equal to
extract_features."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import gfm_fast
import gfm_fast.features
import gfm_fast.features_cli
from gfm_fast import extract_features, save_model
from gfm_fast.features_cli import main

SAMPLE_SHARDS = Path(gfm_fast.__file__).parent / "data" / "sample" / "shards"


@pytest.fixture
def model(tmp_path):
    return save_model(timm.create_model("gfm_swin_test_patch4_window2_64").eval(), tmp_path / "model")


def write_images(root, count=7):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = root / f"site{i % 2}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def read_output(out):
    """(features (N, F), ids) of a .npy (ids in .ids.txt beside it) or .parquet feature file."""
    if out.suffix == ".npy":
        return np.load(out), out.with_name(out.name[:-4] + ".ids.txt").read_text().splitlines()
    table = pq.read_table(out)
    assert table.schema.field("features").type == pa.list_(pa.float32(), table["features"].type.list_size)
    return np.stack(table["features"].to_numpy(zero_copy_only=False)), table["id"].to_pylist()


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_directory_in_chunks_equals_extract_features(tmp_path, model, suffix):
    files = write_images(tmp_path / "data")
    out = tmp_path / f"feats{suffix}"
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out), "--chunk-size", "3",
                 "--batch-size", "2", "--no-progress"]) == 0
    features, ids = read_output(out)
    assert ids == [p.relative_to(tmp_path / "data").as_posix() for p in files]
    assert features.dtype == np.float32 and features.shape == (7, 128)
    np.testing.assert_allclose(features, extract_features(model, files).numpy(), rtol=1e-5, atol=1e-6)
    written = {out.name, "feats.ids.txt"} if suffix == ".npy" else {out.name}
    assert {p.name for p in tmp_path.iterdir()} == {"data", "model"} | written  # no parts, no temporary files


def test_parquet_records_the_settings(tmp_path, model):
    write_images(tmp_path / "data", count=2)
    out = tmp_path / "feats.parquet"
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "64",
                 "--no-progress"]) == 0
    meta = json.loads(pq.read_schema(out).metadata[b"gfm_fast"])
    config = json.loads((model / "config.json").read_text())
    assert meta["model"] == str(model.resolve()) and meta["data"] == str(tmp_path / "data")
    assert meta["image_size"] == 64 and meta["num_features"] == 128 and meta["in_chans"] == 3
    assert meta["mean"] == config["mean"] and meta["std"] == config["std"]
    assert meta["gfm_fast_version"] == gfm_fast.__version__ and "mean over the tokens" in meta["pooling"]


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_an_interrupted_run_resumes_without_redoing_finished_chunks(tmp_path, model, monkeypatch, capsys, suffix):
    files = write_images(tmp_path / "data")
    good = files[4].read_bytes()
    files[4].write_bytes(b"not a png")  # the run stops in the second chunk (files 3-5)
    out = tmp_path / f"feats{suffix}"
    args = ["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out), "--chunk-size", "3",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image file") and files[4].name in err and err.count("\n") == 1
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / f"feats{suffix}.parts").glob("chunk-*")) == [
        "chunk-000000.ids.json", "chunk-000000.npy"]
    files[4].write_bytes(good)
    read = []
    original = gfm_fast.features.read_image
    monkeypatch.setattr(gfm_fast.features, "read_image", lambda path, *args: read.append(Path(path)) or original(path, *args))
    assert main(args) == 0
    assert read == files[3:]  # the first chunk's images are neither decoded nor run again
    beside = " and feats.ids.txt" if suffix == ".npy" else ""  # the summary, --no-progress or not
    assert capsys.readouterr().err == (f"wrote {out} ({len(files)} x 128 float32, 3 from finished chunks of an "
                                       f"earlier run){beside}\n")
    features, ids = read_output(out)
    assert ids == [p.relative_to(tmp_path / "data").as_posix() for p in files]
    np.testing.assert_allclose(features, extract_features(model, files).numpy(), rtol=1e-5, atol=1e-6)


def test_a_kill_while_replacing_an_earlier_npy_never_leaves_a_mismatched_pair(tmp_path, model, monkeypatch):
    """The .npy and its ids cannot be replaced at once: killed between the two, the earlier run's
    rows are gone rather than left beside this run's ids; the same command then completes both."""
    earlier, data, out = tmp_path / "earlier", tmp_path / "data", tmp_path / "feats.npy"
    write_images(earlier, count=3)
    write_images(data, count=5)
    assert main(["--model", str(model), "--data", str(earlier), "--out", str(out), "--no-progress"]) == 0
    real_replace = os.replace

    def killed_at_the_array(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt  # SIGKILL, as far as the files on disk can tell
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_array)
    with pytest.raises(KeyboardInterrupt):
        gfm_fast.features_cli.write_feature_file(str(model), str(data), str(out), progress=False)
    assert not out.exists() and (tmp_path / "feats.npy.parts").is_dir()  # incomplete, and it shows
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(["--model", str(model), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    features, ids = read_output(out)
    assert features.shape[0] == len(ids) == 5


def shard_reference(model, size):
    """The sample shards read with tarfile + Pillow, resized and normalised as documented."""
    manifest = json.loads((SAMPLE_SHARDS / "manifest.json").read_text())
    config = json.loads((model / "config.json").read_text())
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    keys, images = [], []
    for shard in manifest["shards"]:
        with tarfile.open(SAMPLE_SHARDS / shard["name"]) as tar:
            for member in tar:
                stem, ext = os.path.splitext(member.name)
                if ext in (".jpg", ".png"):  # all 8-bit RGB in the sample
                    pixels = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                    keys.append(stem)
                    images.append((x - mean) / std)
    return keys, extract_features(model, torch.cat(images)).numpy()


def test_shards_with_resize(tmp_path, model):
    out = tmp_path / "shards.npy"
    assert main(["--model", str(model), "--data", str(SAMPLE_SHARDS), "--out", str(out), "--image-size", "64",
                 "--chunk-size", "10", "--no-progress"]) == 0
    features, ids = read_output(out)
    keys, expected = shard_reference(model, 64)
    assert ids == keys and len(ids) == 34
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)  # JPEG decoders may differ by a unit


def test_corrupt_shard_samples_are_skipped_and_counted(tmp_path, model, capsys):
    """A shard of 3 images with 2 undecodable samples between them: 3 rows, the 3 ids, and the summary
    line counts the 2 skipped samples."""
    rng = np.random.default_rng(5)
    members = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        members.append((f"site/img{i}.png", buffer.getvalue()))
        if i < 2:
            members.append((f"site/bad{i}.png", b"not a png"))
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "f.npy"
    assert main(["--model", str(model), "--data", str(tmp_path / "s-0.tar"), "--out", str(out), "--chunk-size", "2",
                 "--no-progress"]) == 0
    features, ids = read_output(out)
    assert ids == ["site/img0", "site/img1", "site/img2"] and features.shape == (3, 128)
    assert capsys.readouterr().err == (f"wrote {out} (3 x 128 float32, 2 corrupt samples skipped) and "
                                       f"f.ids.txt\n")


def test_a_damaged_shard_stops_the_run_in_one_line_keeping_finished_chunks(tmp_path, model, capsys):
    first = sorted(SAMPLE_SHARDS.glob("*.tar"))[0]
    (tmp_path / "s-0.tar").write_bytes(first.read_bytes())
    (tmp_path / "s-1.tar").write_bytes(first.read_bytes()[:3000])  # cut inside its first member
    out = tmp_path / "f.npy"
    args = ["--model", str(model), "--data", str(tmp_path / "s-{0..1}.tar"), "--out", str(out), "--image-size", "64",
            "--chunk-size", "2", "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: cannot read {tmp_path / 's-1.tar'}: unexpected end of data; it may be "
                                       f"damaged or not a tar file (`python -m gfm_fast.data verify` checks a build)\n")
    assert (tmp_path / "f.npy.parts" / "chunk-000000.ids.json").is_file() and not out.exists()


def test_errors_are_one_line(tmp_path, model, capsys):
    write_images(tmp_path / "data", count=2)
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "f.csv")]) == 2
    assert "must end in .npy or .parquet" in capsys.readouterr().err
    out = tmp_path / "f.npy"
    (tmp_path / "f.npy.parts").mkdir()
    (tmp_path / "f.npy.parts" / "index.json").write_text(json.dumps({"model": "other"}))
    (tmp_path / "f.npy.parts" / "chunk-000000.ids.json").write_text("[]")
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress"]) == 2
    assert "other settings (chunk_size, data, model)" in capsys.readouterr().err
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "g.npy"),
                 "--image-size", "200", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("error: --image-size 200 is not a positive multiple of 32 (the model's total "
                                       "stride); e.g. --image-size 192\n")
    assert not (tmp_path / "g.npy.parts").exists()
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out), "--device", "gpu"]) == 2
    assert capsys.readouterr().err == "error: device 'gpu' is not a device name; use 'cpu', 'cuda' or 'cuda:N'\n"
    (tmp_path / "a_file").write_text("")
    assert main(["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "a_file" / "f.npy"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: cannot create '{tmp_path / 'a_file' / 'f.npy.parts'}': a file is in "
                                       f"the way of a folder on that path\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(gfm_fast.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "gfm_fast.features", "--model", str(tmp_path / "missing"),
                             "--data", str(tmp_path / "data"), "--out", str(out)], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
