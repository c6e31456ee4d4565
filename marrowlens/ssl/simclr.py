"""SimCLR: lightly's projection head and NT-Xent loss (negatives gathered across devices)."""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.two_view import TwoViewMethod


class SimCLR(TwoViewMethod):
    def __init__(self, backbone: nn.Module, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        super().__init__(config, lr, knn_classes)
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(
            backbone.num_features, config.simclr.hidden_dim, config.simclr.out_dim
        )
        self.criterion = NTXentLoss(temperature=config.simclr.temperature, gather_distributed=True)
