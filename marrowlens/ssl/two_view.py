"""What SimCLR and VICReg share: two global views, one backbone and projection head, a loss on the pair.

A method of this family only builds its ``projection_head`` and ``criterion``.
"""

from __future__ import annotations

import torch
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import Batch, SSLModule
from marrowlens.ssl.views import two_global_views


class TwoViewMethod(SSLModule):
    backbone: nn.Module
    projection_head: nn.Module
    criterion: nn.Module

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        return two_global_views(config, mean, std)

    def trainable(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head]

    @property
    def embedding_backbone(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        first, second = self.projection_head(self.backbone(torch.cat(views)).flatten(1)).chunk(2)
        loss: torch.Tensor = self.criterion(first, second)
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
