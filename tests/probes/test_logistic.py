"""scikit-learn's linear probe (``LogisticProbe``): the estimator contract, C chosen on patient-grouped
inner folds by balanced accuracy, predictions equal to scikit-learn's, and which configs train it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from marrowlens.config import ProbeConfig
from marrowlens.probes.heads import LinearProbe, LogisticProbe, _inner_folds, head_for
from tests.probes.helpers import gaussian_classes

# The estimator checks that do not apply, and why. A probe's classes are labels of cells (strings or
# integers, always categorical): it does not refuse continuous targets as classes, and it reads rows
# block by block from memory maps without scikit-learn's input validation (NaN, sparse, object
# dtype, wrong feature counts are refused upstream: stores are checked finite when loaded).
NOT_APPLICABLE = {
    "check_classifiers_regression_target": "labels are cell classes; a numeric label is a class, not a target",
    "check_estimators_nan_inf": "stores are checked finite when loaded (load_embeddings(check_finite=True))",
    "check_estimator_sparse_array": "embeddings are dense float32 stores, never sparse",
    "check_estimator_sparse_matrix": "embeddings are dense float32 stores, never sparse",
    "check_n_features_in_after_fitting": "the store's dimension is checked against the model's when loaded",
    "check_fit2d_1sample": "a probe is fitted on a cohort, never on one cell",
    "check_complex_data": "embeddings are real float32",
    "check_requires_y_none": "a probe is supervised: fit without labels is not a use",
    "check_fit2d_predict1d": "rows are cells: a 1-d input is not a batch",
    "check_class_weight_classifiers": "class weights come from the config's imbalance setting: none or balanced",
}


def _expected_failures(estimator: Any) -> dict[str, str]:
    return NOT_APPLICABLE


@parametrize_with_checks([LogisticProbe()], expected_failed_checks=_expected_failures)
def test_scikit_learn_estimator_checks(estimator: Any, check: Any) -> None:
    """scikit-learn's own checks (clone, get/set_params, fit idempotence, pickling, classes_, predict
    shapes, decision_function against predict_proba, ...); those marked in NOT_APPLICABLE say why not."""
    check(estimator)


def _patients(n_patients: int, per_patient: int) -> np.ndarray:
    return np.repeat(np.arange(n_patients), per_patient)


def test_c_is_chosen_by_balanced_accuracy_on_patient_grouped_folds() -> None:
    rng = np.random.default_rng(0)
    X, y = gaussian_classes(400, 8, rng, separation=1.0)
    head = LogisticProbe(c_values=(1e-4, 1e-2, 1.0)).fit(X, y, groups=_patients(40, 10))
    state = head.fitted_state()
    assert state["C"] in (1e-4, 1e-2, 1.0) and state["selection"].startswith("balanced accuracy on 3 patient-grouped")
    assert state["C"] == float(max(state["scores"], key=state["scores"].__getitem__))
    assert state["converged"]


def test_inner_folds_keep_patients_apart_and_every_class_on_both_sides() -> None:
    codes = np.r_[np.zeros(100, dtype=np.int64), np.ones(60, dtype=np.int64)]
    groups = _patients(16, 10)
    folds = _inner_folds(codes, groups, 3, 0)
    assert len(folds) == 3
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(codes[train]) == set(codes[test]) == {0, 1}
    assert _inner_folds(codes, np.zeros(160), 3, 0) == []  # one patient: nothing to hold out


def test_too_few_patients_fit_the_middle_c_and_say_so() -> None:
    rng = np.random.default_rng(1)
    X, y = gaussian_classes(60, 4, rng)
    head = LogisticProbe(c_values=(0.001, 0.01, 0.1)).fit(X, y, groups=np.zeros(60))
    assert head.C_ == 0.01 and head.selection_.startswith("none: too few patients")


def test_predictions_are_scikit_learns() -> None:
    """The hand-written prediction (what a loaded probe uses) equals scikit-learn's own pipeline."""
    rng = np.random.default_rng(2)
    for n_classes in (2, 3):
        X, y = gaussian_classes(300, 6, rng, n_classes=n_classes, separation=1.5)
        head = LogisticProbe(class_weight="balanced", tol=1e-8, max_iter=1000).fit(X, y, groups=_patients(30, 10))
        reference = make_pipeline(
            StandardScaler(), LogisticRegression(C=head.C_, class_weight="balanced", tol=1e-8, max_iter=1000)
        ).fit(X.astype(np.float64), y)
        np.testing.assert_allclose(head.predict_proba(X), reference.predict_proba(X.astype(np.float64)), atol=1e-3)
        assert list(head.classes_) == list(reference.classes_)


def test_balanced_class_weights_raise_rare_class_recall() -> None:
    rng = np.random.default_rng(3)
    X, y = gaussian_classes(2000, 4, rng, separation=1.5, weights=[0.95, 0.05])
    Xt, yt = gaussian_classes(4000, 4, rng, separation=1.5, weights=[0.95, 0.05])
    groups = _patients(200, 10)
    plain = recall_score(yt, LogisticProbe().fit(X, y, groups).predict(Xt), pos_label="c1")
    balanced = recall_score(yt, LogisticProbe(class_weight="balanced").fit(X, y, groups).predict(Xt), pos_label="c1")
    assert balanced > plain + 0.2, (plain, balanced)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"linear": {"solver": "sklearn"}}, LogisticProbe),
        ({}, LinearProbe),  # a config saved before `solver` existed keeps the torch head it was trained with
        ({"linear": {"solver": "sklearn"}, "loss": {"name": "gce"}}, LinearProbe),
        ({"linear": {"solver": "sklearn"}, "loss": {"name": "focal"}}, LinearProbe),
        ({"linear": {"solver": "sklearn", "hidden_dim": 64}}, LinearProbe),
        ({"linear": {"solver": "sklearn"}, "imbalance": {"sampling": "balanced"}}, LinearProbe),
        ({"head": "logistic"}, LogisticProbe),
        ({"head": "knn"}, None),
    ],
)
def test_which_head_a_config_trains(settings: dict[str, Any], expected: type | None) -> None:
    """Plain-CE linear probes are scikit-learn's; torch keeps GCE/SCE/focal, the hidden layer and balanced sampling."""
    kind = head_for(ProbeConfig(**settings))
    assert kind is expected if expected is not None else kind.name == "knn"
