"""Classifiers on frozen features for `mae eval`: DINO's weighted k-NN, a linear probe, and their metrics.

Pure functions on arrays (numpy; scikit-learn for the probe, imported when it runs), so a notebook can evaluate
any features with the same numbers `mae eval` reports. Labels are class indexes 0..C-1; every classifier returns
class scores [Q, C], and `rank_classes` orders them the one way everything here does (higher score first, equal
scores by lower class index), so a tie is decided the same in top-1, top-5 and the confusion matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mae.core.errors import MAEError, require
from mae.core.numerics import l2_normalize

SIMILARITY_BUDGET = 1 << 25  # entries of one [queries, train] similarity block (128 MiB of float32)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths the probe chooses from
HOLDOUT_FRACTION = 0.2  # of each class's train images, held out to choose C
TOP5_CLASSES = 5


def _check_labelled(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, num_classes: int) -> None:
    if train_x.ndim != 2 or query_x.ndim != 2 or train_x.shape[1] != query_x.shape[1]:
        raise MAEError(f"Features must be [N, D] and [Q, D] arrays, got {train_x.shape} and {query_x.shape}.")
    if train_y.shape != (len(train_x),):
        raise MAEError(f"{len(train_x)} train features but {train_y.shape} labels.")
    if len(train_x) == 0:
        raise MAEError("No train features to classify with.")
    if num_classes < 1 or train_y.min() < 0 or train_y.max() >= num_classes:
        raise MAEError(f"Labels must be class indexes in 0..{num_classes - 1}.")
    if not (np.isfinite(train_x).all() and np.isfinite(query_x).all()):
        raise MAEError("Features hold NaN or infinite values.", hint="check the model (e.g. fp16 overflow)")


# ------------------------------------------------------------------------------------------------------ k-NN
def top_k_indexes(similarity: np.ndarray, k: int) -> np.ndarray:
    """[Q, N] -> [Q, k]: the columns of the k largest values of each row, in no particular order.

    An equal value at the k-th place is decided by the lower column (train) index, so the neighbours do not
    depend on how a partial sort happens to order ties. A partial sort finds them (O(N) per row); only rows with
    such a tie are sorted in full.
    """
    count = similarity.shape[1]
    if k >= count:
        return np.broadcast_to(np.arange(count), (len(similarity), count)).copy()
    chosen = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(similarity, chosen, axis=1).min(axis=1)
    tied_at_kth = (similarity >= kth[:, None]).sum(axis=1) > k
    for row in np.flatnonzero(tied_at_kth):
        chosen[row] = np.argsort(-similarity[row], kind="stable")[:k]
    return chosen


def knn_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """DINO's weighted k-NN vote: class scores [Q, C] (float64) for each query row.

    Features are made unit length here (cosine similarity whatever the caller stored). For each query the k train
    rows of highest cosine s_j vote for their class with weight exp(s_j / T), and a class's score is the sum of
    its votes (DINO, `eval_knn.py`: T = 0.07, k = 20). Computed as exp((s_j - s_max) / T), i.e. DINO's weights
    divided by one positive number per query, so a small T cannot overflow while every ranking stays the same.
    Ties: see `top_k_indexes` (neighbours) and `rank_classes` (classes). `on_chunk(n)` after each n queries.
    """
    train = l2_normalize(np.asarray(train_x, np.float32))
    query = l2_normalize(np.asarray(query_x, np.float32))
    labels = np.asarray(train_y, np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
    _check_labelled(train, labels, query, num_classes)
    if not 1 <= k <= len(train):
        raise MAEError(f"k = {k} neighbours, with {len(train)} train images: need 1 <= k <= {len(train)}.")
    if not temperature > 0:
        raise MAEError(f"temperature = {temperature}: the vote's temperature must be > 0 (DINO uses 0.07).")
    scores = np.zeros((len(query), num_classes), np.float64)
    chunk = max(1, SIMILARITY_BUDGET // len(train))
    for start in range(0, len(query), chunk):
        similarity = query[start : start + chunk] @ train.T  # [q, N]
        neighbours = top_k_indexes(similarity, k)  # [q, k]
        nearest = np.take_along_axis(similarity, neighbours, axis=1).astype(np.float64)  # [q, k]
        weights = np.exp((nearest - nearest.max(axis=1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(start, start + len(similarity)), neighbours.shape[1])
        np.add.at(scores, (rows, labels[neighbours].ravel()), weights.ravel())
        if on_chunk is not None:
            on_chunk(len(similarity))
    return scores


# ------------------------------------------------------------------------------------------------ linear probe
@dataclass(frozen=True)
class Standardizer:
    """Each feature centred and scaled by the train set's mean and std: what MAE's BatchNorm without affine
    parameters computes at evaluation (its running statistics are the train set's), and what makes lbfgs converge
    on features whose scales differ by orders of magnitude."""

    mean: np.ndarray  # [D] float64
    std: np.ndarray  # [D] float64; 1 where a feature is constant (it becomes 0, not NaN)

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardizer:
        values = np.asarray(features, np.float64)
        std = values.std(axis=0)
        return cls(values.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) / self.std


@dataclass(frozen=True)
class LinearProbe:
    """What `linear_probe` found: the query scores and how the L2 strength was chosen."""

    scores: np.ndarray  # [Q, C] class probabilities of the model refit on all train rows
    c: float  # the chosen inverse L2 strength (scikit-learn's C)
    held_out: dict[float, float] | None  # held-out accuracy per C of the grid; None: too few images to hold any out
    held_out_images: int
    iterations: int  # lbfgs iterations of the final fit
    converged: bool  # every fit converged within max_iter

    def summary(self) -> dict[str, Any]:
        return {
            "C": self.c,
            "c_grid": sorted(self.held_out) if self.held_out else None,
            "held_out_images": self.held_out_images,
            "held_out_accuracy": None if self.held_out is None else {f"{c:g}": a for c, a in self.held_out.items()},
            "iterations": self.iterations,
            "converged": self.converged,
        }


def holdout_split(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(fit rows, held-out rows): `fraction` of each class held out at random (seeded), at least one image of
    each class kept for fitting, so both parts see every class the train set has."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = min(len(rows) - 1, int(round(len(rows) * fraction)))
        held.append(rows[:count])
        fit.append(rows[count:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def _fit(model: Any, features: np.ndarray, labels: np.ndarray) -> bool:
    """Fit in place; False when lbfgs stopped at max_iter (the solution is still used, and the report says so)."""
    exceptions = require("sklearn.exceptions", "search", "The linear probe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", exceptions.ConvergenceWarning)
        model.fit(features, labels)
    return not any(issubclass(w.category, exceptions.ConvergenceWarning) for w in caught)


def _probabilities(model: Any, features: np.ndarray, num_classes: int) -> np.ndarray:
    """[Q, C] over all C classes (scikit-learn's columns are only the classes it saw)."""
    scores = np.zeros((len(features), num_classes), np.float64)
    scores[:, model.classes_] = model.predict_proba(features)
    return scores


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float] = C_GRID,
    holdout: float = HOLDOUT_FRACTION,
    seed: int = 0,
    max_iter: int = 1000,
    on_fit: Callable[[], None] | None = None,
) -> LinearProbe:
    """A linear classifier on frozen features, torch-free: standardize, then multinomial logistic regression.

    MAE's linear probing (`main_linprobe.py`) trains BatchNorm(affine=False) + Linear with cross-entropy. At
    evaluation that BatchNorm is a fixed per-feature standardization with the train set's statistics
    (`Standardizer`), and the Linear + softmax + cross-entropy is multinomial logistic regression: the same
    model. We solve it as the convex problem it is (lbfgs, scikit-learn), which is deterministic and has no
    learning-rate schedule or epoch count to tune, leaving one hyperparameter, the L2 strength 1/C. As CLIP's
    linear-probe evaluation does, C is chosen on data the score never sees: `holdout` of each class of the train
    set is held out (seeded), every C of `c_grid` is fitted on the rest (smallest C first, each fit starting from
    the previous solution), the most accurate C wins (ties: the smaller C, the stronger regularization), and the
    probe is refit with it on all train rows. `on_fit()` after each fit.
    """
    linear_model = require("sklearn.linear_model", "search", "The linear probe")
    train = np.asarray(train_x, np.float32)
    query = np.asarray(query_x, np.float32)
    labels = np.asarray(train_y, np.int64)
    _check_labelled(train, labels, query, num_classes)
    if not c_grid or min(c_grid) <= 0:
        raise MAEError(f"c_grid {list(c_grid)} must hold positive inverse L2 strengths.")
    if len(np.unique(labels)) < 2:
        raise MAEError("The linear probe needs train images of at least two classes.")
    converged, held_out = True, None
    fit_rows, held_rows = holdout_split(labels, holdout, seed)
    chosen = float(sorted(c_grid)[len(c_grid) // 2])  # used only when nothing can be held out
    if len(held_rows) and len(np.unique(labels[fit_rows])) > 1:
        standardize = Standardizer.fit(train[fit_rows])
        fit_x, held_x = standardize(train[fit_rows]), standardize(train[held_rows])
        model = linear_model.LogisticRegression(max_iter=max_iter, warm_start=True, random_state=seed)
        held_out = {}
        for c in sorted(float(value) for value in c_grid):
            converged &= _fit(model.set_params(C=c), fit_x, labels[fit_rows])
            held_out[c] = float((model.predict(held_x) == labels[held_rows]).mean())
            if on_fit is not None:
                on_fit()
        chosen = max(held_out, key=lambda c: (held_out[c], -c))
    standardize = Standardizer.fit(train)
    final = linear_model.LogisticRegression(C=chosen, max_iter=max_iter, random_state=seed)
    converged &= _fit(final, standardize(train), labels)
    if on_fit is not None:
        on_fit()
    scores = _probabilities(final, standardize(query), num_classes)
    return LinearProbe(scores, chosen, held_out, len(held_rows), int(np.max(final.n_iter_)), converged)


# ------------------------------------------------------------------------------------------------------ metrics
def rank_classes(scores: np.ndarray) -> np.ndarray:
    """[Q, C] scores -> [Q, C] class indexes, best first; equal scores in class order (a stable sort)."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] int64: row = true class, column = predicted class, counts of query images."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5 (None with 5 classes or fewer: every label would be in the top 5), the accuracy of each class
    that has query images (None for the others), their mean (balanced accuracy) and the confusion matrix."""
    labels = np.asarray(labels, np.int64)
    ranked = rank_classes(scores)
    correct = ranked[:, 0] == labels
    matrix = confusion_matrix(labels, ranked[:, 0], len(class_names))
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(class_names):
        total = int(matrix[index].sum())
        per_class[name] = float(matrix[index, index] / total) if total else None
    present = [value for value in per_class.values() if value is not None]
    top5 = None
    if len(class_names) > TOP5_CLASSES:
        top5 = float((ranked[:, :TOP5_CLASSES] == labels[:, None]).any(axis=1).mean())
    return {
        "top1": float(correct.mean()) if len(labels) else None,
        "top5": top5,
        "mean_per_class": float(np.mean(present)) if present else None,
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }
