"""The composition patient head: a patient as its cell-type fractions and blast fraction, as a
haematologist reads a smear (APL: many abnormal promyelocytes), into a logistic regression.

Cell types come from a cell-type probe (scikit-learn's logistic head) fitted on the training
patients' labelled cells. The fractions the regression trains on are out-of-fold: each training
patient's cells are typed by a probe fitted without that patient (patient-grouped inner folds), so
no patient's fractions come from its own labels; a patient being called is typed by the probe fitted
on every training patient. C is chosen by log-loss on stratified inner folds of the training patients.
A cell's contribution is the change its type makes to the called class's logit, against the mean
over classes, divided by the patient's cells (and likewise through the blast fraction when kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from marrowlens.config import CellTypeTaskConfig, ProbeConfig
from marrowlens.errors import MarrowLensError
from marrowlens.probes.heads import LogisticProbe, class_weight_of
from marrowlens.probes.patients import Bags, PatientCalls, PatientHead
from marrowlens.probes.tasks import mapped_cell_types

BLAST_FEATURE = "blast fraction"


class Composition(PatientHead):
    name = "composition"
    contribution = "the cell's share of the called class's logit through its predicted type (and blast call)"

    def __init__(
        self,
        mapping: dict[str, str] | None = None,
        min_cells: int = 2,
        c_values: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
        inner_folds: int = 3,
        cell_c_values: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
        class_weight: str | None = "balanced",
        random_state: int = 0,
    ) -> None:
        self.mapping, self.min_cells, self.c_values, self.inner_folds = mapping or {}, min_cells, c_values, inner_folds
        self.cell_c_values, self.class_weight, self.random_state = cell_c_values, class_weight, random_state
        self.types_: list[str] = []
        self.cell_head: LogisticProbe | None = None
        self.C_: float = float("nan")
        self.selection_ = ""

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        return {
            "mapping": dict(config.cell_type.mapping),
            "min_cells": config.cell_type.min_cells,
            "c_values": list(config.composition.c_values),
            "inner_folds": config.composition.inner_folds,
            "cell_c_values": list(config.linear.c_values),
            "class_weight": class_weight_of(config),
            "random_state": config.seed,
        }

    # ------------------------------------------------------------ cell types

    def _labels(self, bags: Bags) -> np.ndarray:
        """Each cell's (mapped) type, None where unknown or of a type with too few cells."""
        if "cell_type" not in bags.cells.columns or bags.cells["cell_type"].isna().all():
            raise MarrowLensError(
                "--aggregate composition needs cell_type labels in the store (its patients are cell-type fractions)"
            )
        section = CellTypeTaskConfig(mapping=self.mapping, min_cells=self.min_cells)
        return np.asarray(mapped_cell_types(bags.cells["cell_type"].iloc[bags.rows], section), dtype=object)

    def _cell_probe(self, bags: Bags, cells: np.ndarray, labels: np.ndarray) -> LogisticProbe:
        probe = LogisticProbe(
            c_values=self.cell_c_values, class_weight="balanced", random_state=self.random_state, inner_folds=3
        )
        return probe.fit(bags.vectors[bags.rows[cells]], labels, groups=bags.which[cells])

    def _types(self, probe: LogisticProbe, bags: Bags, cells: np.ndarray) -> np.ndarray:
        """Indices into ``types_`` of each cell's predicted type."""
        called = probe.predict(bags.vectors[bags.rows[cells]])
        return np.searchsorted(np.asarray(self.types_), called.astype(str))

    def _out_of_fold_types(self, bags: Bags, labels: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Every training cell typed by a probe that never saw its patient's labels."""
        folds = StratifiedGroupKFold(
            n_splits=min(self.inner_folds, bags.n_patients), shuffle=True, random_state=self.random_state
        )
        types = np.full(len(bags.rows), -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # few patients per class: expected
            splits = list(folds.split(np.zeros(len(bags.rows)), np.asarray(y)[bags.which], bags.which))
        for train, test in splits:
            known = train[pd.notna(labels[train])]
            if len(set(labels[known])) < 2:
                raise MarrowLensError("composition: an inner fold has fewer than two labelled cell types; add patients")
            types[test] = self._types(self._cell_probe(bags, known, labels[known].astype(str)), bags, test)
        return types

    # ------------------------------------------------------------ features

    def _features(self, bags: Bags, types: np.ndarray) -> np.ndarray:
        """Per patient: the fraction of its cells of each type, then the fraction the blast filter kept."""
        counts = np.zeros((bags.n_patients, len(self.types_) + 1))
        np.add.at(counts, (bags.which, types), 1)
        np.add.at(counts[:, -1], bags.which, bags.kept.astype(float))
        return counts / np.bincount(bags.which, minlength=bags.n_patients)[:, None]

    def fit(self, bags: Bags, y: np.ndarray, classes: Sequence[str]) -> Composition:
        labels = self._labels(bags)
        known = np.flatnonzero(pd.notna(labels))
        self.types_ = sorted(set(labels[known].astype(str)))
        if len(self.types_) < 2:
            raise MarrowLensError("--aggregate composition needs two or more labelled cell types in the store")
        features = self._features(bags, self._out_of_fold_types(bags, labels, y))
        self.cell_head = self._cell_probe(bags, known, labels[known].astype(str))
        self.mean_ = features.mean(axis=0)
        self.scale_ = np.maximum(features.std(axis=0), 1e-6)
        codes = np.searchsorted(np.asarray(classes), np.asarray(y, dtype=str))
        x = (features - self.mean_) / self.scale_
        weight = "balanced" if self.class_weight == "balanced" else None
        splits = min(self.inner_folds, int(np.bincount(codes).min()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if splits >= 2:
                cv = StratifiedKFold(splits, shuffle=True, random_state=self.random_state)
                model: Any = LogisticRegressionCV(
                    Cs=sorted(self.c_values),
                    cv=cv,
                    scoring="neg_log_loss",
                    class_weight=weight,
                    max_iter=2000,
                    l1_ratios=(0.0,),
                    use_legacy_attributes=False,
                ).fit(x, codes)
                self.C_ = float(model.C_)
                self.selection_ = f"log-loss on {splits} stratified inner folds of the training patients"
            else:
                self.C_ = sorted(self.c_values)[len(self.c_values) // 2]
                self.selection_ = "none: too few patients per class for inner folds; middle of the C grid"
                model = LogisticRegression(C=self.C_, class_weight=weight, max_iter=2000).fit(x, codes)
        self.coef_ = np.asarray(model.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float64)
        return self

    # ------------------------------------------------------------ prediction

    def _logit_weights(self) -> np.ndarray:
        """Per class, the logit's weight on each raw (unscaled) feature; two classes: [-w/2, w/2] as softmax."""
        w = self.coef_ / self.scale_
        return np.vstack([-w[0] / 2, w[0] / 2]) if len(w) == 1 else w

    def predict(self, bags: Bags, classes: Sequence[str]) -> PatientCalls:
        assert self.cell_head is not None
        types = self._types(self.cell_head, bags, np.arange(len(bags.rows)))
        features = self._features(bags, types)
        scores = ((features - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        if scores.shape[1] == 1:
            scores = np.hstack([-scores / 2, scores / 2])
        proba = softmax(scores, axis=1)
        weights = self._logit_weights()
        relative = weights - weights.mean(axis=0, keepdims=True)  # class x feature: pull towards a class vs the rest
        called = proba.argmax(axis=1)[bags.which]
        n = np.bincount(bags.which, minlength=bags.n_patients)[bags.which]
        contribution = (relative[called, types] + bags.kept * relative[called, -1]) / n
        return PatientCalls(proba, contribution, [self._note(row) for row in features])

    def _note(self, row: np.ndarray) -> str:
        top = np.argsort(-row[:-1], kind="stable")[:4]
        parts = [f"{self.types_[i]} {row[i]:.0%}" for i in top if row[i] > 0]
        return f"{', '.join(parts)}; {BLAST_FEATURE} {row[-1]:.0%}"

    # ------------------------------------------------------------ saving

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        assert self.cell_head is not None
        cell = self.cell_head.saved_tensors(np.zeros(0), np.zeros(0), self.types_)
        own = {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_}
        return {
            **{f"cell.{k}": v for k, v in cell.items()},
            **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in own.items()},
        }

    @classmethod
    def from_saved(
        cls, params: dict[str, Any], fitted: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> Composition:
        head = cls(**params)
        head.types_ = list(fitted["types"])
        head.C_ = float(fitted["C"])
        head.selection_ = str(fitted["selection"])
        cell = {k.removeprefix("cell."): v for k, v in tensors.items() if k.startswith("cell.")}
        head.cell_head = LogisticProbe.from_saved(dict(fitted["cell_head"]), head.types_, cell)
        head.coef_, head.intercept_ = tensors["coef"].numpy(), tensors["intercept"].numpy()
        head.mean_, head.scale_ = tensors["mean"].numpy(), tensors["scale"].numpy()
        return head

    def fitted_state(self) -> dict[str, Any]:
        assert self.cell_head is not None
        params = {k: v for k, v in self.cell_head.get_params().items() if k != "c_values"}
        return {
            "types": self.types_,
            "features": [*self.types_, BLAST_FEATURE],
            "C": self.C_,
            "selection": self.selection_,
            "cell_head": {**params, "c_values": list(self.cell_c_values)},
            "cell_head_C": self.cell_head.C_ if hasattr(self.cell_head, "C_") else None,
        }

    def selection(self) -> str | None:
        return (
            f"composition: C {self.C_:g} by {self.selection_}; cell types from a logistic probe fitted on "
            "patient-grouped inner folds (training fractions out-of-fold)"
        )
