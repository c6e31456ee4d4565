"""``marrowlens pretrain``: a Lightning Trainer from the config, on CPU, one GPU, or many GPUs/nodes.

Lightning does the loop, devices, DDP (also under torchrun or SLURM ``srun``, unchanged), mixed
precision, gradient accumulation and checkpoints; this module only decides the run folder rules
(no silent fresh start on ``--resume``, no overwrite without ``--overwrite``), scales the learning
rate with the global batch, and exports the trained backbone at the end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from marrowlens.artifacts import clean_stale_temporaries, require_same_fingerprint, write_json_atomic, write_meta
from marrowlens.cohort.manifest import load_cohort
from marrowlens.config import PretrainConfig, dump_config, load_config
from marrowlens.contracts import BackboneRecord, CheckSubsetRecord, CohortRef, RunMeta
from marrowlens.errors import Interrupted, MarrowLensError, in_main_process
from marrowlens.provenance import python_api
from marrowlens.ssl.backbones import export_backbone
from marrowlens.ssl.base import scaled_lr
from marrowlens.ssl.data import PretrainData, check_subset
from marrowlens.ssl.methods import METHODS
from marrowlens.ssl.preprocessing import eval_transform, for_backbone
from marrowlens.ssl.rank import is_global_zero

CONFIG_FILE = "config.yaml"
COHORT_FILE = "cohort.json"
LAST_CKPT = Path("checkpoints") / "last.ckpt"
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written; renamed onto its name when whole
# Settings a resumed run may change; anything else would make it a different run.
RESUMABLE = {("trainer", "max_epochs"), ("data", "num_workers")}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files appear whole or not at all: a kill mid-save keeps the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        partial = f"{path}{PARTIAL_SUFFIX}"
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def checkpoint_callbacks(folder: Path, monitor: str | None) -> list[ModelCheckpoint]:
    """``best-{epoch}.ckpt`` by the monitored metric, and ``last.ckpt`` after every finished epoch.

    Lightning's ``save_last`` writes ``last.ckpt`` only in epochs that improved the monitored metric,
    so ``last`` is its own unmonitored checkpoint, overwritten in place (no version suffix). Both save
    in ``on_train_epoch_end``, after the epoch's online k-NN check has run; ``best`` comes first so
    that ``last.ckpt`` holds its updated state.
    """
    best = ModelCheckpoint(
        dirpath=str(folder),
        filename="best-{epoch}",
        monitor=monitor or "train_loss_epoch",
        mode="max" if monitor else "min",
        save_top_k=1,
        save_on_train_epoch_end=True,
    )
    last = ModelCheckpoint(
        dirpath=str(folder),
        filename=LAST_CKPT.stem,
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    return [best, last]


@dataclass
class PretrainResult:
    run_dir: Path
    backbone: BackboneRecord
    metrics: dict[str, float]


def resolve_config(config: PretrainConfig, out: Path, resume: bool) -> PretrainConfig:
    """On ``--resume`` the run's saved config wins; only RESUMABLE settings may differ."""
    if not resume:
        return config
    saved = load_config(PretrainConfig, out / CONFIG_FILE)
    new, old = config.model_dump(mode="json"), saved.model_dump(mode="json")
    for section, values in new.items():
        for key, value in values.items():
            if (section, key) not in RESUMABLE and old[section][key] != value:
                raise MarrowLensError(
                    f"--resume continues {out} as configured, but {section}.{key} is {value!r} here and "
                    f"{old[section][key]!r} in {out / CONFIG_FILE}"
                )
    if config.trainer.max_epochs != saved.trainer.max_epochs and is_global_zero():
        print(
            f"note: training now stops after {config.trainer.max_epochs} epochs, but the learning-rate schedule "
            f"restored from {out / LAST_CKPT} stays the one planned for {saved.trainer.max_epochs} epochs"
        )
    return config


def require_same_cohort(out: Path, cohort_dir: Path, fingerprint: str, resume: bool, launching: bool) -> None:
    """The cohort is part of a run: note it at the start, and refuse to resume on another one."""
    path = out / COHORT_FILE
    if resume and path.is_file():
        started = json.loads(path.read_text())
        require_same_fingerprint(
            "cohort",
            started["fingerprint"],
            f"{out} (started on {started['folder']})",
            fingerprint,
            f"--cohort {cohort_dir}",
        )
    elif launching:  # a new run, or one started before runs noted their cohort
        write_json_atomic(path, {"folder": str(Path(cohort_dir).resolve()), "fingerprint": fingerprint})


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise MarrowLensError("--resume and --overwrite contradict each other")
    if resume:
        if not (out / LAST_CKPT).is_file():
            raise MarrowLensError(f"nothing to resume: {out / LAST_CKPT} does not exist")
        if not (out / CONFIG_FILE).is_file():
            raise MarrowLensError(f"cannot resume: {out / CONFIG_FILE} is missing")
        clean_stale_temporaries(out)  # what a killed run left half-written (up to a checkpoint's size)
        clean_stale_temporaries(out / LAST_CKPT.parent, (f"*{PARTIAL_SUFFIX}",))
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MarrowLensError(
                f"{out} is not empty; pass --resume to continue that run or --overwrite to start over"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build_trainer(config: PretrainConfig, out: Path, monitor: str | None) -> pl.Trainer:
    trainer_cfg = config.trainer
    loggers: list[Logger] = [CSVLogger(save_dir=str(out), name="logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard"))
    devices = trainer_cfg.devices
    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
        trainer_cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    several = trainer_cfg.nodes > 1 or devices == "auto" or (isinstance(devices, int) and devices > 1)
    return pl.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=devices,
        num_nodes=trainer_cfg.nodes,
        strategy=trainer_cfg.strategy,
        sync_batchnorm=on_gpu and several,  # GPU-only in torch; a model without batch norm stays as it is
        precision=trainer_cfg.precision,
        max_epochs=trainer_cfg.max_epochs,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        limit_train_batches=trainer_cfg.limit_train_batches,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        use_distributed_sampler=False,
        # tqdm, not rich: its lines survive in non-terminal logs (SLURM, nohup)
        callbacks=[
            *checkpoint_callbacks(out / LAST_CKPT.parent, monitor),
            LearningRateMonitor(logging_interval="step"),
            TQDMProgressBar(),
        ],
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        logger=loggers,
        default_root_dir=str(out),
        num_sanity_val_steps=0,
        deterministic=False,
    )


def require_steps(cells: int, world: int, batch: int, config: PretrainConfig) -> None:
    """Refuse a run whose epochs take no optimizer step: it would "finish" with an untrained backbone.

    Counted as Lightning runs them: full batches only (the sampler and the loader drop the rest), cut
    by ``limit_train_batches`` (a fraction rounds down), one step per ``accumulate_grad_batches``
    batches and one for a remainder at the end of the epoch.
    """
    full = cells // world // batch
    limit = config.trainer.limit_train_batches
    batches = full if limit is None else min(full, limit) if isinstance(limit, int) else int(full * limit)
    if math.ceil(batches / config.trainer.accumulate_grad_batches) < 1:
        kept = "" if limit is None else f", of which trainer.limit_train_batches={limit} keeps {batches}"
        raise MarrowLensError(
            f"this run trains 0 steps: {cells} cells on {world} device(s) "
            f"give {full} full batches of {batch} per epoch{kept}"
        )


def how_to_continue(out: Path) -> str:
    """What continues an interrupted ``marrowlens pretrain``: --resume needs a finished epoch."""
    if (out / LAST_CKPT).is_file():
        return f"run the same command with --resume to continue from {out / LAST_CKPT}"
    return (
        f"no epoch had finished ({out / LAST_CKPT} does not exist): run the same command with --overwrite to start over"
    )


@python_api
def pretrain(
    config: PretrainConfig, cohort_dir: Path, out: Path, resume: bool = False, overwrite: bool = False
) -> PretrainResult | None:
    """Train, checkpoint and export; returns the result on the main process (None elsewhere)."""
    out = Path(out)
    cohort = load_cohort(cohort_dir)
    has_check = check_subset(cohort.cells, config.data.val_cells, config.trainer.seed) is not None
    trainer = build_trainer(config, out, "val_knn_acc" if has_check else None)
    launching = is_global_zero()  # right from here on, on every node (see ssl.rank)
    if launching:
        prepare_run_dir(out, resume, overwrite)
    config = resolve_config(config, out, resume)
    require_same_cohort(out, cohort_dir, cohort.meta.fingerprint, resume, launching)
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
    record = for_backbone(config.model.backbone, config.model.image_size, config.data.crop)
    method = METHODS[config.model.method]
    views = method.build_views(config, record.mean, record.std)
    world = trainer.world_size
    batch = min(config.data.batch_size, len(cohort.cells) // world)
    if batch < 2:
        raise MarrowLensError(f"{len(cohort.cells)} cells cannot fill a batch of 2 per device on {world} device(s)")
    require_steps(len(cohort.cells), world, batch, config)
    data = PretrainData(cohort, config, views, eval_transform(record), batch)
    global_batch = batch * world * config.trainer.accumulate_grad_batches
    lr = scaled_lr(config, global_batch)
    module = method.from_config(config, lr=lr, knn_classes=len(data.subset.classes) if data.subset else 0)
    if launching:
        if batch != config.data.batch_size:
            print(f"note: batch size lowered to {batch} per device: the cohort has only {len(cohort.cells)} cells")
        backbone = module.embedding_backbone
        params = sum(p.numel() for p in backbone.parameters())
        print(
            f"{config.model.method} with {config.model.backbone} ({params / 1e6:.1f} M parameters, "
            f"{backbone.num_features} features) on {len(cohort.cells)} cells"
        )
        print(
            f"learning rate {lr:.4g} for a global batch of {global_batch} ({config.optim.lr_scaling} scaling of "
            f"base_lr {config.optim.base_lr} per 256)"
        )
        if not resume:
            dump_config(config, out / CONFIG_FILE)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(out / LAST_CKPT) if resume else None)
    except SystemExit as exc:  # Lightning's graceful Ctrl-C ends in sys.exit(1)
        raise Interrupted(f"training interrupted; {how_to_continue(out)}") from exc
    except MarrowLensError as exc:  # a missing cell, maybe seen by a loader worker
        raise in_main_process(exc) from exc.__cause__
    if not trainer.is_global_zero:
        return None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    info = export_backbone(module.embedding_backbone, config.model.backbone, record, out)
    subset = data.subset
    meta = RunMeta(
        method=config.model.method,
        backbone=info,
        cohort=CohortRef(folder=str(Path(cohort_dir).resolve()), fingerprint=cohort.meta.fingerprint),
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        world_size=world,
        global_batch=global_batch,
        lr=lr,
        metrics=metrics,
        check_subset=CheckSubsetRecord(label=subset.label_column, classes=subset.classes) if subset else None,
    )
    write_meta(out, meta)
    return PretrainResult(out, info, metrics)
