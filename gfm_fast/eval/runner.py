"""``evaluate``: k-NN and linear-probe accuracy of frozen GFM features, beside the baselines;
``knn_accuracy``: the one number a training loop logs every N steps."""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gfm_fast.eval.cache import FeatureCache, default_cache_dir
from gfm_fast.eval.datasets import EvalError, LabelledImages, open_dataset
from gfm_fast.eval.extraction import compute_features, input_size, model_features, prepared_batches
from gfm_fast.eval.models import EvalModel, encoder_of, load_teacher, random_baseline, resolve_models, resolve_stage
from gfm_fast.eval.protocols import (SMALL_SET, TEST_FRACTION, WEIGHT_DECAYS, Split, confusion_matrix, knn_predict,
                                     linear_probe_predict, macro_f1, majority_rate, stratified_folds, stratified_split,
                                     top1)
from gfm_fast.eval.report import EvalReport, FoldResult, ModelResult, ProtocolResult
from gfm_fast.features import check_device
from gfm_fast.models.swin import encoder_config_of

__all__ = ["evaluate", "knn_accuracy", "plan_splits", "PROTOCOLS"]

PROTOCOLS = ("knn", "linear")
PathLike = Union[str, os.PathLike]


def _protocols(protocol: str) -> List[str]:
    if protocol == "both":
        return list(PROTOCOLS)
    if protocol not in PROTOCOLS:
        raise EvalError(f"--protocol {protocol!r} is not one of knn, linear, both")
    return [protocol]


def _check_options(k: int, temperature: float, folds: int, batch_size: int) -> None:
    for option, value, minimum in (("--k", k, 1), ("--folds", folds, 2), ("--batch-size", batch_size, 1)):
        if value < minimum:
            raise EvalError(f"{option} {value} is too small; it must be at least {minimum}")
    if not temperature > 0:
        raise EvalError(f"--temperature {temperature} must be positive (DINO's k-NN uses 0.07)")


def plan_splits(dataset: LabelledImages, folds: int, seed: int) -> Tuple[List[Split], str]:
    """The (train, test) index pairs every model is scored on, and a sentence saying how they were chosen:
    shipped split files; else ``folds``-fold stratified cross-validation below ``SMALL_SET`` images;
    else one stratified train/test split."""
    if dataset.split is not None:
        train, test = dataset.split
        return [dataset.split], f"shipped split files (train {len(train)}, test {len(test)})"
    labels = dataset.labels
    if len(dataset) < SMALL_SET:
        try:
            splits = stratified_folds(labels, folds, seed)
        except ValueError as exc:
            raise EvalError(f"--folds {folds}: {exc}") from None
        return splits, f"{folds}-fold stratified cross-validation, seed {seed} (sets under {SMALL_SET} images)"
    return ([stratified_split(labels, TEST_FRACTION, seed)],
            f"stratified train/test split, {TEST_FRACTION:.0%} held out, seed {seed} (sets of {SMALL_SET}+ images)")


def run_protocol(name: str, features: torch.Tensor, labels: np.ndarray, splits: Sequence[Split], num_classes: int,
                 *, k: int, temperature: float, seed: int, device: torch.device) -> ProtocolResult:
    """Score one protocol on every split; pooled figures over all test predictions."""
    folds, truths, predictions = [], [], []
    for number, (train, test) in enumerate(splits):
        x_train, x_test = features[train].to(device), features[test].to(device)
        y_train = torch.from_numpy(labels[train]).to(device)
        decay = None
        if name == "knn":
            predicted = knn_predict(x_train, y_train, x_test, num_classes, k=k, temperature=temperature)
        else:
            predicted, decay = linear_probe_predict(x_train, y_train, x_test, num_classes, seed=seed + number)
        predicted = predicted.cpu().numpy()
        truth = labels[test]
        folds.append(FoldResult(number, top1(truth, predicted), macro_f1(truth, predicted, num_classes), len(train),
                                len(test), majority_rate(labels[train], truth), decay))
        truths.append(truth)
        predictions.append(predicted)
    truth, predicted = np.concatenate(truths), np.concatenate(predictions)
    n_test = len(truth)
    majority = sum(f.majority_rate * f.n_test for f in folds) / max(n_test, 1)
    return ProtocolResult(top1(truth, predicted), float(np.std([f.top1 for f in folds])),
                          macro_f1(truth, predicted, num_classes), int(round(np.mean([f.n_train for f in folds]))),
                          n_test, majority, folds, confusion_matrix(truth, predicted, num_classes).tolist())


def _default_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stage_name(stage: Optional[int]) -> str:
    return "last (pooled)" if stage is None else f"stage {stage} (mean over H, W)"


def _random_baselines(users: List[EvalModel], seed: int) -> List[EvalModel]:
    """One seeded random-init model per distinct architecture (and normalisation) among ``users``."""
    architectures, baselines = [], []
    for model in users:
        config = model.config
        if (config.swin, config.mean, config.std) not in architectures:
            architectures.append((config.swin, config.mean, config.std))
            baselines.append(random_baseline(model, seed))
    for baseline in baselines if len(baselines) > 1 else []:  # several: name them apart
        baseline.label = f"random-init {baseline.config.model_name}"
    return baselines


def evaluate(models: Union[Any, Sequence[Any]], data: Union[PathLike, LabelledImages], *, protocol: str = "both",
             stage: Optional[int] = None, image_size: Optional[int] = None, folds: int = 5, seed: int = 0,
             k: int = 20, temperature: float = 0.07, baseline_random: bool = True, teacher: Optional[PathLike] = None,
             teacher_bands: Sequence[int] = (0, 1, 2), cache_dir: Optional[PathLike] = None, use_cache: bool = True,
             batch_size: int = 64, device: Optional[Union[str, torch.device]] = None,
             progress: bool = True) -> EvalReport:
    """How good are a model's frozen features? k-NN and linear-probe scene classification.

    Args:
        models: one model or a list: paths ``gfm_fast.load_model`` reads (model, run or DeepSpeed
            directory, GFM release, Swin checkpoint) or encoders in memory (not cached).
        data: labelled images: a class-folder root (``root/<class>/<image>``, shipped
            ``train.txt``/``test.txt`` honoured) or WebDataset shards with ``cls``/``json`` labels.
        protocol: ``knn``, ``linear`` or ``both``.
        stage: the stage whose spatially averaged map is the feature (negative from the end);
            None: the last stage's pooled feature.
        image_size: resize every image to this side (default: each model's own input size).
        folds: k of the stratified k-fold used for sets under ``SMALL_SET`` images.
        seed: seeds the splits, the random-init baseline and the probe's held-out part.
        k, temperature: k-NN neighbours and the temperature of its exp(similarity / T) votes.
        baseline_random: also score a randomly initialised encoder of each architecture.
        teacher: also score a Swin checkpoint's own features (e.g. the ImageNet-22k teacher).
        teacher_bands: for multi-band models, the bands the teacher's RGB filters read.
        cache_dir: feature cache directory (default: ``default_cache_dir()``).
        use_cache: False: neither read nor write the cache.
        batch_size: images per forward pass.
        device: where encoders run (default CUDA when available); models in memory are moved there.
        progress: progress bars while extracting features.

    Returns:
        An :class:`EvalReport` (``to_dict()``, ``to_table()``, ``to_markdown()``, ``write(path)``).

    Raises:
        EvalError: empty or single-class data, an unreadable image, a file that is not a GFM model,
            a stage the model does not have, an option out of range (each a one-line message).
    """
    names = _protocols(protocol)
    _check_options(k, temperature, folds, batch_size)
    dataset = open_dataset(data)
    splits, split_text = plan_splits(dataset, folds, seed)
    users = resolve_models(models)
    evaluated = users + (_random_baselines(users, seed) if baseline_random else [])
    if teacher is not None:
        evaluated.append(load_teacher(teacher, users[0].config, teacher_bands))
    stages = [resolve_stage(stage, model) for model in evaluated]
    for model in evaluated:
        input_size(model.config, image_size)  # fail before any extraction
    device = _default_device(device)
    cache = FeatureCache((cache_dir if cache_dir is not None else default_cache_dir()) if use_cache else None)
    fingerprint = dataset.fingerprint()
    labels = dataset.labels
    results = []
    for model, model_stage in zip(evaluated, stages):
        features = model_features(model, dataset, data_fingerprint=fingerprint, stage=model_stage,
                                  image_size=image_size, batch_size=batch_size, device=device, cache=cache,
                                  progress=progress)
        result = ModelResult(model.label, model.kind, model.source, model.config.model_name, features.image_size,
                             _stage_name(model_stage), int(features.values.shape[1]), features.cached,
                             features.seconds)
        for name in names:
            result.protocols[name] = run_protocol(name, features.values, labels, splits, len(dataset.classes), k=k,
                                                  temperature=temperature, seed=seed, device=device)
        results.append(result)
    settings = {"protocols": ", ".join(names), "stage": "last (pooled)" if stage is None else stage,
                "image_size": image_size if image_size is not None else "each model's own",
                "k": k, "temperature": temperature, "folds": folds, "seed": seed, "device": str(device),
                "linear_probe_weight_decays": list(WEIGHT_DECAYS),
                "cache": str(cache.directory) if cache.directory is not None else "off"}
    return EvalReport(dataset.source, list(dataset.classes), dataset.class_counts(), len(dataset), split_text, settings,
                      results, dataset.skipped_unlabelled)


def knn_accuracy(model: Any, data: Union[PathLike, LabelledImages], *, k: int = 20, temperature: float = 0.07,
                 stage: Optional[int] = None, image_size: Optional[int] = None, folds: int = 5, seed: int = 0,
                 batch_size: int = 64, device: Optional[Union[str, torch.device]] = None) -> float:
    """k-NN top-1 of a model on a labelled set, uncached and without progress bars (for training logs).

    Args:
        model: an encoder, ``GFMStudent`` or ``GFMPretrainer`` (its training mode is restored), or a path.
        data: a class-folder root or shard spec, or a ``LabelledImages`` opened once with
            ``gfm_fast.eval.open_dataset`` (saves re-listing the files at every call).
        k, temperature, stage, image_size, folds, seed, batch_size: as in :func:`evaluate`.
        device: default: where the model's parameters are.

    Returns:
        top-1 accuracy in [0, 1] over the same splits :func:`evaluate` uses.
    """
    _check_options(k, temperature, folds, batch_size)
    dataset = open_dataset(data)
    splits, _ = plan_splits(dataset, folds, seed)
    if isinstance(model, (str, os.PathLike)):
        evaluated = resolve_models([model])[0]
    else:
        encoder = encoder_of(model)
        evaluated = EvalModel("model", "model", type(encoder).__name__, encoder_config_of(encoder), None,
                              lambda: encoder)
    picked = resolve_stage(stage, evaluated)
    size = input_size(evaluated.config, image_size)
    parameter = next(evaluated.encoder.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = check_device(device)
    batches = prepared_batches(dataset, evaluated.config, size, batch_size)
    features = compute_features(evaluated.encoder, batches, picked, torch.device(device))
    result = run_protocol("knn", features, dataset.labels, splits, len(dataset.classes), k=k,
                          temperature=temperature, seed=seed, device=torch.device(device))
    return result.top1
