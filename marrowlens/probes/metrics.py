"""Classification metrics with 95% bootstrap intervals over patients.

Point estimates come from scikit-learn. The bootstrap is hand-written because calling
scikit-learn 1000 times per metric is slow on 100k cells: a resample of patients is a vector of
patient multiplicities, so every confusion-matrix metric of every resample is one matrix product
of those multiplicities with per-patient confusion counts, the ECE one product with per-patient
bin sums, and the ROC-AUC a weighted rank statistic over one fixed sort of the scores. The tests
check each resample against scikit-learn called with the same multiplicities as sample weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

CI_LEVEL = 0.95
SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


# ---------------------------------------------------------------- point estimates


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017); no sklearn equivalent."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def roc_auc_ovr(y: np.ndarray, proba: np.ndarray, sample_weight: np.ndarray | None = None) -> float | None:
    """Macro one-vs-rest ROC-AUC over the classes that have both positives and negatives.

    scikit-learn's multi-class form refuses a test set missing a class (common in small folds);
    averaging the per-class binary AUCs of the classes present is the same quantity otherwise.
    """
    scores = []
    for c in range(proba.shape[1]):
        positive = y == c
        weight = np.ones(len(y)) if sample_weight is None else sample_weight
        if weight[positive].sum() > 0 and weight[~positive].sum() > 0:
            scores.append(roc_auc_score(positive, proba[:, c], sample_weight=sample_weight))
    return float(np.mean(scores)) if scores else None


def point_metrics(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], ece_bins: int = 15) -> dict[str, Any]:
    """Every metric of the report for integer labels ``y`` and probabilities ``proba``."""
    pred = proba.argmax(axis=1)
    labels = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(y, pred))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "roc_auc_ovr": roc_auc_ovr(y, proba),
        "ece": expected_calibration_error(y, proba, ece_bins),
        "per_class": {
            str(name): {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": {
            "labels": [str(c) for c in classes],
            "matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        },
    }


# ---------------------------------------------------------------- bootstrap over patients


def resample_counts(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_groups)`` multiplicities: each row is one draw of patients with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 and per-class P/R/F1 of ``(B, C, C)`` confusion matrices.

    Conventions follow scikit-learn: balanced accuracy averages recall over classes with true
    cells; macro-F1 averages over classes that are true or predicted; 0 where undefined.
    """
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = true.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(true + predicted > 0, 2 * tp / (true + predicted), 0.0)
        has_true = true > 0
        balanced = (recall * has_true).sum(axis=1) / has_true.sum(axis=1)
        present = has_true | (predicted > 0)
        macro_f1 = (f1 * present).sum(axis=1) / present.sum(axis=1)
        accuracy = tp.sum(axis=1) / total
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _ece_from_bins(count: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.abs(correct - confidence)
        return np.asarray(gap.sum(axis=1) / count.sum(axis=1))


def _weighted_auc(weights: np.ndarray, positive: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Binary AUC for each row of ``weights`` (B x N), scores pre-sorted by ``order``, ties grouped.

    AUC = P(score_pos > score_neg) + P(tie) / 2, from weighted counts per tie group.
    """
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray((pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1)))


def bootstrap_metrics(
    y: np.ndarray,
    proba: np.ndarray,
    groups: np.ndarray,
    n_boot: int,
    seed: int = 0,
    ece_bins: int = 15,
    counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every summary metric for ``n_boot`` resamples of ``groups``: arrays of length ``n_boot``.

    ``counts`` (resamples x groups, in the order of ``np.unique(groups)``) overrides the random draw.
    """
    group_ids, g = np.unique(np.asarray(groups), return_inverse=True)
    n_groups, n_classes = len(group_ids), proba.shape[1]
    if counts is None:
        counts = resample_counts(n_groups, n_boot, seed)
    pred = proba.argmax(axis=1)
    per_group_cm = np.zeros((n_groups, n_classes * n_classes))
    np.add.at(per_group_cm, (g, y * n_classes + pred), 1)
    out = metrics_from_confusion((counts @ per_group_cm).reshape(-1, n_classes, n_classes))

    confidence = proba.max(axis=1)
    which = np.minimum((confidence * ece_bins).astype(int), ece_bins - 1)
    bins = np.zeros((3, n_groups, ece_bins))
    for k, value in enumerate((np.ones(len(y)), confidence, (pred == y).astype(float))):
        np.add.at(bins[k], (g, which), value)
    out["ece"] = _ece_from_bins(*(counts @ b for b in bins))

    aucs = []
    chunk = max(1, 20_000_000 // max(len(y), 1))
    for c in range(n_classes):
        positive = y == c
        if not positive.any() or positive.all():
            continue
        order = np.argsort(proba[:, c], kind="stable")
        sorted_scores = proba[order, c]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        aucs.append(
            np.concatenate(
                [
                    _weighted_auc(counts[i : i + chunk][:, g], positive, order, starts)
                    for i in range(0, len(counts), chunk)
                ]
            )
        )
    out["roc_auc_ovr"] = np.nanmean(np.vstack(aucs), axis=0) if aucs else np.full(len(counts), np.nan)
    return out


def interval(values: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """Percentile interval, ignoring resamples where the metric is undefined."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def metrics_with_ci(
    y: np.ndarray,
    proba: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    n_boot: int,
    seed: int = 0,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """:func:`point_metrics` with ``{"value", "ci"}`` for every summary and per-class metric."""
    point = point_metrics(y, proba, classes, ece_bins)
    boot = bootstrap_metrics(y, proba, groups, n_boot, seed, ece_bins) if n_boot > 0 and len(y) else None
    for name in SUMMARY:
        point[name] = {"value": point[name], "ci": interval(boot[name]) if boot is not None else None}
    for i, name in enumerate(classes):
        entry = point["per_class"][str(name)]
        for metric in ("precision", "recall", "f1"):
            entry[metric] = {"value": entry[metric], "ci": interval(boot[metric][:, i]) if boot is not None else None}
    point["n_groups"] = len(np.unique(groups))
    point["bootstrap"] = {"resamples": n_boot, "unit": "patient", "level": CI_LEVEL}
    return point
