"""Metrics: the vectorised patient bootstrap equals scikit-learn on each materialised resample."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from marrowlens.probes.metrics import (
    bootstrap_metrics,
    expected_calibration_error,
    interval,
    metrics_with_ci,
    point_metrics,
    resample_counts,
    roc_auc_ovr,
)


def _case(n_classes: int, seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    n, n_groups = 240, 24
    groups = np.array([f"p{i:02d}" for i in rng.integers(0, n_groups, n)])
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1, (n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    if ties:
        logits = np.round(logits)
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba, groups


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_each_resample_equals_sklearn_on_the_materialised_resample(n_classes: int, ties: bool) -> None:
    y, proba, groups = _case(n_classes, seed=n_classes, ties=ties)
    ids, g = np.unique(groups, return_inverse=True)
    counts = resample_counts(len(ids), 6, seed=1)
    boot = bootstrap_metrics(y, proba, groups, n_boot=6, counts=counts)
    for b in range(6):
        take = np.repeat(np.arange(len(y)), counts[b][g].astype(int))
        yb, pb = y[take], proba[take]
        pred = pb.argmax(axis=1)
        assert boot["accuracy"][b] == pytest.approx(accuracy_score(yb, pred))
        assert boot["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pred))
        assert boot["macro_f1"][b] == pytest.approx(f1_score(yb, pred, average="macro", zero_division=0))
        assert boot["ece"][b] == pytest.approx(expected_calibration_error(yb, pb, 15))
        assert boot["roc_auc_ovr"][b] == pytest.approx(roc_auc_ovr(yb, pb))


def test_auc_of_two_classes_is_the_usual_auc() -> None:
    y, proba, _ = _case(2, seed=5, ties=False)
    assert roc_auc_ovr(y, proba) == pytest.approx(roc_auc_score(y, proba[:, 1]))


def test_auc_skips_a_class_missing_from_the_truth() -> None:
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert roc_auc_ovr(y, proba) == pytest.approx(1.0)


def test_ece_by_hand() -> None:
    # two bins used: conf 0.9 (2 cells, 1 right) and 0.6 (2 cells, 2 right)
    y = np.array([0, 1, 0, 0])
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(y, proba, 10) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))


def test_interval_ignores_undefined_resamples() -> None:
    assert interval(np.array([np.nan, np.nan])) is None
    low, high = interval(np.r_[np.linspace(0, 1, 101), np.nan])
    assert low == pytest.approx(0.025) and high == pytest.approx(0.975)


def test_report_block_has_every_field() -> None:
    y, proba, groups = _case(3, seed=7, ties=False)
    block = metrics_with_ci(y, proba, groups, ["a", "b", "c"], n_boot=50)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece"):
        low, high = block[name]["ci"]
        assert low <= block[name]["value"] <= high or name == "ece"
    for cls in ("a", "b", "c"):
        assert set(block["per_class"][cls]) == {"precision", "recall", "f1", "support"}
        assert block["per_class"][cls]["f1"]["ci"] is not None
    assert np.asarray(block["confusion_matrix"]["matrix"]).sum() == len(y)
    assert block["bootstrap"]["unit"] == "patient" and block["n_groups"] == len(set(groups))
    assert point_metrics(y, proba, ["a", "b", "c"])["accuracy"] == block["accuracy"]["value"]
