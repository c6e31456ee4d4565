"""Patient-grouped evaluation: cross-validation, held-out groups, leave-one-domain-out, patient aggregation, summaries.

Splits come from scikit-learn's ``StratifiedGroupKFold``; every split, and every set of rows a
fitted head (or a refitted blast filter) actually trained on, is checked against the test
patients: a leak raises ``AssertionError`` (a bug, never a user error). A mutation probe's patient
head (:mod:`marrowlens.probes.patients`), fitted in each fold with the cell head, calls that fold's
test patients; a patient it cannot call is "undetermined" and is reported, never dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from tqdm.auto import tqdm

from marrowlens.errors import MarrowLensError
from marrowlens.probes.metrics import interval, metrics_with_ci
from marrowlens.probes.noise import NoiseSpec
from marrowlens.probes.patients import UNDETERMINED, PatientCalls, patient_table
from marrowlens.probes.tasks import BLAST, Probe, Task


@dataclass
class Predictions:
    """Per evaluated cell: truth, patient, whether the blast filter kept it, probabilities, fold."""

    rows: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    kept: np.ndarray
    proba: np.ndarray
    fold: np.ndarray
    contribution: np.ndarray  # mutation task: each cell's pull on its patient's call (NaN: unused)
    patient_calls: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # patient -> (proba, note)

    @classmethod
    def empty(cls, task: Task) -> Predictions:
        n = len(task.rows)
        return cls(
            task.rows.copy(),
            task.y.copy(),
            task.groups.copy(),
            np.zeros(n, dtype=bool),
            np.full((n, len(task.classes)), np.nan),
            np.full(n, -1),
            np.full(n, np.nan),
        )

    def record_patients(self, probe: Probe, task: Task, units: np.ndarray) -> None:
        """The probe's patient head calls the patients of ``units`` (their cells already predicted)."""
        rows, patients = self.rows[units], self.patients[units]
        bags, calls = probe.call_patients(task.emb, rows, patients, self.kept[units], self.proba[units])
        self.contribution[units] = calls.contribution
        notes = calls.notes or [""] * bags.n_patients
        for patient, proba, note in zip(bags.ids, calls.proba, notes):
            self.patient_calls[str(patient)] = (proba, note)

    def patient_table(self, classes: list[str], units: np.ndarray | None = None) -> pd.DataFrame:
        """The recorded patient calls of ``units`` (default: all) as :func:`patient_table` rows."""
        units = np.arange(len(self.rows)) if units is None else units
        ids = np.unique(self.patients[units].astype(str))
        calls = PatientCalls(
            np.vstack([self.patient_calls[i][0] for i in ids]),
            self.contribution[units],
            [self.patient_calls[i][1] for i in ids],
        )
        return patient_table(self.patients[units], self.kept[units], self.proba[units], calls, classes, self.y[units])


# ---------------------------------------------------------------- splits


def check_no_leak(groups: np.ndarray, train: np.ndarray, test: np.ndarray, what: str = "split") -> None:
    """No patient may have cells on both sides."""
    shared = np.intersect1d(np.asarray(groups)[train], np.asarray(groups)[test])
    if len(shared):
        raise AssertionError(f"patient leak in {what}: {len(shared)} patient(s) on both sides, e.g. {shared[0]!r}")


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped K folds; fewer patients than folds is a user error."""
    if n_splits < 2:
        raise MarrowLensError(f"--cv {n_splits}: use 0 to skip cross-validation or 2 or more folds")
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise MarrowLensError(
            f"{n_groups} patient(s) but {n_splits} folds: "
            "patient-grouped CV needs at least as many patients as folds; lower --cv"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is expected with few patients
        folds = list(splitter.split(np.zeros(len(y)), y, groups))
    for train, test in folds:
        check_no_leak(groups, train, test)
    return folds


def domain_folds(task: Task) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One fold per domain: test on it, train on the others minus any patient also in the test."""
    cells = task.emb.cells
    if "domain" not in cells.columns or cells["domain"].isna().all():
        raise MarrowLensError(f"{task.emb.folder} has no domain labels; leave-one-domain-out needs them")
    domains = cells["domain"].to_numpy()[task.rows]
    names = sorted({str(d) for d in domains if pd.notna(d)})
    if len(names) < 2:
        raise MarrowLensError(f"leave-one-domain-out needs two or more domains; {task.emb.folder} has {names}")
    folds = []
    for name in names:
        test = np.flatnonzero(domains == name)
        train = np.flatnonzero((domains != name) & pd.notna(domains) & ~np.isin(task.groups, task.groups[test]))
        check_no_leak(task.groups, train, test, f"domain {name}")
        folds.append((name, train, test))
    return folds


def column_folds(task: Task, column: str, n_splits: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Folds holding out whole values of ``column`` (a source, site, scan date), named by the held-out values.

    One fold per value when there are at most ``n_splits`` values (leave one group out), else ``n_splits``
    folds of values (``GroupKFold``: cell counts balanced). A patient whose cells have two values would
    straddle folds: a user error naming the patient, as is a missing column, a missing value or one value only.
    """
    if n_splits < 2:
        raise MarrowLensError(f"--cv {n_splits}: --group-by needs 2 or more folds")
    cells, where = task.emb.cells, task.emb.folder
    if column not in cells.columns:
        raise MarrowLensError(
            f"--group-by {column}: {where} has no such column; index the cohort from a labels CSV with a {column} "
            "column (or choose one of its columns: "
            f"{', '.join(map(str, cells.columns))})"
        )
    values = cells[column].to_numpy(dtype=object)[task.rows]
    missing = pd.isna(values)
    if missing.any():
        raise MarrowLensError(
            f"--group-by {column}: {int(missing.sum())} of {len(values)} evaluated cells "
            f"({len(np.unique(task.groups[missing]))} patient(s), e.g. {task.groups[missing][0]!r}) have no {column} "
            "value; fill them in and index the cohort again"
        )
    values = _as_names(values)
    frame = pd.DataFrame({"patient": task.groups, "value": values})
    per_patient = frame.groupby("patient")["value"].unique()
    straddling = per_patient[per_patient.map(len) > 1]
    if len(straddling):
        patient, seen = straddling.index[0], sorted(straddling.iloc[0])
        raise MarrowLensError(
            f"--group-by {column}: patient {patient!r} has cells with {column} {' and '.join(map(repr, seen[:2]))}, "
            f"so it would straddle folds ({len(straddling)} such patient(s)); give each patient one {column}"
        )
    names = sorted(set(values))
    if len(names) < 2:
        raise MarrowLensError(
            f"--group-by {column}: every evaluated cell has {column} {names[0]!r}; holding out groups needs two or "
            "more values (choose another column, or drop --group-by for patient-grouped CV)"
        )
    if len(names) <= n_splits:
        held_out = [[name] for name in names]
    else:
        splitter = GroupKFold(n_splits=n_splits)
        held_out = [sorted(set(values[test])) for _, test in splitter.split(np.zeros(len(values)), groups=values)]
    folds = []
    for group in held_out:
        name = "+".join(group)
        test = np.flatnonzero(np.isin(values, group))
        train = np.flatnonzero(~np.isin(values, group))
        check_no_leak(task.groups, train, test, f"{column} {name}")
        folds.append((name, train, test))
    return folds


def _as_names(values: np.ndarray) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def column_fold_table(task: Task, column: str, folds: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """How :func:`column_folds` grouped: the column, and per fold the held-out values, patients and cells."""
    values = _as_names(task.emb.cells[column].to_numpy(dtype=object)[task.rows])
    return {
        "column": column,
        "folds": [
            {
                "fold": name,
                "held_out": sorted(set(values[test])),
                "test_patients": len(np.unique(task.groups[test])),
                "test_cells": len(test),
                "train_patients": len(np.unique(task.groups[train])),
                "train_cells": len(train),
            }
            for name, train, test in folds
        ],
    }


def _check_trained_rows(task: Task, probe: Probe, test: np.ndarray, what: str) -> None:
    """What the fitted head (and a refitted blast filter) trained on shares no patient with the test."""
    trained = [probe.train_rows]
    if probe.blast is not None and getattr(task, "refit_blast", False):
        trained.append(probe.blast.train_rows)
    test_patients = np.unique(task.groups[test])
    for rows in trained:
        shared = np.intersect1d(task.groups_all[rows], test_patients)
        if len(shared):
            raise AssertionError(f"patient leak in {what}: the head trained on cells of test patient {shared[0]!r}")


# ---------------------------------------------------------------- running folds


def run_folds(
    task: Task, folds: list[tuple[Any, np.ndarray, np.ndarray]], noise: NoiseSpec | None = None, desc: str = "cv"
) -> tuple[Predictions, list[dict[str, Any]]]:
    """Fit on each fold's training units, predict its test units; per-fold figures beside."""
    pred = Predictions.empty(task)
    info = []
    for i, (name, train, test) in enumerate(tqdm(folds, desc=desc, unit="fold", disable=None)):
        check_no_leak(task.groups, train, test, f"fold {name}")
        try:
            probe = task.fit(train, noise)
        except MarrowLensError as exc:
            raise MarrowLensError(f"fold {name}: {exc}") from None
        _check_trained_rows(task, probe, test, f"fold {name}")
        kept, proba = probe.predict_rows(task.emb.vectors, task.rows[test])
        pred.kept[test], pred.proba[test], pred.fold[test] = kept, proba, i
        if probe.patient_head is not None:
            pred.record_patients(probe, task, test)
        info.append(
            {
                "fold": name,
                "train_patients": len(np.unique(task.groups[train])),
                "test_patients": len(np.unique(task.groups[test])),
                "train_cells": len(probe.train_rows),
                "test_cells": len(test),
                "test_kept": int(kept.sum()),
                "head": probe.head.fitted_state(),
                **({"patient_head": _patient_head_state(probe)} if probe.patient_head is not None else {}),
                **_quick(task, pred, test),
            }
        )
    return pred, info


def _patient_head_state(probe: Probe) -> dict[str, Any]:
    assert probe.patient_head is not None
    return {"selection": probe.patient_head.selection(), **probe.patient_head.fitted_state()}


def _quick(task: Task, pred: Predictions, test: np.ndarray) -> dict[str, Any]:
    """Point estimates of one fold (cells, and patients for patient-level tasks)."""
    kept = test[pred.kept[test]]
    out: dict[str, Any] = {}
    if len(kept):
        y = np.searchsorted(task.classes, pred.y[kept])
        p = pred.proba[kept].argmax(axis=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            balanced = float(balanced_accuracy_score(y, p))
        out.update(
            accuracy=float(accuracy_score(y, p)),
            balanced_accuracy=balanced,
            macro_f1=float(f1_score(y, p, average="macro", zero_division=0)),
        )
    if task.name == "mutation":
        table = pred.patient_table(task.classes, test)
        determined = table[table["predicted"] != UNDETERMINED]
        out["patient_accuracy"] = (
            float((determined["predicted"] == determined["truth"]).mean()) if len(determined) else None
        )
        out["undetermined_patients"] = int((table["predicted"] == UNDETERMINED).sum())
    return out


# ---------------------------------------------------------------- summaries


def summarize(task: Task, pred: Predictions, n_boot: int, seed: int = 0, ece_bins: int = 15) -> dict[str, Any]:
    """Cell-level metrics (kept cells), and patient-level ones for tasks that have them."""
    kept = pred.kept
    if not kept.any():
        raise MarrowLensError("no evaluated cell was kept by the blast filter; nothing to report")
    y = np.searchsorted(task.classes, pred.y)
    cell = metrics_with_ci(y[kept], pred.proba[kept], pred.patients[kept], task.classes, n_boot, seed, ece_bins)
    cell.update(n_evaluated=len(kept), n_kept=int(kept.sum()))
    out: dict[str, Any] = {"cell": cell, "patient": None, "patients_table": None}
    if task.name == "mutation":
        table = pred.patient_table(task.classes)
        out["patient"] = patient_metrics(table, task.classes, n_boot, seed, ece_bins)
        out["patients_table"] = table
    elif task.name == "blast":
        out["patient"], out["patients_table"] = blast_fractions(task, pred, n_boot, seed)
    return out


def patient_metrics(table: pd.DataFrame, classes: list[str], n_boot: int, seed: int, ece_bins: int) -> dict[str, Any]:
    determined = table[table["predicted"] != UNDETERMINED]
    undetermined = table.loc[table["predicted"] == UNDETERMINED, "patient_id"].astype(str).tolist()
    out: dict[str, Any] = {
        "n_patients": len(table),
        "n_determined": len(determined),
        "n_undetermined": len(undetermined),
        "undetermined": undetermined,
        "coverage": float(len(determined) / len(table)) if len(table) else 0.0,
        "kept_cells_per_patient": {
            "min": int(table["n_kept"].min()),
            "median": float(table["n_kept"].median()),
            "max": int(table["n_kept"].max()),
        },
    }
    if len(determined):
        y = np.searchsorted(classes, determined["truth"].astype(str).to_numpy())
        proba = determined[[f"p_{c}" for c in classes]].to_numpy()
        out.update(metrics_with_ci(y, proba, determined["patient_id"].to_numpy(), classes, n_boot, seed, ece_bins))
        wrong_if_undetermined = (determined["predicted"] == determined["truth"]).sum() / len(table)
        out["accuracy_counting_undetermined_as_wrong"] = float(wrong_if_undetermined)
    return out


def blast_fractions(
    task: Task, pred: Predictions, n_boot: int, seed: int
) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
    """Per patient: true vs predicted blast fraction (mean P(blast) too); MAE with a bootstrap CI."""
    real = ~pd.Series(pred.patients).astype(str).str.startswith("cell:").to_numpy()
    if not real.any():
        return {"note": "no patient ids: blast fractions per patient cannot be formed"}, None
    b = task.classes.index(BLAST)
    frame = pd.DataFrame(
        {
            "patient_id": pred.patients[real],
            "true": pred.y[real] == BLAST,
            "predicted": pred.proba[real].argmax(axis=1) == b,
            "p_blast": pred.proba[real, b],
        }
    )
    table = (
        frame.groupby("patient_id")
        .agg(
            n_cells=("true", "size"),
            true_blast_fraction=("true", "mean"),
            predicted_blast_fraction=("predicted", "mean"),
            mean_p_blast=("p_blast", "mean"),
        )
        .reset_index()
    )
    error = (table["true_blast_fraction"] - table["predicted_blast_fraction"]).abs().to_numpy()
    boot = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        boot = error[rng.integers(0, len(error), size=(n_boot, len(error)))].mean(axis=1)
    pearson = None
    if len(table) > 2 and table["true_blast_fraction"].std() > 0 and table["predicted_blast_fraction"].std() > 0:
        pearson = float(np.corrcoef(table["true_blast_fraction"], table["predicted_blast_fraction"])[0, 1])
    return {
        "n_patients": len(table),
        "blast_fraction_mae": {"value": float(error.mean()), "ci": interval(boot) if boot is not None else None},
        "blast_fraction_pearson_r": pearson,
    }, table
