"""BYOL: lightly's BYOL heads and negative cosine similarity, a momentum target network.

The online network (backbone, projection, prediction) learns to predict the target's projection of
the other view, both ways (the symmetric loss of lightly's benchmark); the target is an EMA of the
online backbone and projection head (:class:`MomentumMethod`). The online backbone is exported.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import Batch, SharedArgs
from marrowlens.ssl.momentum import MomentumMethod
from marrowlens.ssl.views import two_global_views


class BYOL(MomentumMethod):
    def __init__(
        self,
        *,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        momentum_start: float = 0.99,
        momentum_end: float = 1.0,
        **shared: Unpack[SharedArgs],
    ) -> None:
        super().__init__(momentum_start=momentum_start, momentum_end=momentum_end, **shared)
        self.backbone = self.new_backbone()
        self.projection_head = BYOLProjectionHead(self.backbone.num_features, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.target_backbone = self.frozen_copy(self.backbone)
        self.target_projection_head = self.frozen_copy(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    @classmethod
    def method_args(cls, config: PretrainConfig) -> dict[str, Any]:
        return config.byol.model_dump()  # the section's fields are the constructor's arguments

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        return two_global_views(config, mean, std)

    def trainable(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head, self.prediction_head]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_projection_head)]

    @property
    def embedding_backbone(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        both = torch.cat(views)
        with torch.no_grad():
            target = self.target_projection_head(self.target_backbone(both).flatten(1)).chunk(2)
        predicted = self.prediction_head(self.projection_head(self.backbone(both).flatten(1))).chunk(2)
        loss: torch.Tensor = self.criterion(predicted[0], target[1]) + self.criterion(predicted[1], target[0])
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
