"""Contact sheets of the cells behind each patient call (mutation reports)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.embeddings import write_embeddings
from marrowlens.probes import commands
from marrowlens.probes.pooling import log_odds
from marrowlens.probes.report import REPORT_JSON, REPORT_MD, write_report
from marrowlens.probes.sheets import CellCalls, safe_name
from tests.conftest import model_meta, write_cell
from tests.probes.helpers import SYNTHETIC_MODEL, mean_pooled_table, synthetic_cells, synthetic_vectors

CLASSES = ["NPM1", "control"]


def _calls(cohort: Path | None, rng: np.random.Generator) -> tuple[pd.DataFrame, CellCalls]:
    """Four patients, five kept cells each; patient ``NPM1 p/1`` is called control (misclassified)."""
    patients, proba, paths, truth = [], [], [], []
    for p, (patient, label, p_npm1) in enumerate(
        [
            ("NPM1_p0", "NPM1", 0.8),
            ("NPM1 p/1", "NPM1", 0.2),
            ("control_p0", "control", 0.1),
            ("control_p1", "control", 0.3),
        ]
    ):
        for c in range(5):
            value = float(np.clip(p_npm1 + rng.normal(0, 0.05), 0.01, 0.99))
            patients.append(patient)
            proba.append([value, 1 - value])
            paths.append(f"{label}/p{p}/c{c}.png")
            truth.append(label)
            if cohort is not None:
                write_cell(cohort / paths[-1], seed=10 * p + c)
    table = mean_pooled_table(
        np.array(patients), np.ones(len(patients), bool), np.array(proba), CLASSES, np.array(truth)
    )
    called = table.set_index("patient_id").loc[patients, "predicted"].map(CLASSES.index).to_numpy()
    calls = CellCalls(
        patients=np.array(patients),
        cell_ids=np.array([f"c{i}" for i in range(len(patients))]),
        kept=np.ones(len(patients), bool),
        contribution=log_odds(np.array(proba), called),
        paths=np.array(paths, dtype=object),
        cell_types=np.array(["myeloblast", None, "monocyte", np.nan, "myeloblast"] * 4, dtype=object),
        head="mean",
        meaning="log-odds",
        cohort=cohort,
        per_sheet=3,
        correct_sheets=50,
    )
    return table, calls


def _report() -> dict:
    return {"task": "mutation", "classes": CLASSES, "evaluation": {}, "cell": None}


def test_contributions_are_log_odds() -> None:
    proba = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(log_odds(proba, np.zeros(3, dtype=int)), [0.0, np.log(9), np.log(0.25)])


def test_safe_names_are_unique_file_names() -> None:
    taken: set[str] = set()
    assert safe_name("NPM1 p/1", taken) == "NPM1_p_1"
    assert safe_name("NPM1_p:1", taken) == "NPM1_p_1-2"
    assert safe_name("../x", taken) == "_x"


def test_sheets_per_patient_misclassified_first(tmp_path: Path) -> None:
    table, calls = _calls(tmp_path / "cohort", np.random.default_rng(0))
    (tmp_path / "cohort" / "control/p3/c0.png").write_bytes(b"not a png")  # unreadable: a grey tile
    (tmp_path / "cohort" / "control/p3/c1.png").unlink()  # gone: a grey tile
    out = tmp_path / "probe"
    written = write_report(out, _report(), table, calls)
    report = json.loads((out / REPORT_JSON).read_text())
    sheets = report["sheets"]["patients"]
    assert sheets[0]["patient_id"] == "NPM1 p/1" and sheets[0]["misclassified"]
    assert {s["patient_id"] for s in sheets} == set(table["patient_id"])
    assert sum(s["misclassified"] for s in sheets) == 1
    for entry in sheets:
        path = out / entry["sheet"]
        assert path.is_file() and path.stat().st_size > 0 and path in written
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "patients" / "NPM1_p_1.png").is_file()
    markdown = (out / REPORT_MD).read_text()
    section = markdown[markdown.index("## Cells behind each call") :]
    assert section.index("[NPM1 p/1](patients/NPM1_p_1.png)") < section.index("[NPM1_p0](patients/NPM1_p0.png)")
    assert "**misclassified**" in section


def test_cap_on_correct_patients(tmp_path: Path) -> None:
    table, calls = _calls(tmp_path / "cohort", np.random.default_rng(1))
    write_report(tmp_path / "probe", _report(), table, calls)  # an earlier report, every patient drawn
    calls.correct_sheets = 1
    write_report(tmp_path / "probe", _report(), table, calls)
    report = json.loads((tmp_path / "probe" / REPORT_JSON).read_text())
    assert [s["misclassified"] for s in report["sheets"]["patients"]] == [True, False]
    assert "2 correctly called patient(s) without a sheet" in report["sheets"]["note"]
    assert len(list((tmp_path / "probe" / "patients").glob("*.png"))) == 2


@pytest.mark.parametrize("cohort", [None, "missing"])
def test_unreachable_cohort_is_one_line(tmp_path: Path, cohort: str | None) -> None:
    table, calls = _calls(None, np.random.default_rng(2))
    calls.cohort = None if cohort is None else tmp_path / cohort
    written = write_report(tmp_path / "probe", _report(), table, calls)
    assert not (tmp_path / "probe" / "patients").exists()
    assert not any("patients/" in str(p) for p in written)
    markdown = (tmp_path / "probe" / REPORT_MD).read_text()
    notes = [line for line in markdown.splitlines() if line.startswith("contact sheets skipped")]
    assert len(notes) == 1


def test_fit_writes_sheets_from_out_of_fold_calls(tmp_path: Path) -> None:
    cells = synthetic_cells(mutations=("NPM1", "control"), patients_per_class=2, cells_per_patient=6)
    cohort = tmp_path / "cohort"
    for i, path in enumerate(cells["path"]):
        write_cell(cohort / path, seed=i)
    vectors = synthetic_vectors(cells)
    origin = {
        "model": model_meta(SYNTHETIC_MODEL, vectors.shape[1]),
        "cohort": {"folder": str(cohort), "fingerprint": "cd" * 32},
    }
    write_embeddings(tmp_path / "emb", vectors, cells, origin)
    knn = {"head": "knn", "loss.name": None}
    blast = commands.probe_config("blast", None, knn, ["eval.cv=0"])
    commands.fit("blast", tmp_path / "emb", tmp_path / "blast", blast)
    config = commands.probe_config("mutation", None, knn, ["eval.cv=2", "eval.bootstrap=5"])
    commands.fit("mutation", tmp_path / "emb", tmp_path / "probe", config, blast_probe=tmp_path / "blast")
    report = json.loads((tmp_path / "probe" / REPORT_JSON).read_text())
    determined = [p for p in report["patients"] if p["predicted"] != "undetermined"]
    assert len(report["sheets"]["patients"]) == len(determined) > 0
    for entry in report["sheets"]["patients"]:
        assert (tmp_path / "probe" / entry["sheet"]).stat().st_size > 0
    assert "## Cells behind each call" in (tmp_path / "probe" / REPORT_MD).read_text()


def test_sheet_images_come_from_the_cohorts_image_root(tmp_path: Path) -> None:
    """An indexed cohort keeps its images where they were (DeepAPL: the shared data folder), not in its folder."""
    from marrowlens.cohort.manifest import IndexOptions, index_cohort

    images = tmp_path / "images"
    for i, path in enumerate(synthetic_cells(mutations=("NPM1", "control"), patients_per_class=1)["path"][:4]):
        write_cell(images / path, seed=i)
    index_cohort([images], tmp_path / "cohort", IndexOptions(layout="mutation_patient", workers=1))
    assert commands._cohort_images(tmp_path / "cohort") == images.resolve()
    assert commands._cohort_images(tmp_path / "not_a_cohort") == tmp_path / "not_a_cohort"  # sheets say why
