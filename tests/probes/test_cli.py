"""The probe commands end to end: fit -> eval -> predict, noise sweep, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli_subprocess
from tests.probes.helpers import synthetic_cells, synthetic_store, synthetic_vectors

FAST = ["--set", "linear.max_epochs=40", "--set", "linear.patience=4", "--set", "eval.bootstrap=50"]
SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probes")
    synthetic_store(root / "emb", patients_per_class=5, cells_per_patient=20)
    return root


@pytest.fixture(scope="module")
def fitted(workspace: Path) -> Path:
    """A blast probe and a mutation probe on it, fitted once for the module (in-process CLI)."""
    from tests.conftest import Cli

    cli = Cli()
    code, out = cli(
        "probe", "fit", "blast", "--embeddings", workspace / "emb", "--out", workspace / "blast", "--cv", "3", *FAST
    )
    assert code == 0, out
    code, out = cli(
        "probe",
        "fit",
        "mutation",
        "--embeddings",
        workspace / "emb",
        "--blast-probe",
        workspace / "blast",
        "--loss",
        "gce",
        "--class-weight",
        "balanced",
        "--out",
        workspace / "mutation",
        "--cv",
        "3",
        *FAST,
    )
    assert code == 0, out
    return workspace


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _check_level(block: dict, classes: list[str]) -> None:
    for name in SUMMARY:
        assert "value" in block[name] and "ci" in block[name], name
    assert set(block["per_class"]) == set(classes)
    for entry in block["per_class"].values():
        assert {"precision", "recall", "f1", "support"} <= set(entry)
        assert entry["f1"]["ci"] is not None
    assert block["confusion_matrix"]["labels"] == classes


class TestRoundTrip:
    def test_a_fit_without_config_saves_the_shipped_config(self, fitted: Path) -> None:
        """`probe fit blast --embeddings emb/ --head linear` (the README) trains as configs/probes/blast.yaml says."""
        import yaml

        from marrowlens.config import ProbeConfig, load_config

        saved = load_config(ProbeConfig, fitted / "blast" / "config.yaml")
        shipped = Path(__file__).resolve().parents[2] / "configs" / "probes" / "blast.yaml"
        expected = load_config(ProbeConfig, shipped, [*FAST[1::2], "eval.cv=3"])
        assert saved == expected and saved.imbalance.class_weight == "balanced"
        assert yaml.safe_load((fitted / "blast" / "config.yaml").read_text())["imbalance"]["class_weight"] == "balanced"
        report = _report(fitted / "blast")
        # the shipped linear probe is scikit-learn's: C chosen by balanced accuracy (bench/RESULTS.md "Two solvers")
        assert report["evaluation"]["hyper_parameters"].startswith("C (inverse L2) chosen inside each training fold")
        assert all("C" in fold["head"] and "balanced accuracy" in fold["head"]["selection"] for fold in report["folds"])

    def test_fit_writes_the_probe_folder_and_a_full_report(self, fitted: Path) -> None:
        for name in ("blast", "mutation"):
            folder = fitted / name
            for file in (
                "probe.json",
                "head.safetensors",
                "config.yaml",
                "meta.json",
                "report.json",
                "report.md",
                "report.html",
                "confusion_cell.png",
                "calibration.png",
                "patients.png",
                "roc_cell.png",
                "umap.png",
            ):
                assert (folder / file).is_file(), (name, file)
        blast = _report(fitted / "blast")
        _check_level(blast["cell"], ["blast", "non_blast"])
        assert blast["cell"]["balanced_accuracy"]["value"] > 0.9
        assert blast["patient"]["blast_fraction_mae"]["value"] < 0.1
        mutation = _report(fitted / "mutation")
        _check_level(mutation["cell"], ["NPM1", "PML_RARA", "control"])
        _check_level(mutation["patient"], ["NPM1", "PML_RARA", "control"])
        assert (fitted / "mutation" / "confusion_patient.png").is_file()
        assert mutation["evaluation"]["blast_filter"].startswith("refitted in every fold")
        assert len(mutation["folds"]) == 3
        patients = mutation["patients"]
        assert len(patients) == 15 and all("n_kept" in p and "predicted" in p for p in patients)
        assert mutation["patient"]["accuracy"]["value"] >= 0.8
        probe = json.loads((fitted / "mutation" / "probe.json").read_text())
        assert probe["loss"] == "gce" and probe["head_params"]["class_weight"] == "balanced"
        assert (
            probe["blast_filter"]["threshold"] == 0.5
            and (fitted / "mutation" / "blast_filter" / "head.safetensors").is_file()
        )
        markdown = (fitted / "mutation" / "report.md").read_text()
        for text in ("## Cell level", "## Patient level", "95% CI", "Confusion matrix", "refitted in every fold"):
            assert text in markdown

    def test_eval_repeats_the_cv_and_can_leave_domains_out(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli(
            "probe",
            "eval",
            fitted / "mutation",
            "--embeddings",
            fitted / "emb",
            "--cv",
            "2",
            "--bootstrap",
            "20",
            "--leave-one-domain-out",
            "--out",
            tmp_path / "eval",
        )
        assert code == 0, out
        assert "held-out domain centre_a" in out and "wrote" in out
        patient_line = next(line for line in out.splitlines() if line.startswith("patient level"))
        assert "balanced accuracy" in patient_line and "ROC-AUC" in patient_line, patient_line
        report = _report(tmp_path / "eval")
        assert report["evaluation"]["folds"] == 2
        rows = report["leave_one_domain_out"]
        assert [r["held_out_domain"] for r in rows] == ["centre_a", "centre_b"]
        assert all({"accuracy", "macro_f1", "patient_accuracy"} <= set(r) for r in rows)

    def test_predict_writes_cells_and_patients(self, cli, fitted: Path, tmp_path: Path) -> None:
        out = tmp_path / "pred.parquet"
        code, text = cli("probe", "predict", fitted / "mutation", "--embeddings", fitted / "emb", "--out", out)
        assert code == 0, text
        cells = pd.read_parquet(out)
        assert {"cell_id", "patient_id", "kept", "predicted", "p_NPM1", "p_PML_RARA", "p_control"} <= set(cells.columns)
        assert cells.loc[~cells["kept"], "predicted"].isna().all()
        patients = pd.read_parquet(tmp_path / "pred.patients.parquet")
        assert {"patient_id", "n_cells", "n_kept", "predicted", "frac_NPM1"} <= set(patients.columns)
        assert len(patients) == 15
        code, text = cli("probe", "predict", fitted / "mutation", "--embeddings", fitted / "emb", "--out", out)
        assert code == 2 and "--overwrite" in text

    def test_a_new_cohort_of_the_same_model_is_evaluated_as_is(self, cli, fitted: Path, tmp_path: Path) -> None:
        synthetic_store(tmp_path / "new", patients_per_class=3, seed=9)
        code, out = cli("probe", "eval", fitted / "mutation", "--embeddings", tmp_path / "new", "--bootstrap", "20")
        assert code == 0, out
        folders = list((fitted / "mutation").glob("external-*"))
        assert len(folders) == 1 and _report(folders[0])["evaluation"]["kind"] == "external"

    def test_knn_head_round_trip_on_a_new_cohort(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli(
            "probe",
            "fit",
            "blast",
            "--embeddings",
            fitted / "emb",
            "--head",
            "knn",
            "--cv",
            "0",
            "--out",
            tmp_path / "knn",
        )
        assert code == 0, out
        synthetic_store(tmp_path / "new", patients_per_class=2, seed=4)
        code, out = cli(
            "probe", "predict", tmp_path / "knn", "--embeddings", tmp_path / "new", "--out", tmp_path / "p.parquet"
        )
        assert code == 0, out
        cells = pd.read_parquet(tmp_path / "p.parquet")
        truth = np.where(pd.read_parquet(tmp_path / "new" / "cells.parquet")["is_blast"], "blast", "non_blast")
        assert (cells["predicted"].to_numpy() == truth).mean() > 0.9

    def test_knn_probe_whose_training_store_is_gone(self, cli, tmp_path: Path) -> None:
        synthetic_store(tmp_path / "train")
        synthetic_store(tmp_path / "new", seed=3)
        code, out = cli(
            "probe",
            "fit",
            "blast",
            "--embeddings",
            tmp_path / "train",
            "--head",
            "knn",
            "--cv",
            "0",
            "--out",
            tmp_path / "knn",
        )
        assert code == 0, out
        (tmp_path / "train").rename(tmp_path / "moved")
        code, out = cli(
            "probe", "predict", tmp_path / "knn", "--embeddings", tmp_path / "new", "--out", tmp_path / "p.parquet"
        )
        assert code == 2 and "needs its training embeddings" in out and str(tmp_path / "train") in out

    def test_cell_type_task(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli(
            "probe",
            "fit",
            "cell_type",
            "--embeddings",
            fitted / "emb",
            "--cv",
            "2",
            "--out",
            tmp_path / "ct",
            "--set",
            "cell_type.mapping={lymphocyte: lymphocyte, neutrophil: granulocyte, monocyte: monocyte}",
            *FAST,
        )
        assert code == 0, out
        report = _report(tmp_path / "ct")
        assert report["classes"] == ["granulocyte", "lymphocyte", "monocyte"]
        assert report["cell"]["macro_f1"]["value"] > 0.8

    def test_noise_sweep_tabulates_every_loss_and_rate(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli(
            "probe",
            "noise-sweep",
            "--embeddings",
            fitted / "emb",
            "--task",
            "mutation",
            "--noise",
            "0,0.4",
            "--kind",
            "bag",
            "--losses",
            "ce,gce",
            "--cv",
            "2",
            "--out",
            tmp_path / "sweep",
            *FAST,
        )
        assert code == 0, out
        result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
        assert [(r["loss"], r["noise"]) for r in result["rows"]] == [
            ("ce", 0.0),
            ("ce", 0.4),
            ("gce", 0.0),
            ("gce", 0.4),
        ]
        assert all(
            r["patient_accuracy"] is not None and r["cell_balanced_accuracy"] is not None for r in result["rows"]
        )
        assert (tmp_path / "sweep" / "sweep.png").is_file() and "| loss |" in (
            tmp_path / "sweep" / "sweep.md"
        ).read_text()


class TestBadInput:
    def test_embeddings_without_the_label_column(self, cli, tmp_path: Path) -> None:
        cells = synthetic_cells()
        vectors = synthetic_vectors(cells)
        cells["is_blast"] = pd.array([pd.NA] * len(cells), dtype="boolean")
        synthetic_store(tmp_path / "e", cells=cells, vectors=vectors)
        code, out = cli("probe", "fit", "blast", "--embeddings", tmp_path / "e", "--out", tmp_path / "p")
        assert code == 2 and "no is_blast labels" in out

    def test_a_class_with_no_cells_after_the_blast_filter(self, cli, fitted: Path, tmp_path: Path) -> None:
        synthetic_store(tmp_path / "e", mutations=("NPM1", "CBFB_MYH11"), blast_fraction={"CBFB_MYH11": 0.0})
        code, out = cli("probe", "fit", "blast", "--embeddings", tmp_path / "e", "--cv", "0", "--out", tmp_path / "b")
        assert code == 0, out
        code, out = cli(
            "probe",
            "fit",
            "mutation",
            "--embeddings",
            tmp_path / "e",
            "--blast-probe",
            tmp_path / "b",
            "--out",
            tmp_path / "m",
        )
        assert code == 2 and "'CBFB_MYH11' has no cells after the blast filter" in out

    def test_fewer_patients_than_folds(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli("probe", "fit", "blast", "--embeddings", fitted / "emb", "--cv", "50", "--out", tmp_path / "p")
        assert code == 2 and "15 patient(s) but 50 folds" in out

    def test_probe_from_another_model_is_refused_naming_both(self, cli, fitted: Path, tmp_path: Path) -> None:
        synthetic_store(tmp_path / "other", fingerprint="sha256:" + "ef" * 32)
        for args in (
            ("probe", "eval", fitted / "blast", "--embeddings", tmp_path / "other"),
            ("probe", "predict", fitted / "blast", "--embeddings", tmp_path / "other", "--out", tmp_path / "x.parquet"),
            (
                "probe",
                "fit",
                "mutation",
                "--embeddings",
                tmp_path / "other",
                "--blast-probe",
                fitted / "blast",
                "--out",
                tmp_path / "m",
            ),
        ):
            code, out = cli(*args)
            assert (
                code == 2 and "model fingerprint mismatch" in out and "abababababab" in out and "efefefefefef" in out
            ), out

    def test_nan_vectors(self, cli, tmp_path: Path) -> None:
        synthetic_store(tmp_path / "e")
        vectors = np.load(tmp_path / "e" / "vectors.npy", mmap_mode="r+")  # damaged after it was written
        vectors[7, 3] = np.nan
        vectors.flush()
        del vectors
        code, out = cli("probe", "fit", "blast", "--embeddings", tmp_path / "e", "--out", tmp_path / "p")
        assert code == 2 and "row 7" in out and "NaN or inf" in out

    @pytest.mark.parametrize(
        "args, message",
        [
            (("probe", "fit", "blasts"), "unknown probe task 'blasts'"),
            (("probe", "fit", "blast", "--set", "loss.name=mae"), "loss.name"),
            (("probe", "fit", "mutation"), "needs a blast probe"),
            (("probe", "fit", "cell_type", "--blast-probe", "x"), "only applies to the mutation task"),
            (("probe", "fit", "blast", "--aggregate", "abmil"), "only applies to the mutation task"),
        ],
    )
    def test_bad_arguments(self, cli, fitted: Path, tmp_path: Path, args, message: str) -> None:
        code, out = cli(*args, "--embeddings", fitted / "emb", "--out", tmp_path / "p")
        assert code == 2 and message in out

    def test_a_blast_probe_must_be_a_blast_probe(self, cli, fitted: Path, tmp_path: Path) -> None:
        code, out = cli(
            "probe",
            "fit",
            "mutation",
            "--embeddings",
            fitted / "emb",
            "--blast-probe",
            fitted / "mutation",
            "--out",
            tmp_path / "m",
        )
        assert code == 2 and "not a blast probe" in out

    def test_existing_probe_needs_overwrite(self, cli, fitted: Path) -> None:
        code, out = cli("probe", "fit", "blast", "--embeddings", fitted / "emb", "--out", fitted / "blast")
        assert code == 2 and "--overwrite" in out


class TestGroupBy:
    """`--group-by site`: whole sites held out of training, the report saying so; bad columns are one-line errors."""

    @pytest.fixture(scope="class")
    def sited(self, tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp("sited")
        cells = synthetic_cells(patients_per_class=3, cells_per_patient=16)
        number = cells["patient_id"].str.extract(r"_p(\d+)$")[0].astype(int)
        cells["site"] = ("site_" + number.astype(str)).astype("string")  # three sites, every mutation at each
        synthetic_store(root / "emb", cells=cells, vectors=synthetic_vectors(cells))
        return root

    def test_eval_holds_out_whole_sites(self, cli, sited: Path) -> None:
        emb = ["--embeddings", sited / "emb"]
        code, out = cli("probe", "fit", "blast", *emb, "--out", sited / "blast", "--cv", "3", *FAST)
        assert code == 0, out
        assert "group_by" not in _report(sited / "blast")["evaluation"]
        code, out = cli("probe", "eval", sited / "blast", *emb, "--group-by", "site", "--out", sited / "by_site")
        assert code == 0, out
        report = _report(sited / "by_site")
        evaluation = report["evaluation"]
        assert evaluation["description"].startswith("3-fold CV holding out whole values of site (leave one group out")
        assert evaluation["grouping"].startswith("site: ") and evaluation["folds"] == 3
        table = evaluation["group_by"]
        assert table["column"] == "site"
        assert [row["held_out"] for row in table["folds"]] == [["site_0"], ["site_1"], ["site_2"]]
        assert all(row["test_patients"] == 3 and row["train_patients"] == 6 for row in table["folds"])
        assert sum(row["test_cells"] for row in table["folds"]) == report["cell"]["n"]
        assert [row["fold"] for row in report["folds"]] == ["site_0", "site_1", "site_2"]
        assert report["config"]["eval"]["group_by"] == "site"
        markdown = (sited / "by_site" / "report.md").read_text()
        assert "## Held-out groups" in markdown and "whole values of `site`" in markdown
        code, out = cli("probe", "eval", sited / "blast", *emb, "--group-by", "", "--out", sited / "by_patient")
        assert code == 0, out
        assert "patient-grouped" in _report(sited / "by_patient")["evaluation"]["description"]

    def test_fit_cell_type_and_mutation_by_site(self, cli, sited: Path, tmp_path: Path) -> None:
        emb = ["--embeddings", sited / "emb", "--group-by", "site"]
        code, out = cli("probe", "fit", "cell_type", *emb, "--out", tmp_path / "ct", "--cv", "2", *FAST)
        assert code == 0, out
        report = _report(tmp_path / "ct")
        assert report["evaluation"]["folds"] == 2
        assert "GroupKFold over its 3 values" in report["evaluation"]["description"]
        held = sorted(v for row in report["evaluation"]["group_by"]["folds"] for v in row["held_out"])
        assert held == ["site_0", "site_1", "site_2"]
        code, out = cli("probe", "fit", "blast", "--embeddings", sited / "emb", "--out", tmp_path / "b", "--cv", "0")
        assert code == 0, out
        blast = ["--blast-probe", tmp_path / "b"]
        code, out = cli("probe", "fit", "mutation", *emb, *blast, "--out", tmp_path / "m", "--cv", "3", *FAST)
        assert code == 0, out
        report = _report(tmp_path / "m")
        assert [row["fold"] for row in report["folds"]] == ["site_0", "site_1", "site_2"]
        assert report["evaluation"]["blast_filter"].startswith("refitted in every fold")

    @pytest.mark.parametrize(
        ("column", "message"),
        [
            ("scanner", "--group-by scanner: "),
            ("split", "have no split value; fill them in"),
        ],
    )
    def test_bad_columns(self, cli, sited: Path, tmp_path: Path, column: str, message: str) -> None:
        emb = ["--embeddings", sited / "emb", "--group-by", column]
        code, out = cli("probe", "fit", "blast", *emb, "--out", tmp_path / "p", "--cv", "3", *FAST)
        assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out
        assert not (tmp_path / "p").exists()


class TestHelp:
    @pytest.mark.parametrize("command", ["fit", "eval", "test", "predict", "noise-sweep"])
    def test_help_has_an_example(self, cli, command: str) -> None:
        code, out = cli("probe", command, "--help")
        assert code == 0 and "Example: marrowlens probe" in out

    def test_real_process_prints_one_line_and_exits_2(self, fitted: Path, tmp_path: Path) -> None:
        result = run_cli_subprocess(
            "probe", "fit", "blast", "--embeddings", fitted / "emb", "--cv", "99", "--out", tmp_path / "p"
        )
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
