"""Shared fixtures: tiny image folders and embedding stores made on the fly (no data files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image
from typer.testing import CliRunner

from marrowlens.cli import app


def write_cell(path: Path, seed: int, size: int = 32, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random blob image, enough for decoding and layout tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = size * rng.uniform(0.2, 0.4)
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    array = np.full((size, size, 3), 230, dtype=np.uint8)
    array[disk] = rng.integers(60, 200, size=3, dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def mutation_tree(tmp_path: Path) -> Path:
    """ROOT/<mutation>/<patient>/<image>: two classes, two patients each, three cells each."""
    root = tmp_path / "aml"
    seed = 0
    for mutation in ("NPM1", "control"):
        for patient in range(2):
            for cell in range(3):
                seed += 1
                write_cell(root / mutation / f"{mutation}_p{patient}" / f"cell{cell}.png", seed)
    return root


class Cli:
    """Runs the CLI in-process and returns (exit code, output)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str) -> tuple[int, str]:
        from marrowlens.errors import MarrowLensError

        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
        if isinstance(result.exception, MarrowLensError):
            return 2, f"error: {result.exception}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output


@pytest.fixture
def cli() -> Cli:
    return Cli()


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli_subprocess(*args: object, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run ``python -m marrowlens ARGS`` in a fresh process with this checkout first on the path."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "marrowlens", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class InterruptAtEpoch(pl.Callback):
    """Presses Ctrl-C at the start of an epoch (Lightning turns it into sys.exit(1))."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt
