"""What every method shares (solo-learn's pattern): optimiser and schedule from the config, the
per-epoch reseeding that makes resumed runs exact, and the online k-NN check of the embedding.

Methods subclass :class:`SSLModule` (or :class:`~marrowlens.ssl.momentum.MomentumMethod`), declare
their views in ``build_views`` and only wire lightly's loss and heads in ``training_step``.
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.models.utils import get_weight_decay_parameters
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.utils.benchmarking import knn_predict
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from marrowlens.config import PretrainConfig


def scaled_lr(config: PretrainConfig, global_batch: int) -> float:
    """The base learning rate (per 256 images) scaled to the global batch, linearly or by sqrt."""
    ratio = global_batch / 256
    return config.optim.base_lr * (ratio if config.optim.lr_scaling == "linear" else math.sqrt(ratio))


class SSLModule(pl.LightningModule):
    """Shared training logic; subclasses define ``build_views``, ``trainable`` modules, ``embedding_backbone`` and the step."""

    def __init__(self, config: PretrainConfig, lr: float, knn_classes: int = 0) -> None:
        super().__init__()
        self.config, self.lr, self.knn_classes = config, lr, knn_classes
        self.resume_epoch = 0
        self._check_features: list[torch.Tensor] = []
        self._check_labels: list[torch.Tensor] = []
        self._check_query: list[torch.Tensor] = []

    # -- what subclasses provide
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

    # -- optimisation
    def configure_optimizers(self):
        optim = self.config.optim
        params, no_decay = get_weight_decay_parameters(self.trainable())
        groups = [{"params": params}, {"params": no_decay, "weight_decay": 0.0}]
        if optim.optimizer == "lars":
            optimizer = LARS(groups, lr=self.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        elif optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=optim.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = steps / max(1, self.trainer.max_epochs)
        warmup = min(int(per_epoch * optim.warmup_epochs), steps - 1)
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup, max_epochs=steps)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints are written at epoch end, so training resumes with the next epoch.
        self.resume_epoch = int(checkpoint["epoch"]) + 1

    def data_epoch(self) -> int:
        """The epoch whose views the sampler should draw (see ``EpochSampler``)."""
        return max(self.current_epoch, self.resume_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Step randomness (drop-path, dropout) as a function of (seed, step), so resumes are exact.
        state = np.random.SeedSequence([self.config.trainer.seed, self.global_step, batch_idx]).generate_state(1)
        torch.manual_seed(int(state[0]))

    def log_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=batch_size)

    # -- online k-NN check (DINO-style weighted vote, lightly's knn_predict)
    def validation_step(self, batch, batch_idx: int) -> None:
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
        k = min(self.config.data.knn_k, len(bank))
        predicted = knn_predict(
            features[query], bank.T, bank_labels, self.knn_classes, knn_k=k, knn_t=self.config.data.knn_t
        )[:, 0]
        truth = labels[query].cpu().numpy()
        guess = predicted.cpu().numpy()
        self.log("val_knn_acc", float(np.mean(truth == guess)), prog_bar=True, sync_dist=False)
        self.log("val_knn_bal_acc", float(balanced_accuracy_score(truth, guess)), sync_dist=False)
