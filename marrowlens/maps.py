"""2-D maps of embeddings (UMAP): one job, coordinates of vectors, reusable for figures and the web page.

- :func:`umap_2d`: vectors -> (n, 2) coordinates, fixed seed (what a report's UMAP figure calls);
- :func:`sample_rows`: which rows a map of a big store keeps (at most ``max_cells``, fixed seed);
- :func:`index_map` / :func:`write_map` / :func:`read_map`: the cached map of an index, ``map.parquet``
  (cell_id, x, y) in the index folder, written atomically by ``marrowlens index map`` (or by
  ``serve`` for a small index that has none). The file's schema metadata names the backbone
  fingerprint and the cell count it was made from, so a map of another index version is recognised
  as stale (:func:`map_is_current`).

umap-learn (and numba under it) is imported on first use only: importing it costs seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path
from marrowlens.errors import MarrowLensError

if TYPE_CHECKING:
    from marrowlens.retrieval.index import CellIndex

MAP_FILE = "map.parquet"
DEFAULT_MAX_CELLS = 20_000
DEFAULT_SEED = 0
_META_KEY = b"marrowlens.map"


def sample_rows(n: int, max_cells: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """All rows when ``n <= max_cells``, else ``max_cells`` of them drawn without replacement, in row order."""
    if max_cells < 1:
        raise MarrowLensError(f"a map needs at least one cell, not max_cells={max_cells}")
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def umap_2d(
    vectors: np.ndarray,
    seed: int = DEFAULT_SEED,
    metric: str = "cosine",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> np.ndarray:
    """UMAP coordinates (float32, shape (n, 2)) of ``vectors``; the same seed gives the same map.

    Tiny inputs still get a map: ``n_neighbors`` shrinks to n - 1, below 4 vectors the first two
    principal axes stand in (UMAP needs a neighbourhood graph).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise MarrowLensError(f"a map needs a non-empty 2-D array of vectors, not shape {vectors.shape}")
    n = len(vectors)
    if n < 4:
        centred = vectors - vectors.mean(axis=0)
        _, _, axes = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ axes[:2].T
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))).astype(np.float32)
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        init="spectral" if n > 64 else "random",  # the spectral layout of a tiny graph is degenerate
        n_jobs=1,  # a fixed random_state runs single-threaded anyway; saying so silences umap's warning
    )
    return np.asarray(reducer.fit_transform(vectors), dtype=np.float32)


def index_vectors(index: CellIndex, rows: np.ndarray) -> np.ndarray:
    """The stored vectors of some rows of an index (normalised for cosine, decoded for PQ)."""
    return np.asarray(index.index.reconstruct_batch(np.asarray(rows, dtype=np.int64)), dtype=np.float32)


def index_map(index: CellIndex, max_cells: int = DEFAULT_MAX_CELLS, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """The map of an index's cells (at most ``max_cells``): a table of cell_id, x, y."""
    rows = sample_rows(len(index), max_cells, seed)
    coords = umap_2d(
        index_vectors(index, rows), seed=seed, metric="cosine" if index.metric == "cosine" else "euclidean"
    )
    frame = pd.DataFrame(
        {"cell_id": index.cells["cell_id"].astype(str).to_numpy()[rows], "x": coords[:, 0], "y": coords[:, 1]}
    )
    frame.attrs["source"] = {"model_fingerprint": index.model_fingerprint, "count": len(index), "max_cells": max_cells}
    return frame


def write_map(folder: str | Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` (cell_id, x, y, and what :func:`index_map` records in attrs) to ``folder/map.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[["cell_id", "x", "y"]].reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _META_KEY: json.dumps(frame.attrs.get("source", {})).encode()}
    )
    path = Path(folder) / MAP_FILE
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_map(folder: str | Path) -> pd.DataFrame | None:
    """The cached map of an index folder (its source in ``attrs["source"]``), or None where there is none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(folder) / MAP_FILE
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise MarrowLensError(f"{path} is not a readable map (truncated?): {exc}; run `marrowlens index map`") from exc
    missing = {"cell_id", "x", "y"} - set(table.column_names)
    if missing:
        raise MarrowLensError(f"{path} lacks the columns {sorted(missing)}; run `marrowlens index map` again")
    frame: pd.DataFrame = table.select(["cell_id", "x", "y"]).to_pandas()
    raw = (table.schema.metadata or {}).get(_META_KEY)
    source: dict[str, Any] = json.loads(raw) if raw else {}
    frame.attrs["source"] = source
    return frame


def map_is_current(frame: pd.DataFrame, index: CellIndex) -> bool:
    """Whether a cached map was made from this index: same backbone, same cell count, ids all indexed."""
    source = frame.attrs.get("source", {})
    if source.get("model_fingerprint") != index.model_fingerprint or source.get("count") != len(index):
        return False
    return bool(frame["cell_id"].isin(index.cells["cell_id"].astype(str)).all())
