"""A tiny labelled cohort (two visibly different cell kinds, four patients) for SSL tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from marrowlens.cohort.manifest import index_cohort

TINY = [
    "model.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.val_cells=64",
    "trainer.log_every_n_steps=1",
]


def _blob(path: Path, seed: int, big: bool) -> None:
    rng = np.random.default_rng(seed)
    size = 40
    yy, xx = np.mgrid[:size, :size]
    radius = (14 if big else 7) + rng.uniform(-1.5, 1.5)
    disk = (yy - size / 2 - rng.uniform(-2, 2)) ** 2 + (xx - size / 2) ** 2 < radius**2
    array = np.full((size, size, 3), 235, dtype=np.uint8)
    array[disk] = (120, 70, 160) if big else (60, 40, 110)
    array = np.clip(array + rng.normal(0, 8, array.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="session")
def labelled_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for patient in range(4):
        for cell in range(8):
            big = cell % 2 == 0
            relative = f"images/P{patient}/c{cell}.png"
            _blob(root / relative, seed=patient * 100 + cell, big=big)
            rows.append(
                {"path": relative, "patient_id": f"P{patient}", "cell_type": "myeloblast" if big else "lymphocyte"}
            )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    index_cohort([root / "labels.csv"], root / "cohort")
    return root / "cohort"


@pytest.fixture
def cohort_missing_a_cell(tmp_path: Path) -> tuple[Path, Path]:
    """A small cohort, and one of its listed images deleted after indexing."""
    from marrowlens.cohort.synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(tmp_path / "synthetic", patients=4, cells_per_patient=8, image_size=32, seed=2)
    gone = cohort.image_path(cohort.cells["path"].iloc[5])
    gone.unlink()
    return cohort.folder, gone
