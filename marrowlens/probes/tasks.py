"""What a probe learns: blast vs non-blast, cell types, or mutations through a blast filter.

A task turns an embedding store into *units* (the labelled cells it is evaluated on, their truth
and their patient) and fits a :class:`Probe` on any subset of them. The mutation task is the
hand-written part (no library has it): a blast probe keeps the cells it calls blasts, those cells
inherit their patient's ``mutation`` label (control patients contribute the cells chosen by
``mutation.control_cells``), and the mutation head learns on them; applied to a patient, only the
kept cells are classified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marrowlens.cohort.manifest import patient_groups
from marrowlens.config import BlastLabelConfig, CellTypeTaskConfig, ProbeConfig
from marrowlens.embeddings import Embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.probes.heads import Head, RowView, head_for, make_head
from marrowlens.probes.noise import NoiseSpec, inject_noise
from marrowlens.probes.patients import Bags, PatientCalls, PatientHead, make_patient_head, patient_labels

BLAST, NON_BLAST = "blast", "non_blast"


# ---------------------------------------------------------------- labels


def _require_column(cells: pd.DataFrame, column: str, where: str, hint: str = "") -> pd.Series:
    if column not in cells.columns or cells[column].isna().all():
        raise MarrowLensError(f"{where} has no {column} labels (the column is missing or empty){hint}")
    return cells[column]


def blast_labels(cells: pd.DataFrame, config: BlastLabelConfig, where: str) -> pd.Series:
    """``blast`` / ``non_blast`` per cell, None where unknown."""
    if config.source == "is_blast":
        values = _require_column(cells, "is_blast", where, "; the blast task needs them, or set blast.source=cell_type")
        return values.map({True: BLAST, False: NON_BLAST}).astype(object).where(values.notna(), None)
    types = _require_column(cells, "cell_type", where, "; blast.source=cell_type needs them")
    labels = pd.Series(None, index=cells.index, dtype=object)
    labels[types.isin(config.blast_types)] = BLAST
    others = types.notna() & ~types.isin(config.blast_types)
    if config.non_blast_types is not None:
        others &= types.isin(config.non_blast_types)
    labels[others] = NON_BLAST
    return labels


def has_blast_labels(cells: pd.DataFrame, config: BlastLabelConfig) -> bool:
    try:
        labels = blast_labels(cells, config, "")
    except MarrowLensError:
        return False
    return bool(labels.notna().any())


def cell_type_labels(cells: pd.DataFrame, config: ProbeConfig, where: str) -> pd.Series:
    """Cell types (mapped to coarse classes when a mapping is given; unmapped types dropped)."""
    types = _require_column(cells, "cell_type", where, "; the cell_type task needs them")
    return mapped_cell_types(types, config.cell_type)


def mapped_cell_types(types: pd.Series, section: CellTypeTaskConfig) -> pd.Series:
    """Raw cell types as the probe's classes: mapped when a mapping is given (unmapped ones dropped), None
    where unknown or of a class with fewer than ``section.min_cells`` cells among ``types``."""
    labels = types.map(section.mapping) if section.mapping else types
    labels = labels.astype(object).where(labels.notna(), None)
    counts = labels.value_counts()
    rare = counts[counts < section.min_cells].index
    return labels.where(~labels.isin(rare), None)


# ---------------------------------------------------------------- fitted probe


@dataclass
class Probe:
    """A fitted head with what is needed to apply it (and, for mutations, its blast filter)."""

    config: ProbeConfig
    head: Head
    classes: list[str]
    train_rows: np.ndarray
    train_labels: np.ndarray
    blast: Probe | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the folder it was loaded from, if any
    patient_head: PatientHead | None = None  # mutation probes: how a patient's cells make one call

    def proba(self, X: Any) -> np.ndarray:
        """Probabilities over :attr:`classes` (a fold's head may have seen fewer: those get 0)."""
        raw = self.head.predict_proba(X)
        out = np.zeros((len(raw), len(self.classes)))
        columns = [self.classes.index(str(c)) for c in self.head.classes_]
        out[:, columns] = raw
        return out

    def blast_probability(self, X: Any) -> np.ndarray:
        return self.proba(X)[:, self.classes.index(BLAST)]

    def predict_rows(self, vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(kept, proba)`` for store rows; cells the blast filter drops get NaN probabilities."""
        rows = np.asarray(rows, dtype=np.int64)
        proba = np.full((len(rows), len(self.classes)), np.nan)
        kept = self.blast_scores(vectors, rows) >= self.config.mutation.blast_threshold  # no filter: all kept
        if kept.any():
            proba[kept] = self.proba(RowView(vectors, rows[kept]))
        return kept, proba

    def blast_scores(self, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The blast filter's P(blast) per row (1 without a filter: every cell counts)."""
        if self.blast is None:
            return np.ones(len(rows))
        return self.blast.blast_probability(RowView(vectors, np.asarray(rows, dtype=np.int64)))

    def call_patients(
        self, emb: Embeddings, rows: np.ndarray, patients: np.ndarray, kept: np.ndarray, proba: np.ndarray
    ) -> tuple[Bags, PatientCalls]:
        """The patient head's calls for the patients of ``rows`` (their cells' ``kept``/``proba`` given)."""
        if self.patient_head is None:
            raise MarrowLensError("only a mutation probe calls patients")
        bags = Bags.of(patients, rows, kept, self.blast_scores(emb.vectors, rows), proba, emb.vectors, emb.cells)
        return bags, self.patient_head.predict(bags, self.classes)


def head_spec(config: ProbeConfig) -> tuple[str, dict[str, Any]]:
    """Registry name and constructor parameters of the head a config trains (``head: linear`` may resolve
    to scikit-learn's ``logistic``: :meth:`LinearProbe.resolve`)."""
    kind = head_for(config)
    return kind.name, kind.config_params(config)


def fit_head(
    config: ProbeConfig,
    vectors: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
) -> Probe:
    """Fit a fresh head on store rows; one class left is an error naming it."""
    present = sorted(set(labels))
    if len(present) < 2:
        raise MarrowLensError(
            f"only class {str(present[0]) if present else '(none)'!r} has training cells; a probe needs two or more"
        )
    kind, params = head_spec(config)
    head = make_head(kind, params)
    head.fit(RowView(vectors, rows), labels, groups=groups)
    return Probe(
        config=config, head=head, classes=classes, train_rows=np.asarray(rows), train_labels=np.asarray(labels)
    )


# ---------------------------------------------------------------- tasks


class Task:
    """Labelled units of a store and how to fit a probe on a subset of them."""

    name: str

    def __init__(self, config: ProbeConfig, emb: Embeddings) -> None:
        self.config, self.emb = config, emb
        self.groups_all = patient_groups(emb.cells).to_numpy()
        labels = self.labels()
        known = labels.notna().to_numpy()
        self.rows = np.flatnonzero(known)
        self.y = labels.to_numpy()[known].astype(str)
        self.groups = self.groups_all[self.rows]
        self.classes = sorted(set(self.y))
        if len(self.classes) < 2:
            raise MarrowLensError(
                f"{emb.folder}: the {self.name} task needs two classes, found {self.classes or 'none'}"
            )

    def labels(self) -> pd.Series:
        raise NotImplementedError

    def fit(self, train: np.ndarray, noise: NoiseSpec | None = None, final: bool = False) -> Probe:
        """Fit on ``train`` (indices into :attr:`rows`); ``final`` marks the fit on every unit."""
        rows, y, groups = self.rows[train], self.y[train], self.groups[train]
        if noise is not None:
            y = inject_noise(y, self.classes, noise, groups)
        return fit_head(self.config, self.emb.vectors, rows, y, groups, self.classes)

    def describe(self) -> dict[str, Any]:
        return {"cells": len(self.rows), "patients": len(set(self.groups))}


class BlastTask(Task):
    name = "blast"

    def labels(self) -> pd.Series:
        return blast_labels(self.emb.cells, self.config.blast, str(self.emb.folder))


class CellTypeTask(Task):
    name = "cell_type"

    def labels(self) -> pd.Series:
        return cell_type_labels(self.emb.cells, self.config, str(self.emb.folder))


class MutationTask(Task):
    """Units: every cell of a patient with a ``mutation``; the blast filter decides which count.

    ``blast`` is the blast probe given by the user. When the store has that probe's kind of blast
    labels, each CV fit refits the filter on the labelled cells of everyone but the held-out
    patients (so a fold never sees a test patient's blast labels); otherwise the given probe is
    used as it is.
    """

    name = "mutation"

    def __init__(self, config: ProbeConfig, emb: Embeddings, blast: Probe) -> None:
        self.blast = blast
        super().__init__(config, emb)
        self.refit_blast = has_blast_labels(emb.cells, blast.config.blast)
        if self.refit_blast:
            self.blast_y = blast_labels(emb.cells, blast.config.blast, str(emb.folder)).to_numpy()

    def labels(self) -> pd.Series:
        mutation = _require_column(self.emb.cells, "mutation", str(self.emb.folder), "; the mutation task needs them")
        return mutation.astype(object).where(mutation.notna(), None)

    @property
    def control(self) -> str | None:
        control = self.config.mutation.control
        return control if control in self.classes else None

    def blast_filter_for(self, train: np.ndarray) -> Probe:
        """The blast probe refitted on every blast-labelled cell outside the held-out patients.

        That includes cells with no mutation label at all (a second source with cell classes,
        e.g. the Munich LMU set beside AML_Hehr), which the mutation units do not cover. With
        ``eval.group_by`` the held-out groups' cells are left out too, patients or not: a held-out
        site must be new to the filter as well.
        """
        if not self.refit_blast:
            return self.blast
        held_out = np.setdiff1d(self.groups, self.groups[train])
        outside = ~np.isin(self.groups_all, held_out)
        column = self.config.eval.group_by
        if column and column in self.emb.cells.columns:
            values = self.emb.cells[column].astype(str).to_numpy()
            tested = np.setdiff1d(values[self.rows], values[self.rows[train]])
            outside &= ~np.isin(values, tested)
        labelled = np.flatnonzero(pd.notna(self.blast_y) & outside)
        return fit_head(
            self.blast.config,
            self.emb.vectors,
            labelled,
            self.blast_y[labelled].astype(str),
            self.groups_all[labelled],
            [BLAST, NON_BLAST],
        )

    def training_cells(self, train: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """Which of the ``train`` units train the head: kept cells, and the chosen control cells."""
        y = self.y[train]
        is_control = y == self.control if self.control is not None else np.zeros(len(y), dtype=bool)
        choice = self.config.mutation.control_cells
        control_cells = {"non_blast": ~kept, "kept": kept, "all": np.ones(len(y), dtype=bool)}[choice]
        return np.where(is_control, control_cells, kept)

    def fit(self, train: np.ndarray, noise: NoiseSpec | None = None, final: bool = False) -> Probe:
        """In CV folds the blast filter is refitted (when it can be); the final fit keeps the given one."""
        rows = self.rows[train]
        refit = self.refit_blast and not final
        blast = self.blast_filter_for(train) if refit else self.blast
        scores = blast.blast_probability(RowView(self.emb.vectors, rows))
        kept = scores >= self.config.mutation.blast_threshold
        chosen = self.training_cells(train, kept)
        y = self.y[train][chosen]
        empty = [c for c in self.classes if c not in set(y)]
        if empty:
            raise MarrowLensError(
                f"class {str(empty[0])!r} has no cells after the blast filter (threshold "
                f"{self.config.mutation.blast_threshold}, {int(kept.sum())} of {len(kept)} cells kept); "
                "lower --blast-threshold or check the blast probe"
            )
        groups = self.groups[train][chosen]
        if noise is not None:
            y = inject_noise(y, self.classes, noise, groups)
        probe = fit_head(self.config, self.emb.vectors, rows[chosen], y, groups, self.classes)
        probe.blast = blast
        probe.patient_head = self.fit_patient_head(train, kept, scores, noise)
        probe.notes = {
            "blast_filter": "refitted on the training patients' blast labels"
            if refit
            else "the given blast probe, as is",
            "kept_training_cells": int(kept.sum()),
            "training_cells": int(chosen.sum()),
        }
        return probe

    def fit_patient_head(
        self, train: np.ndarray, kept: np.ndarray, scores: np.ndarray, noise: NoiseSpec | None
    ) -> PatientHead:
        """The patient head, fitted on the training patients' labels (mean and vote have nothing to fit)."""
        rows = self.rows[train]
        no_proba = np.full((len(rows), len(self.classes)), np.nan)
        bags = Bags.of(self.groups[train], rows, kept, scores, no_proba, self.emb.vectors, self.emb.cells)
        y = patient_labels(bags, self.y[train]).astype(str)
        if noise is not None:
            y = inject_noise(y, self.classes, noise, bags.ids)
        missing = [c for c in self.classes if c not in set(y)]
        if missing:
            raise MarrowLensError(f"class {missing[0]!r} has no training patient; the patient head needs every class")
        return make_patient_head(self.config).fit(bags, y, self.classes)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "control": self.control, "blast_filter_refitted": self.refit_blast}


def make_task(config: ProbeConfig, emb: Embeddings, blast: Probe | None = None) -> Task:
    if config.task == "mutation":
        if blast is None:
            raise MarrowLensError("the mutation task needs a blast probe (--blast-probe probes/blast)")
        return MutationTask(config, emb, blast)
    return {"blast": BlastTask, "cell_type": CellTypeTask}[config.task](config, emb)
