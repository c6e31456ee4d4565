"""DINO: lightly's DINO head and loss, a momentum teacher (:class:`MomentumMethod`), multi-crop views.

The teacher sees only the global views; the teacher temperature follows our own warm-up schedule
and is passed to the loss explicitly; the last head layer's gradients are cancelled after backward
for the first epochs (lightly 1.6 semantics, see DESIGN.md pitfalls).
"""

from __future__ import annotations

from typing import Any, Unpack

import numpy as np
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import DinoExport, PretrainConfig
from marrowlens.ssl.base import Batch, SharedArgs
from marrowlens.ssl.momentum import MomentumMethod
from marrowlens.ssl.views import multi_crop_views

# Settings of the ``dino:`` section that shape the views (``build_views``), not the module.
VIEW_SETTINGS = {"n_local_views", "local_crop_size", "local_crop_scale"}


class DINO(MomentumMethod):
    def __init__(
        self,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 4096,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        freeze_last_layer_epochs: int = 1,
        export: DinoExport = "teacher",
        **shared: Unpack[SharedArgs],
    ) -> None:
        super().__init__(momentum_start=momentum_start, momentum_end=momentum_end, **shared)
        self.teacher_temp, self.exported = teacher_temp, export
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self.student_backbone = self.new_backbone()
        head_args = (self.student_backbone.num_features, hidden_dim, bottleneck_dim, out_dim)
        self.student_head = DINOProjectionHead(*head_args, freeze_last_layer=freeze_last_layer_epochs)
        self.teacher_backbone = self.frozen_copy(self.student_backbone)
        # The head's weight norm cannot be deep-copied: build a twin and copy its state instead.
        self.teacher_head = DINOProjectionHead(*head_args)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=out_dim, student_temp=student_temp, teacher_temp=teacher_temp)

    @classmethod
    def method_args(cls, config: PretrainConfig) -> dict[str, Any]:
        return config.dino.model_dump(exclude=VIEW_SETTINGS)

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        return multi_crop_views(config, mean, std)

    def trainable(self) -> list[nn.Module]:
        return [self.student_backbone, self.student_head]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student_backbone, self.teacher_backbone), (self.student_head, self.teacher_head)]

    @property
    def embedding_backbone(self) -> nn.Module:
        return self.teacher_backbone if self.exported == "teacher" else self.student_backbone

    def teacher_temperature(self) -> float:
        if self.warmup_teacher_temp_epochs == 0:
            return self.teacher_temp
        return float(
            np.interp(
                self.current_epoch,
                [0, self.warmup_teacher_temp_epochs],
                [self.warmup_teacher_temp, self.teacher_temp],
            )
        )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(global_views).flatten(1)).chunk(2)
        student = [self.student_head(self.student_backbone(global_views).flatten(1))]
        if len(views) > 2:
            student.append(self.student_head(self.student_backbone(torch.cat(views[2:])).flatten(1)))
        student_out = torch.cat(student).chunk(len(views))
        loss: torch.Tensor = self.criterion(
            teacher_out=list(teacher_out), student_out=list(student_out), teacher_temp=self.teacher_temperature()
        )
        self.log_loss(loss, batch_size=len(views[0]))
        return loss

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(self.current_epoch)
