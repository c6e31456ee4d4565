"""The explorer's data: filter values per column (facets) and the embedding map with a colour column.

The map is read from the index folder's ``map.parquet`` (``marrowlens index map``). An index of at
most :data:`LAZY_MAX_CELLS` cells without a current map gets one computed by the server itself, in
a background thread started by the first request for it (UMAP takes seconds, numba's compilation most of them),
and cached to ``map.parquet`` where the folder is writable; a bigger index without one gets a
message naming the command.
"""

from __future__ import annotations

import threading
from typing import Any

import pandas as pd

from marrowlens.errors import MarrowLensError
from marrowlens.maps import DEFAULT_MAX_CELLS, index_map, map_is_current, read_map, write_map
from marrowlens.retrieval.index import CellIndex

FACET_COLUMNS = ("patient_id", "mutation", "cell_type", "domain")
MAX_FACET_VALUES = 200
PREDICTION = "prediction"  # the colour column of the probe's call of each cell's patient
COLOR_COLUMNS = ("cell_type", "mutation", "patient_id", "domain", "is_blast")
LAZY_MAX_CELLS = 5_000
UNKNOWN = "unknown"


def facets(cells: pd.DataFrame, limit: int = MAX_FACET_VALUES) -> tuple[dict[str, list[str]], list[str]]:
    """Distinct values of each facet column, most common first, at most ``limit``; and the columns cut short."""
    values: dict[str, list[str]] = {}
    truncated = []
    for column in FACET_COLUMNS:
        if column not in cells:
            values[column] = []
            continue
        counts = cells[column].dropna().astype(str).value_counts(sort=False)
        ordered = sorted(counts.index, key=lambda v: (-int(counts[v]), v))
        values[column] = ordered[:limit]
        if len(ordered) > limit:
            truncated.append(column)
    return values, truncated


def color_values(cells: pd.DataFrame, rows: Any, column: str, predictions: dict[str, str] | None) -> list[str]:
    """The colour value of each map point: a label column, or the probe's call of the cell's patient."""
    if column == PREDICTION:
        if predictions is None:
            raise MarrowLensError("no probe is loaded: start the server with --probe PROBE to colour by prediction")
        patients = cells["patient_id"].iloc[rows].astype("string")
        return [predictions.get(str(p), UNKNOWN) if not pd.isna(p) else UNKNOWN for p in patients]
    if column not in COLOR_COLUMNS:
        raise MarrowLensError(f"cannot colour by {column!r}; colour columns are {', '.join(COLOR_COLUMNS)}")
    if column not in cells:
        return [UNKNOWN] * len(rows)
    series = cells[column].iloc[rows]
    if column == "is_blast":
        return [UNKNOWN if pd.isna(v) else ("blast" if v else "non-blast") for v in series]
    return [UNKNOWN if pd.isna(v) else str(v) for v in series]


class MapState:
    """The map of one index: loaded, computed in the background (small index), or missing with a reason."""

    def __init__(self, index: CellIndex, lazy_max_cells: int = LAZY_MAX_CELLS) -> None:
        self.index, self.lazy_max_cells = index, lazy_max_cells
        self.frame: pd.DataFrame | None = None
        self.message = ""
        self._done = threading.Event()
        self._lazy = False
        self._start = threading.Lock()
        try:
            cached = read_map(index.folder)
        except MarrowLensError as exc:
            cached, self.message = None, str(exc)
        if cached is not None and map_is_current(cached, index):
            self._set(cached)
        elif len(index) <= lazy_max_cells:
            self._lazy = True  # computed on the first request for it
        else:
            why = "is from another version of the index" if cached is not None else "has not been made"
            self.message = (
                f"the map of this index {why}: run `marrowlens index map {index.folder}` "
                "(UMAP of up to 20,000 cells) and restart the server"
            )
            self._done.set()

    def _set(self, frame: pd.DataFrame) -> None:
        rows = pd.Index(self.index.cells["cell_id"].astype(str)).get_indexer(pd.Index(frame["cell_id"]))
        self.frame = frame.assign(row=rows)[rows >= 0].reset_index(drop=True)
        self._done.set()

    def _compute(self) -> None:
        try:
            frame = index_map(self.index, max_cells=min(DEFAULT_MAX_CELLS, self.lazy_max_cells))
            try:
                write_map(self.index.folder, frame)
            except OSError:
                pass  # a read-only index folder: the map lives as long as the server
            self._set(frame)
        except Exception as exc:  # noqa: BLE001 - the page shows why there is no map
            self.message = f"the map could not be computed: {exc}"
            self._done.set()

    def wait(self, timeout: float | None = None) -> pd.DataFrame | None:
        """The map once ready (None: see :attr:`message`, or still computing); the first call of a small
        index without a map starts its computation in a background thread and waits up to ``timeout``."""
        with self._start:
            if self._lazy:
                self._lazy = False
                threading.Thread(target=self._compute, name="marrowlens-map", daemon=True).start()
        self._done.wait(timeout)
        return self.frame
