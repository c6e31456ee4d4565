"""Tasks: where labels come from, the blast filter before the mutation head, data-driven classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from marrowlens.config import ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.probes import tasks as tasks_module
from marrowlens.probes.tasks import BLAST, NON_BLAST, RowView, blast_labels, make_task
from tests.probes.helpers import synthetic_cells, synthetic_store

FAST = {"linear": {"max_epochs": 15, "patience": 3, "weight_decays": [0.0, 0.01]}}


def config(task: str, **extra) -> ProbeConfig:
    return ProbeConfig.model_validate({"task": task, **FAST, **extra})


@pytest.fixture
def emb(tmp_path):
    return synthetic_store(tmp_path / "emb")


@pytest.fixture
def blast_probe(emb):
    return make_task(config("blast", linear={"max_epochs": 60}), emb).fit(np.arange(len(emb)), final=True)


def _kept(blast_probe, emb) -> np.ndarray:
    return blast_probe.blast_probability(RowView(emb.vectors, np.arange(len(emb)))) >= 0.5


class TestLabels:
    def test_blast_labels_from_is_blast(self) -> None:
        cells = synthetic_cells(patients_per_class=1, cells_per_patient=10)
        cells.loc[0, "is_blast"] = pd.NA
        labels = blast_labels(cells, config("blast").blast, "x")
        assert labels[0] is None
        assert set(labels[1:]) <= {BLAST, NON_BLAST}
        assert (labels[1:] == BLAST).tolist() == cells["is_blast"][1:].astype(bool).tolist()

    def test_blast_labels_from_mapped_cell_types(self) -> None:
        cells = synthetic_cells(patients_per_class=1, cells_per_patient=30)
        chosen = config(
            "blast", blast={"source": "cell_type", "blast_types": ["myeloblast"], "non_blast_types": ["lymphocyte"]}
        )
        labels = blast_labels(cells, chosen.blast, "x")
        assert set(labels[cells["cell_type"] == "myeloblast"]) == {BLAST}
        assert set(labels[cells["cell_type"] == "lymphocyte"]) == {NON_BLAST}
        assert labels[cells["cell_type"].isin(["neutrophil", "monocyte"])].isna().all()

    def test_cell_type_source_needs_the_blast_types(self) -> None:
        with pytest.raises(MarrowLensError, match="blast_types"):
            from marrowlens.config import load_config

            load_config(ProbeConfig, None, ["blast.source=cell_type"])

    @pytest.mark.parametrize(
        "column, task", [("is_blast", "blast"), ("mutation", "mutation"), ("cell_type", "cell_type")]
    )
    def test_missing_label_column_names_it(self, tmp_path, column: str, task: str, blast_probe) -> None:
        cells = synthetic_cells()
        cells[column] = None
        bare = synthetic_store(
            tmp_path / "bare",
            cells=cells,
            vectors=np.zeros((len(cells), 16), dtype=np.float32) + np.arange(16, dtype=np.float32),
        )
        with pytest.raises(MarrowLensError, match=f"no {column} labels"):
            make_task(config(task), bare, blast_probe)

    def test_cell_type_mapping_drops_unmapped_and_rare_types(self, tmp_path) -> None:
        store = synthetic_store(tmp_path / "e", cells_per_patient=30)
        mapped = config(
            "cell_type",
            cell_type={"mapping": {"lymphocyte": "lymph", "neutrophil": "granulocyte", "monocyte": "granulocyte"}},
        )
        task = make_task(mapped, store)
        assert task.classes == ["granulocyte", "lymph"]
        kept_types = set(store.cells["cell_type"].to_numpy()[task.rows])
        assert "myeloblast" not in kept_types
        rare = config("cell_type", cell_type={"min_cells": 10_000})
        with pytest.raises(MarrowLensError, match="needs two classes"):
            make_task(rare, store)


class TestMutationTask:
    def test_blast_filter_removes_non_blasts_before_the_mutation_head(self, emb, blast_probe, monkeypatch) -> None:
        calls = []
        real = tasks_module.fit_head
        monkeypatch.setattr(
            tasks_module,
            "fit_head",
            lambda c, v, rows, labels, g, k: calls.append((rows, labels)) or real(c, v, rows, labels, g, k),
        )
        task = make_task(config("mutation"), emb, blast_probe)
        task.fit(np.arange(len(task.rows)), final=True)
        rows, labels = calls[-1]
        kept = _kept(blast_probe, emb)
        leukemic = (emb.cells["mutation"] != "control").to_numpy()
        assert set(rows[leukemic[rows]]) == set(np.flatnonzero(kept & leukemic))  # exactly the kept leukemic cells
        is_blast = emb.cells["is_blast"].astype(bool).to_numpy()
        assert (kept == is_blast).mean() > 0.95 and (leukemic & ~is_blast).sum() > 20  # many non-blasts removed
        np.testing.assert_array_equal(labels, emb.cells["mutation"].to_numpy()[rows])

    @pytest.mark.parametrize("choice", ["non_blast", "kept", "all"])
    def test_control_cells_follow_the_config(self, emb, blast_probe, choice: str) -> None:
        task = make_task(config("mutation", mutation={"control_cells": choice}), emb, blast_probe)
        probe = task.fit(np.arange(len(task.rows)), final=True)
        is_control = (emb.cells["mutation"] == "control").to_numpy()
        trained = set(probe.train_rows[is_control[probe.train_rows]])
        kept = _kept(blast_probe, emb)
        expected = {"non_blast": ~kept, "kept": kept, "all": np.ones(len(kept), dtype=bool)}[choice]
        assert trained == set(np.flatnonzero(expected & is_control))

    def test_classes_are_the_data_s(self, tmp_path) -> None:
        store = synthetic_store(tmp_path / "apl", mutations=("PML_RARA", "other_AML"))
        blast = make_task(config("blast"), store).fit(np.arange(len(store)), final=True)
        task = make_task(config("mutation"), store, blast)
        assert task.classes == ["PML_RARA", "other_AML"] and task.control is None
        probe = task.fit(np.arange(len(task.rows)), final=True)
        kept, proba = probe.predict_rows(store.vectors, np.arange(len(store)))
        assert proba.shape == (len(store), 2) and np.isnan(proba[~kept]).all()

    def test_a_custom_control_name(self, tmp_path) -> None:
        store = synthetic_store(tmp_path / "e", mutations=("NPM1", "healthy"))
        blast = make_task(config("blast"), store).fit(np.arange(len(store)), final=True)
        assert make_task(config("mutation", mutation={"control": "healthy"}), store, blast).control == "healthy"

    def test_class_with_no_cells_after_the_filter(self, tmp_path) -> None:
        store = synthetic_store(tmp_path / "e", mutations=("NPM1", "CBFB_MYH11"), blast_fraction={"CBFB_MYH11": 0.0})
        blast = make_task(config("blast"), store).fit(np.arange(len(store)), final=True)
        task = make_task(config("mutation"), store, blast)
        with pytest.raises(MarrowLensError, match="class 'CBFB_MYH11' has no cells after the blast filter"):
            task.fit(np.arange(len(task.rows)), final=True)

    def test_refit_only_with_blast_labels(self, tmp_path, blast_probe) -> None:
        cells = synthetic_cells()
        cells["is_blast"] = pd.array([pd.NA] * len(cells), dtype="boolean")
        unlabelled = synthetic_store(
            tmp_path / "u", cells=cells, vectors=synthetic_store(tmp_path / "l").vectors.copy()
        )
        task = make_task(config("mutation"), unlabelled, blast_probe)
        assert not task.refit_blast
        probe = task.fit(np.arange(len(task.rows)))
        assert probe.blast is blast_probe and "as is" in probe.notes["blast_filter"]


@pytest.mark.parametrize("name", ["blast", "mutation", "cell_type"])
def test_shipped_configs_load(name: str) -> None:
    from pathlib import Path

    from marrowlens.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "probes" / f"{name}.yaml"
    assert load_config(ProbeConfig, path).task == name


@pytest.mark.parametrize("name", ["blast", "mutation", "cell_type"])
def test_no_config_means_the_shipped_config(name: str) -> None:
    """The README's commands name no --config: they must run exactly what configs/probes/TASK.yaml says."""
    from pathlib import Path

    from marrowlens.probes.run import probe_config

    shipped = Path(__file__).resolve().parents[2] / "configs" / "probes" / f"{name}.yaml"
    assert probe_config(name, None, {}, []) == probe_config(name, shipped, {}, [])
    with_flags = probe_config(name, None, {"head": "knn", "loss.name": None}, ["eval.cv=3"])
    assert with_flags == probe_config(name, shipped, {"head": "knn"}, ["eval.cv=3"])


def test_shipped_defaults_are_the_measured_ones() -> None:
    """Balanced class weights (blast: 0.861 vs 0.824 on real cells) and CE for mutations (AUC 0.904 vs 0.833)."""
    from marrowlens.probes.run import probe_config

    assert probe_config("blast", None, {}, []).imbalance.class_weight == "balanced"
    mutation = probe_config("mutation", None, {}, [])
    assert mutation.loss.name == "ce" and mutation.imbalance.class_weight == "balanced"
    assert probe_config("mutation", None, {"loss.name": "gce"}, []).loss.name == "gce"


def test_the_report_says_how_the_weight_decay_was_chosen_and_how_often_the_grid_edge_won() -> None:
    """On real cells the grid's top won most folds, silently; the report must show the picks."""
    from marrowlens.probes.run import _selection_note

    config = ProbeConfig(task="blast")
    top = max(config.linear.weight_decays)
    note = _selection_note([{"head": {"weight_decay": w}} for w in (top, top, 0.01, top, 0.001)], config)
    assert note.startswith("weight decay chosen inside each training fold by loss on held-out training patients: ")
    assert note.endswith("3 of 5 folds chose its largest value)")
    assert _selection_note([{"head": {"k": 20}}], config) is None  # k-NN: nothing was chosen
