"""DINO: lightly's DINO head and loss, a momentum teacher (:class:`MomentumMethod`), multi-crop views.

The teacher sees only the global views; the teacher temperature follows our own warm-up schedule
and is passed to the loss explicitly; the last head layer's gradients are cancelled after backward
for the first epochs (lightly 1.6 semantics, see DESIGN.md pitfalls).
"""

from __future__ import annotations

import numpy as np
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import nn

from marrowlens.config import PretrainConfig
from marrowlens.ssl.momentum import MomentumMethod
from marrowlens.ssl.views import multi_crop_views


class DINO(MomentumMethod):
    def __init__(self, backbone: nn.Module, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        dino = config.dino
        super().__init__(config, lr, knn_classes, dino.momentum_start, dino.momentum_end)
        self.student_backbone = backbone
        head_args = (backbone.num_features, dino.hidden_dim, dino.bottleneck_dim, dino.out_dim)
        self.student_head = DINOProjectionHead(*head_args, freeze_last_layer=dino.freeze_last_layer_epochs)
        self.teacher_backbone = self.frozen_copy(backbone)
        # The head's weight norm cannot be deep-copied: build a twin and copy its state instead.
        self.teacher_head = DINOProjectionHead(*head_args)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=dino.out_dim, student_temp=dino.student_temp, teacher_temp=dino.teacher_temp
        )

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        return multi_crop_views(config, mean, std)

    def trainable(self) -> list[nn.Module]:
        return [self.student_backbone, self.student_head]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student_backbone, self.teacher_backbone), (self.student_head, self.teacher_head)]

    @property
    def embedding_backbone(self) -> nn.Module:
        return self.teacher_backbone if self.config.dino.export == "teacher" else self.student_backbone

    def teacher_temperature(self) -> float:
        dino = self.config.dino
        if dino.warmup_teacher_temp_epochs == 0:
            return dino.teacher_temp
        return float(
            np.interp(
                self.current_epoch, [0, dino.warmup_teacher_temp_epochs], [dino.warmup_teacher_temp, dino.teacher_temp]
            )
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(global_views).flatten(1)).chunk(2)
        student_out = [self.student_head(self.student_backbone(global_views).flatten(1))]
        if len(views) > 2:
            student_out.append(self.student_head(self.student_backbone(torch.cat(views[2:])).flatten(1)))
        student_out = torch.cat(student_out).chunk(len(views))
        loss = self.criterion(
            teacher_out=list(teacher_out), student_out=list(student_out), teacher_temp=self.teacher_temperature()
        )
        self.log_loss(loss, batch_size=len(views[0]))
        return loss

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(self.current_epoch)
