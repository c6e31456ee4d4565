"""The ``marrowlens probe`` commands as library functions: fit, eval, test, predict, noise-sweep.

Each loads its inputs, refuses mismatched ones, does its work and writes atomically; the CLI only
parses and prints what these return (its text comes from :mod:`marrowlens.probes.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from marrowlens.artifacts import (
    META_FILE,
    prepare_out_dir,
    read_parquet,
    short,
    write_json_atomic,
    write_meta,
    write_parquet_atomic,
    write_text_atomic,
)
from marrowlens.cohort.manifest import image_root, patient_groups
from marrowlens.config import ProbeConfig, load_config, nest, shipped_probe_config, validate_config
from marrowlens.contracts import ModelRef, NoiseSweepMeta, ProbeTestMeta, StoreRef, SweptStore, TestedProbe
from marrowlens.embeddings import CELLS_FILE, Embeddings, load_embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.maps import sample_rows
from marrowlens.probes.evaluate import (
    Predictions,
    column_fold_table,
    column_folds,
    domain_folds,
    grouped_folds,
    run_folds,
    summarize,
)
from marrowlens.probes.figures import OutOfFold
from marrowlens.probes.folder import PROBE_FILE, load_probe, read_probe_info, save_probe
from marrowlens.probes.heads import head_for
from marrowlens.probes.noise import NoiseKind, NoiseSpec
from marrowlens.probes.patients import patient_head_class, patient_table
from marrowlens.probes.pooling import MeanPooling
from marrowlens.probes.report import (
    headline,
    predict_headline,
    reliability_bins,
    selection_note,
    shared_note,
    sweep_line,
    sweep_markdown,
    unseen_note,
    write_report,
    write_sweep_plot,
)
from marrowlens.probes.sheets import CellCalls
from marrowlens.probes.tasks import MutationTask, Probe, Task, make_task
from marrowlens.provenance import python_api

PREDICT_BLOCK = 65536
REPORT_MAP_CELLS = 5000  # cells on a report's UMAP (a fixed sample)


@dataclass
class Outcome:
    """What a command wrote and its headline figures, for the CLI to print."""

    written: list[Path] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)


def probe_config(task: str, config_path: Path | None, flags: dict[str, Any], overrides: list[str]) -> ProbeConfig:
    """The task's shipped YAML (or the user's) <- named CLI flags <- ``--set`` overrides."""
    path = config_path or shipped_probe_config(task)
    return load_config(ProbeConfig, path, [*overrides, f"task={task}"], values=nest(flags))


def _load_store(path: Path) -> Embeddings:
    return load_embeddings(path, mmap=True, check_finite=True)


def _load_blast(path: Path | None, emb: Embeddings) -> Probe | None:
    if path is None:
        return None
    probe, info = load_probe(path, emb)
    if info["task"] != "blast":
        raise MarrowLensError(f"--blast-probe {path} is a {info['task']!r} probe, not a blast probe")
    return probe


# ---------------------------------------------------------------- evaluation


def cv_folds(task: Task, config: ProbeConfig) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """Patient-grouped folds (whole values of ``eval.group_by`` held out, if set), made (and checked) before any
    fitting so bad input fails fast."""
    if config.eval.group_by:
        return list(column_folds(task, config.eval.group_by, config.eval.cv))
    folds = grouped_folds(task.y, task.groups, config.eval.cv, config.seed)
    return [(i, train, test) for i, (train, test) in enumerate(folds)]


def cross_validation_report(
    task: Task, config: ProbeConfig, folds: list[tuple[Any, np.ndarray, np.ndarray]] | None = None
) -> tuple[dict[str, Any], pd.DataFrame | None, CellCalls | None, OutOfFold]:
    """CV figures, the patient table, (mutation task) the kept cells' out-of-fold calls for contact sheets, and
    every evaluated cell's out-of-fold call for the report's figures."""
    folds = cv_folds(task, config) if folds is None else folds
    pred, info = run_folds(task, folds, desc=f"{task.name} cv")
    report, patients = _summary(task, pred, config)
    report["folds"] = info
    report["evaluation"] = {
        "hyper_parameters": selection_note(info, config),
        "kind": "cross-validation",
        "description": f"{config.eval.cv}-fold patient-grouped CV (StratifiedGroupKFold, seed {config.seed})",
        "folds": config.eval.cv,
        "grouping": "patient: no cell of a test patient is in training (checked)",
        "blast_filter": _blast_note(task),
    }
    if config.eval.group_by:
        report["evaluation"].update(_group_note(task, config.eval.group_by, folds, config.eval.cv))
    calls = cell_calls(task, pred, config) if task.name == "mutation" else None
    return report, patients, calls, out_of_fold(task, pred)


def out_of_fold(task: Task, pred: Predictions) -> OutOfFold:
    """The evaluated cells' calls with their cell-table rows, the cohort's image folder, and the vectors of
    those the map shows (a fixed subsample: only they are read from the store)."""
    cohort = task.emb.meta.cohort
    mapped = sample_rows(len(pred.rows), REPORT_MAP_CELLS)
    return OutOfFold(
        classes=list(task.classes),
        y=np.asarray(pred.y).astype(str),
        kept=pred.kept,
        proba=pred.proba,
        cells=task.emb.cells.iloc[pred.rows].reset_index(drop=True),
        cohort=_cohort_images(Path(cohort.folder)) if cohort is not None else None,
        mapped=mapped,
        vectors=np.asarray(task.emb.vectors[pred.rows[mapped]], dtype=np.float32),
    )


def _group_note(task: Task, column: str, folds: list[tuple[Any, np.ndarray, np.ndarray]], cv: int) -> dict[str, Any]:
    """How CV grouped by ``column``: described, and the held-out values, patients and cells of every fold."""
    table = column_fold_table(task, column, folds)
    values = sum(len(fold["held_out"]) for fold in table["folds"])
    how = "leave one group out" if values == len(folds) else f"GroupKFold over its {values} values"
    return {
        "description": f"{len(folds)}-fold CV holding out whole values of {column} ({how}; --cv {cv})",
        "folds": len(folds),
        "grouping": f"{column}: every fold holds out whole {column} values; no patient has two, so no cell of a "
        "test patient is in training (checked)",
        "group_by": table,
    }


def _cohort_images(folder: Path) -> Path:
    """Where the store's cohort keeps its images; the cohort folder itself when that cannot be told (the
    sheets then say it is not reachable, or draw its cells as unreadable)."""
    try:
        return image_root(folder)
    except MarrowLensError:
        return folder


def cell_calls(task: Task, pred: Predictions, config: ProbeConfig) -> CellCalls:
    """The evaluated cells' out-of-fold contributions to their patient's call, with their images' paths in
    the store's cohort."""
    cells = task.emb.cells.iloc[pred.rows]
    cohort = task.emb.meta.cohort
    types = cells["cell_type"] if "cell_type" in cells else pd.Series([None] * len(cells), dtype=object)
    return CellCalls(
        patients=pred.patients,
        cell_ids=cells["cell_id"].astype(str).to_numpy(),
        kept=pred.kept,
        contribution=pred.contribution,
        paths=cells["path"].astype(str).to_numpy() if "path" in cells else np.full(len(cells), "", dtype=object),
        cell_types=types.to_numpy(dtype=object),
        head=config.mutation.aggregate,
        meaning=patient_head_class(config.mutation.aggregate).contribution,
        cohort=_cohort_images(Path(cohort.folder)) if cohort is not None else None,
        per_sheet=config.eval.sheet_cells,
        correct_sheets=config.eval.sheets,
    )


def _blast_note(task: Task) -> str | None:
    if not isinstance(task, MutationTask):
        return None
    if task.refit_blast:
        return "refitted in every fold on the training patients' blast labels (the store has them)"
    return "the given blast probe, as is (the store has no blast labels to refit it)"


def _summary(task: Task, pred: Predictions, config: ProbeConfig) -> tuple[dict[str, Any], pd.DataFrame | None]:
    summary = summarize(task, pred, config.eval.bootstrap, config.seed, config.eval.ece_bins)
    kept = pred.kept
    summary["cell"]["calibration_bins"] = reliability_bins(
        np.searchsorted(task.classes, pred.y[kept]), pred.proba[kept], config.eval.ece_bins
    )
    patients = summary.pop("patients_table")
    return summary, patients


def domain_report(task: Task) -> list[dict[str, Any]]:
    _, info = run_folds(task, domain_folds(task), desc=f"{task.name} leave-one-domain-out")
    return [{"held_out_domain": row.pop("fold"), **row} for row in info]


def _header(config: ProbeConfig, task: Task, emb: Embeddings) -> dict[str, Any]:
    kind = patient_head_class(config.mutation.aggregate) if config.task == "mutation" else None
    return {
        "task": config.task,
        "classes": task.classes,
        "head": head_for(config).name,
        "patient_head": {"name": kind.name, "contribution": kind.contribution} if kind is not None else None,
        "loss": config.loss.name if head_for(config).trains_with_loss else None,
        "embeddings": {
            "folder": str(emb.folder),
            "fingerprint": emb.fingerprint,
            "model_fingerprint": emb.model_fingerprint,
        },
        "units": task.describe(),
        "config": config.model_dump(mode="json"),
    }


# ---------------------------------------------------------------- commands


@python_api
def fit(
    task_name: str,
    embeddings: Path,
    out: Path,
    config: ProbeConfig,
    blast_probe: Path | None = None,
    overwrite: bool = False,
) -> Outcome:
    """Cross-validate (unless ``eval.cv`` is 0), then fit the final probe on every labelled cell."""
    if blast_probe is not None and config.task != "mutation":
        raise MarrowLensError(f"--blast-probe only applies to the mutation task, not {config.task}")
    emb = _load_store(embeddings)
    blast = _load_blast(blast_probe, emb)
    task = make_task(config, emb, blast)
    folds = cv_folds(task, config) if config.eval.cv else None
    out = prepare_out_dir(out, overwrite)
    final = task.fit(np.arange(len(task.rows)), final=True)  # fails early on bad input, before any CV
    report = _header(config, task, emb)
    patients, calls, cells = None, None, None
    if folds is not None:
        evaluation, patients, calls, cells = cross_validation_report(task, config, folds)
        report.update(evaluation)
    else:
        report.update(cell=None, patient=None, evaluation={"kind": "none", "description": "skipped (--cv 0)"})
    written = write_report(out, report, patients, calls, cells)
    save_probe(out, final, emb, extra={"cv": report.get("evaluation", {}).get("description")})
    return Outcome([out / PROBE_FILE, out / "head.safetensors", *written], headline(report))


def evaluate(
    probe_dir: Path,
    embeddings: Path,
    out: Path | None = None,
    cv: int | None = None,
    leave_one_domain_out: bool = False,
    bootstrap: int | None = None,
    group_by: str | None = None,
) -> Outcome:
    """CV of the probe's recipe on its own store, or the fitted probe as is on another store (same model).

    ``group_by`` holds out whole values of that column instead of patients ("" back to patients); None keeps
    the probe's own setting.
    """
    emb = _load_store(embeddings)
    probe, info = load_probe(probe_dir, emb)
    data = probe.config.model_dump(mode="json")
    data["eval"].update({k: v for k, v in (("cv", cv), ("bootstrap", bootstrap)) if v is not None})
    if group_by is not None:
        data["eval"]["group_by"] = group_by or None
    config = validate_config(ProbeConfig, data, "command line")
    task = make_task(config, emb, probe.blast)
    same_store = emb.fingerprint == info["embeddings"]["fingerprint"]
    unseen = {} if same_store else _keep_known_classes(task, probe.classes)  # a fitted probe knows its classes
    report = _header(config, task, emb)
    patients, calls, cells = None, None, None
    if same_store and config.eval.cv:
        evaluation, patients, calls, cells = cross_validation_report(task, config)
        report.update(evaluation)
    elif not same_store:
        evaluation, patients, cells = _apply_as_is(probe, emb, task, config)
        report.update(evaluation)
        report["evaluation"] = {
            "kind": "external",
            "description": f"the fitted probe as is, on embeddings {short(emb.fingerprint)} "
            f"(trained on {short(info['embeddings']['fingerprint'])}); no refitting",
            "grouping": "none needed: no cell of this store was used for training",
            "blast_filter": "the probe's own blast filter" if probe.blast is not None else None,
            "left_out": unseen,
        }
    else:
        report.update(cell=None, patient=None, evaluation={"kind": "none", "description": "skipped (--cv 0)"})
    if leave_one_domain_out:
        report["leave_one_domain_out"] = domain_report(task)
    if out is None:
        out = Path(probe_dir) if same_store else Path(probe_dir) / f"external-{short(emb.fingerprint)}"
    written = write_report(out, report, patients, calls, cells)
    return Outcome(written, [*([unseen_note(unseen)] if unseen else []), *headline(report)])


def external_test(
    probe_dir: Path, embeddings: Path, out: Path, bootstrap: int | None = None, overwrite: bool = False
) -> Outcome:
    """The fitted probe (and its blast filter) as is on a cohort it never saw: generalisation, measured honestly.

    Internal CV shares scanners, stains and labelling habits with training; only another cohort shows
    what survives. Nothing is refitted; cells of classes the probe never learned are left out, saying so.
    """
    emb = _load_store(embeddings)
    info = read_probe_info(probe_dir)
    _require_unseen_store(info, Path(probe_dir), emb)
    probe, _ = load_probe(probe_dir, emb)
    data = probe.config.model_dump(mode="json")
    if bootstrap is not None:
        data["eval"]["bootstrap"] = bootstrap
    config = validate_config(ProbeConfig, data, "command line")
    task = make_task(config, emb, probe.blast)
    unseen = _keep_known_classes(task, probe.classes)
    shared = _shared_patients(info, task)
    out = prepare_out_dir(out, overwrite)
    (out / META_FILE).unlink(missing_ok=True)  # the "finished" marker: back only once every file is
    report = _header(config, task, emb)
    evaluation, patients, cells = _apply_as_is(probe, emb, task, config)
    report.update(evaluation)
    report["probe"] = {"folder": str(Path(probe_dir).resolve()), "fingerprint": info["fingerprint"]}
    report["evaluation"] = {
        "kind": "external-test",
        "description": f"probe {probe_dir} ({short(info['fingerprint'])}), fitted on embeddings "
        f"{short(info['embeddings']['fingerprint'])}, applied as is to {emb.folder} ({short(emb.fingerprint)}); "
        "nothing refitted",
        "grouping": "none needed: no cell of this store was used for training",
        "blast_filter": _saved_filter_note(probe),
        "left_out": unseen,
        "shared_patients": shared,
    }
    written = write_report(out, report, patients, cells=cells)
    write_meta(out, _test_meta(config.task, Path(probe_dir), info, emb))
    notes = [*([unseen_note(unseen)] if unseen else []), *([shared_note(shared)] if shared else [])]
    return Outcome([*written, out / META_FILE], [*notes, *headline(report)])


def _require_unseen_store(info: dict[str, Any], folder: Path, emb: Embeddings) -> None:
    """Another backbone's vectors live in another space; the probe's own store is no external test."""
    if info["model_fingerprint"] != emb.model_fingerprint:
        raise MarrowLensError(
            f"{emb.folder} was embedded by another backbone ({short(emb.model_fingerprint)}) than probe {folder} "
            f"({short(info['model_fingerprint'])}); embed the test cohort with the probe's backbone"
        )
    if info["embeddings"]["fingerprint"] == emb.fingerprint:
        raise MarrowLensError(
            f"{emb.folder} is the store probe {folder} was fitted on; `probe eval` cross-validates there"
        )


def _keep_known_classes(task: Task, classes: list[str]) -> dict[str, dict[str, int]]:
    """Restrict ``task`` to the probe's classes; what is left out, per unseen class (cells and patients)."""
    known = np.isin(task.y, classes)
    if not known.any():
        raise MarrowLensError(
            f"{task.emb.folder}: none of its {task.name} labels ({', '.join(sorted(set(task.y)))}) "
            f"is a class the probe knows ({', '.join(classes)})"
        )
    unseen = {
        str(name): {"cells": int((task.y == name).sum()), "patients": len(set(task.groups[task.y == name]))}
        for name in sorted(set(task.y[~known]))
    }
    task.rows, task.y, task.groups = task.rows[known], task.y[known], task.groups[known]
    task.classes = list(classes)
    return unseen


def _shared_patients(info: dict[str, Any], task: Task) -> list[str]:
    """Test patients whose ids the probe's training store has too: the same patients, or a clash of names.

    Best effort: a training store that moved or cannot be read is not checked.
    """
    try:
        trained = read_parquet(Path(info["embeddings"]["folder"]) / CELLS_FILE)["patient_id"].dropna()
    except (MarrowLensError, KeyError):
        return []
    return sorted(set(task.groups) & set(trained.astype(str)))


def _apply_as_is(
    probe: Probe, emb: Embeddings, task: Task, config: ProbeConfig
) -> tuple[dict[str, Any], pd.DataFrame | None, OutOfFold]:
    """Predict ``task``'s units with the fitted probe (its blast filter included) and summarise them."""
    pred = Predictions.empty(task)
    pred.kept, pred.proba = _predict_blocks(probe, emb, task.rows)
    pred.fold[:] = 0
    if probe.patient_head is not None:
        pred.record_patients(probe, task, np.arange(len(task.rows)))
    summary, patients = _summary(task, pred, config)
    return summary, patients, out_of_fold(task, pred)


def _saved_filter_note(probe: Probe) -> str | None:
    if probe.blast is None:
        return None
    return f"the probe's own blast filter, as saved (P(blast) >= {probe.config.mutation.blast_threshold}); not refitted"


def _test_meta(task: str, probe_dir: Path, info: dict[str, Any], emb: Embeddings) -> ProbeTestMeta:
    tested = TestedProbe(
        folder=str(probe_dir.resolve()),
        fingerprint=info["fingerprint"],
        trained_on=StoreRef.model_validate(info["embeddings"]),
    )
    store = StoreRef(folder=str(Path(emb.folder).resolve()), fingerprint=emb.fingerprint)
    return ProbeTestMeta(task=task, probe=tested, embeddings=store, model=ModelRef(fingerprint=emb.model_fingerprint))


def _predict_blocks(probe: Probe, emb: Embeddings, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    kept = np.zeros(len(rows), dtype=bool)
    proba = np.full((len(rows), len(probe.classes)), np.nan)
    for start in tqdm(range(0, len(rows), PREDICT_BLOCK), desc="predict", unit="block", disable=None):
        block = slice(start, start + PREDICT_BLOCK)
        kept[block], proba[block] = probe.predict_rows(emb.vectors, rows[block])
    return kept, proba


def cell_predictions(classes: list[str], kept: np.ndarray, proba: np.ndarray) -> pd.DataFrame:
    """Per cell: ``kept`` (by the blast filter), ``predicted`` (None when dropped), ``confidence``, ``p_<class>``."""
    cells = pd.DataFrame({"kept": kept})
    best = np.nan_to_num(proba, nan=-1).argmax(axis=1)
    predicted = np.asarray(classes, dtype=object)[best]
    predicted[~kept] = None
    cells["predicted"] = predicted
    cells["confidence"] = np.where(kept, np.nanmax(np.where(kept[:, None], proba, 0), axis=1), np.nan)
    for i, name in enumerate(classes):
        cells[f"p_{name}"] = proba[:, i]
    return cells


def predictions(probe: Probe, emb: Embeddings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``probe predict``'s two tables for every cell of ``emb``: the cells (``cell_id``, ``patient_id``, then
    :func:`cell_predictions`' columns and each cell's ``contribution`` to its patient's call) and the patients
    (:func:`~marrowlens.probes.patients.patient_table`; a blast or cell-type probe pools its cells' calls with
    the mean)."""
    kept, proba = _predict_blocks(probe, emb, np.arange(len(emb)))
    ids = {"cell_id": emb.cells["cell_id"].to_numpy(), "patient_id": emb.cells["patient_id"].to_numpy()}
    cells = pd.concat([pd.DataFrame(ids), cell_predictions(probe.classes, kept, proba)], axis=1)
    has_patient = np.flatnonzero(emb.cells["patient_id"].notna().to_numpy())
    groups = patient_groups(emb.cells).to_numpy()[has_patient]
    if probe.patient_head is None:  # a blast or cell-type probe: per patient, the mean of its cells' calls
        probe = replace(probe, patient_head=MeanPooling())
    _, calls = probe.call_patients(emb, has_patient, groups, kept[has_patient], proba[has_patient])
    cells["contribution"] = np.nan
    cells.loc[has_patient, "contribution"] = calls.contribution
    patients = patient_table(groups, kept[has_patient], proba[has_patient], calls, probe.classes)
    return cells, patients


def predict(probe_dir: Path, embeddings: Path, out: Path, overwrite: bool = False) -> Outcome:
    """Cell predictions (``out``) and patient aggregates (``<out stem>.patients.parquet``)."""
    out = Path(out)
    if out.suffix != ".parquet":
        raise MarrowLensError(f"--out {out} must end in .parquet")
    patients_out = out.with_name(out.stem + ".patients.parquet")
    for path in (out, patients_out):
        if path.exists() and not overwrite:
            raise MarrowLensError(f"{path} exists; pass --overwrite to replace it")
    emb = _load_store(embeddings)
    probe, _info = load_probe(probe_dir, emb)
    cells, patients = predictions(probe, emb)
    write_parquet_atomic(out, cells)
    write_parquet_atomic(patients_out, patients)
    undetermined = int((patients["predicted"] == "undetermined").sum())
    n_kept = int(cells["kept"].sum())
    lines = predict_headline(n_kept, len(cells), probe.blast is not None, len(patients), undetermined)
    return Outcome([out, patients_out], lines)


@python_api
def noise_sweep(
    embeddings: Path,
    out: Path,
    config: ProbeConfig,
    rates: list[float],
    kind: str,
    losses: list[str],
    blast_probe: Path | None = None,
    overwrite: bool = False,
) -> Outcome:
    """Inject known noise into training labels only; CV every loss at every rate on the same folds.

    Every loss trains with the torch head (``linear.solver: torch``), CE included: with scikit-learn's
    solver for CE alone, the sweep would compare optimisers as well as losses.
    """
    if kind not in get_args(NoiseKind):
        raise MarrowLensError(f"noise kind must be symmetric or bag, not {kind!r}")
    noise_kind = cast(NoiseKind, kind)
    config = config.model_copy(update={"linear": config.linear.model_copy(update={"solver": "torch"})})
    if not head_for(config).trains_with_loss:
        raise MarrowLensError(
            "noise-sweep compares training losses, so it needs a head trained with one (--head linear), "
            f"not {config.head}"
        )
    if config.eval.cv < 2:
        raise MarrowLensError("noise-sweep needs cross-validation: --cv 2 or more")
    for rate in rates:
        if not 0 <= rate < 1:
            raise MarrowLensError(f"noise rate {rate} must be in [0, 1)")
    emb = _load_store(embeddings)
    blast = _load_blast(blast_probe, emb)
    if config.task == "mutation" and blast is None:
        blast = _seed_blast_probe(config, emb)
    out = prepare_out_dir(out, overwrite)
    rows = []
    for loss in losses:
        data = config.model_dump(mode="json")
        data["loss"]["name"] = loss
        loss_config = validate_config(ProbeConfig, data, "--losses")
        task = make_task(loss_config, emb, blast)
        folds = cv_folds(task, loss_config)
        for rate in rates:
            noise = NoiseSpec(rate, noise_kind, config.seed) if rate > 0 else None
            pred, _ = run_folds(task, folds, noise, desc=f"{loss} noise {rate:g}")
            summary, _ = _summary(task, pred, loss_config)
            rows.append(_sweep_row(loss, rate, summary))
    result = {
        "task": config.task,
        "kind": kind,
        "rates": rates,
        "losses": losses,
        "folds": config.eval.cv,
        "embeddings": {"fingerprint": emb.fingerprint, "model_fingerprint": emb.model_fingerprint},
        "blast_filter": _blast_note(task),
        "rows": rows,
        "config": config.model_dump(mode="json"),
    }
    write_json_atomic(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", sweep_markdown(result))
    written = [out / "sweep.json", out / "sweep.md", write_sweep_plot(out, result)]
    write_meta(out, NoiseSweepMeta(embeddings=SweptStore.model_validate(result["embeddings"]), task=config.task))
    return Outcome(written, [sweep_line(r) for r in rows])


def _seed_blast_probe(config: ProbeConfig, emb: Embeddings) -> Probe:
    """Without --blast-probe, the store's own blast labels make one (refitted in every fold anyway)."""
    blast_config = validate_config(
        ProbeConfig,
        {
            "task": "blast",
            "blast": config.blast.model_dump(),
            "seed": config.seed,
            "linear": config.linear.model_dump(),
        },
        "noise-sweep blast filter",
    )
    try:
        task = make_task(blast_config, emb)
    except MarrowLensError as exc:
        raise MarrowLensError(f"the mutation sweep needs --blast-probe or blast labels in the store ({exc})") from None
    return task.fit(np.arange(len(task.rows)), final=True)


def _value(entry: Any) -> float | None:
    return entry.get("value") if isinstance(entry, dict) else entry


def _sweep_row(loss: str, rate: float, summary: dict[str, Any]) -> dict[str, Any]:
    cell, patient = summary["cell"], summary.get("patient") or {}
    row = {
        "loss": loss,
        "noise": rate,
        "cell_accuracy": _value(cell["accuracy"]),
        "cell_balanced_accuracy": _value(cell["balanced_accuracy"]),
        "cell_macro_f1": _value(cell["macro_f1"]),
        "cell_balanced_accuracy_ci": cell["balanced_accuracy"]["ci"],
    }
    if "accuracy" in patient:
        row.update(
            patient_accuracy=_value(patient["accuracy"]),
            patient_accuracy_ci=patient["accuracy"]["ci"],
            patient_balanced_accuracy=_value(patient["balanced_accuracy"]),
            undetermined_patients=patient["n_undetermined"],
        )
    return row
