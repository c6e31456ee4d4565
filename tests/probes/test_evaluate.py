"""Patient grouping (property tests), leak checks, and patient aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marrowlens.config import ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.probes import tasks as tasks_module
from marrowlens.probes.evaluate import (
    UNDETERMINED,
    check_no_leak,
    column_fold_table,
    column_folds,
    domain_folds,
    grouped_folds,
    run_folds,
)
from marrowlens.probes.tasks import make_task
from tests.probes.helpers import mean_pooled_table, synthetic_cells, synthetic_store

FAST = {"linear": {"max_epochs": 15, "patience": 3, "weight_decays": [0.0, 0.01]}}


class TestGroupedFolds:
    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(
        n_patients=st.integers(3, 25),
        n_splits=st.integers(2, 6),
        seed=st.integers(0, 1000),
        data=st.data(),
    )
    def test_no_patient_on_both_sides_and_every_cell_tested_once(self, n_patients, n_splits, seed, data) -> None:
        sizes = data.draw(st.lists(st.integers(1, 6), min_size=n_patients, max_size=n_patients))
        groups = np.repeat([f"p{i}" for i in range(n_patients)], sizes)
        labels = data.draw(st.lists(st.sampled_from("ab"), min_size=n_patients, max_size=n_patients))
        y = np.repeat(labels, sizes)
        if n_patients < n_splits:
            with pytest.raises(MarrowLensError, match="patient"):
                grouped_folds(y, groups, n_splits, seed)
            return
        folds = grouped_folds(y, groups, n_splits, seed)
        tested = np.concatenate([test for _, test in folds])
        assert sorted(tested) == list(range(len(y)))
        for train, test in folds:
            assert not set(groups[train]) & set(groups[test])

    def test_fewer_patients_than_folds_names_both(self) -> None:
        with pytest.raises(MarrowLensError, match=r"3 patient\(s\) but 5 folds"):
            grouped_folds(np.array(list("aabbc")), np.array(["p1", "p1", "p2", "p2", "p3"]), 5)

    def test_leak_check_fires(self) -> None:
        groups = np.array(["p1", "p1", "p2"])
        with pytest.raises(AssertionError, match="patient leak"):
            check_no_leak(groups, np.array([0]), np.array([1, 2]))


class TestMutationFoldsNeverLeak:
    @settings(
        max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(n_splits=st.integers(2, 4), seed=st.integers(0, 100))
    def test_every_head_and_refitted_blast_filter_trains_on_training_patients_only(
        self, tmp_path_factory, monkeypatch, n_splits, seed
    ) -> None:
        emb = synthetic_store(tmp_path_factory.mktemp("emb"), patients_per_class=4, cells_per_patient=12, seed=seed)
        seen: list[np.ndarray] = []
        real_fit_head = tasks_module.fit_head

        def spy(config, vectors, rows, labels, groups, classes):
            seen.append(np.asarray(rows))
            return real_fit_head(config, vectors, rows, labels, groups, classes)

        monkeypatch.setattr(tasks_module, "fit_head", spy)
        blast = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb).fit(
            np.arange(len(emb)), final=True
        )
        task = make_task(ProbeConfig.model_validate({"task": "mutation", "seed": seed, **FAST}), emb, blast)
        folds = grouped_folds(task.y, task.groups, n_splits, seed)
        for i, (train, test) in enumerate(folds):
            seen.clear()
            run_folds(task, [(i, train, test)])
            assert len(seen) == 2  # the refitted blast filter, then the mutation head
            test_patients = set(task.groups[test])
            for rows in seen:
                assert not set(task.groups_all[rows]) & test_patients

    def test_a_head_trained_on_test_patients_is_caught(self, tmp_path, monkeypatch) -> None:
        emb = synthetic_store(tmp_path / "emb", patients_per_class=3, cells_per_patient=8)
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb)
        train, test = grouped_folds(task.y, task.groups, 3)[0]
        honest_fit = task.fit
        monkeypatch.setattr(task, "fit", lambda rows, noise=None: honest_fit(np.arange(len(task.rows))))
        with pytest.raises(AssertionError, match="patient leak"):
            run_folds(task, [(0, train, test)])


class TestDomainFolds:
    def test_one_fold_per_domain_without_shared_patients(self, tmp_path) -> None:
        emb = synthetic_store(tmp_path / "emb", domains=("a", "b", "c"))
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb)
        folds = domain_folds(task)
        assert [name for name, _, _ in folds] == ["a", "b", "c"]
        domains = emb.cells["domain"].to_numpy()[task.rows]
        for name, train, test in folds:
            assert set(domains[test]) == {name} and name not in set(domains[train])

    def test_one_domain_is_an_error(self, tmp_path) -> None:
        emb = synthetic_store(tmp_path / "emb", domains=("only",))
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb)
        with pytest.raises(MarrowLensError, match="two or more domains"):
            domain_folds(task)


class TestAggregatePatients:
    def test_mean_log_probability_votes_and_undetermined(self) -> None:
        patients = np.array(["p1", "p1", "p1", "p2", "p2", "p3"])
        kept = np.array([True, True, False, True, False, False])
        proba = np.array([[0.9, 0.1], [0.4, 0.6], [np.nan, np.nan], [0.2, 0.8], [np.nan, np.nan], [np.nan, np.nan]])
        table = mean_pooled_table(
            patients, kept, proba, ["a", "b"], truth=np.array(["a", "a", "a", "b", "b", "a"])
        ).set_index("patient_id")
        geo = np.sqrt([0.9 * 0.4, 0.1 * 0.6])
        assert table.loc["p1", "p_a"] == pytest.approx(geo[0] / geo.sum())
        assert table.loc["p1", "predicted"] == "a"
        assert table.loc["p1", "frac_a"] == pytest.approx(0.5) and table.loc["p1", "frac_b"] == pytest.approx(0.5)
        assert (table.loc["p1", "n_cells"], table.loc["p1", "n_kept"]) == (3, 2)
        assert table.loc["p2", "predicted"] == "b" and table.loc["p2", "p_b"] == pytest.approx(0.8)
        assert table.loc["p3", "predicted"] == UNDETERMINED and table.loc["p3", "n_kept"] == 0
        assert np.isnan(table.loc["p3", "p_a"]) and table.loc["p3", "truth"] == "a"
        assert list(table.index) == ["p1", "p2", "p3"]  # nobody dropped


def _site_store(folder, sites: int = 3, **kwargs):
    """A synthetic store whose patients each sit at one site (``site_k``, by patient number)."""
    cells = synthetic_cells(**kwargs)
    number = cells["patient_id"].str.extract(r"_p(\d+)$")[0].astype(int)
    cells["site"] = ("site_" + (number % sites).astype(str)).astype("string")
    return synthetic_store(folder, cells=cells)


class TestColumnFolds:
    @pytest.mark.parametrize("task_name", ["blast", "cell_type", "mutation"])
    def test_one_fold_per_site_holds_it_out_whole(self, tmp_path, task_name) -> None:
        emb = _site_store(tmp_path / "emb", sites=3, patients_per_class=3)
        config = ProbeConfig.model_validate({"task": "blast", **FAST})
        blast = make_task(config, emb).fit(np.arange(len(emb.cells))) if task_name == "mutation" else None
        task = make_task(ProbeConfig.model_validate({"task": task_name, **FAST}), emb, blast)
        folds = column_folds(task, "site", 5)
        assert [name for name, _, _ in folds] == ["site_0", "site_1", "site_2"]
        sites = emb.cells["site"].to_numpy()[task.rows]
        tested = np.concatenate([test for _, _, test in folds])
        assert sorted(tested) == list(range(len(task.rows)))  # every unit tested once
        for name, train, test in folds:
            assert set(sites[test]) == {name} and name not in set(sites[train])
            assert not set(task.groups[train]) & set(task.groups[test])
            assert len(train) + len(test) == len(task.rows)
        _, info = run_folds(task, folds)  # the leak checks of every fitted head run here
        assert [row["fold"] for row in info] == ["site_0", "site_1", "site_2"]

    def test_the_refitted_blast_filter_never_sees_a_held_out_site(self, tmp_path) -> None:
        """Cells of a held-out site without a patient or mutation still train no filter of that fold."""
        cells = synthetic_cells(patients_per_class=3, cells_per_patient=12)
        cells["site"] = [f"site_{int(p.rsplit('p', 1)[1]) % 2}" for p in cells["patient_id"]]
        loose = synthetic_cells(mutations=("NPM1",), patients_per_class=1, cells_per_patient=10, seed=3)
        loose = loose.assign(cell_id="loose_" + loose["cell_id"], patient_id=None, mutation=None, site="site_0")
        emb = synthetic_store(tmp_path / "emb", cells=pd.concat([cells, loose], ignore_index=True))
        blast = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb).fit(np.arange(10))
        config = ProbeConfig.model_validate({"task": "mutation", "eval": {"group_by": "site"}, **FAST})
        task = make_task(config, emb, blast)
        sites = emb.cells["site"].to_numpy()
        for name, train, _ in column_folds(task, "site", 5):
            assert name not in set(sites[task.blast_filter_for(train).train_rows])

    def test_more_sites_than_folds_are_grouped_into_cv_folds(self, tmp_path) -> None:
        emb = _site_store(tmp_path / "emb", sites=6, patients_per_class=6)
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb)
        folds = column_folds(task, "site", 3)
        assert len(folds) == 3
        held = [name.split("+") for name, _, _ in folds]
        assert sorted(name for group in held for name in group) == [f"site_{k}" for k in range(6)]
        sites = emb.cells["site"].to_numpy()[task.rows]
        for group, (_, train, test) in zip(held, folds):
            assert set(sites[test]) == set(group) and not set(sites[train]) & set(group)
        table = column_fold_table(task, "site", folds)
        assert table["column"] == "site" and [row["held_out"] for row in table["folds"]] == held
        assert sum(row["test_cells"] for row in table["folds"]) == len(task.rows)

    def test_bad_columns_are_one_line_errors(self, tmp_path) -> None:
        emb = _site_store(tmp_path / "emb", sites=1)
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), emb)
        with pytest.raises(MarrowLensError, match=r"^--group-by scanner: .* has no such column; index the cohort"):
            column_folds(task, "scanner", 5)
        with pytest.raises(MarrowLensError, match="every evaluated cell has site 'site_0'; .* two or more values"):
            column_folds(task, "site", 5)
        with pytest.raises(MarrowLensError, match="--cv 1"):
            column_folds(task, "site", 1)

    def test_missing_values_and_a_patient_at_two_sites(self, tmp_path) -> None:
        cells = synthetic_cells()
        cells["site"] = np.where(cells["patient_id"].str.endswith(("_p0", "_p1")), "north", "south")
        cells.loc[cells.index[:3], "site"] = None
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), synthetic_store(tmp_path / "a", cells))
        with pytest.raises(MarrowLensError, match=r"3 of \d+ evaluated cells \(1 patient\(s\), e.g. 'NPM1_p0'\) have"):
            column_folds(task, "site", 5)
        cells.loc[cells.index[:3], "site"] = "south"
        task = make_task(ProbeConfig.model_validate({"task": "blast", **FAST}), synthetic_store(tmp_path / "b", cells))
        with pytest.raises(MarrowLensError, match="patient 'NPM1_p0' has cells with site 'north' and 'south'") as error:
            column_folds(task, "site", 5)
        assert "\n" not in str(error.value)
