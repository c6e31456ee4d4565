"""The hand-written losses against their definitions, computed independently in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marrowlens.probes.losses import (
    RCE_LOG_ZERO,
    focal_loss,
    generalized_cross_entropy,
    per_sample_loss,
    symmetric_cross_entropy,
    weighted_mean,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(params=[2, 5])
def batch(request) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(request.param)
    logits = rng.normal(0, 3, (64, request.param))
    target = rng.integers(0, request.param, 64)
    return torch.tensor(logits), torch.tensor(target), _softmax(logits), target


class TestAgainstReferenceMaths:
    @pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 1.0])
    def test_gce_is_one_minus_p_to_the_q_over_q(self, batch, q: float) -> None:
        logits, target, p, y = batch
        expected = (1 - p[np.arange(len(y)), y] ** q) / q
        np.testing.assert_allclose(generalized_cross_entropy(logits, target, q).numpy(), expected, rtol=1e-10)

    def test_gce_tends_to_cross_entropy_as_q_vanishes(self, batch) -> None:
        logits, target, _, _ = batch
        ce = F.cross_entropy(logits, target, reduction="none")
        np.testing.assert_allclose(generalized_cross_entropy(logits, target, 1e-6).numpy(), ce.numpy(), rtol=1e-4)

    @pytest.mark.parametrize("alpha, beta", [(0.1, 1.0), (1.0, 0.0), (0.0, 1.0)])
    def test_sce_is_ce_plus_reverse_ce_with_clamped_log(self, batch, alpha: float, beta: float) -> None:
        logits, target, p, y = batch
        onehot = np.eye(p.shape[1])[y]
        log_label = np.where(onehot > 0, 0.0, RCE_LOG_ZERO)  # log(1) = 0, log(0) clamped to A = -4
        reverse = -(p * log_label).sum(axis=1)
        ce = -np.log(p[np.arange(len(y)), y])
        np.testing.assert_allclose(
            symmetric_cross_entropy(logits, target, alpha, beta).numpy(),
            alpha * ce + beta * reverse,
            rtol=1e-9,
            atol=1e-12,
        )

    @pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
    def test_focal(self, batch, gamma: float) -> None:
        logits, target, p, y = batch
        py = p[np.arange(len(y)), y]
        np.testing.assert_allclose(
            focal_loss(logits, target, gamma).numpy(), -((1 - py) ** gamma) * np.log(py), rtol=1e-9
        )

    def test_focal_with_gamma_zero_is_cross_entropy(self, batch) -> None:
        logits, target, _, _ = batch
        torch.testing.assert_close(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target, reduction="none"))

    def test_weighted_mean_matches_torch_class_weights(self, batch) -> None:
        logits, target, _, _ = batch
        weight = torch.linspace(0.5, 2.0, logits.shape[1], dtype=logits.dtype)
        ours = weighted_mean(per_sample_loss("ce", logits, target), target, weight)
        torch.testing.assert_close(ours, F.cross_entropy(logits, target, weight=weight))


class TestBehaviour:
    def test_gce_and_sce_are_bounded_where_ce_is_not(self) -> None:
        logits = torch.tensor([[40.0, -40.0]])
        wrong = torch.tensor([1])
        assert per_sample_loss("ce", logits, wrong).item() > 50
        assert per_sample_loss("gce", logits, wrong, gce_q=0.7).item() <= 1 / 0.7 + 1e-6
        sce = per_sample_loss("sce", logits, wrong, sce_alpha=0.0, sce_beta=1.0).item()
        assert sce == pytest.approx(-RCE_LOG_ZERO)

    @pytest.mark.parametrize("name", ["ce", "gce", "sce", "focal"])
    def test_gradients_are_finite_at_extreme_logits(self, name: str) -> None:
        logits = torch.tensor([[300.0, -300.0, 0.0], [-300.0, 300.0, 0.0]], requires_grad=True)
        per_sample_loss(name, logits, torch.tensor([1, 1])).sum().backward()
        assert torch.isfinite(logits.grad).all()

    def test_unknown_loss(self) -> None:
        with pytest.raises(ValueError, match="unknown loss"):
            per_sample_loss("mae", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
