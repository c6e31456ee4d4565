"""`probe test`: a fitted probe, as is, on a cohort it never saw (other patients, same backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from marrowlens.artifacts import read_meta
from marrowlens.contracts import ProbeTestMeta
from marrowlens.embeddings import load_embeddings
from marrowlens.probes.folder import load_probe
from marrowlens.probes.tasks import RowView
from tests.conftest import Cli
from tests.probes.helpers import synthetic_cells, synthetic_store, synthetic_vectors

FAST = ["--cv", "0", "--set", "linear.max_epochs=40", "--set", "linear.patience=4"]
SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blast probe and a mutation probe (through it), fitted without CV on one synthetic cohort."""
    root = tmp_path_factory.mktemp("external")
    synthetic_store(root / "emb", patients_per_class=5, cells_per_patient=20)
    cli = Cli()
    code, out = cli("probe", "fit", "blast", "--embeddings", root / "emb", "--out", root / "blast", *FAST)
    assert code == 0, out
    code, out = cli(
        "probe", "fit", "mutation", "--embeddings", root / "emb", "--blast-probe", root / "blast",
        "--out", root / "mutation", *FAST,
    )  # fmt: skip
    assert code == 0, out
    return root


def other_cohort(folder: Path, mutations: tuple[str, ...] = ("NPM1", "PML_RARA", "control"), seed: int = 7) -> Path:
    """Another cohort of the same backbone: other patients, other cells, the same biology."""
    cells = synthetic_cells(mutations, patients_per_class=3, cells_per_patient=20, seed=seed)
    cells["patient_id"] = "ext_" + cells["patient_id"]
    synthetic_store(folder, cells=cells, vectors=synthetic_vectors(cells, seed=seed))
    return folder


def unlabelled(folder: Path) -> None:
    cells = synthetic_cells()
    synthetic_store(folder, cells=cells.drop(columns="mutation"), vectors=synthetic_vectors(cells))


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_a_fitted_probe_on_another_cohort_reports_cells_and_patients(cli, fitted: Path, tmp_path: Path) -> None:
    test_store, out = other_cohort(tmp_path / "other"), tmp_path / "test"
    code, text = cli(
        "probe", "test", fitted / "mutation", "--embeddings", test_store, "--out", out, "--bootstrap", "30"
    )
    assert code == 0, text
    assert "cell level" in text and "patient level (" in text and f"wrote {out / 'meta.json'}" in text
    assert "warning" not in text and "left out" not in text
    report = _report(out)
    assert report["evaluation"]["kind"] == "external-test" and "nothing refitted" in report["evaluation"]["description"]
    assert report["probe"]["fingerprint"] == json.loads((fitted / "mutation" / "probe.json").read_text())["fingerprint"]
    for level in ("cell", "patient"):
        for name in SUMMARY:
            assert report[level][name]["ci"] is not None, (level, name)
    assert report["patient"]["n_patients"] == 9 and all(p["patient_id"].startswith("ext_") for p in report["patients"])
    assert report["patient"]["accuracy"]["value"] > 0.5  # chance: 1/3
    for name in (
        "report.md",
        "report.html",
        "confusion_cell.png",
        "confusion_patient.png",
        "calibration.png",
        "patients.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "report.md").read_text().startswith("# External test: mutation")
    meta = read_meta(out, ProbeTestMeta)
    assert meta.probe.trained_on.fingerprint == load_embeddings(fitted / "emb").fingerprint
    assert meta.embeddings.fingerprint == load_embeddings(test_store).fingerprint
    code, text = cli("probe", "test", fitted / "mutation", "--embeddings", test_store, "--out", out)
    assert code == 2 and "--overwrite" in text


def test_the_mutation_probe_keeps_the_cells_its_own_blast_filter_keeps(fitted: Path, tmp_path: Path) -> None:
    from marrowlens.probes.commands import external_test

    test_store = other_cohort(tmp_path / "other", seed=11)
    external_test(fitted / "mutation", test_store, tmp_path / "test", bootstrap=0)
    emb = load_embeddings(test_store)
    blast, _ = load_probe(fitted / "blast", emb)
    expected = int((blast.blast_probability(RowView(emb.vectors, np.arange(len(emb)))) >= 0.5).sum())
    report = _report(tmp_path / "test")
    assert report["cell"]["n_kept"] == expected < report["cell"]["n_evaluated"] == len(emb)
    assert "not refitted" in report["evaluation"]["blast_filter"]


def test_classes_the_probe_never_learned_are_left_out_saying_so(cli, fitted: Path, tmp_path: Path) -> None:
    test_store = other_cohort(tmp_path / "other", ("NPM1", "CBFB_MYH11", "control"))
    code, text = cli("probe", "test", fitted / "mutation", "--embeddings", test_store, "--out", tmp_path / "t")
    assert code == 0, text
    assert text.splitlines()[0] == "left out, classes the probe never learned: CBFB_MYH11 (60 cells, 3 patients)"
    report = _report(tmp_path / "t")
    assert report["classes"] == ["NPM1", "PML_RARA", "control"] and report["patient"]["n_patients"] == 6
    assert report["evaluation"]["left_out"] == {"CBFB_MYH11": {"cells": 60, "patients": 3}}
    assert "classes the probe never learned: CBFB_MYH11" in (tmp_path / "t" / "report.md").read_text()


def test_patient_ids_the_training_store_has_too_are_flagged(cli, fitted: Path, tmp_path: Path) -> None:
    cells = synthetic_cells(patients_per_class=2, cells_per_patient=20, seed=5)  # named as the training patients
    synthetic_store(tmp_path / "same", cells=cells, vectors=synthetic_vectors(cells, seed=5))
    code, text = cli("probe", "test", fitted / "blast", "--embeddings", tmp_path / "same", "--out", tmp_path / "t")
    assert code == 0 and "warning: 6 test patient id(s) are in the probe's training store too" in text, text
    assert "this is no external test" in (tmp_path / "t" / "report.md").read_text()


def test_probe_eval_on_another_store_scores_against_the_probes_classes(fitted: Path, tmp_path: Path) -> None:
    """A store with fewer classes than the probe: its labels must map to the probe's columns, not its own."""
    from marrowlens.probes.commands import evaluate

    outcome = evaluate(
        fitted / "mutation", other_cohort(tmp_path / "other", ("NPM1", "control")), tmp_path / "e", bootstrap=0
    )
    report = _report(tmp_path / "e")
    assert report["cell"]["confusion_matrix"]["labels"] == ["NPM1", "PML_RARA", "control"]
    assert report["cell"]["accuracy"]["value"] > 0.8 and outcome.headline[0].startswith("cell level")


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda f: synthetic_store(f, fingerprint="sha256:" + "ef" * 32),
            "embedded by another backbone (efefefefefef)",
        ),
        (lambda f: other_cohort(f, ("FLT3", "CBFB_MYH11")), "none of its mutation labels (CBFB_MYH11, FLT3)"),
        (lambda f: unlabelled(f), "has no mutation labels"),
    ],
)
def test_refusals(cli, fitted: Path, tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "other")
    code, text = cli("probe", "test", fitted / "mutation", "--embeddings", tmp_path / "other", "--out", tmp_path / "t")
    assert code == 2 and message in text and text.count("\n") == 0, text
    assert not (tmp_path / "t").exists()


def test_the_probes_own_store_is_no_external_test(cli, fitted: Path, tmp_path: Path) -> None:
    code, text = cli("probe", "test", fitted / "blast", "--embeddings", fitted / "emb", "--out", tmp_path / "t")
    assert code == 2 and "is the store probe" in text and "`probe eval`" in text


def test_the_study_table_sets_internal_cv_beside_the_external_test() -> None:
    from marrowlens.probes.report import comparison_markdown

    internal = {
        "task": "blast",
        "units": {"cells": 10, "patients": 2},
        "cell": {"accuracy": {"value": 0.9, "ci": [0.8, 1.0]}},
    }
    external = {"task": "blast", "units": {"cells": 8, "patients": 3}, "cell": {"accuracy": {"value": 0.7, "ci": None}}}
    lines = comparison_markdown("b", internal, external)
    assert lines[0] == "### Probe `b` (blast)"
    assert "| metric | internal CV (10 cells, 2 patients) | external test (8 cells, 3 patients) |" in lines
    assert "| cell accuracy | 0.900 [0.800, 1.000] | 0.700 |" in lines and len(lines) == 6
    assert "| metric | internal CV (not run) | external test (8 cells, 3 patients) |" in comparison_markdown(
        "b", {"task": "blast", "cell": None}, external
    )
