"""Patient heads: how a mutation probe turns a patient's cells into one call.

A patient is a bag of cells (:class:`Bags`: every evaluated cell, whether the blast filter kept it,
its P(blast) and the cell head's probabilities). A :class:`PatientHead` (registry :func:`patient_heads`,
from ``config.PATIENT_HEAD_CLASSES``) maps bags to class probabilities per patient plus, per cell, its
contribution to the call (what the contact sheets and the web page sort by). ``mean`` and ``vote``
only combine the cell head's calls; ``abmil`` and ``composition`` are fitted on the training
patients' labels, inside each cross-validation fold like the cell head. A patient a head cannot call
(no kept cell) has a row of NaN: "undetermined", reported and never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from marrowlens.config import PATIENT_HEAD_CLASSES, ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.registry import load_registered

UNDETERMINED = "undetermined"


@dataclass
class Bags:
    """Patients' evaluated cells, grouped: ``which[i]`` is cell i's patient (an index into ``ids``).

    ``vectors`` and ``cells`` are the whole store's (``rows`` index them), so a head can read a cell's
    embedding or its labels (composition reads cell types) without copies.
    """

    ids: np.ndarray
    which: np.ndarray
    rows: np.ndarray
    kept: np.ndarray
    blast: np.ndarray
    proba: np.ndarray
    vectors: np.ndarray
    cells: pd.DataFrame

    @classmethod
    def of(
        cls,
        patients: np.ndarray,
        rows: np.ndarray,
        kept: np.ndarray,
        blast: np.ndarray,
        proba: np.ndarray,
        vectors: np.ndarray,
        cells: pd.DataFrame,
    ) -> Bags:
        ids, which = np.unique(np.asarray(patients).astype(str), return_inverse=True)
        return cls(ids, which, np.asarray(rows), np.asarray(kept, dtype=bool), np.asarray(blast), proba, vectors, cells)

    @property
    def n_patients(self) -> int:
        return len(self.ids)

    def members(self) -> list[np.ndarray]:
        """Per patient, the positions of its cells (in this bag set's cell order)."""
        order = np.argsort(self.which, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.which, minlength=self.n_patients))[:-1])


@dataclass
class PatientCalls:
    """Per patient: class probabilities (NaN row: undetermined) and a note; per cell: its contribution."""

    proba: np.ndarray
    contribution: np.ndarray
    notes: list[str] = field(default_factory=list)


class PatientHead:
    """A patient model. ``fit`` sees only training patients; ``predict`` any patients (same store rows space)."""

    name: ClassVar[str]
    contribution: ClassVar[str]  # what a cell's contribution means, for reports and the web page

    def fit(self, bags: Bags, y: np.ndarray, classes: Sequence[str]) -> PatientHead:
        """``y``: one label per patient of ``bags`` (in ``bags.ids`` order)."""
        return self

    def predict(self, bags: Bags, classes: Sequence[str]) -> PatientCalls:
        raise NotImplementedError

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        return {}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_saved(
        cls, params: dict[str, Any], fitted: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> PatientHead:
        return cls(**params)

    def fitted_state(self) -> dict[str, Any]:
        """JSON-able facts about the fit (how its hyper-parameters were chosen), for probe.json and reports."""
        return {}

    def selection(self) -> str | None:
        """How the head's own hyper-parameters were chosen, in a sentence; None for heads without any."""
        return None


@cache
def patient_heads() -> dict[str, type[PatientHead]]:
    """The registry, imported on first use (the heads import the probe code that imports this module)."""
    return load_registered(PATIENT_HEAD_CLASSES)


def patient_head_class(name: str, where: str = "the probe config") -> type[PatientHead]:
    heads = patient_heads()
    if name not in heads:
        raise MarrowLensError(
            f"{where} names patient head {name!r}, which this version does not know (known: {', '.join(heads)})"
        )
    return heads[name]


def make_patient_head(config: ProbeConfig) -> PatientHead:
    kind = patient_head_class(config.mutation.aggregate)
    return kind(**kind.config_params(config))


def patient_labels(bags: Bags, labels: np.ndarray) -> np.ndarray:
    """One label per patient from per-cell labels (a patient's cells share its label)."""
    return _first_per_patient(bags.which, labels, bags.n_patients)


def _first_per_patient(which: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Each patient's first cell's value (``which``: each cell's patient index)."""
    first = np.empty(n, dtype=object)
    first[which[::-1]] = np.asarray(values, dtype=object)[::-1]
    return first


def patient_table(
    patients: np.ndarray,
    kept: np.ndarray,
    proba: np.ndarray,
    calls: PatientCalls,
    classes: Sequence[str],
    truth: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per patient (sorted ids, as :class:`Bags`): cells, kept cells, the head's probabilities and
    call, and the fraction of kept cells whose own call is each class."""
    ids, which = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    n, n_classes = len(ids), len(classes)
    kept = np.asarray(kept, dtype=bool)
    n_kept = np.bincount(which, weights=kept, minlength=n).astype(int)
    determined = np.isfinite(calls.proba).all(axis=1)
    predicted = np.full(n, UNDETERMINED, dtype=object)
    predicted[determined] = np.asarray(classes, dtype=object)[calls.proba[determined].argmax(axis=1)]
    confidence = np.full(n, np.nan)
    confidence[determined] = calls.proba[determined].max(axis=1)
    votes = np.zeros((n, n_classes))
    voting = kept & np.isfinite(proba).all(axis=1)
    np.add.at(votes, (which[voting], proba[voting].argmax(axis=1)), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(n_kept[:, None] > 0, votes / np.maximum(n_kept, 1)[:, None], np.nan)
    table = pd.DataFrame({"patient_id": ids, "n_cells": np.bincount(which, minlength=n), "n_kept": n_kept})
    table["kept_fraction"] = table["n_kept"] / table["n_cells"]
    if truth is not None:
        table["truth"] = _first_per_patient(which, truth, n)
    table["predicted"] = predicted
    table["confidence"] = confidence
    for i, name in enumerate(classes):
        table[f"p_{name}"] = calls.proba[:, i]
    for i, name in enumerate(classes):
        table[f"frac_{name}"] = fractions[:, i]
    if any(calls.notes):
        table["composition"] = calls.notes
    return table
