"""A base for methods with a momentum (EMA) target network, after solo-learn's ``BaseMomentumMethod``.

Before every training batch each target module moves towards its online twin by lightly's
``update_momentum``, with a momentum that rises from ``momentum_start`` to ``momentum_end`` over
the run on lightly's cosine schedule; targets get no gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Unpack

from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from marrowlens.ssl.base import SharedArgs, SSLModule


class MomentumMethod(SSLModule):
    """Subclasses build their target modules (``frozen_copy`` helps) and list them in ``momentum_pairs``."""

    def __init__(self, *, momentum_start: float, momentum_end: float, **shared: Unpack[SharedArgs]) -> None:
        super().__init__(**shared)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs."""
        raise NotImplementedError

    @staticmethod
    def frozen_copy(module: nn.Module) -> nn.Module:
        target = copy.deepcopy(module)
        deactivate_requires_grad(target)
        return target

    def momentum(self) -> float:
        """The EMA momentum at the current optimizer step."""
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        return float(cosine_schedule(self.trainer.global_step, steps, self.momentum_start, self.momentum_end))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        momentum = self.momentum()
        for online, target in self.momentum_pairs():
            update_momentum(online, target, m=momentum)
