"""Training throughput of ``marrowlens pretrain`` against a plain PyTorch SimCLR loop.

The reference is written after lightly's own SimCLR example (examples/pytorch/simclr.py): a
Dataset that decodes and transforms, a shuffling DataLoader, backbone + SimCLRProjectionHead,
NTXentLoss, one optimiser step per batch. Both sides use the same timm backbone, batch size,
views (our cell views), images and loader workers; runs alternate A/B/A/B so machine noise hits
both. Reports cells/s (each cell = 2 views) and the ratio marrowlens / reference.

    python bench/pretrain_throughput.py --cohort COHORT [--backbone resnet18 --image-size 64 --batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torch.utils.data import DataLoader, Dataset

from marrowlens.cohort.images import load_rgb
from marrowlens.cohort.manifest import load_cohort
from marrowlens.config import PretrainConfig, load_config
from marrowlens.ssl import train
from marrowlens.ssl.backbones import create_backbone
from marrowlens.ssl.preprocessing import default_norm
from marrowlens.ssl.views import two_global_views


class _PlainImages(Dataset):
    def __init__(self, cohort, transform) -> None:
        self.paths = [cohort.image_path(p) for p in cohort.cells["path"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), index


def reference_loop(config: PretrainConfig, cohort, warmup: int, steps: int, device: str) -> float:
    """Cells/s of a plain loop (lightly's SimCLR example, same parts as ours)."""
    torch.manual_seed(0)
    backbone = create_backbone(config.model.backbone, config.model.image_size).to(device)
    head = SimCLRProjectionHead(backbone.num_features, config.simclr.hidden_dim, config.simclr.out_dim).to(device)
    model = nn.Sequential(backbone, head)
    criterion = NTXentLoss(temperature=config.simclr.temperature)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    views = two_global_views(config, *default_norm(config.model.backbone))
    loader = DataLoader(
        _PlainImages(cohort, views),
        batch_size=config.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.data.num_workers,
        pin_memory=device == "cuda",
    )
    autocast = torch.autocast(
        device_type=device, dtype=torch.bfloat16, enabled=config.trainer.precision == "bf16-mixed"
    )
    done, start = 0, None
    while done < warmup + steps:
        for (x0, x1), _ in loader:
            if done == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with autocast:
                z0, z1 = model(x0.to(device, non_blocking=True)), model(x1.to(device, non_blocking=True))
                loss = criterion(z0, z1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == warmup + steps:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * config.data.batch_size / (time.perf_counter() - start)


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.end, self.steps = time.perf_counter(), batch_idx - self.warmup + 1


def marrowlens_run(config: PretrainConfig, cohort_dir: Path, warmup: int, steps: int) -> float:
    """Cells/s of ``marrowlens pretrain`` (the library call behind the command), same settings."""
    timer = _StepTimer(warmup)
    build = train.build_trainer

    def timed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(timer)
        return trainer

    train.build_trainer = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            train.pretrain(config, cohort_dir, Path(out) / "run")
    finally:
        train.build_trainer = build
    return timer.steps * config.data.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(
        PretrainConfig,
        None,
        [
            f"model.backbone={args.backbone}",
            f"model.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            "data.val_cells=0",
            f"trainer.precision={args.precision}",
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={args.warmup + args.steps}",
            "trainer.log_every_n_steps=1000",
            "optim.optimizer=sgd",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            "trainer.devices=1",
        ],
    )
    cohort = load_cohort(args.cohort)
    needed = (args.warmup + args.steps) * args.batch_size
    if len(cohort.cells) < needed:
        raise SystemExit(f"the cohort has {len(cohort.cells)} cells; this run needs {needed}")
    ours, reference = [], []
    for _ in range(args.repeats):
        reference.append(reference_loop(config, cohort, args.warmup, args.steps, device))
        ours.append(marrowlens_run(config, args.cohort, args.warmup, args.steps))
    ratios = [a / b for a, b in zip(ours, reference)]
    result = {
        "machine": (
            f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            + (torch.cuda.get_device_name() if device == "cuda" else "CPU only")
        ),
        "settings": vars(args) | {"cohort": str(args.cohort), "json": None},
        "marrowlens_cells_per_s": [round(x, 1) for x in ours],
        "reference_cells_per_s": [round(x, 1) for x in reference],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
