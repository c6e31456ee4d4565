"""SimCLR: lightly's projection head and NT-Xent loss (negatives gathered across devices)."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import SSLModule
from marrowlens.ssl.views import two_global_views


class SimCLR(SSLModule):
    def __init__(self, backbone: nn.Module, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        super().__init__(config, lr, knn_classes)
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, config.simclr.hidden_dim, config.simclr.out_dim)
        self.criterion = NTXentLoss(temperature=config.simclr.temperature, gather_distributed=True)

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        return two_global_views(config, mean, std)

    def trainable(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head]

    @property
    def embedding_backbone(self) -> nn.Module:
        return self.backbone

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        projections = self.projection_head(self.backbone(torch.cat(views)).flatten(1))
        first, second = projections.chunk(2)
        loss = self.criterion(first, second)
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
