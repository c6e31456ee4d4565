"""Per-sample classification losses for probes trained on noisy labels.

Hand-written: neither torch, lightly nor timm ships generalized or symmetric cross-entropy, and
torchvision's focal loss is the binary (sigmoid) form, not the softmax one a multi-class probe
needs. Each function maps logits ``(N, C)`` and integer targets ``(N,)`` to per-sample losses
``(N,)``; class weighting and averaging are the caller's (see :func:`weighted_mean`).

- **GCE** (Zhang & Sabuncu, NeurIPS 2018): ``(1 - p_y^q) / q``. Bounded, so a cell whose label
  is wrong cannot pull the head arbitrarily far; ``q -> 0`` recovers CE, ``q = 1`` is MAE.
- **SCE** (Wang et al., ICCV 2019): ``alpha * CE + beta * RCE`` with the reverse cross-entropy
  ``RCE = -sum_k p_k log y_k``, ``log 0`` clamped to ``A = -4``, i.e. ``RCE = -A (1 - p_y)``.
- **Focal** (Lin et al., ICCV 2017), softmax form: ``-(1 - p_y)^gamma log p_y``; down-weights
  cells the head already gets right, which helps rare classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES: tuple[str, ...] = ("ce", "gce", "sce", "focal")
RCE_LOG_ZERO = -4.0  # Wang et al.'s clamp of log(0) in the reverse cross-entropy


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def generalized_cross_entropy(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """``(1 - p_y^q) / q``, computed from log-probabilities so tiny ``p_y`` stays finite."""
    log_p = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    return -torch.expm1(q * log_p) / q


def symmetric_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.1, beta: float = 1.0
) -> torch.Tensor:
    """``alpha * CE + beta * RCE``; with a one-hot label RCE reduces to ``-A (1 - p_y)``."""
    log_p = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    reverse = -RCE_LOG_ZERO * (1.0 - log_p.exp())
    return alpha * (-log_p) + beta * reverse


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    return -((1.0 - log_p.exp()) ** gamma) * log_p


def per_sample_loss(
    name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gce_q: float = 0.7,
    sce_alpha: float = 0.1,
    sce_beta: float = 1.0,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """Dispatch by name; unknown names are a programming error (configs validate them first)."""
    if name == "ce":
        return cross_entropy(logits, target)
    if name == "gce":
        return generalized_cross_entropy(logits, target, gce_q)
    if name == "sce":
        return symmetric_cross_entropy(logits, target, sce_alpha, sce_beta)
    if name == "focal":
        return focal_loss(logits, target, focal_gamma)
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def weighted_mean(losses: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last axis, each sample weighted by its class weight (torch's CE convention)."""
    if class_weight is None:
        return losses.mean(dim=-1)
    weights = class_weight[target]
    return (losses * weights).sum(dim=-1) / weights.sum(dim=-1)
