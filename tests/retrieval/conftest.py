"""Fixtures for retrieval tests: one tiny image cohort (random stores: ``tests.conftest.make_store``)
and a mutation probe folder over its cells, for the patient pages.

The image cohort is embedded once per session with timm's random-init ``test_resnet`` at 32 px,
the cheapest real backbone, so CLI and web tests exercise the real embed -> index -> search path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import MUTATIONS, Cli, write_cell


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


ODD_PATIENT = "odd <b>id</b> & 'x'"  # a patient id with a space, markup and quotes: must come out escaped
NOT_INDEXED = ("f" * 64, "e" * 64)  # cells of the probe's cohort that the index does not hold


@dataclass
class MutationProbe:
    """A hand-written mutation probe folder over ``image_index``'s cells (the probe writer's contract)."""

    folder: Path
    report: dict
    cells: pd.DataFrame


def write_mutation_probe(folder: Path, image_index: ImageIndex) -> MutationProbe:
    """One patient per cohort patient, ``control_p1`` renamed to ``ODD_PATIENT``; ``NPM1_p1`` misclassified.

    Within a patient, contributions fall with the cell's position in the index; its last cell is unused
    (NaN) and filtered out; ``NPM1_p0`` also names two cells the index lacks.
    """
    from marrowlens.retrieval.index import load_index

    index = load_index(image_index.idx)
    indexed = index.cells[["cell_id", "patient_id"]].astype(str)
    indexed["patient_id"] = indexed["patient_id"].replace("control_p1", ODD_PATIENT)
    rows = []
    for patient, group in indexed.groupby("patient_id", sort=True):
        ids = list(group["cell_id"]) + (list(NOT_INDEXED) if patient == "NPM1_p0" else [])
        for position, cell_id in enumerate(ids):
            unused = position == len(group) - 1
            contribution = float("nan") if unused else 1.0 - 0.1 * position
            rows.append({"cell_id": cell_id, "patient_id": patient, "kept": not unused, "contribution": contribution})
    cells = pd.DataFrame(rows)
    patients = []
    for patient, group in cells.groupby("patient_id", sort=True):
        truth = "control" if patient == ODD_PATIENT else str(patient).split("_")[0]
        predicted = "control" if patient == "NPM1_p1" else truth
        p_npm1 = 0.3 if predicted == "control" else 0.8
        patients.append(
            {
                "patient_id": patient,
                "n_cells": len(group),
                "n_kept": int(group["kept"].sum()),
                "truth": truth,
                "predicted": predicted,
                "confidence": max(p_npm1, 1 - p_npm1),
                "p_NPM1": p_npm1,
                "p_control": 1 - p_npm1,
            }
        )
    report = {
        "task": "mutation",
        "classes": ["NPM1", "control"],
        "embeddings": {
            "folder": str(image_index.emb),
            "fingerprint": "sha256:" + "0" * 64,
            "model_fingerprint": index.model_fingerprint,
        },
        "patient_head": {"name": "abmil", "contribution": "attention weight"},
        "patients": patients,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    cells.to_parquet(folder / "patient_cells.parquet", index=False)
    return MutationProbe(folder=folder, report=report, cells=cells)


@pytest.fixture(scope="session")
def mutation_probe(image_index: ImageIndex, tmp_path_factory: pytest.TempPathFactory) -> MutationProbe:
    return write_mutation_probe(tmp_path_factory.mktemp("probe") / "mutation", image_index)
