"""Heads: the scikit-learn contract, learning, chance on shuffled labels, noise robustness, imbalance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

from marrowlens.probes.heads import KNNProbe, LinearProbe, LogisticProbe, as_rows
from marrowlens.probes.noise import NoiseSpec, inject_noise
from marrowlens.probes.tasks import RowView
from tests.probes.helpers import gaussian_classes, long_servedio

FAST = {"max_epochs": 40, "patience": 4}


def _heads() -> list:
    return [LinearProbe(**FAST), LinearProbe(hidden_dim=32, **FAST), KNNProbe(k=10), LogisticProbe()]


class TestScikitLearnContract:
    @pytest.mark.parametrize("head", _heads(), ids=["linear", "hidden", "knn", "logistic"])
    def test_clone_and_params(self, head) -> None:
        copy = clone(head)
        assert copy.get_params() == head.get_params()
        assert copy is not head

    @pytest.mark.parametrize("head", _heads(), ids=["linear", "hidden", "knn", "logistic"])
    def test_unfitted_head_refuses_to_predict(self, head) -> None:
        with pytest.raises(NotFittedError):
            head.predict_proba(np.zeros((2, 4), dtype=np.float32))

    @pytest.mark.parametrize("head", _heads(), ids=["linear", "hidden", "knn", "logistic"])
    def test_cross_val_predict_with_patient_groups(self, head) -> None:
        rng = np.random.default_rng(0)
        X, y = gaussian_classes(300, 8, rng, n_classes=3)
        groups = np.repeat(np.arange(30), 10)
        cv = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=0)
        proba = cross_val_predict(head, X, y, groups=groups, cv=cv, method="predict_proba", params={"groups": groups})
        assert proba.shape == (300, 3)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
        assert list(head.fit(X, y).classes_) == ["c0", "c1", "c2"]


class TestLearning:
    @pytest.mark.parametrize("head", _heads(), ids=["linear", "hidden", "knn", "logistic"])
    def test_well_above_chance_on_separable_classes(self, head) -> None:
        rng = np.random.default_rng(1)
        X, y = gaussian_classes(600, 16, rng, n_classes=3)
        Xt, yt = gaussian_classes(600, 16, rng, n_classes=3)
        assert (head.fit(X, y).predict(Xt) == yt).mean() > 0.95

    @pytest.mark.parametrize("head", _heads(), ids=["linear", "hidden", "knn", "logistic"])
    def test_at_chance_on_shuffled_labels(self, head) -> None:
        rng = np.random.default_rng(2)
        X, y = gaussian_classes(800, 16, rng)
        shuffled = rng.permutation(y)
        groups = np.repeat(np.arange(80), 10)
        cv = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0)
        pred = cross_val_predict(head, X, shuffled, groups=groups, cv=cv)
        assert 0.4 < balanced_accuracy_score(shuffled, pred) < 0.6

    def test_reads_memory_maps_and_row_views(self, tmp_path) -> None:
        rng = np.random.default_rng(3)
        X, y = gaussian_classes(400, 8, rng)
        np.save(tmp_path / "v.npy", X)
        mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
        rows = rng.permutation(400)[:300]
        view = RowView(mapped, rows)
        np.testing.assert_array_equal(as_rows(view), X[rows])
        a = LinearProbe(**FAST).fit(view, y[rows]).predict_proba(X[:50])
        b = LinearProbe(**FAST).fit(X[rows], y[rows]).predict_proba(X[:50])
        np.testing.assert_allclose(a, b, rtol=1e-5)


class TestLinearProbe:
    def test_grid_members_train_independently(self) -> None:
        """Training the weight-decay grid together gives each member what training it alone gives."""
        rng = np.random.default_rng(4)
        X, y = gaussian_classes(200, 6, rng)
        head = LinearProbe()
        head.classes_, head._class_weight_t = np.array(["c0", "c1"]), None
        x, t = torch.from_numpy(X), torch.from_numpy((y == "c1").astype(np.int64))
        rows = torch.arange(len(t))
        together = head._train(x, t, rows, [1e-3, 1e-1], 5, torch.Generator().manual_seed(0))
        alone = head._train(x, t, rows, [1e-1], 5, torch.Generator().manual_seed(0))
        for a, b in zip(together, alone):
            torch.testing.assert_close(a[1], b[0], rtol=1e-4, atol=1e-5)

    def test_weight_decay_is_chosen_on_held_out_patients(self) -> None:
        rng = np.random.default_rng(5)
        X, y = gaussian_classes(400, 8, rng)
        head = LinearProbe(weight_decays=(0.0, 1.0), **FAST).fit(X, y, groups=np.repeat(np.arange(40), 10))
        assert head.weight_decay_ in (0.0, 1.0) and len(head.val_losses_) == 2
        assert head.weight_decay_ == (0.0, 1.0)[int(np.argmin(head.val_losses_))]
        assert "held out" in head.validation_

    def test_validation_fold_holds_enough_of_every_class(self) -> None:
        codes = np.r_[np.zeros(90, dtype=np.int64), np.ones(10, dtype=np.int64)]
        groups = np.repeat(np.arange(10), 10)  # class 1 is one patient: no fold can hold it out and train on it
        assert LinearProbe()._validation_split(codes, groups)[1] is None
        groups = np.r_[np.repeat(np.arange(9), 10), np.arange(9, 19)]  # ten patients: two per fold, too few
        assert LinearProbe()._validation_split(codes, groups)[1] is None
        codes = np.r_[np.zeros(90, dtype=np.int64), np.ones(20, dtype=np.int64)]
        groups = np.r_[np.repeat(np.arange(9), 10), np.arange(9, 29)]  # twenty: four per fold
        train, val = LinearProbe()._validation_split(codes, groups)
        assert np.bincount(codes[val]).min() >= 3 and set(codes[train]) == {0, 1}
        assert not set(groups[train]) & set(groups[val])

    def test_saved_tensors_reload_to_the_same_predictions(self) -> None:
        rng = np.random.default_rng(6)
        X, y = gaussian_classes(300, 8, rng, n_classes=3)
        for hidden in (0, 16):
            head = LinearProbe(hidden_dim=hidden, **FAST).fit(X, y)
            again = LinearProbe.from_saved(head.get_params(), head.classes_, head.tensors())
            np.testing.assert_allclose(again.predict_proba(X), head.predict_proba(X), rtol=1e-6)

    @pytest.mark.parametrize("robust", ["gce", "sce"])
    def test_robust_losses_beat_ce_under_symmetric_noise(self, robust: str) -> None:
        """Long & Servedio's case: separable, but 20% symmetric noise drags CE's boundary through
        the 'penaliser' points (half the mass); the bounded losses keep it where it belongs."""
        gaps = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            X, y = long_servedio(1000, rng)
            Xt, yt = long_servedio(4000, rng)
            noisy = inject_noise(y, ["neg", "pos"], NoiseSpec(0.2, "symmetric", seed), np.arange(len(y)))
            accuracy = {
                loss: (LinearProbe(loss=loss, random_state=seed).fit(X, noisy).predict(Xt) == yt).mean()
                for loss in ("ce", robust)
            }
            assert accuracy["ce"] < 0.9 and accuracy[robust] >= accuracy["ce"], accuracy
            gaps.append(accuracy[robust] - accuracy["ce"])
        assert np.mean(gaps) > 0.15, gaps


class TestImbalance:
    @pytest.mark.parametrize(
        "params",
        [{"class_weight": "balanced"}, {"sampling": "balanced"}, {"loss": "focal", "class_weight": "balanced"}],
    )
    def test_rare_class_recall_improves(self, params: dict) -> None:
        rng = np.random.default_rng(7)
        X, y = gaussian_classes(2000, 4, rng, separation=1.5, weights=[0.95, 0.05])
        Xt, yt = gaussian_classes(4000, 4, rng, separation=1.5, weights=[0.95, 0.05])
        plain = recall_score(yt, LinearProbe(**FAST).fit(X, y).predict(Xt), pos_label="c1")
        handled = recall_score(yt, LinearProbe(**FAST, **params).fit(X, y).predict(Xt), pos_label="c1")
        assert handled > plain + 0.2, (plain, handled)

    def test_knn_class_weights_scale_votes(self) -> None:
        X = np.array([[1, 0], [1, 0.1], [1, -0.1], [0.9, 0.3]], dtype=np.float32)
        y = np.array(["a", "a", "a", "b"])
        plain = KNNProbe(k=4).fit(X, y).predict_proba(X[:1])
        weighted = KNNProbe(k=4, class_weight="balanced").fit(X, y).predict_proba(X[:1])
        assert weighted[0, 1] > plain[0, 1]


class TestKNNProbe:
    def test_votes_match_brute_force(self) -> None:
        rng = np.random.default_rng(8)
        X, y = gaussian_classes(200, 8, rng, n_classes=3, separation=1.0)
        Q = rng.normal(0, 1, (20, 8)).astype(np.float32)
        k, T = 7, 0.1
        proba = KNNProbe(k=k, temperature=T).fit(X, y).predict_proba(Q)
        unit = X / np.linalg.norm(X, axis=1, keepdims=True)
        q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        sims = q @ unit.T
        classes = np.unique(y)
        for i in range(len(Q)):
            top = np.argsort(-sims[i])[:k]
            votes = np.array([np.exp(sims[i, top] / T)[y[top] == c].sum() for c in classes])
            np.testing.assert_allclose(proba[i], votes / votes.sum(), rtol=1e-4)

    def test_k_larger_than_training_set(self) -> None:
        X = np.eye(3, dtype=np.float32)
        proba = KNNProbe(k=20).fit(X, ["a", "b", "b"]).predict_proba(X)
        assert np.isfinite(proba).all() and proba.shape == (3, 2)
