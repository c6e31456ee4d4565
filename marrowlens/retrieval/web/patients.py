"""A mutation probe's patient calls, for the patient pages: ``report.json`` + ``patient_cells.parquet``.

The probe folder (``marrowlens probe fit mutation``) says, per patient, what the patient head called
and how much each cell pushed that call (``contribution``). The server reads it once at start-up and
refuses a probe whose backbone is not the index's: its cells' contributions would describe other
embeddings than the ones searched. Cells of a patient that are not in the index cannot be shown or
searched from; they are counted, not refused (an index may hold a subset of the probe's cohort).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pydantic
from pydantic import BaseModel, ConfigDict, field_validator

from marrowlens.artifacts import read_parquet, require_same_fingerprint
from marrowlens.errors import MarrowLensError, listing
from marrowlens.probes.patients import UNDETERMINED
from marrowlens.retrieval.search import Searcher

REPORT_FILE = "report.json"
CELLS_FILE = "patient_cells.parquet"
CELL_COLUMNS = ("cell_id", "patient_id", "kept", "contribution")


class ProbeEmbeddings(BaseModel):
    model_fingerprint: str


class PatientHead(BaseModel):
    name: str
    contribution: str


class PatientRecord(BaseModel):
    """One patient's call; the ``p_<class>`` probabilities stay in ``model_extra``."""

    model_config = ConfigDict(extra="allow")

    patient_id: str
    n_cells: int
    n_kept: int
    truth: str | None = None
    predicted: str
    confidence: float | None = None

    @field_validator("confidence")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        """A NaN confidence is no confidence (and JSON answers cannot carry NaN)."""
        return value if value is not None and math.isfinite(value) else None

    @property
    def correct(self) -> bool | None:
        """Whether the call matches the truth; None where the store had no label."""
        return None if self.truth is None else self.predicted == self.truth


class MutationReport(BaseModel):
    """The keys of a mutation probe's report.json the patient pages read (the others are ignored)."""

    task: str
    classes: list[str]
    embeddings: ProbeEmbeddings
    patient_head: PatientHead
    patients: list[PatientRecord]


@dataclass(frozen=True)
class PatientCellRow:
    """A patient's cell that the index holds: its index row and what the head made of it."""

    row: int
    cell_id: str
    kept: bool
    contribution: float | None  # None: the head did not use this cell


@dataclass(frozen=True)
class Patients:
    """A mutation probe's patients, their class probabilities and their indexed cells (by contribution)."""

    folder: Path
    report: MutationReport
    probabilities: dict[str, dict[str, float]]
    cells: dict[str, list[PatientCellRow]]
    not_indexed: dict[str, int]

    @classmethod
    def open(cls, folder: str | Path, searcher: Searcher) -> Patients:
        """Read a mutation probe; refuse one that is not, or whose backbone is not the index's."""
        folder = Path(folder)
        if not folder.is_dir():
            raise MarrowLensError(f"probe folder {folder} does not exist")
        report = _read_report(folder)
        require_same_fingerprint(
            "backbone fingerprint",
            searcher.index.model_fingerprint,
            f"index {searcher.index.folder}",
            report.embeddings.model_fingerprint,
            f"probe {folder}",
        )
        table = _read_cells(folder)
        ids = [record.patient_id for record in report.patients]
        cells: dict[str, list[PatientCellRow]] = {patient: [] for patient in ids}
        not_indexed = dict.fromkeys(ids, 0)
        for cell_id, patient, kept, contribution in table.itertuples(index=False):
            if patient not in cells:
                continue
            row = searcher.exact_row(cell_id)
            if row is None:
                not_indexed[patient] += 1
            else:
                score = None if pd.isna(contribution) else float(contribution)
                cells[patient].append(PatientCellRow(row, cell_id, bool(kept), score))
        for rows in cells.values():
            rows.sort(key=_by_contribution)
        return cls(folder, report, _probabilities(folder, report), cells, not_indexed)

    def record(self, patient_id: str) -> PatientRecord | None:
        return next((r for r in self.report.patients if r.patient_id == patient_id), None)

    def ordered(self) -> list[PatientRecord]:
        """Misclassified patients first (then those without a truth, then correct calls), each by id."""
        rank = {False: 0, None: 1, True: 2}
        return sorted(self.report.patients, key=lambda r: (rank[r.correct], r.patient_id))


def _by_contribution(cell: PatientCellRow) -> tuple[bool, float, str]:
    """Highest contribution first; cells the head did not use last."""
    return (cell.contribution is None, -(cell.contribution or 0.0), cell.cell_id)


def _read_report(folder: Path) -> MutationReport:
    path = folder / REPORT_FILE
    if not path.is_file():
        raise MarrowLensError(f"{folder} is not a probe folder: {REPORT_FILE} is missing")
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MarrowLensError(f"{path} is unreadable: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise MarrowLensError(f"{path} holds a JSON {type(data).__name__}, not a probe report")
    if data.get("task") != "mutation":
        raise MarrowLensError(
            f"{folder} is a {data.get('task')!r} probe; patient pages need a mutation probe "
            "(`marrowlens probe fit mutation`)"
        )
    try:
        return MutationReport.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise MarrowLensError(f"{path} is not a mutation probe report: at {where}: {first['msg']}{more}") from None


def _read_cells(folder: Path) -> pd.DataFrame:
    path = folder / CELLS_FILE
    if not path.is_file():
        raise MarrowLensError(f"{folder} has no {CELLS_FILE}: refit the probe with this MarrowLens version")
    table: pd.DataFrame = read_parquet(path)
    missing = [column for column in CELL_COLUMNS if column not in table.columns]
    if missing:
        raise MarrowLensError(f"{path} lacks the column(s) {', '.join(missing)}")
    table = table[list(CELL_COLUMNS)].copy()
    table["cell_id"] = table["cell_id"].astype(str)
    table["patient_id"] = table["patient_id"].astype(str)
    return table


def _probabilities(folder: Path, report: MutationReport) -> dict[str, dict[str, float]]:
    """Each patient's ``p_<class>`` as {class: probability}; a missing or non-finite one is an error naming it,
    except for an undetermined patient (no cell its head could use), which has none."""
    result: dict[str, dict[str, float]] = {}
    for record in report.patients:
        extra = record.model_extra or {}
        values = {name: extra.get(f"p_{name}") for name in report.classes}
        if record.predicted == UNDETERMINED and all(value is None for value in values.values()):
            result[record.patient_id] = {}
            continue
        bad = [f"p_{name}" for name, value in values.items() if not _finite_number(value)]
        if bad:
            raise MarrowLensError(
                f"{folder / REPORT_FILE}: patient {record.patient_id!r} lacks a probability {listing(bad)}"
            )
        result[record.patient_id] = {name: float(extra[f"p_{name}"]) for name in report.classes}
    return result


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
