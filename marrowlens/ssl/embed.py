"""Batched, resumable inference of a frozen backbone over a cohort into an embedding store.

Lightning's ``Trainer.predict`` runs the loop (CPU, one GPU or several, mixed precision, progress
bar); a prediction writer streams each batch straight into the store, so memory stays bounded
whatever the cohort size, and an interrupted run picks up the rows it had not written yet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from marrowlens.artifacts import META_FILE
from marrowlens.cohort.images import ImageDecodeError, load_rgb
from marrowlens.cohort.manifest import Cohort, load_cohort
from marrowlens.cohort.stain import ReinhardTarget, fit_reinhard
from marrowlens.config import PRECISIONS, STAIN_NORMALIZATIONS, Precision, is_precision
from marrowlens.contracts import (
    BackboneRecord,
    CohortRef,
    CropCounts,
    EmbeddingsMeta,
    EmbeddingsOrigin,
    IndexMeta,
    Preprocessing,
    StorePreprocessing,
    stain_record,
)
from marrowlens.embeddings import Embeddings, EmbeddingWriter
from marrowlens.errors import Interrupted, MarrowLensError, in_main_process
from marrowlens.provenance import python_api
from marrowlens.ssl.backbones import load_backbone
from marrowlens.ssl.preprocessing import Crop, crop_counts, eval_transform, resize_transform
from marrowlens.ssl.rank import is_global_zero


def stain_target_of(meta: EmbeddingsMeta | IndexMeta) -> ReinhardTarget | None:
    """The stain target an embedding store (or an index built from one) was made with."""
    return ReinhardTarget.from_dict(stain_record(meta))


def _fit_stain_target(cohort: Cohort, record: Preprocessing, sample: int = 256, seed: int = 0) -> ReinhardTarget:
    """Fit on a fixed random sample of the cohort's cells, as the backbone will see them (before the stain step)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(cohort.cells), size=min(sample, len(cohort.cells)), replace=False)
    resize = resize_transform(record)
    paths = cohort.cells["path"].to_numpy()
    return fit_reinhard(resize(load_cell(cohort, paths[r])) for r in sorted(rows))


def load_cell(cohort: Cohort, relative: str) -> Image.Image:
    """A cell the cohort lists; one that is gone or no longer decodes stops the run, named, with the fix."""
    path = cohort.image_path(relative)
    try:
        return load_rgb(path)
    except ImageDecodeError as exc:
        raise MarrowLensError(
            f"cell {path} is in the cohort but cannot be loaded ({exc}); "
            f"run `marrowlens cohort check {cohort.folder} --fix` to quarantine it, then run again"
        ) from exc


class CohortImages(Dataset[tuple[torch.Tensor, int]]):
    """Cells of a cohort by row index."""

    def __init__(self, cohort: Cohort, rows: np.ndarray, transform: T.Compose) -> None:
        self.cohort, self.paths = cohort, cohort.cells["path"].to_numpy()
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[index])
        return self.transform(load_cell(self.cohort, self.paths[row])), row


class _Embedder(pl.LightningModule):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval()

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> tuple[np.ndarray, np.ndarray]:
        images, rows = batch
        features = self.backbone(images).flatten(1).float()
        return rows.cpu().numpy(), features.cpu().numpy()


class _StoreWriter(BasePredictionWriter):
    def __init__(self, folder: Path, n_rows: int, dim: int, key: dict[str, Any]) -> None:
        super().__init__(write_interval="batch")
        self.args = (folder, n_rows, dim, key)
        self.writer: EmbeddingWriter | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.writer = EmbeddingWriter(*self.args, create=False)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: tuple[np.ndarray, np.ndarray],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rows, vectors = prediction
        if self.writer is not None:
            self.writer.write(rows, vectors)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()


def embed_images(
    model: nn.Module,
    info: BackboneRecord,
    images: Sequence[Image.Image],
    batch_size: int = 64,
    stain: ReinhardTarget | None = None,
) -> np.ndarray:
    """Embed in-memory images (search queries) with the same preprocessing as ``embed``."""
    transform = eval_transform(info.preprocessing, stain)
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im.convert("RGB")) for im in images[start : start + batch_size]])
            out.append(model(batch.to(device)).flatten(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, info.num_features), dtype=np.float32)


def _clear_store(out: Path) -> None:
    for name in (META_FILE, "vectors.npy", "cells.parquet", "vectors.partial.npy", "done.partial.npy", "progress.json"):
        (out / name).unlink(missing_ok=True)


@python_api
def embed_cohort(
    model_ref: str | Path,
    cohort_dir: str | Path,
    out: str | Path,
    weights: Path | None = None,
    image_size: int | None = None,
    batch_size: int = 256,
    devices: int | str = 1,
    accelerator: str = "auto",
    precision: str = "32",
    num_workers: int | None = None,
    overwrite: bool = False,
    stain_normalize: str = "none",
    crop: str | None = None,
) -> Embeddings | None:
    """Embed every cell of a cohort; resumes an unfinished store of the same inputs.

    Returns the store on the main process (None on the others under multi-device runs).
    """
    out = Path(out)
    if (out / META_FILE).is_file():
        if not overwrite:
            raise MarrowLensError(f"{out} already holds embeddings; pass --overwrite to replace them")
        _clear_store(out)
    elif overwrite and out.is_dir():
        _clear_store(out)
    if not is_precision(precision):
        raise MarrowLensError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if stain_normalize not in STAIN_NORMALIZATIONS:
        known = ", ".join(STAIN_NORMALIZATIONS)
        raise MarrowLensError(f"unknown stain normalisation {stain_normalize!r}; known: {known}")
    cohort = load_cohort(cohort_dir)
    if crop not in (None, *get_args(Crop)):
        raise MarrowLensError(f"unknown crop {crop!r}; known: {', '.join(get_args(Crop))}")
    model, info = load_backbone(model_ref, weights=weights, image_size=image_size, crop=cast(Crop | None, crop))
    stain = _fit_stain_target(cohort, info.preprocessing) if stain_normalize == "reinhard" else None
    key = {
        "model": info.fingerprint,
        "cohort": cohort.meta.fingerprint,
        "image_size": info.image_size,
        "stain": stain.to_dict() if stain else None,
        **({"crop": info.preprocessing.crop} if info.preprocessing.crop != "full" else {}),  # full frame: as before
    }
    store = EmbeddingWriter(out, len(cohort.cells), info.num_features, key=key, create=True)
    pending = store.pending()
    store.close()
    counts = None
    if len(pending):
        counts = _predict(
            model, info, stain, cohort, pending, out, key, batch_size, devices, accelerator, precision, num_workers
        )
    if not is_global_zero():
        return None
    final = EmbeddingWriter(out, len(cohort.cells), info.num_features, key=key, create=False)
    origin = EmbeddingsOrigin(
        model=info,
        cohort=CohortRef(folder=str(Path(cohort_dir).resolve()), fingerprint=cohort.meta.fingerprint),
        preprocessing=StorePreprocessing(
            **info.preprocessing.model_dump(),
            stain=stain.to_dict() if stain else None,
            cell_crop=CropCounts(found=counts[0], centre_crop=counts[1]) if counts else None,
        ),
    )
    return final.finish(cohort.cells, origin)


def _predict(
    model: nn.Module,
    info: BackboneRecord,
    stain: ReinhardTarget | None,
    cohort: Cohort,
    pending: np.ndarray,
    out: Path,
    key: dict[str, Any],
    batch_size: int,
    devices: int | str,
    accelerator: str,
    precision: Precision,
    num_workers: int | None,
) -> tuple[int, int] | None:
    """Embed the pending cells; the cell-crop step's (found, centre crop) counts, if it has one."""
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    transform = eval_transform(info.preprocessing, stain)
    loader = DataLoader(
        CohortImages(cohort, pending, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[_StoreWriter(out, len(cohort.cells), info.num_features, key), TQDMProgressBar()],
        inference_mode=True,
    )
    try:
        trainer.predict(_Embedder(model), dataloaders=loader, return_predictions=False)
    except SystemExit as exc:  # Lightning's graceful Ctrl-C ends in sys.exit(1)
        raise Interrupted(f"embedding interrupted; run the same command again to resume ({out})") from exc
    except MarrowLensError as exc:  # a missing cell, maybe seen by a loader worker
        raise in_main_process(exc) from exc.__cause__
    return crop_counts(transform)
