"""gfm_fast.eval: protocols against hand computations, the pipeline on images the tests make, the cache,
the baselines, every bad-input error and the CLI end to end (tiny random-init Swin, CPU)."""
import io
import json
import math
import os
import tarfile
import time

import numpy as np
import pytest
import tifffile
import timm
import torch
from PIL import Image
from timm.models.swin_transformer import SwinTransformer

import gfm_fast
import gfm_fast.eval.cache as cache
import gfm_fast.eval.extraction as extraction
from gfm_fast.config import RunConfig, SwinConfig
from gfm_fast.errors import ConfigError, GFMError
from gfm_fast.eval import EvalError, evaluate, knn_accuracy, open_dataset
from gfm_fast.eval.__main__ import main
from gfm_fast.eval.models import random_baseline, resolve_models
from gfm_fast.eval.protocols import (WEIGHT_DECAYS, _fit_logistic, _logits, _span_basis, knn_predict, linear_probe_predict, macro_f1, majority_rate, stratified_folds,
                                     stratified_split)
from gfm_fast.models.io import save_model
from gfm_fast.models.swin import EncoderConfig, build_student, swin_kwargs

CLASSES = ("red_stripes", "green_checker", "blue_smooth", "gray_noise")
PER_CLASS = 12
QUIET = dict(progress=False, use_cache=False)


# --------------------------------------------------------------------------------------------
# Data and models made by the tests
# --------------------------------------------------------------------------------------------

def scene(kind: int, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) uint8 scene of class ``kind``: colour and texture differ between classes;
    size, brightness, phase and noise vary within a class."""
    height, width = (int(v) for v in rng.choice([48, 64, 80], size=2))
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.integers(0, 8)
    if kind == 0:
        texture, colour = ((y + phase) // 4 % 2), (200, 50, 40)
    elif kind == 1:
        texture, colour = (((y + phase) // 6 + (x + phase) // 6) % 2), (40, 180, 60)
    elif kind == 2:
        texture, colour = x / width, (40, 70, 200)
    else:
        texture, colour = rng.random((height, width)), (130, 130, 130)
    brightness = rng.uniform(0.8, 1.2)
    image = np.asarray(colour, np.float64) * brightness * (0.6 + 0.4 * texture[..., None])
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_scenes(root, labels_of=None, seed=0):
    """CLASSES x PER_CLASS scenes as PNG/JPEG under root/<class>/; ``labels_of`` maps the true
    class index of image i to the folder it goes to (shuffled labels)."""
    rng = np.random.default_rng(seed)
    for i in range(len(CLASSES) * PER_CLASS):
        kind = i % len(CLASSES)
        folder = CLASSES[labels_of[i]] if labels_of is not None else CLASSES[kind]
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(kind, rng)).save(root / folder / f"img{i:03d}.{'png' if i % 3 else 'jpg'}", quality=95)
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised tiny GFM Swin (64 px), saved as a model directory."""
    torch.manual_seed(0)
    return save_model(timm.create_model("gfm_swin_test_patch4_window2_64"), tmp_path_factory.mktemp("m") / "tiny")


# --------------------------------------------------------------------------------------------
# Protocols and metrics against hand computations
# --------------------------------------------------------------------------------------------

def test_knn_votes_match_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])  # norms differ: cosine only
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.2]])
    q = np.array([1.0, 0.2]) / math.hypot(1.0, 0.2)
    cos = {0: q[0], 1: q[1], 2: (q[0] + q[1]) / math.sqrt(2)}  # the 3 nearest: images 0, 2, 1
    for temperature in (0.5, 2.0):
        votes = [math.exp(cos[0] / temperature), math.exp(cos[2] / temperature) + math.exp(cos[1] / temperature)]
        expected = int(np.argmax(votes))
        got = knn_predict(train, labels, query, 2, k=3, temperature=temperature)
        assert got.tolist() == [expected]
    # T = 0.5: the single nearest neighbour outweighs two; T = 2: two votes of class 1 win.
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.5).tolist() == [0]
    assert knn_predict(train, labels, query, 2, k=3, temperature=2.0).tolist() == [1]
    assert knn_predict(train, labels, query, 2, k=1).tolist() == [0]
    assert knn_predict(train, labels, query, 2, k=100, temperature=100.0).tolist() == [1]  # k capped at 4: 2 vs 2 votes, class 1 closer


def test_protocol_runner_passes_k_and_temperature_to_the_votes():
    """run_protocol (what evaluate and knn_accuracy score with) on the hand-computed example above:
    the query is class 1; T = 2 over 3 neighbours gets it right, T = 0.5 or k = 1 does not."""
    from gfm_fast.eval.runner import run_protocol

    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [1.0, 0.2]])
    labels = np.array([0, 1, 1, 0, 1])
    split = [(np.arange(4), np.array([4]))]

    def top1(k, temperature):
        return run_protocol("knn", features, labels, split, 2, k=k, temperature=temperature, seed=0,
                            device=torch.device("cpu")).top1

    assert (top1(3, 2.0), top1(3, 0.5), top1(1, 2.0)) == (1.0, 0.0, 0.0)


def test_linear_probe_standardises_with_the_training_fold_only(monkeypatch):
    """Every fit sees features standardised by the training fold's own mean and std (computed here
    in float64): test features far off that distribution must not shift them (no test leakage)."""
    import gfm_fast.eval.protocols as protocols

    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(60, 4, generator=gen) * 3 + 1, torch.randn(20, 4, generator=gen) * 10 + 50
    labels = torch.arange(60) % 2
    seen, real = [], protocols._fit_logistic
    monkeypatch.setattr(protocols, "_fit_logistic", lambda x, *a, **k: seen.append(x) or real(x, *a, **k))
    linear_probe_predict(train, labels, test, 2, seed=0)
    x = train.double().numpy()
    standardised = torch.from_numpy((x - x.mean(0)) / x.std(0)).float()
    final = seen[-1]  # the refit on the whole training fold (60 images > 4 features: no span basis)
    torch.testing.assert_close(final, standardised, rtol=1e-4, atol=1e-5)


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 4
    labels = torch.arange(3).repeat_interleave(30)
    features = centres[labels] + torch.randn(90, 16, generator=gen)
    test = torch.arange(90) % 3 == 0
    predicted, decay = linear_probe_predict(features[~test], labels[~test], features[test], 3, seed=0)
    assert (predicted == labels[test]).float().mean().item() == 1.0
    assert decay == max(WEIGHT_DECAYS)  # every penalty separates the held-out part: the tie goes to the strongest
    # Labels no linear map of the features explains: the probe cannot generalise.
    shuffled = labels[torch.randperm(90, generator=gen)]
    predicted, _ = linear_probe_predict(features[~test], shuffled[~test], features[test], 3, seed=0)
    assert (predicted == shuffled[test]).float().mean().item() < 0.7


def test_linear_probe_in_the_span_of_the_training_features_is_exact():
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(12, 40, generator=gen), torch.randn(5, 40, generator=gen)
    labels = torch.arange(12) % 3
    full = _fit_logistic(train, labels, 3, 0.1)
    basis = _span_basis(train)
    reduced = _fit_logistic(train @ basis, labels, 3, 0.1)
    assert basis.shape == (40, 12)
    torch.testing.assert_close(_logits(reduced, test @ basis), _logits(full, test), atol=2e-4, rtol=1e-3)


def test_stratified_folds_keep_proportions_and_are_seeded():
    labels = np.repeat([0, 1, 2], [30, 20, 10])
    folds = stratified_folds(labels, 5, seed=3)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(60))  # every image tested exactly once
    for train, test in folds:
        assert np.bincount(labels[test]).tolist() == [6, 4, 2]
        assert not set(train) & set(test) and len(train) + len(test) == 60
    again = stratified_folds(labels, 5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = stratified_folds(labels, 5, seed=4)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    with pytest.raises(ValueError, match="too few"):
        stratified_folds(labels[:3], 5, seed=0)
    # Class sizes that 5 does not divide: the folds' sizes still differ by at most one.
    uneven = stratified_folds(np.repeat([0, 1, 2], 7), 5, seed=0)
    assert sorted(len(test) for _, test in uneven) == [4, 4, 4, 4, 5]


def test_stratified_split_holds_out_each_class():
    labels = np.repeat([0, 1, 2], [50, 30, 1])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test], minlength=3).tolist() == [10, 6, 0]  # a single image stays in training
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(81))
    assert np.array_equal(test, stratified_split(labels, 0.2, seed=0)[1])
    train, test = stratified_split(np.array([0, 0, 1, 1, 1]), 0.9, seed=0)  # rounds to all of each class
    assert len(train) == 2 and set(np.array([0, 0, 1, 1, 1])[train]) == {0, 1}  # one training image each


def test_metrics_match_hand_computation():
    truth, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # F1: class 0 = 2*1/(2+1+1), class 1 = 2*2/(4+1+0), class 2 = 0
    assert macro_f1(truth, predicted, 4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert majority_rate(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx(1 / 3)
    # A class only predicted, never true, counts with F1 0: (2/3 + 1 + 0) / 3
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 2, 1]), 3) == pytest.approx(5 / 9)


# --------------------------------------------------------------------------------------------
# The pipeline on made-up scenes
# --------------------------------------------------------------------------------------------

def test_random_init_knn_separates_colour_and_texture(scenes, tiny_model):
    report = evaluate(tiny_model, scenes, protocol="both", k=5, baseline_random=False, **QUIET)
    assert report.n_images == 48 and report.classes == sorted(CLASSES)
    knn = report.models[0].protocols["knn"]
    assert knn.top1 >= 0.9 and knn.macro_f1 >= 0.9  # chance is 0.25
    assert knn.n_test == 48 and len(knn.folds) == 5 and knn.majority_rate == pytest.approx(0.25, abs=0.05)
    assert report.models[0].protocols["linear"].top1 >= 0.8
    assert np.array(knn.confusion).sum() == 48


def test_shuffled_labels_are_near_chance(tmp_path, tiny_model):
    rng = np.random.default_rng(1)
    folders = rng.permutation(np.arange(len(CLASSES) * PER_CLASS) % len(CLASSES))
    report = evaluate(tiny_model, write_scenes(tmp_path / "shuffled", folders), protocol="knn", k=5,
                      baseline_random=False, **QUIET)
    assert report.models[0].protocols["knn"].top1 <= 0.45


def test_random_baseline_is_seeded_and_same_architecture(scenes, tiny_model):
    report = evaluate(tiny_model, scenes, protocol="knn", **QUIET)
    assert [m.kind for m in report.models] == ["model", "random-init"]
    assert report.models[1].architecture == report.models[0].architecture == "gfm_swin_test_patch4_window2_64"
    model = resolve_models([tiny_model])[0]
    state = torch.get_rng_state()
    first, again, other = (random_baseline(model, seed).encoder.state_dict() for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["layers.0.blocks.0.attn.qkv.weight"], other["layers.0.blocks.0.attn.qkv.weight"])
    assert first.keys() == model.encoder.state_dict().keys()


def test_two_models_one_table(scenes, tiny_model, tmp_path):
    torch.manual_seed(1)
    other = save_model(timm.create_model("gfm_swin_test_patch4_window2_64"), tmp_path / "run_b" / "model")
    report = evaluate([tiny_model, other, tiny_model], scenes, protocol="knn", **QUIET)
    assert [m.label for m in report.models] == ["tiny #1", "run_b/model", "tiny #2", "random-init"]
    assert report.models[0].protocols["knn"].confusion == report.models[2].protocols["knn"].confusion
    assert report.models[1].source == str(other)  # one random-init for the one architecture


def test_one_random_baseline_per_architecture(scenes, tiny_model, tmp_path):
    wider = SwinConfig(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2, img_size=64)
    other = save_model(build_student(wider), tmp_path / "wide")
    report = evaluate([tiny_model, other], scenes, protocol="knn", **QUIET)
    assert [(m.kind, m.feature_dim) for m in report.models] == [("model", 128), ("model", 192), ("random-init", 128),
                                                               ("random-init", 192)]
    assert report.models[2].label == "random-init gfm_swin_test_patch4_window2_64"
    assert report.models[3].label.startswith("random-init gfm_swin_custom")


def test_stage_and_image_size(scenes, tiny_model):
    report = evaluate(tiny_model, scenes, protocol="knn", stage=1, image_size=96, baseline_random=False, **QUIET)
    model = report.models[0]
    assert model.feature_dim == 32 and model.image_size == 96 and model.stage.startswith("stage 1")
    last = evaluate(tiny_model, scenes, protocol="knn", stage=-1, baseline_random=False, **QUIET).models[0]
    assert last.feature_dim == 128 and last.stage == "last (pooled)"


def test_eval_features_are_extract_features_of_the_files(tmp_path, tiny_model):
    """The images evaluate scores, at the model's own size (no resize): the pooled feature and a
    stage's spatial mean equal what extract_features gives for the same files."""
    from gfm_fast.eval.extraction import compute_features, prepared_batches

    rng = np.random.default_rng(3)
    for i in range(6):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    dataset = open_dataset(tmp_path)
    encoder = gfm_fast.load_model(tiny_model)
    files = [sample.path for sample in dataset.samples]
    references = {None: gfm_fast.extract_features(tiny_model, files),
                  1: gfm_fast.extract_features(tiny_model, files, stages=[1])[1].mean(dim=(2, 3))}
    for stage, reference in references.items():
        got = compute_features(encoder, prepared_batches(dataset, encoder.gfm_config, 64, 4), stage,
                               torch.device("cpu"))
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5, msg=f"stage {stage}")


def test_cache_second_run_skips_extraction(scenes, tiny_model, tmp_path, monkeypatch):
    first = evaluate(tiny_model, scenes, protocol="knn", cache_dir=tmp_path, progress=False)
    assert not any(m.cached for m in first.models)

    def fail(*args, **kwargs):
        raise AssertionError("features were extracted although the cache holds them")

    monkeypatch.setattr(extraction, "compute_features", fail)
    second = evaluate(tiny_model, scenes, protocol="knn", cache_dir=tmp_path, progress=False)
    assert all(m.cached for m in second.models)
    assert [m.protocols["knn"].confusion for m in second.models] == [m.protocols["knn"].confusion for m in first.models]
    for other in ({"image_size": 96}, {"stage": 1}):  # other settings: another key, never the cached features
        with pytest.raises(AssertionError, match="extracted"):
            evaluate(tiny_model, scenes, protocol="knn", cache_dir=tmp_path, progress=False, **other)


def test_a_cache_that_cannot_be_written_is_a_warning(scenes, tiny_model, tmp_path):
    """The default cache lives in the home directory, read-only on some clusters and containers: the
    evaluation still finishes (after minutes of extraction), uncached, and says so."""
    (tmp_path / "home").write_text("")  # a file where the cache's folder would go
    reference = evaluate(tiny_model, scenes, protocol="knn", progress=False, use_cache=False)
    with pytest.warns(UserWarning, match="cannot be written"):
        report = evaluate(tiny_model, scenes, protocol="knn", cache_dir=tmp_path / "home" / "cache", progress=False)
    assert [m.protocols["knn"].confusion for m in report.models] == \
        [m.protocols["knn"].confusion for m in reference.models]


def test_the_cache_removes_what_a_killed_write_left(tmp_path):
    """A SIGKILL between a write's temporary file and its rename leaves a whole feature matrix
    behind; the next write removes such files once they are old enough not to be another
    evaluation's write in progress."""
    killed, in_progress = tmp_path / ".aaa.x1.tmp", tmp_path / ".bbb.x2.tmp"
    for path in (killed, in_progress):
        path.write_bytes(b"partial")
    os.utime(killed, (time.time() - 2 * cache.STALE_TEMPORARY_S,) * 2)
    cache.FeatureCache(tmp_path).save("ccc", torch.ones(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bbb.x2.tmp", "ccc.pt"]


def test_knn_accuracy_for_training_loop(scenes, tiny_model):
    encoder = gfm_fast.load_model(tiny_model).train()
    accuracy = knn_accuracy(encoder, scenes, k=5)
    report = evaluate(tiny_model, scenes, protocol="knn", k=5, baseline_random=False, **QUIET)
    assert accuracy == pytest.approx(report.models[0].protocols["knn"].top1)
    assert encoder.training  # its mode is restored
    assert knn_accuracy(encoder, open_dataset(scenes), k=5) == pytest.approx(accuracy)


def test_lazy_public_entry():
    assert gfm_fast.evaluate is evaluate


# --------------------------------------------------------------------------------------------
# Layouts: split files, shards, multi-band TIFF, teacher baseline
# --------------------------------------------------------------------------------------------

def test_shipped_split_files_are_used(tmp_path, tiny_model):
    root = write_scenes(tmp_path / "split")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("img*"))
    (root / "train.txt").write_text("\n".join(names[::2]) + "\n")
    (root / "test.txt").write_text("\n".join(n.split("/")[1] for n in names[1::2][:10]) + "\n")  # bare names work
    report = evaluate(tiny_model, root, protocol="knn", baseline_random=False, **QUIET)
    knn = report.models[0].protocols["knn"]
    assert (knn.n_train, knn.n_test, len(knn.folds)) == (24, 10, 1) and "shipped split" in report.split
    (root / "val.txt").write_text("\n".join(names[1::2][10:14]) + "\n")  # a shipped val split is training data
    train, test = open_dataset(root).split
    assert (len(train), len(test)) == (28, 10)
    (root / "val.txt").write_text(names[1] + "\n")  # also in test.txt
    with pytest.raises(EvalError, match="split files list 1 image.s. in both train and test"):
        open_dataset(root)
    (root / "val.txt").unlink()
    (root / "test.txt").unlink()
    with pytest.raises(EvalError, match="not both a train and a test"):
        open_dataset(root)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_labelled_shards(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        buffer = io.BytesIO()
        Image.fromarray(scene(i % 2, rng)).save(buffer, format="PNG")
        samples.append((f"s{i:03d}.png", buffer.getvalue()))
        label = (f"s{i:03d}.cls", str(i % 2).encode()) if i % 3 else \
            (f"s{i:03d}.json", json.dumps({"label": str(i % 2)}).encode())
        samples.append(label)
    samples += [("flat.png", samples[0][1]), ("flat.json", b'{"label": null}')]
    _tar(tmp_path / "shard-0.tar", samples)
    dataset = open_dataset(str(tmp_path / "shard-0.tar"))
    assert (len(dataset), dataset.classes, dataset.skipped_unlabelled) == (24, ["0", "1"], 1)
    report = evaluate(tiny_model, str(tmp_path / "shard-0.tar"), protocol="knn", k=5, baseline_random=False, **QUIET)
    assert report.models[0].protocols["knn"].top1 >= 0.9


def test_embedded_sample_folders_and_shards_agree(tiny_model):
    """The sample's neon_sites/<site>/ folders and its shards (json labels) are the same 24 images."""
    from gfm_fast.data.shards import SAMPLE_SHARDS_DIR

    folders = evaluate(tiny_model, SAMPLE_SHARDS_DIR.parent / "images" / "neon_sites", protocol="knn",
                       baseline_random=False, **QUIET)
    shards = evaluate(tiny_model, str(SAMPLE_SHARDS_DIR), protocol="knn", baseline_random=False, **QUIET)
    assert folders.class_counts == shards.class_counts == {"OSBS": 4, "SOAP": 8, "YELL": 12}
    assert shards.skipped_unlabelled == 10  # the flat neon_yell source has no labels
    assert folders.models[0].protocols["knn"].confusion == shards.models[0].protocols["knn"].confusion


def test_multiband_tiffs_and_teacher_baseline(tmp_path):
    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=2, img_size=64,
                      in_chans=4)
    student = build_student(swin)
    student.gfm_config = EncoderConfig(swin, (0.1,) * 4, (0.05,) * 4)
    model = save_model(student, tmp_path / "ms")
    rng = np.random.default_rng(0)
    for i in range(20):
        level = 3000 if i % 2 else 9000  # the classes differ in reflectance
        bands = rng.normal(level, 300, (4, 40, 56)).clip(0, 65535).astype(np.uint16)
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "data" / f"c{i % 2}" / f"{i}.tif", bands, photometric="minisblack",
                         planarconfig="separate")
    teacher_cfg = SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=3, img_size=96)
    teacher = SwinTransformer(**{**swin_kwargs(teacher_cfg), "num_classes": 5})  # a plain timm Swin with a head
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    report = evaluate(model, tmp_path / "data", protocol="knn", k=3, teacher=tmp_path / "teacher.pth",
                      teacher_bands=(2, 1, 0), **QUIET)
    assert [m.kind for m in report.models] == ["model", "random-init", "teacher"]
    assert report.models[2].image_size == 96 and report.models[0].image_size == 64
    assert all(m.protocols["knn"].top1 >= 0.9 for m in report.models)


# --------------------------------------------------------------------------------------------
# Bad input: one-line EvalError (a GFMError) each
# --------------------------------------------------------------------------------------------

def test_empty_and_single_class_folders(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="has no labelled images"):
        evaluate(tiny_model, tmp_path / "empty", **QUIET)
    (tmp_path / "one" / "forest").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "one" / "forest" / "a.png")
    with pytest.raises(EvalError, match=r"single class \(forest\)"):
        evaluate(tiny_model, tmp_path / "one", **QUIET)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tiny_model, tmp_path / "missing", **QUIET)


def test_unreadable_image_is_named(tmp_path, tiny_model):
    root = write_scenes(tmp_path / "broken")
    (root / CLASSES[0] / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(EvalError, match=r"cannot read image .*damaged\.png"):
        evaluate(tiny_model, root, **QUIET)


def test_not_a_gfm_model(tmp_path, scenes):
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    for path in (tmp_path / "notes.txt", tmp_path / "other.pth", tmp_path / "nothing"):
        with pytest.raises(EvalError, match=r"(cannot load it as a GFM model|does not exist)") as info:
            evaluate(path, scenes, **QUIET)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_stage_that_does_not_exist(scenes, tiny_model):
    with pytest.raises(EvalError, match=r"--stage 4 does not exist: .* has 4 stages"):
        evaluate(tiny_model, scenes, stage=4, **QUIET)
    with pytest.raises(EvalError, match="multiple of the model's stride 32"):
        evaluate(tiny_model, scenes, image_size=50, **QUIET)


def test_eval_error_is_a_gfm_error():
    assert issubclass(EvalError, GFMError)


def test_run_config_eval_keys():
    RunConfig(eval_data="/data/ucm", eval_every=500).validate()
    RunConfig().validate()  # off by default
    with pytest.raises(ConfigError, match="run.eval_data"):
        RunConfig(eval_every=100).validate()
    with pytest.raises(ConfigError, match="run.eval_every"):
        RunConfig(eval_every=-1).validate()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def test_cli_writes_json_markdown_and_png(scenes, tiny_model, tmp_path, capsys):
    out = tmp_path / "report" / "ucm.json"
    code = main(["--model", str(tiny_model), "--data", str(scenes), "--json", str(out), "--folds", "3",
                 "--k", "5", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [m["kind"] for m in report["models"]] == ["model", "random-init"]
    knn = report["models"][0]["protocols"]["knn"]
    assert knn["top1"] >= 0.9 and len(knn["folds"]) == 3 and set(report["models"][0]["protocols"]) == {"knn", "linear"}
    markdown = out.with_suffix(".md").read_text()
    assert "| model | kind | protocol |" in markdown and "## Per fold" in markdown
    pngs = sorted(out.parent.glob("ucm.confusion.*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as image:
        assert image.format == "PNG" and image.width > 100
    printed = capsys.readouterr().out
    assert "top1" in printed and "tiny" in printed and str(out) in printed


@pytest.mark.parametrize("case", ["empty", "folds", "stage", "model", "device", "json"])
def test_cli_bad_input_is_one_line_exit_2(case, scenes, tmp_path, tiny_model, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    args = {"empty": ["--data", str(tmp_path / "empty")], "folds": ["--folds", "1"], "stage": ["--stage", "-5"],
            "model": ["--model", str(tmp_path / "empty")], "device": ["--device", "gpu"],
            "json": ["--json", str(tmp_path / "a_file" / "eval.json")]}[case]
    code = main(["--model", str(tiny_model), "--data", str(scenes), "--no-progress", "--no-cache"] + args)
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error
