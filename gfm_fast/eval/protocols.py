"""Evaluation protocols on frozen features, the seeded stratified splits they run on, and metrics.

* k-NN (DINO's weighted k-NN classifier): features are L2-normalised, a test image's ``k`` most
  cosine-similar training images vote for their class with weight ``exp(similarity / T)``; the
  class with the largest total wins (ties: the lower class index).
* Linear probe: multinomial logistic regression on the frozen features (standardised with the
  training fold's mean and std), fitted full-batch with L-BFGS; the L2 weight decay is chosen
  from ``WEIGHT_DECAYS`` by accuracy on a stratified held-out part of the training fold
  (``VALIDATION_FRACTION``), then the probe is refitted on the whole training fold. With fewer
  images than features the fit runs, exactly, in the span of the training features (see
  ``_span_basis``), which makes the probe on a few hundred images take seconds on a CPU.
* Splits: a set smaller than ``SMALL_SET`` images gets a seeded stratified k-fold (every image is
  tested once, so the figure is not one lucky split); a larger one a seeded stratified train/test
  split (``TEST_FRACTION``).
"""
from __future__ import annotations

import contextlib

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SMALL_SET", "TEST_FRACTION", "WEIGHT_DECAYS", "stratified_folds", "stratified_split", "knn_predict",
           "linear_probe_predict", "top1", "macro_f1", "majority_rate", "confusion_matrix"]

SMALL_SET = 1000  # images; below this a k-fold, from this on one train/test split
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # linear probe L2 penalty grid (on standardised features)
DEFAULT_WEIGHT_DECAY = 1e-2  # when the training fold is too small to hold any part out
LBFGS_ITERATIONS = 200
SINGLE_THREAD_WORK = 1 << 24  # training features x classes below which the probe runs on one CPU thread
Split = Tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Seeded stratified splits
# --------------------------------------------------------------------------------------------

def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> List[Split]:
    """``folds`` (train indices, test indices) pairs; every index is tested exactly once.

    Each class's images are shuffled (seeded) and dealt round-robin over the folds, continuing
    where the previous class stopped, so every fold keeps the class proportions (to within one
    image per class) and the folds' sizes differ by at most one.
    """
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(labels) < folds:
        raise ValueError(f"{len(labels)} images are too few for {folds} folds; use fewer folds")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    everything = np.arange(len(labels))
    return [(everything[fold_of != f], everything[fold_of == f]) for f in range(folds)]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Split:
    """One seeded (train indices, test indices) split holding out ``test_fraction`` of every class
    (rounded; a class keeps at least one training image)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = min(int(round(len(members) * test_fraction)), len(members) - 1)
        test.append(members[:held])
        train.append(members[held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------------------------
# Classifiers
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, *,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN predictions (see the module docstring).

    Args:
        train: (N, D) training features; train_labels: (N,) class indices.
        test: (M, D) features to classify.
        num_classes: number of classes.
        k: neighbours (capped at N).
        temperature: T in exp(similarity / T); small T lets the nearest neighbours dominate.
        chunk: test rows per similarity matrix (bounds memory to chunk x N).

    Returns:
        (M,) predicted class indices.
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    train = F.normalize(train.float(), dim=1)
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], chunk):
        query = F.normalize(test[start:start + chunk].float(), dim=1)
        similarity, neighbours = (query @ train.T).topk(k, dim=1)  # (m, k) cosine similarities
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels.to(weights.device)[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                  start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(D + 1, C) weights (last row: bias) minimising cross-entropy + weight_decay / 2 * |W|^2,
    from ``start`` (a previous solution: warm start) or zeros."""
    weights = (start.clone() if start is not None else
               torch.zeros(x.shape[1] + 1, num_classes, dtype=x.dtype, device=x.device)).requires_grad_(True)
    inputs = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=LBFGS_ITERATIONS, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weights, y) + 0.5 * weight_decay * weights[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach()


def _logits(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ weights[:-1] + weights[-1]


def _span_basis(x: torch.Tensor) -> torch.Tensor:
    """(D, r) orthonormal basis of the span of the rows of ``x`` (r = rank <= N).

    With an L2 penalty the optimal weights lie in that span (representer theorem), so fitting on
    ``x @ basis`` (N x r) gives exactly the same logits as on ``x``, with r << D parameters per
    class on small sets (a few hundred images, 1024 features).
    """
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    rank = int((singular > singular.max() * 1e-6).sum())
    return vh[:rank].T


@contextlib.contextmanager
def _cpu_threads_for(work: int, device: torch.device) -> Iterator[None]:
    """One CPU thread for a small probe: on matrices this small, waking and syncing intra-op threads
    costs more than the arithmetic (measured: a 5-fold probe on 24 images took 1.9 s on one thread
    and 28 s on two, on a busy 2-core machine)."""
    if device.type != "cpu" or work >= SINGLE_THREAD_WORK:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def linear_probe_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, *,
                         seed: int = 0, weight_decays: Tuple[float, ...] = WEIGHT_DECAYS
                         ) -> Tuple[torch.Tensor, float]:
    """Linear-probe predictions (see the module docstring).

    Args:
        train: (N, D) training features; train_labels: (N,) class indices.
        test: (M, D) features to classify.
        num_classes: number of classes.
        seed: seed of the held-out part used to choose the weight decay.
        weight_decays: the candidate L2 penalties.

    Returns:
        (M,) predicted class indices, and the chosen weight decay.
    """
    with _cpu_threads_for(train.numel() * num_classes, train.device):
        return _linear_probe(train, train_labels, test, num_classes, seed, weight_decays)


def _linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, seed: int,
                  weight_decays: Tuple[float, ...]) -> Tuple[torch.Tensor, float]:
    mean, std = train.float().mean(dim=0), train.float().std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train, x_test = (train.float() - mean) / std, (test.float() - mean) / std
    y_train = train_labels.to(train.device)
    fit, held = stratified_split(y_train.cpu().numpy(), VALIDATION_FRACTION, seed)
    chosen = DEFAULT_WEIGHT_DECAY
    if len(held):
        fit, held = torch.from_numpy(fit).to(train.device), torch.from_numpy(held).to(train.device)
        x_fit = x_train[fit]
        if x_fit.shape[0] < x_fit.shape[1]:
            basis = _span_basis(x_fit)
            x_fit, x_held = x_fit @ basis, x_train[held] @ basis
        else:
            x_held = x_train[held]
        best, weights = -1.0, None
        for decay in sorted(weight_decays, reverse=True):  # strong to weak: each fit warm-starts the next
            weights = _fit_logistic(x_fit, y_train[fit], num_classes, decay, start=weights)
            accuracy = (_logits(weights, x_held).argmax(1) == y_train[held]).float().mean().item()
            if accuracy > best:  # ties go to the stronger penalty
                best, chosen = accuracy, decay
    if x_train.shape[0] < x_train.shape[1]:
        basis = _span_basis(x_train)
        x_train, x_test = x_train @ basis, x_test @ basis
    weights = _fit_logistic(x_train, y_train, num_classes, chosen)
    return _logits(weights, x_test).argmax(dim=1), chosen


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth), np.asarray(predicted)), 1)
    return matrix


def top1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.asarray(truth) == np.asarray(predicted))) if len(truth) else float("nan")


def macro_f1(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that occur in truth or predictions."""
    matrix = confusion_matrix(truth, predicted, num_classes)
    tp = np.diag(matrix).astype(np.float64)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    if not present.any():
        return float("nan")
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def majority_rate(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy on the test labels of always answering the training fold's most frequent class."""
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return top1(test_labels, np.full(len(test_labels), majority))
