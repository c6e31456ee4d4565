"""VICReg: lightly's VICReg projection head and loss (invariance, variance, covariance terms).

No negatives and no target network: the variance and covariance terms keep the embedding from
collapsing. Statistics are gathered across devices, as in lightly's benchmark.
"""

from __future__ import annotations

from typing import Any, Unpack

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import SharedArgs
from marrowlens.ssl.two_view import TwoViewMethod


class VICReg(TwoViewMethod):
    def __init__(
        self,
        *,
        hidden_dim: int = 8192,
        out_dim: int = 8192,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        **shared: Unpack[SharedArgs],
    ) -> None:
        super().__init__(**shared)
        self.backbone = self.new_backbone()
        self.projection_head = VICRegProjectionHead(self.backbone.num_features, hidden_dim, out_dim)
        self.criterion = VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed=True)

    @classmethod
    def method_args(cls, config: PretrainConfig) -> dict[str, Any]:
        return config.vicreg.model_dump()  # the section's fields are the constructor's arguments
