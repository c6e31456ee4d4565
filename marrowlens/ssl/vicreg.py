"""VICReg: lightly's VICReg projection head and loss (invariance, variance, covariance terms).

No negatives and no target network: the variance and covariance terms keep the embedding from
collapsing. Statistics are gathered across devices, as in lightly's benchmark.
"""

from __future__ import annotations

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.two_view import TwoViewMethod


class VICReg(TwoViewMethod):
    def __init__(self, backbone: nn.Module, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        super().__init__(config, lr, knn_classes)
        vicreg = config.vicreg
        self.backbone = backbone
        self.projection_head = VICRegProjectionHead(backbone.num_features, vicreg.hidden_dim, vicreg.out_dim)
        self.criterion = VICRegLoss(vicreg.lambda_param, vicreg.mu_param, vicreg.nu_param, gather_distributed=True)
