"""VICReg: lightly's VICReg projection head and loss (invariance, variance, covariance terms).

No negatives and no target network: the variance and covariance terms keep the embedding from
collapsing. Statistics are gathered across devices, as in lightly's benchmark.
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import SSLModule
from marrowlens.ssl.views import two_global_views


class VICReg(SSLModule):
    def __init__(self, backbone: nn.Module, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        super().__init__(config, lr, knn_classes)
        vicreg = config.vicreg
        self.backbone = backbone
        self.projection_head = VICRegProjectionHead(backbone.num_features, vicreg.hidden_dim, vicreg.out_dim)
        self.criterion = VICRegLoss(vicreg.lambda_param, vicreg.mu_param, vicreg.nu_param, gather_distributed=True)

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
        first, second = self.projection_head(self.backbone(torch.cat(views)).flatten(1)).chunk(2)
        loss = self.criterion(first, second)
        self.log_loss(loss, batch_size=len(views[0]))
        return loss
