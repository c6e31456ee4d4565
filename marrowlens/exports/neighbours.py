"""An index's k nearest neighbours of every cell, as one CSV (long format: k rows per query cell).

The search is :class:`marrowlens.retrieval.search.Searcher`'s, batch by batch: the index's own cells
are queried by their stored vectors with the cell itself left out (``search_cells``); the cells of
another store (``--embeddings``, same backbone fingerprint) by their vectors, a cell the index also
holds (same ``cell_id``) again left out of its own neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path, require_same_fingerprint
from marrowlens.errors import MarrowLensError

if TYPE_CHECKING:
    from marrowlens.retrieval.search import Searcher

BATCH = 1024
LABELS = ("patient_id", "cell_type")  # the neighbour's labels written when the index has them


@dataclass
class NeighboursExport:
    path: Path
    queries: int
    k: int
    rows: int


def _open_searcher(index_dir: Path) -> Searcher:
    """A Searcher over the index alone: queries here are vectors, so no backbone is loaded."""
    from torch import nn

    from marrowlens.retrieval.index import load_index
    from marrowlens.retrieval.search import Searcher

    index = load_index(index_dir)
    return Searcher(index=index, model=nn.Identity(), info=index.meta.model)


def _batches(n: int) -> Iterator[range]:
    from tqdm.auto import tqdm

    starts = range(0, n, BATCH)
    for start in tqdm(starts, desc="neighbours", unit="batch", disable=None):
        yield range(start, min(start + BATCH, n))


def export_neighbours(
    index_dir: str | Path,
    out: str | Path,
    k: int = 10,
    embeddings: str | Path | None = None,
    overwrite: bool = False,
) -> NeighboursExport:
    """Write ``out`` (CSV): query_cell_id, rank, neighbour_cell_id, similarity [, distance for l2]
    [, neighbour_patient_id, neighbour_cell_type]; rows ordered by query, then rank."""
    from marrowlens.embeddings import load_embeddings

    out = Path(out)
    if out.exists() and (out.is_dir() or not overwrite):
        raise MarrowLensError(f"{out} already exists; pass --overwrite to replace it")
    searcher = _open_searcher(Path(index_dir))
    index = searcher.index
    if embeddings is not None:
        store = load_embeddings(embeddings, mmap=True)
        require_same_fingerprint(
            "backbone fingerprint", index.model_fingerprint, f"index {index_dir}", store.model_fingerprint,
            f"embeddings {embeddings}",
        )  # fmt: skip
        query_ids = store.cells["cell_id"].astype(str).to_numpy()
        positions = pd.Index(index.cells["cell_id"].astype(str)).get_indexer(pd.Index(query_ids))  # -1: not indexed
    else:
        query_ids = index.cells["cell_id"].astype(str).to_numpy()
    labels = [c for c in LABELS if c in index.cells]
    written = 0
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        for batch in _batches(len(query_ids)):
            rows = list(batch)
            if embeddings is None:
                tables = searcher.search_cells(rows, k)
            else:
                vectors = np.asarray(store.vectors[batch.start : batch.stop])
                exclude = [int(p) for p in positions[batch.start : batch.stop]]
                tables = searcher.search_vectors(vectors, k, exclude=exclude if max(exclude) >= 0 else None)
            frame = _frame(query_ids[batch.start : batch.stop], tables, index.cells, labels, index.metric)
            frame.to_csv(handle, header=written == 0, index=False)
            written += len(frame)
    return NeighboursExport(path=out, queries=len(query_ids), k=k, rows=written)


def _frame(
    query_ids: np.ndarray, tables: list[pd.DataFrame], cells: pd.DataFrame, labels: list[str], metric: str
) -> pd.DataFrame:
    table = pd.concat(tables, ignore_index=True)
    counts = [len(t) for t in tables]
    neighbours = cells.iloc[table["row"].to_numpy()]
    frame = pd.DataFrame(
        {
            "query_cell_id": np.repeat(query_ids, counts),
            "rank": table["rank"].to_numpy(),
            "neighbour_cell_id": neighbours["cell_id"].astype(str).to_numpy(),
            "similarity": table["similarity"].to_numpy(),
        }
    )
    if metric != "cosine":
        frame["distance"] = table["distance"].to_numpy()
    for column in labels:
        frame[f"neighbour_{column}"] = neighbours[column].to_numpy()
    return frame
