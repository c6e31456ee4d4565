"""Pretraining data: every cell of a cohort as multi-view samples, plus a labelled check subset.

Augmentations are a pure function of (seed, epoch, cell): the sampler hands each index over with
its epoch, and the dataset seeds torch, numpy and random from the three before drawing views. A run
resumed from an epoch-end checkpoint therefore sees exactly the views an uninterrupted run would
have seen, whatever the number of workers or devices.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from lightly.transforms.multi_view_transform import MultiViewTransform
from PIL import Image
from sklearn.model_selection import GroupShuffleSplit
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from marrowlens.cohort.crop import CellCrop
from marrowlens.cohort.manifest import Cohort, patient_groups
from marrowlens.config import PretrainConfig
from marrowlens.ssl.base import SSLModule
from marrowlens.ssl.embed import load_cell

Transform = Callable[[Image.Image], torch.Tensor]


class EpochSampler(DistributedSampler[Any]):
    """A DistributedSampler (one replica or many) that yields ``(index, epoch)`` pairs.

    The epoch comes from ``epoch_source`` when iteration starts, not from Lightning's ``set_epoch``:
    after a resume from an epoch-end checkpoint, Lightning's epoch counters still read the finished
    epoch while the first resumed epoch is iterated.
    """

    def __init__(self, dataset: Dataset[Any], epoch_source: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.epoch = epoch = self.epoch_source()
        return ((index, epoch) for index in super().__iter__())


def _seed_everything_for(seed: int, epoch: int, index: int) -> None:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]))


class PretrainImages(Dataset[tuple[list[torch.Tensor], int]]):
    """All cells of a cohort; labels are never read (self-supervision). With ``crop`` (``data.crop: cell``)
    each image is cut to its cell once, before the views are drawn from it."""

    def __init__(self, cohort: Cohort, views: MultiViewTransform, seed: int, crop: CellCrop | None = None) -> None:
        self.cohort, self.paths = cohort, cohort.cells["path"].to_numpy()
        self.views, self.seed, self.crop = views, seed, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        index, epoch = key
        _seed_everything_for(self.seed, epoch, index)
        image = load_cell(self.cohort, self.paths[index])
        views: list[torch.Tensor] = self.views(self.crop(image) if self.crop else image)  # type: ignore[assignment]
        return views, index


@dataclass
class CheckSubset:
    """Labelled cells for the online k-NN check: a bank and queries from disjoint patients."""

    rows: np.ndarray
    labels: np.ndarray
    is_query: np.ndarray
    label_column: str
    classes: list[str]


def check_subset(cells: pd.DataFrame, n_cells: int, seed: int) -> CheckSubset | None:
    """Pick up to ``n_cells`` labelled cells (cell type, else blast status); None if unlabelled."""
    if n_cells <= 0:
        return None
    for column in ("cell_type", "is_blast"):
        labelled = cells[column].notna()
        if labelled.sum() >= 4 and cells.loc[labelled, column].nunique() >= 2:
            break
    else:
        return None
    candidates = np.flatnonzero(labelled.to_numpy())
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(candidates, size=min(n_cells, len(candidates)), replace=False))
    groups = patient_groups(cells.iloc[rows]).to_numpy()
    if len(set(groups)) >= 2:
        splitter = GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=seed)
        _, query_idx = next(splitter.split(rows, groups=groups))
    else:
        query_idx = rng.choice(len(rows), size=max(1, len(rows) * 3 // 10), replace=False)
    is_query = np.zeros(len(rows), dtype=bool)
    is_query[query_idx] = True
    values = cells[column].iloc[rows].astype(str).to_numpy()
    classes = sorted(set(values))
    labels = np.array([classes.index(v) for v in values])
    if is_query.all() or not is_query.any():
        return None
    return CheckSubset(rows, labels, is_query, column, classes)


class CheckImages(Dataset[tuple[torch.Tensor, int, bool]]):
    def __init__(self, cohort: Cohort, subset: CheckSubset, transform: Transform) -> None:
        self.cohort, self.subset, self.transform = cohort, subset, transform
        self.paths = cohort.cells["path"].to_numpy()

    def __len__(self) -> int:
        return len(self.subset.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image = load_cell(self.cohort, self.paths[self.subset.rows[i]])
        return self.transform(image), int(self.subset.labels[i]), bool(self.subset.is_query[i])


class PretrainData(pl.LightningDataModule):
    """Shards the cohort over devices itself (``use_distributed_sampler=False``) so the epoch-seeded
    sampler is used on one device and on many alike."""

    def __init__(
        self,
        cohort: Cohort,
        config: PretrainConfig,
        views: MultiViewTransform,
        check_transform: Transform,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.cohort, self.config, self.batch_size = cohort, config, batch_size
        crop = CellCrop(keep_size=config.data.crop == "centred") if config.data.crop != "full" else None
        self.train_set = PretrainImages(cohort, views, config.trainer.seed, crop)
        self.subset = check_subset(cohort.cells, config.data.val_cells, config.trainer.seed)
        self.check_set = CheckImages(cohort, self.subset, check_transform) if self.subset else None

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.config.data.num_workers
        return {"num_workers": workers, "persistent_workers": False, "pin_memory": torch.cuda.is_available()}

    def _data_epoch(self) -> int:
        module = self.trainer.lightning_module if self.trainer else None
        return module.data_epoch() if isinstance(module, SSLModule) else 0

    def train_dataloader(self) -> DataLoader[tuple[list[torch.Tensor], int]]:
        trainer = self.trainer
        sampler = EpochSampler(
            self.train_set,
            epoch_source=self._data_epoch,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.config.trainer.seed,
            drop_last=True,
        )
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, int, bool]] | list[Any]:
        if self.check_set is None:
            return []
        return DataLoader(self.check_set, batch_size=self.batch_size, shuffle=False, **self._loader_kwargs())
