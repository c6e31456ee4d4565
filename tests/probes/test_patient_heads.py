"""Patient heads of the mutation probe: mean, vote, attention MIL and cell-type composition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from marrowlens.cli import app
from marrowlens.config import ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.probes.composition import Composition
from marrowlens.probes.folder import PROBE_FILE, load_probe, save_probe
from marrowlens.probes.patients import Bags, patient_labels
from marrowlens.probes.pooling import MeanPooling
from marrowlens.probes.tasks import make_task
from tests.conftest import make_store
from tests.probes.helpers import SYNTHETIC_MODEL, synthetic_store

QUICK_MIL = {"seeds": 2, "max_epochs": 80, "patience": 10, "fallback_epochs": 20}


def _few_witnesses(n_patients: int = 40, witnesses: int = 3, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """APL patients differ from other AML only by ``witnesses`` blasts shifted along one axis; bags hold 32-152
    blasts (plus 8 non-blasts), so the few witnesses drown in a mean but not under attention (measured with
    seed 0: mean-pooling patient AUC 0.78, abmil 1.0)."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], []
    for p in range(n_patients):
        label = "PML_RARA" if p % 2 == 0 else "other_AML"
        n = int(rng.integers(40, 160))
        v = rng.normal(0, 1, (n, 16))
        if label == "PML_RARA":
            v[:witnesses, 0] += 6.0
        v[n - 8 :, 2] += 6.0
        for c in range(n):
            blast = c < n - 8
            rows.append(
                {
                    "cell_id": f"p{p}_c{c}",
                    "path": f"p{p}/c{c}.png",
                    "patient_id": f"p{p}",
                    "cell_type": "myeloblast" if blast else "lymphocyte",
                    "is_blast": blast,
                    "mutation": label,
                    "domain": "a",
                    "split": None,
                    "width": 32,
                    "height": 32,
                }
            )
        vectors.append(v)
    cells = pd.DataFrame(rows)
    cells["is_blast"] = cells["is_blast"].astype("boolean")
    return cells, np.vstack(vectors).astype(np.float32)


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_attention_mil_beats_mean_pooling_when_few_cells_carry_the_signal(tmp_path: Path) -> None:
    cells, vectors = _few_witnesses()
    make_store(tmp_path / "emb", vectors=vectors, cells=cells, fingerprint=SYNTHETIC_MODEL)
    emb, blast = str(tmp_path / "emb"), str(tmp_path / "blast")
    _invoke("probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--cv", "0")
    auc = {}
    for head in ("mean", "abmil"):
        out = tmp_path / head
        args = ["--set", "mutation.control=null", "--set", "eval.bootstrap=0"]
        args += [f"--set=abmil.{k}={v}" for k, v in QUICK_MIL.items()]
        _invoke(
            *("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", str(out)),
            *("--cv", "4", "--aggregate", head, *args),
        )
        report = json.loads((out / "report.json").read_text())
        assert report["patient_head"]["name"] == head
        auc[head] = report["patient"]["roc_auc_ovr"]["value"]
    assert auc["abmil"] >= 0.9 and auc["abmil"] > auc["mean"] + 0.1, auc


@pytest.fixture(scope="module")
def mutation_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    synthetic_store(root / "emb", patients_per_class=5, cells_per_patient=20)
    return root


@pytest.mark.parametrize("head", ["mean", "vote", "abmil", "composition"])
def test_every_head_fits_reports_saves_and_reloads(mutation_store: Path, head: str, tmp_path: Path) -> None:
    from marrowlens.embeddings import load_embeddings

    emb = load_embeddings(mutation_store / "emb")
    blast_config = ProbeConfig.model_validate({"task": "blast"})
    blast = make_task(blast_config, emb).fit(np.arange(len(emb)), final=True)
    config = ProbeConfig.model_validate({"task": "mutation", "mutation": {"aggregate": head}, "abmil": QUICK_MIL})
    task = make_task(config, emb, blast)
    probe = task.fit(np.arange(len(task.rows)), final=True)
    _, before = probe.call_patients(emb, task.rows, task.groups, *probe.predict_rows(emb.vectors, task.rows))
    save_probe(tmp_path / "probe", probe, emb)
    loaded, info = load_probe(tmp_path / "probe", emb)
    assert info["patient_head"]["name"] == head and type(loaded.patient_head) is type(probe.patient_head)
    _, after = loaded.call_patients(emb, task.rows, task.groups, *loaded.predict_rows(emb.vectors, task.rows))
    np.testing.assert_allclose(after.proba, before.proba, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.contribution, before.contribution, rtol=1e-5, atol=1e-6)
    assert np.isfinite(before.proba).all(axis=1).sum() >= len(np.unique(task.groups)) - 2
    if head == "abmil":  # attention weights: a patient's cells share the whole vector
        bags = Bags.of(
            task.groups,
            task.rows,
            np.ones(len(task.rows), bool),
            np.ones(len(task.rows)),
            np.zeros(0),
            emb.vectors,
            emb.cells,
        )
        sums = np.bincount(bags.which, weights=before.contribution)
        np.testing.assert_allclose(sums, 1.0, rtol=1e-4)


def test_cli_report_says_how_each_choice_was_made_and_lists_every_cell(mutation_store: Path, tmp_path: Path) -> None:
    emb, blast, out = str(mutation_store / "emb"), str(tmp_path / "blast"), tmp_path / "mil"
    _invoke("probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--cv", "0")
    _invoke(
        *("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", str(out), "--cv", "3"),
        *(
            "--aggregate",
            "abmil",
            "--set",
            "eval.bootstrap=20",
            *[f"--set=abmil.{k}={v}" for k, v in QUICK_MIL.items()],
        ),
    )
    report = json.loads((out / "report.json").read_text())
    chosen = report["evaluation"]["hyper_parameters"]
    assert "C (inverse L2) chosen inside each training fold" in chosen
    assert "fold 2: abmil:" in chosen and "blast threshold 0.5 fixed (not tuned)" in chosen
    markdown = (out / "report.md").read_text()
    assert "| patient head | abmil |" in markdown and "| hyper-parameters |" in markdown
    cells = pd.read_parquet(out / "patient_cells.parquet")
    assert len(cells) == report["units"]["cells"] and cells["contribution"].notna().all()
    assert set(cells["patient_id"]) == {row["patient_id"] for row in report["patients"]}
    predicted = pd.read_parquet(_predict(out, emb, tmp_path))
    assert predicted["contribution"].notna().sum() == len(cells)


def test_the_web_patient_pages_read_what_probe_fit_writes(mutation_store: Path, tmp_path: Path) -> None:
    """The contract between the probe writer and the server's reader, undetermined patients included."""
    from marrowlens.retrieval.web import patients as web

    emb, blast, out = str(mutation_store / "emb"), str(tmp_path / "blast"), tmp_path / "mean"
    _invoke("probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--cv", "0")
    _invoke("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", str(out), "--cv", "3")
    report = web._read_report(out)
    probabilities = web._probabilities(out, report)
    undetermined = [p.patient_id for p in report.patients if p.predicted == "undetermined"]
    assert undetermined and all(probabilities[p] == {} for p in undetermined)
    assert len(web._read_cells(out)) == json.loads((out / "report.json").read_text())["units"]["cells"]


def _predict(probe: Path, emb: str, tmp_path: Path) -> Path:
    out = tmp_path / "calls.parquet"
    _invoke("probe", "predict", str(probe), "--embeddings", emb, "--out", str(out))
    return out


def test_a_probe_from_before_patient_heads_pools_with_the_mean(mutation_store: Path, tmp_path: Path) -> None:
    emb, blast, out = str(mutation_store / "emb"), str(tmp_path / "blast"), tmp_path / "old"
    _invoke("probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--cv", "0")
    _invoke("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", str(out), "--cv", "0")
    info = json.loads((out / PROBE_FILE).read_text())
    del info["patient_head"]
    (out / PROBE_FILE).write_text(json.dumps(info))
    from marrowlens.embeddings import load_embeddings

    probe, _ = load_probe(out, load_embeddings(mutation_store / "emb"))
    assert isinstance(probe.patient_head, MeanPooling)


class TestComposition:
    def _bags(self, emb_folder: Path) -> tuple[Bags, np.ndarray]:
        from marrowlens.embeddings import load_embeddings

        emb = load_embeddings(emb_folder)
        n = len(emb)
        kept = emb.cells["is_blast"].to_numpy(dtype=bool)
        bags = Bags.of(
            emb.cells["patient_id"].to_numpy(), np.arange(n), kept, kept * 1.0, np.zeros(0), emb.vectors, emb.cells
        )
        return bags, patient_labels(bags, emb.cells["mutation"].to_numpy()).astype(str)

    def test_training_fractions_never_use_the_patients_own_labels(self, mutation_store: Path, tmp_path: Path) -> None:
        bags, y = self._bags(mutation_store / "emb")
        head = Composition(random_state=0)
        labels = head._labels(bags)
        before = head._out_of_fold_types(bags, labels, y)
        patient = bags.which == 0
        changed = labels.copy()
        changed[patient] = np.where(changed[patient] == "myeloblast", "lymphocyte", "myeloblast")  # its own labels
        after = head._out_of_fold_types(bags, changed, y)
        np.testing.assert_array_equal(after[patient], before[patient])

    def test_fractions_in_the_call_and_contributions_follow_the_types(self, mutation_store: Path) -> None:
        bags, y = self._bags(mutation_store / "emb")
        classes = sorted(set(y))
        head = Composition(random_state=0).fit(bags, y, classes)
        calls = head.predict(bags, classes)
        assert np.isfinite(calls.proba).all() and np.allclose(calls.proba.sum(axis=1), 1)
        assert all("blast fraction" in note for note in calls.notes)
        types = head._types(head.cell_head, bags, np.arange(len(bags.rows)))
        for p in range(bags.n_patients):  # cells of one type in one patient pull alike
            cells = np.flatnonzero((bags.which == p) & (types == types[bags.which == p][0]) & ~bags.kept)
            if len(cells) > 1:
                assert np.ptp(calls.contribution[cells]) < 1e-12

    def test_a_store_without_cell_types_is_a_clear_error(self, tmp_path: Path) -> None:
        emb = synthetic_store(tmp_path / "emb", patients_per_class=3, cells_per_patient=10)
        cells = emb.cells.assign(cell_type=None)
        n = len(cells)
        bags = Bags.of(
            cells["patient_id"].to_numpy(), np.arange(n), np.ones(n, bool), np.ones(n), np.zeros(0), emb.vectors, cells
        )
        with pytest.raises(MarrowLensError, match="needs cell_type labels"):
            Composition().fit(
                bags, patient_labels(bags, cells["mutation"].to_numpy()).astype(str), ["NPM1", "PML_RARA", "control"]
            )


@pytest.mark.parametrize("head", ["abmil", "composition"])
def test_a_fitted_patient_head_calls_a_cohort_it_never_saw(mutation_store: Path, tmp_path: Path, head: str) -> None:
    from tests.probes.test_external import other_cohort

    emb, blast, probe = str(mutation_store / "emb"), str(tmp_path / "blast"), str(tmp_path / head)
    _invoke("probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--cv", "0")
    _invoke(
        *("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", probe, "--cv", "0"),
        *("--aggregate", head, *[f"--set=abmil.{k}={v}" for k, v in QUICK_MIL.items()]),
    )
    out = tmp_path / "test"
    _invoke("probe", "test", probe, "--embeddings", str(other_cohort(tmp_path / "other")), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["patient_head"]["name"] == head and report["patient"]["n_determined"] == 9
    assert report["patient"]["accuracy"]["value"] > 0.5  # chance: 1/3
