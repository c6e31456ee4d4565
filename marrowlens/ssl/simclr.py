"""SimCLR: lightly's projection head and NT-Xent loss (negatives gathered across devices)."""

from __future__ import annotations

from typing import Any, Unpack

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import SharedArgs
from marrowlens.ssl.two_view import TwoViewMethod


class SimCLR(TwoViewMethod):
    def __init__(
        self, *, hidden_dim: int = 512, out_dim: int = 128, temperature: float = 0.1, **shared: Unpack[SharedArgs]
    ) -> None:
        super().__init__(**shared)
        self.backbone = self.new_backbone()
        self.projection_head = SimCLRProjectionHead(self.backbone.num_features, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    @classmethod
    def method_args(cls, config: PretrainConfig) -> dict[str, Any]:
        return config.simclr.model_dump()  # the section's fields are the constructor's arguments
