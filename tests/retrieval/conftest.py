"""Fixtures for retrieval tests: random embedding stores (pure index tests) and one tiny image cohort.

The image cohort is embedded once per session with timm's random-init ``test_resnet`` at 32 px,
the cheapest real backbone, so CLI and web tests exercise the real embed -> index -> search path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.embeddings import write_embeddings
from tests.conftest import Cli, write_cell

MUTATIONS = ("NPM1", "control")


def model_meta(fingerprint: str = "random:test_resnet:seed0", dim: int = 16) -> dict:
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


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def make_store(
    folder: Path,
    n: int = 300,
    dim: int = 16,
    seed: int = 0,
    prefix: str = "c",
    fingerprint: str = "random:test_resnet:seed0",
    vectors: np.ndarray | None = None,
):
    vectors = random_vectors(n, dim, seed) if vectors is None else vectors
    return write_embeddings(
        folder, vectors, random_cells(len(vectors), prefix), {"model": model_meta(fingerprint, vectors.shape[1])}
    )


@dataclass
class ImageIndex:
    """A tiny real cohort: images on disk, its embeddings and a flat index over them."""

    root: Path
    cohort: Path
    emb: Path
    idx: Path

    def image(self, mutation: str = "NPM1", patient: int = 0, cell: int = 0) -> Path:
        return self.root / mutation / f"{mutation}_p{patient}" / f"cell{cell}.png"


@pytest.fixture(scope="session")
def image_index(tmp_path_factory: pytest.TempPathFactory) -> ImageIndex:
    base = tmp_path_factory.mktemp("image_index")
    root = base / "aml"
    seed = 100
    for mutation in MUTATIONS:
        for patient in range(2):
            for cell in range(6):
                seed += 1
                write_cell(root / mutation / f"{mutation}_p{patient}" / f"cell{cell}.png", seed, size=40)
    cli = Cli()
    for args in (
        ("cohort", "index", root, "--out", base / "cohort", "--workers", "2"),
        (
            "embed",
            "--model",
            "test_resnet",
            "--image-size",
            "32",
            "--cohort",
            base / "cohort",
            "--out",
            base / "emb",
            "--num-workers",
            "0",
            "--accelerator",
            "cpu",
        ),
        ("index", "build", "--embeddings", base / "emb", "--out", base / "idx"),
    ):
        code, output = cli(*args)
        assert code == 0, output
    return ImageIndex(root=root, cohort=base / "cohort", emb=base / "emb", idx=base / "idx")
