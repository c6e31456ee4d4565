"""What every method shares (solo-learn's pattern): optimiser and schedule, the per-epoch reseeding
that makes resumed runs exact, and the online k-NN check of the embedding.

Methods subclass :class:`SSLModule` (or :class:`~marrowlens.ssl.momentum.MomentumMethod`) with
explicit typed constructor arguments (their own, plus the shared :class:`SharedArgs`), map their
config section onto them in ``method_args``, declare their views in ``build_views`` and only wire
lightly's loss and heads in ``training_step``. Every constructor argument is saved in the
checkpoint (``save_hyperparameters``), so a checkpoint rebuilds its module without a config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NotRequired, Self, TypedDict

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.models.utils import get_weight_decay_parameters
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.utils.benchmarking import knn_predict
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from marrowlens.config import Optimizer, PretrainConfig
from marrowlens.ssl.backbones import create_backbone

Batch = tuple[list[torch.Tensor], torch.Tensor]
CheckBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def scaled_lr(config: PretrainConfig, global_batch: int) -> float:
    """The base learning rate (per 256 images) scaled to the global batch, linearly or by sqrt."""
    ratio = global_batch / 256
    return config.optim.base_lr * (ratio if config.optim.lr_scaling == "linear" else math.sqrt(ratio))


class SharedArgs(TypedDict):
    """The constructor arguments every method takes, passed through by ``**shared``."""

    timm_name: str
    image_size: int
    lr: float
    weights: NotRequired[str | None]
    optimizer: NotRequired[Optimizer]
    weight_decay: NotRequired[float]
    sgd_momentum: NotRequired[float]
    warmup_epochs: NotRequired[float]
    seed: NotRequired[int]
    knn_k: NotRequired[int]
    knn_t: NotRequired[float]
    knn_classes: NotRequired[int]


class SSLModule(pl.LightningModule):
    """Shared training logic.

    Subclasses define ``build_views``, ``trainable`` modules, ``embedding_backbone`` and the step.
    """

    def __init__(
        self,
        *,
        timm_name: str,
        image_size: int,
        lr: float,
        weights: str | None = None,
        optimizer: Optimizer = "lars",
        weight_decay: float = 1e-6,
        sgd_momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        seed: int = 0,
        knn_k: int = 20,
        knn_t: float = 0.07,
        knn_classes: int = 0,
    ) -> None:
        super().__init__()
        # Collects the arguments of every constructor up the subclass chain, not only these.
        self.save_hyperparameters()
        self.timm_name, self.image_size, self.weights = timm_name, image_size, weights
        self.lr, self.optimizer_name, self.weight_decay = lr, optimizer, weight_decay
        self.sgd_momentum, self.warmup_epochs, self.seed = sgd_momentum, warmup_epochs, seed
        self.knn_k, self.knn_t, self.knn_classes = knn_k, knn_t, knn_classes
        self.resume_epoch = 0
        self._check_features: list[torch.Tensor] = []
        self._check_labels: list[torch.Tensor] = []
        self._check_query: list[torch.Tensor] = []

    # -- from a config
    @classmethod
    def from_config(cls, config: PretrainConfig, lr: float, knn_classes: int = 0) -> Self:
        """The method of ``config.model.method`` with its section of the config as arguments."""
        model, optim = config.model, config.optim
        shared: SharedArgs = {
            "timm_name": model.backbone,
            "image_size": model.image_size,
            "weights": str(model.weights) if model.weights is not None else None,
            "lr": lr,
            "optimizer": optim.optimizer,
            "weight_decay": optim.weight_decay,
            "sgd_momentum": optim.momentum,
            "warmup_epochs": optim.warmup_epochs,
            "seed": config.trainer.seed,
            "knn_k": config.data.knn_k,
            "knn_t": config.data.knn_t,
            "knn_classes": knn_classes,
        }
        return cls(**cls.method_args(config), **shared)

    # -- what subclasses provide
    @classmethod
    def method_args(cls, config: PretrainConfig) -> dict[str, Any]:
        """The method's own constructor arguments, from its section of the config."""
        raise NotImplementedError

    @classmethod
    def build_views(cls, config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
        """The views ``training_step`` consumes, one list of tensors per cell."""
        raise NotImplementedError

    def trainable(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def embedding_backbone(self) -> nn.Module:
        """The backbone whose features are checked online and exported at the end."""
        raise NotImplementedError

    def new_backbone(self) -> nn.Module:
        """A fresh backbone as the arguments describe it (timm name, input size, starting weights)."""
        return create_backbone(self.timm_name, self.image_size, Path(self.weights) if self.weights else None)

    # -- optimisation
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        params, no_decay = get_weight_decay_parameters(self.trainable())
        groups = [{"params": params}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "lars":
            optimizer = LARS(groups, lr=self.lr, momentum=self.sgd_momentum, weight_decay=self.weight_decay)
        elif self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.sgd_momentum, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = steps / max(1, self.trainer.max_epochs or 1)
        warmup = min(int(per_epoch * self.warmup_epochs), steps - 1)
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup, max_epochs=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints are written at epoch end, so training resumes with the next epoch.
        self.resume_epoch = int(checkpoint["epoch"]) + 1

    def data_epoch(self) -> int:
        """The epoch whose views the sampler should draw (see ``EpochSampler``)."""
        return max(self.current_epoch, self.resume_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Step randomness (drop-path, dropout) as a function of (seed, step), so resumes are exact.
        state = np.random.SeedSequence([self.seed, self.global_step, batch_idx]).generate_state(1)
        torch.manual_seed(int(state[0]))

    def log_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)

    # -- online k-NN check (DINO-style weighted vote, lightly's knn_predict)
    def validation_step(self, batch: CheckBatch, batch_idx: int) -> None:
        images, labels, is_query = batch
        features = self.embedding_backbone(images).flatten(1).float()
        self._check_features.append(F.normalize(features, dim=1))
        self._check_labels.append(labels)
        self._check_query.append(is_query)

    def on_validation_epoch_end(self) -> None:
        if not self._check_features:
            return
        features = torch.cat(self._check_features)
        labels = torch.cat(self._check_labels)
        query = torch.cat(self._check_query).bool()
        self._check_features, self._check_labels, self._check_query = [], [], []
        bank, bank_labels = features[~query], labels[~query]
        k = min(self.knn_k, len(bank))
        predicted = knn_predict(features[query], bank.T, bank_labels, self.knn_classes, knn_k=k, knn_t=self.knn_t)[:, 0]
        truth = labels[query].cpu().numpy()
        guess = predicted.cpu().numpy()
        self.log("val_knn_acc", float(np.mean(truth == guess)), prog_bar=True, sync_dist=False)
        self.log("val_knn_bal_acc", float(balanced_accuracy_score(truth, guess)), sync_dist=False)
