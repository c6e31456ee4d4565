"""Shared fixtures: tiny image folders and embedding stores made on the fly (no data files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import pytorch_lightning as pl
from PIL import Image
from typer.testing import CliRunner

from marrowlens.cli import app
from marrowlens.embeddings import Embeddings, write_embeddings


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


MUTATIONS = ("NPM1", "control")
RANDOM_MODEL = "random:test_resnet:seed0"


def model_meta(fingerprint: str = RANDOM_MODEL, dim: int = 16) -> dict[str, Any]:
    """A store's record of its backbone (timm's random-init ``test_resnet`` at 32 px); the code under
    test compares only the fingerprint and the width."""
    return {
        "timm_name": "test_resnet",
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "num_features": dim,
        "fingerprint": fingerprint,
        "source": "random init",
    }


def random_cells(n: int, prefix: str = "c") -> pd.DataFrame:
    """A cells table with every label column; labels cycle so filters have known answers."""
    rows = np.arange(n)
    return pd.DataFrame(
        {
            "cell_id": pd.array([f"{prefix}{i:06d}" for i in rows], dtype="string"),
            "path": pd.array([f"img/{prefix}{i}.png" for i in rows], dtype="string"),
            "patient_id": pd.array([f"P{i % 5}" for i in rows], dtype="string"),
            "cell_type": pd.array(["myeloblast" if i % 3 == 0 else "lymphocyte" for i in rows], dtype="string"),
            "is_blast": pd.array([i % 3 == 0 for i in rows], dtype="boolean"),
            "mutation": pd.array([MUTATIONS[i % 2] for i in rows], dtype="string"),
            "domain": pd.array([None] * n, dtype="string"),
            "split": pd.array([None] * n, dtype="string"),
            "width": np.full(n, 32, dtype="int32"),
            "height": np.full(n, 32, dtype="int32"),
        }
    )


def random_vectors(n: int, dim: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def make_store(
    folder: Path,
    n: int = 300,
    dim: int = 16,
    seed: int = 0,
    prefix: str = "c",
    fingerprint: str = RANDOM_MODEL,
    vectors: npt.NDArray[np.float32] | None = None,
    cells: pd.DataFrame | None = None,
) -> Embeddings:
    """An embedding store as ``marrowlens embed`` leaves it, written without a backbone.

    ``vectors`` default to ``n`` x ``dim`` random ones (one row per given cell), ``cells`` to
    :func:`random_cells`; the meta names a model by ``fingerprint``, the one thing stores are matched on.
    """
    if vectors is None:
        vectors = random_vectors(n if cells is None else len(cells), dim, seed)
    if cells is None:
        cells = random_cells(len(vectors), prefix)
    return write_embeddings(folder, vectors, cells, {"model": model_meta(fingerprint, vectors.shape[1])})


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
