"""Tiny synthetic embedding stores with known structure, made by the tests themselves.

Each patient has a mutation; a leukemic patient's cells are blasts with probability
``blast_fraction`` (control patients: ``control_blast_fraction``). Non-blast cells sit around a
shared "normal" centre, blasts around a blast centre plus an offset of their patient's mutation,
so a blast probe separates blasts from the rest and a mutation head separates mutations only on
blasts: exactly what the blast filter is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from marrowlens.embeddings import Embeddings
from marrowlens.probes.patients import Bags, patient_table
from marrowlens.probes.pooling import MeanPooling
from tests.conftest import make_store

NON_BLAST_TYPES = ("lymphocyte", "neutrophil", "monocyte")
SYNTHETIC_MODEL = "sha256:" + "ab" * 32


def synthetic_cells(
    mutations: Sequence[str] = ("NPM1", "PML_RARA", "control"),
    patients_per_class: int = 4,
    cells_per_patient: int = 24,
    blast_fraction: float | dict[str, float] = 0.6,
    control_blast_fraction: float = 0.05,
    domains: Sequence[str] = ("centre_a", "centre_b"),
    seed: int = 0,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for m, mutation in enumerate(mutations):
        for p in range(patients_per_class):
            patient = f"{mutation}_p{p}"
            if mutation == "control":
                fraction = control_blast_fraction
            elif isinstance(blast_fraction, dict):
                fraction = blast_fraction.get(mutation, 0.6)
            else:
                fraction = blast_fraction
            for c in range(cells_per_patient):
                blast = bool(rng.random() < fraction)
                rows.append(
                    {
                        "cell_id": f"{patient}_c{c}",
                        "path": f"{mutation}/{patient}/c{c}.png",
                        "patient_id": patient,
                        "cell_type": "myeloblast"
                        if blast
                        else NON_BLAST_TYPES[int(rng.integers(len(NON_BLAST_TYPES)))],
                        "is_blast": blast,
                        "mutation": mutation,
                        "domain": domains[(m * patients_per_class + p) % len(domains)],
                        "split": None,
                        "width": 32,
                        "height": 32,
                    }
                )
    cells = pd.DataFrame(rows)
    cells["is_blast"] = cells["is_blast"].astype("boolean")
    return cells


def synthetic_vectors(cells: pd.DataFrame, dim: int = 16, separation: float = 4.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    mutations = sorted(cells["mutation"].dropna().unique())
    blast_centre = np.zeros(dim)
    blast_centre[0] = separation
    offsets = {m: np.eye(dim)[1 + i % (dim - 1)] * separation for i, m in enumerate(mutations)}
    cell_types = sorted(cells["cell_type"].dropna().unique())
    type_centre = {t: np.eye(dim)[(1 + len(mutations) + i) % dim] * separation * 0.75 for i, t in enumerate(cell_types)}
    vectors = rng.normal(0, 1, (len(cells), dim))
    for i, row in enumerate(cells.itertuples()):
        if pd.notna(row.is_blast) and bool(row.is_blast) and pd.notna(row.mutation):
            vectors[i] += blast_centre + offsets[row.mutation]
        elif row.cell_type in type_centre:
            vectors[i] += type_centre[row.cell_type] - blast_centre
    return vectors.astype(np.float32)


def synthetic_store(
    folder: Path,
    cells: pd.DataFrame | None = None,
    vectors: np.ndarray | None = None,
    fingerprint: str = SYNTHETIC_MODEL,
    **kwargs,
) -> Embeddings:
    """A store of :func:`synthetic_cells` (``kwargs``) and their :func:`synthetic_vectors`, unless given."""
    cells = synthetic_cells(**kwargs) if cells is None else cells
    vectors = synthetic_vectors(cells) if vectors is None else vectors
    return make_store(folder, vectors=vectors, cells=cells, fingerprint=fingerprint)


def long_servedio(n: int, rng: np.random.Generator, gamma: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Long & Servedio's (2010) distribution, mirrored into two classes: linearly separable, yet
    symmetric label noise makes every convex-loss linear classifier misplace the boundary.

    Per class: a large-margin point (1, 0) with mass 1/4, a "puller" (g, 5g) with 1/4 and a
    "penaliser" (g, -g) with 1/2; the other class is the mirror image.
    """
    kind = rng.choice(3, size=n, p=[0.25, 0.25, 0.5])
    base = np.array([[1.0, 0.0], [gamma, 5 * gamma], [gamma, -gamma]])[kind]
    sign = rng.choice([-1.0, 1.0], size=n)
    return (base * sign[:, None]).astype(np.float32), np.where(sign > 0, "pos", "neg")


def gaussian_classes(
    n: int,
    dim: int,
    rng: np.random.Generator,
    n_classes: int = 2,
    separation: float = 4.0,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one per class, ``separation`` apart along their own axis."""
    y = rng.choice(n_classes, size=n, p=weights)
    X = rng.normal(0, 1, (n, dim))
    X[np.arange(n), y % dim] += separation
    return X.astype(np.float32), np.array([f"c{k}" for k in y])


def mean_pooled_table(
    patients: np.ndarray, kept: np.ndarray, proba: np.ndarray, classes: list[str], truth: np.ndarray | None = None
) -> pd.DataFrame:
    """The patient table of the ``mean`` head for given cell calls (no store needed: it only pools them)."""
    n = len(patients)
    bags = Bags.of(patients, np.arange(n), kept, np.ones(n), proba, np.zeros((n, 1)), pd.DataFrame())
    return patient_table(patients, kept, proba, MeanPooling().predict(bags, classes), classes, truth)
