"""Attention-based multiple-instance learning over a patient's cells (gated attention, Ilse et al. 2018).

Trained on patient labels only: the cells of a patient are a bag, a small network scores each cell,
the softmax of those scores weights the cells' features into one patient vector, and a linear layer
calls the patient. The attention weights are each cell's contribution (what the sheets show).

The pooling is torchmil's ``AttentionPool`` (gated, masked softmax over padded bags). torchmil's own
``ABMIL`` model is binary only (one logit, BCE), so the multi-class layer around the pool is ours.
Cohorts are small (tens of patients), so each of ``seeds`` models holds out its own stratified share
of the training patients for early stopping on their loss, and their probabilities are averaged;
with too few patients to hold any out, ``fallback_epochs`` are trained instead and the fit says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedShuffleSplit
from torch import nn
from torchmil.nn import AttentionPool, masked_softmax  # type: ignore[import-untyped]

from marrowlens.config import ProbeConfig
from marrowlens.probes.heads import class_weight_of, torch_threads
from marrowlens.probes.patients import Bags, PatientCalls, PatientHead


class GatedAttentionMIL(nn.Module):
    """Cell features -> ReLU projection -> gated attention pooling -> class logits (and attention scores)."""

    def __init__(self, n_in: int, hidden_dim: int, attention_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(n_in, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.pool = AttentionPool(in_dim=hidden_dim, att_dim=attention_dim, gated=True)
        self.classify = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, scores = self.pool(self.project(x), mask, return_att=True)
        return self.classify(pooled), scores


class AttentionMIL(PatientHead):
    name = "abmil"
    contribution = "attention weight (share of the patient vector; mean of the seeds' models)"

    def __init__(
        self,
        cells: str = "all",
        hidden_dim: int = 64,
        attention_dim: int = 32,
        dropout: float = 0.25,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        max_epochs: int = 200,
        patience: int = 20,
        val_fraction: float = 0.25,
        fallback_epochs: int = 50,
        seeds: int = 5,
        batch_patients: int = 16,
        max_cells: int = 512,
        class_weight: str | None = "balanced",
        random_state: int = 0,
    ) -> None:
        self.cells, self.hidden_dim, self.attention_dim, self.dropout = cells, hidden_dim, attention_dim, dropout
        self.lr, self.weight_decay, self.max_epochs, self.patience = lr, weight_decay, max_epochs, patience
        self.val_fraction, self.fallback_epochs, self.seeds = val_fraction, fallback_epochs, seeds
        self.batch_patients, self.max_cells = batch_patients, max_cells
        self.class_weight, self.random_state = class_weight, random_state
        self.models: list[GatedAttentionMIL] = []
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.epochs_: list[int] = []
        self.early_stopped_: list[bool] = []

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        params: dict[str, Any] = config.abmil.model_dump()
        return {**params, "class_weight": class_weight_of(config), "random_state": config.seed}

    # ------------------------------------------------------------ features

    def _used(self, bags: Bags) -> np.ndarray:
        return np.ones(len(bags.rows), dtype=bool) if self.cells == "all" else bags.kept

    def _features(self, bags: Bags, cells: np.ndarray) -> np.ndarray:
        x = np.asarray(bags.vectors[bags.rows[cells]], dtype=np.float32)
        if self.cells == "all":  # the filter's opinion, as one more input: 2 P(blast) - 1
            x = np.concatenate([x, (2 * bags.blast[cells, None] - 1).astype(np.float32)], axis=1)
        return x

    def _bag_tensors(self, bags: Bags, members: list[np.ndarray]) -> list[torch.Tensor]:
        assert self.mean_ is not None and self.scale_ is not None
        return [torch.from_numpy((self._features(bags, m) - self.mean_) / self.scale_) for m in members]

    # ------------------------------------------------------------ fitting

    def fit(self, bags: Bags, y: np.ndarray, classes: Sequence[str]) -> AttentionMIL:
        used = self._used(bags)
        members = [m[used[m]] for m in bags.members()]
        has_cells = np.array([len(m) > 0 for m in members])
        x_all = self._features(bags, np.flatnonzero(used))
        self.mean_ = x_all.mean(axis=0)
        self.scale_ = np.maximum(x_all.std(axis=0), 1e-6).astype(np.float32)
        codes = np.searchsorted(np.asarray(classes), np.asarray(y, dtype=str))
        patients = np.flatnonzero(has_cells)
        tensors = self._bag_tensors(bags, [members[p] for p in patients])
        codes = codes[patients]
        weight = None
        if self.class_weight == "balanced":
            counts = np.bincount(codes, minlength=len(classes)).astype(np.float64)
            weight = torch.tensor(np.where(counts > 0, len(codes) / (len(classes) * np.maximum(counts, 1)), 0.0))
        self.models, self.epochs_, self.early_stopped_ = [], [], []
        with torch_threads(1):
            for seed in range(self.seeds):
                model, epochs, held_out = self._fit_one(tensors, codes, len(classes), weight, self.random_state + seed)
                self.models.append(model)
                self.epochs_.append(epochs)
                self.early_stopped_.append(held_out)
        return self

    def _split(self, codes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A stratified held-out share of patients holding every class on both sides, or None."""
        n_classes = len(np.unique(codes))
        n_val = max(n_classes, round(self.val_fraction * len(codes)))
        if np.bincount(codes).min() < 2 or len(codes) - n_val < n_classes:
            return None
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        train, val = next(splitter.split(np.zeros(len(codes)), codes))
        return train, val

    def _fit_one(
        self, tensors: list[torch.Tensor], codes: np.ndarray, n_classes: int, weight: torch.Tensor | None, seed: int
    ) -> tuple[GatedAttentionMIL, int, bool]:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = GatedAttentionMIL(tensors[0].shape[1], self.hidden_dim, self.attention_dim, n_classes, self.dropout)
        optimiser = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.float())
        target = torch.from_numpy(codes).long()
        split = self._split(codes, seed)
        train = np.arange(len(codes)) if split is None else split[0]
        epochs = self.fallback_epochs if split is None else self.max_epochs
        best, best_state, best_epoch, waited = np.inf, None, epochs, 0
        for epoch in range(1, epochs + 1):
            model.train()
            order = train[torch.randperm(len(train), generator=generator).numpy()]
            for start in range(0, len(order), self.batch_patients):
                batch = order[start : start + self.batch_patients]
                x, mask = _pad([_draw(tensors[i], self.max_cells, generator) for i in batch])
                logits, _ = model(x, mask)
                loss = loss_fn(logits, target[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if split is None:
                continue
            val_loss = float(loss_fn(self._logits(model, [tensors[i] for i in split[1]])[0], target[split[1]]))
            if val_loss < best - 1e-6:
                best, best_epoch, waited = val_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= self.patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return model, best_epoch, split is not None

    @staticmethod
    def _logits(model: GatedAttentionMIL, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Logits of each bag and its attention weights (one bag at a time: bags differ in size)."""
        model.eval()
        logits, weights = [], []
        with torch.no_grad():
            for x in tensors:
                mask = torch.ones(1, len(x))
                out, scores = model(x[None], mask)
                logits.append(out[0])
                weights.append(masked_softmax(scores[..., None], mask[..., None])[0, :, 0].numpy())
        return torch.stack(logits), weights

    # ------------------------------------------------------------ prediction

    def predict(self, bags: Bags, classes: Sequence[str]) -> PatientCalls:
        used = self._used(bags)
        members = [m[used[m]] for m in bags.members()]
        has_cells = np.flatnonzero([len(m) > 0 for m in members])
        proba = np.full((bags.n_patients, len(classes)), np.nan)
        contribution = np.full(len(bags.rows), np.nan)
        if len(has_cells):
            tensors = self._bag_tensors(bags, [members[p] for p in has_cells])
            total = np.zeros((len(has_cells), len(classes)))
            attention = [np.zeros(len(t)) for t in tensors]
            with torch_threads(1):
                for model in self.models:
                    logits, weights = self._logits(model, tensors)
                    total += torch.softmax(logits, dim=1).numpy()
                    for a, w in zip(attention, weights):
                        a += w
            proba[has_cells] = total / len(self.models)
            for p, a in zip(has_cells, attention):
                contribution[members[p]] = a / len(self.models)
        return PatientCalls(proba, contribution)

    # ------------------------------------------------------------ saving

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        assert self.mean_ is not None and self.scale_ is not None
        out = {"mean": torch.from_numpy(self.mean_.copy()), "scale": torch.from_numpy(self.scale_.copy())}
        for i, model in enumerate(self.models):
            out.update({f"seed{i}.{k}": v.contiguous() for k, v in model.state_dict().items()})
        return out

    @classmethod
    def from_saved(
        cls, params: dict[str, Any], fitted: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> AttentionMIL:
        head = cls(**params)
        head.mean_, head.scale_ = tensors["mean"].numpy(), tensors["scale"].numpy()
        head.epochs_ = list(fitted.get("epochs", []))
        head.early_stopped_ = list(fitted.get("early_stopped", []))
        n_classes = int(fitted["n_classes"])
        for i in range(int(fitted["models"])):
            prefix = f"seed{i}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            model = GatedAttentionMIL(len(head.mean_), head.hidden_dim, head.attention_dim, n_classes, head.dropout)
            model.load_state_dict(state)
            model.eval()
            head.models.append(model)
        return head

    def fitted_state(self) -> dict[str, Any]:
        n_classes = self.models[0].classify.out_features if self.models else 0
        return {
            "models": len(self.models),
            "epochs": self.epochs_,
            "early_stopped": self.early_stopped_,
            "n_classes": n_classes,
        }

    def selection(self) -> str | None:
        if all(self.early_stopped_):
            how = "epochs by early stopping on the loss of held-out training patients (a stratified share per seed)"
        else:
            how = f"{self.fallback_epochs} epochs where too few patients could be held out for early stopping"
        return (
            f"abmil: {how}: {', '.join(str(e) for e in self.epochs_)} for its {len(self.models)} seeds; "
            f"attention {self.attention_dim}, hidden {self.hidden_dim}, weight decay {self.weight_decay:g} "
            "fixed (not tuned)"
        )


def _draw(x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``limit`` of a bag's cells, drawn at random (bounds memory on large patients)."""
    if len(x) <= limit:
        return x
    return x[torch.randperm(len(x), generator=generator)[:limit]]


def _pad(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of different sizes as one zero-padded batch and its mask."""
    longest = max(len(b) for b in bags)
    x = torch.zeros(len(bags), longest, bags[0].shape[1])
    mask = torch.zeros(len(bags), longest)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = 1
    return x, mask
