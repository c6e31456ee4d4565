"""The figures of a probe report drawn from its evaluated cells rather than its tables: ROC curves (cell and
patient level, one-vs-rest), a UMAP of the evaluated cells' vectors, and a gallery of the worst errors.

The cells come as an :class:`OutOfFold` (out-of-fold calls in CV, the fitted probe's calls in an external
test); the patient ROC needs only the patient table. Each writer returns the PNG it wrote, or a note on
why there is none (recorded in ``report.json`` under ``figures``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path
from marrowlens.maps import umap_2d

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ERRORS_SHOWN = 16
MAP_COLUMNS = (("cell_type", "cell type"), ("patient_id", "patient"), ("domain", "domain"))
LEGEND_MAX = 12

MIN_MAP_CELLS = 8  # fewer cells make no map worth drawing


@dataclass
class OutOfFold:
    """The evaluated cells: truth, kept by the blast filter, class probabilities (NaN when not kept), their rows
    of the store's cell table, where the cohort keeps their images, and the map's cells (at most
    :data:`MAX_POINTS`, fixed seed: ``mapped`` indexes the evaluated cells) with their vectors."""

    classes: list[str]
    y: np.ndarray
    kept: np.ndarray
    proba: np.ndarray
    cells: pd.DataFrame
    cohort: Path | None
    mapped: np.ndarray
    vectors: np.ndarray

    def predicted(self) -> np.ndarray:
        """Each cell's call (the argmax class), "filtered out" where the blast filter dropped it."""
        best = np.nan_to_num(self.proba, nan=-1.0).argmax(axis=1)
        calls = np.asarray(self.classes, dtype=object)[best]
        calls[~self.kept] = "filtered out"
        return np.asarray(calls)


Written = tuple[dict[str, str | None], list[Path]]


def write_figures(plt: ModuleType, folder: Path, report: dict[str, Any], cells: OutOfFold | None) -> Written:
    """``roc_cell.png``, ``roc_patient.png``, ``umap.png``, ``errors.png``: which were drawn (file name) or why
    not (a note), and the files written."""
    notes: dict[str, str | None] = {}
    written: list[Path] = []

    def keep(name: str, result: Path | str) -> None:
        if isinstance(result, Path):
            written.append(result)
            notes[name] = None
        else:
            notes[name] = result
            (folder / f"{name}.png").unlink(missing_ok=True)  # an earlier report's figure would mislead

    if cells is None:
        for name in ("roc_cell", "umap", "errors"):
            keep(name, "no cell-level evaluation")
    else:
        keep("roc_cell", _roc_cell(plt, folder, report["task"], cells))
        keep("umap", _umap(plt, folder, report["task"], cells))
        keep("errors", _errors(plt, folder, report["task"], cells))
    keep("roc_patient", _roc_patient(plt, folder, report))
    return notes, written


# ---------------------------------------------------------------- ROC


def _roc_axes(plt: ModuleType, title: str) -> tuple[Figure, Axes]:
    figure: Figure  # pyplot is imported lazily, so mypy sees its calls as untyped
    figure, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    return figure, ax


def _curves(ax: Axes, classes: list[str], truth: np.ndarray, scores: np.ndarray) -> int:
    """One-vs-rest ROC per class (the positive class only for two); how many curves were drawn."""
    from sklearn.metrics import roc_auc_score, roc_curve

    drawn = 0
    for k in range(1, 2) if len(classes) == 2 else range(len(classes)):
        positive = truth == classes[k]
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, k])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{classes[k]} (AUC {roc_auc_score(positive, scores[:, k]):.3f})")
        drawn += 1
    ax.legend(loc="lower right", fontsize=7)
    return drawn


def _roc_cell(plt: ModuleType, folder: Path, task: str, cells: OutOfFold) -> Path | str:
    kept = cells.kept & np.isfinite(cells.proba).all(axis=1)
    figure, ax = _roc_axes(plt, f"{task}: cell level, one-vs-rest ({int(kept.sum())} cells)")
    if not _curves(ax, cells.classes, cells.y[kept], cells.proba[kept]):
        plt.close(figure)
        return "no class has both positive and negative cells"
    return _save(plt, figure, folder / "roc_cell.png")


def _roc_patient(plt: ModuleType, folder: Path, report: dict[str, Any]) -> Path | str:
    rows = pd.DataFrame(report.get("patients") or [])
    classes = list(report.get("classes") or [])
    columns = [f"p_{name}" for name in classes]
    if rows.empty or "truth" not in rows or not set(columns) <= set(rows.columns):
        return "no patient-level class probabilities in this report"
    rows = rows[rows["predicted"] != "undetermined"].dropna(subset=columns)
    figure, ax = _roc_axes(plt, f"{report['task']}: patient level, one-vs-rest ({len(rows)} patients)")
    if not _curves(ax, classes, rows["truth"].astype(str).to_numpy(), rows[columns].to_numpy(dtype=float)):
        plt.close(figure)
        return "no class has both positive and negative determined patients"
    return _save(plt, figure, folder / "roc_patient.png")


# ---------------------------------------------------------------- UMAP


def _umap(plt: ModuleType, folder: Path, task: str, cells: OutOfFold) -> Path | str:
    chosen = cells.mapped
    if len(chosen) < MIN_MAP_CELLS:
        return f"{len(chosen)} cells are too few for a map"
    coords = umap_2d(cells.vectors)
    panels = [(title, _labels(cells.cells, column, chosen)) for column, title in MAP_COLUMNS]
    panels.append(("out-of-fold prediction", cells.predicted()[chosen].astype(str)))
    figure: Figure
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.4), gridspec_kw={"wspace": 0.75})
    for ax, (title, labels) in zip(axes.ravel(), panels):
        _scatter(ax, coords, labels, title)
    figure.suptitle(f"{task}: UMAP of {len(chosen)} evaluated cells' embeddings", fontsize=10)
    return _save(plt, figure, folder / "umap.png")


def _labels(cells: pd.DataFrame, column: str, chosen: np.ndarray) -> np.ndarray:
    if column not in cells:
        return np.full(len(chosen), "unknown", dtype=object)
    values = cells[column].iloc[chosen]
    return values.astype(object).where(values.notna(), "unknown").astype(str).to_numpy()


def _scatter(ax: Axes, coords: np.ndarray, labels: np.ndarray, title: str) -> None:
    """One panel: the most frequent values in colour (all of them when few), the rest grey as "other"."""
    import matplotlib

    values, counts = np.unique(labels, return_counts=True)
    order = values[np.argsort(-counts, kind="stable")]
    named = list(order) if len(order) <= LEGEND_MAX else list(order[: LEGEND_MAX - 1])
    palette = matplotlib.colormaps["tab20"]
    rest = ~np.isin(labels, named)
    if rest.any():
        other = f"other ({len(order) - len(named)} values)"
        ax.scatter(coords[rest, 0], coords[rest, 1], s=4, color="lightgrey", label=other, linewidths=0)
    for i, name in enumerate(sorted(named)):
        inside = labels == name
        ax.scatter(coords[inside, 0], coords[inside, 1], s=6, color=palette(i % 20), label=name, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(order)})", fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


# ---------------------------------------------------------------- worst errors


def worst_errors(cells: OutOfFold, shown: int = ERRORS_SHOWN) -> np.ndarray:
    """The kept cells called wrong, most confident call first: indices into ``cells``."""
    predicted = cells.predicted()
    confidence = np.nan_to_num(cells.proba, nan=-1.0).max(axis=1)
    wrong = np.flatnonzero(cells.kept & (predicted != cells.y.astype(str)))
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:shown]


def _errors(plt: ModuleType, folder: Path, task: str, cells: OutOfFold) -> Path | str:
    from marrowlens.probes.sheets import _tile, unreachable

    worst = worst_errors(cells)
    if not len(worst):
        return "no kept cell was called wrong"
    if "path" not in cells.cells:
        return "the store's cell table has no image paths"
    reason = unreachable(cells.cohort)
    if reason is not None:
        return f"error gallery skipped: {reason}"
    assert cells.cohort is not None
    predicted, paths = cells.predicted(), cells.cells["path"].astype(str).to_numpy()
    types = cells.cells["cell_type"].to_numpy(dtype=object) if "cell_type" in cells.cells else None
    columns = min(len(worst), 4)
    rows = -(-len(worst) // columns)
    figure: Figure
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), worst):
        _tile(ax, cells.cohort / paths[i])
        kind = "" if types is None or pd.isna(types[i]) or types[i] == cells.y[i] else f" ({types[i]})"
        confidence = float(np.nanmax(cells.proba[i]))
        title = f"truth {cells.y[i]}{kind}\ncalled {predicted[i]} ({confidence:.2f})"
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in title.split("\n")), fontsize=7)
    figure.suptitle(f"{task}: the {len(worst)} most confident wrong calls", fontsize=9)
    return _save(plt, figure, folder / "errors.png")


def _save(plt: ModuleType, figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
