"""The cells behind every patient call: one PNG contact sheet per patient of a mutation report, and
``patient_cells.parquet`` (every evaluated cell's contribution, for the web app's patient pages).

Each patient head says what a cell's contribution to the call is (:mod:`marrowlens.probes.patients`):
the log-odds of the called class for ``mean``, the attention weight for ``abmil``, its share of the
called class's logit through its cell type for ``composition``. A sheet shows a patient's top cells by
that out-of-fold contribution: what the probe looked at when it called the patient (composition
sheets add the patient's cell-type fractions). Misclassified patients always get a sheet; correctly
called ones up to a cap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path, write_parquet_atomic
from marrowlens.cohort.images import ImageDecodeError, load_rgb
from marrowlens.probes.patients import UNDETERMINED

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SHEETS_DIR = "patients"
PATIENT_CELLS = "patient_cells.parquet"
THUMBNAIL = 96


@dataclass
class CellCalls:
    """The evaluated cells: patient, id, kept by the filter, out-of-fold contribution to the patient's call
    (NaN: unused by the head), image path (relative to the cohort), type; and what the head's contribution is."""

    patients: np.ndarray
    cell_ids: np.ndarray
    kept: np.ndarray
    contribution: np.ndarray
    paths: np.ndarray
    cell_types: np.ndarray
    head: str
    meaning: str
    cohort: Path | None  # the folder the paths are relative to (the cohort's image root); None: no cohort recorded
    per_sheet: int = 12
    correct_sheets: int = 50


def write_patient_cells(folder: Path, calls: CellCalls) -> Path:
    """Every evaluated cell's contribution to its patient's call (what the web app's patient pages sort by)."""
    frame = pd.DataFrame(
        {
            "cell_id": np.asarray(calls.cell_ids).astype(str),
            "patient_id": np.asarray(calls.patients).astype(str),
            "kept": np.asarray(calls.kept, dtype=bool),
            "contribution": np.asarray(calls.contribution, dtype=float),
        }
    )
    write_parquet_atomic(folder / PATIENT_CELLS, frame)
    return folder / PATIENT_CELLS


def safe_name(patient: str, taken: set[str]) -> str:
    """A file name for ``patient``: letters, digits, ``.``, ``_`` and ``-`` only, unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", patient).lstrip(".") or "patient"
    name, k = base, 1
    while name.lower() in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name.lower())
    return name


def unreachable(cohort: Path | None) -> str | None:
    """Why the cohort images cannot be drawn, or None when they can."""
    if cohort is None:
        return "the embeddings' meta.json records no cohort folder"
    if not Path(cohort).is_dir():
        return f"the cohort folder {cohort} is not reachable from here"
    return None


def _chosen(patients: pd.DataFrame, cap: int) -> tuple[pd.DataFrame, int]:
    """Misclassified patients (most confident first), then up to ``cap`` correct ones; how many were left out."""
    determined = patients[patients["predicted"] != UNDETERMINED]
    wrong = determined["predicted"].astype(str) != determined["truth"].astype(str)
    misclassified = determined[wrong].sort_values("confidence", ascending=False, kind="stable")
    correct = determined[~wrong]
    return pd.concat([misclassified, correct.head(cap)]), max(len(correct) - cap, 0)


def write_sheets(folder: Path, patients: pd.DataFrame, calls: CellCalls) -> tuple[dict[str, Any], list[Path]]:
    """Draw ``folder/patients/PATIENT.png`` per chosen patient; what report.json records, and the files written."""
    reason = unreachable(calls.cohort)
    if reason is not None:
        for stale in (folder / SHEETS_DIR).glob("*.png"):  # an earlier report's sheets would mislead beside this one
            stale.unlink()
        return {"note": f"contact sheets skipped: {reason}", "patients": []}, []
    assert calls.cohort is not None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, left_out = _chosen(patients, calls.correct_sheets)
    ids = np.asarray(calls.patients).astype(str)
    taken: set[str] = set()
    entries, written = [], []
    for row in chosen.itertuples(index=False):
        patient, truth, predicted = str(row.patient_id), str(row.truth), str(row.predicted)
        wrong = truth != predicted
        cells = np.flatnonzero((ids == patient) & np.isfinite(calls.contribution))
        score = calls.contribution[cells]
        top = np.argsort(-score, kind="stable")[: calls.per_sheet]
        path = folder / SHEETS_DIR / f"{safe_name(patient, taken)}.png"
        title = f"{patient}: truth {truth}, predicted {predicted}" + (" (misclassified)" if wrong else "")
        composition = getattr(row, "composition", None)
        if isinstance(composition, str) and composition:
            title = f"{composition}\n{title}"
        tiles = [(calls.cohort / str(calls.paths[cells[i]]), calls.cell_types[cells[i]], score[i]) for i in top]
        _draw(plt, path, title, tiles)
        written.append(path)
        entries.append(
            {
                "patient_id": patient,
                "sheet": f"{SHEETS_DIR}/{path.name}",
                "truth": truth,
                "predicted": predicted,
                "misclassified": wrong,
            }
        )
    for stale in (folder / SHEETS_DIR).glob("*.png"):  # an earlier report's sheets of patients not drawn now
        if stale not in written:
            stale.unlink()
    out: dict[str, Any] = {
        "note": None,
        "per_sheet": calls.per_sheet,
        "head": calls.head,
        "contribution": calls.meaning,
        "patients": entries,
    }
    if left_out:
        out["note"] = (
            f"{left_out} correctly called patient(s) without a sheet (cap eval.sheets = {calls.correct_sheets})"
        )
    return out, written


def _tile(ax: Axes, image_path: Path) -> None:
    try:
        image = load_rgb(image_path)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        ax.imshow(np.asarray(image))
    except (ImageDecodeError, OSError, ValueError):
        ax.imshow(np.full((THUMBNAIL, THUMBNAIL, 3), 160, dtype=np.uint8))
        ax.text(THUMBNAIL / 2, THUMBNAIL / 2, "unreadable", ha="center", va="center", fontsize=8)


def _draw(plt: Any, path: Path, title: str, tiles: list[tuple[Path, Any, float]]) -> None:
    columns = max(1, min(len(tiles), 4))
    rows = max(1, -(-len(tiles) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 1.9 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image_path, cell_type, score) in zip(axes.ravel(), tiles):
        _tile(ax, image_path)
        label = str(cell_type) if cell_type is not None and not pd.isna(cell_type) else "type unknown"
        ax.set_title(f"{label}\n{score:+.2f}", fontsize=7)
    if not tiles:
        axes[0, 0].text(0.5, 0.5, "no kept cell", ha="center", va="center")
    figure.suptitle(title, fontsize=8, color="tab:red" if title.endswith("(misclassified)") else "black")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def sheets_markdown(sheets: dict[str, Any]) -> list[str]:
    """The report.md section: a link per patient's sheet, misclassified patients first."""
    lines = ["## Cells behind each call", ""]
    if sheets.get("patients"):
        lines += [
            (
                f"Per patient, its top {sheets.get('per_sheet', '')} cells by their out-of-fold contribution to the "
                f"call of the {sheets.get('head', 'mean')} head ({sheets.get('contribution', 'log-odds')}); "
                "misclassified patients first."
            ),
            "",
        ]
        for entry in sheets["patients"]:
            wrong = " **misclassified**" if entry["misclassified"] else ""
            lines.append(
                f"- [{entry['patient_id']}]({entry['sheet']}): truth {entry['truth']}, "
                f"predicted {entry['predicted']}{wrong}"
            )
        lines.append("")
    if sheets.get("note"):
        lines += [sheets["note"], ""]
    return lines
