"""The untrained patient heads: a patient's call from its kept cells' calls (no patient-level fitting).

``mean``: the kept cells' mean log-probability, renormalised (a geometric mean), so a cell pulls the
call towards class c by its log-odds ``log p_c - log(1 - p_c)`` — its contribution. ``vote``: the
fraction of kept cells calling each class; a cell contributes 1 when it votes for the patient's call.
Hand-written: a dozen lines of numpy, no library has them for bags of cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marrowlens.probes.patients import Bags, PatientCalls, PatientHead

_LOG_FLOOR = 1e-12


def log_odds(proba: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per cell, the log-odds of class ``c[i]`` against the rest."""
    p = np.clip(proba[np.arange(len(proba)), c], _LOG_FLOOR, 1 - _LOG_FLOOR)
    out: np.ndarray = np.log(p) - np.log1p(-p)
    return out


def _usable(bags: Bags) -> np.ndarray:
    out: np.ndarray = bags.kept & np.isfinite(bags.proba).all(axis=1)
    return out


def _per_cell_call(bags: Bags, patient_proba: np.ndarray) -> np.ndarray:
    """Each cell's patient's predicted class index (0 for undetermined patients: their cells are unused)."""
    calls = np.nan_to_num(patient_proba, nan=-1.0).argmax(axis=1)
    out: np.ndarray = calls[bags.which]
    return out


class MeanPooling(PatientHead):
    name = "mean"
    contribution = "log-odds of the patient's predicted class (out-of-fold cell head)"

    def predict(self, bags: Bags, classes: Sequence[str]) -> PatientCalls:
        usable = _usable(bags)
        n_kept = np.bincount(bags.which, weights=usable, minlength=bags.n_patients)
        log_sum = np.zeros((bags.n_patients, len(classes)))
        np.add.at(log_sum, bags.which[usable], np.log(np.clip(bags.proba[usable], _LOG_FLOOR, 1.0)))
        proba = np.full((bags.n_patients, len(classes)), np.nan)
        determined = n_kept > 0
        mean_log = log_sum[determined] / n_kept[determined, None]
        mean_log -= mean_log.max(axis=1, keepdims=True)
        proba[determined] = np.exp(mean_log) / np.exp(mean_log).sum(axis=1, keepdims=True)
        contribution = np.full(len(bags.which), np.nan)
        call = _per_cell_call(bags, proba)
        contribution[usable] = log_odds(bags.proba[usable], call[usable])
        return PatientCalls(proba, contribution)


class VotePooling(PatientHead):
    name = "vote"
    contribution = "1 when the cell's own call is the patient's predicted class, else 0"

    def predict(self, bags: Bags, classes: Sequence[str]) -> PatientCalls:
        usable = _usable(bags)
        votes = np.zeros((bags.n_patients, len(classes)))
        np.add.at(votes, (bags.which[usable], bags.proba[usable].argmax(axis=1)), 1)
        total = votes.sum(axis=1, keepdims=True)
        proba = np.full_like(votes, np.nan)
        determined = total[:, 0] > 0
        proba[determined] = votes[determined] / total[determined]
        contribution = np.full(len(bags.which), np.nan)
        call = _per_cell_call(bags, proba)
        contribution[usable] = (bags.proba[usable].argmax(axis=1) == call[usable]).astype(float)
        return PatientCalls(proba, contribution)
