"""Query an index by image or by indexed cell: embed like ``embed`` does, search, label the neighbours.

A :class:`Searcher` holds an index and the backbone that made its vectors, loaded once and checked
against the index's model fingerprint (the CLI makes one per command, the web server one per
process). Filters on the cells table become a FAISS id selector (a bitmap over rows), so the k
neighbours returned all satisfy the filter. An approximate index searches a filter passing a
fraction f of the cells with 1/f times its usual nprobe / efSearch (so it still meets as many
candidates), and when it comes back short it is asked again with more, up to an exhaustive scan.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pandas as pd
from PIL import Image
from torch import nn

from marrowlens.artifacts import require_same_fingerprint
from marrowlens.cohort.images import ImageDecodeError, load_rgb
from marrowlens.cohort.labels import parse_bool
from marrowlens.cohort.schema import CLASS_COLUMNS, LABEL_COLUMNS
from marrowlens.contracts import BackboneRecord
from marrowlens.errors import MarrowLensError
from marrowlens.retrieval.batching import BatchingEmbedder
from marrowlens.retrieval.index import CellIndex, load_index
from marrowlens.ssl.backbones import load_backbone
from marrowlens.ssl.embed import embed_images, stain_target_of
from marrowlens.ssl.preprocessing import eval_transform

FILTER_COLUMNS = tuple(LABEL_COLUMNS)
VOTE_COLUMNS = tuple(sorted(CLASS_COLUMNS))  # cell_type, is_blast, mutation: the order votes are shown in
NEIGHBOUR_COLUMNS = [
    "rank",
    "row",
    "cell_id",
    *LABEL_COLUMNS,
    "path",
    "similarity",
    "distance",
]
MIN_ID_PREFIX = 6
IDENTICAL_SIMILARITY = 1 - 1e-5  # a query image this close to an indexed cell is that cell


class UnknownCellError(MarrowLensError):
    """A cell id that names no indexed cell (the web API answers 404)."""


def parse_filters(texts: Sequence[str] | None) -> dict[str, set[str]]:
    """``["mutation=NPM1,control", "is_blast=true"]`` -> {"mutation": {"NPM1", "control"}, "is_blast": {"true"}}.

    Values after ``=`` are alternatives (any may match); different columns must all match.
    """
    filters: dict[str, set[str]] = {}
    for text in texts or []:
        key, sep, raw = text.partition("=")
        key = key.strip()
        values = {v.strip() for v in raw.split(",") if v.strip()}
        if not sep or not key or not values:
            raise MarrowLensError(f"filter {text!r} is not of the form column=value[,value...]")
        if key not in FILTER_COLUMNS:
            raise MarrowLensError(f"cannot filter on {key!r}; filter columns are {', '.join(FILTER_COLUMNS)}")
        filters.setdefault(key, set()).update(values)
    return filters


def filter_mask(cells: pd.DataFrame, filters: dict[str, set[str]]) -> np.ndarray:
    """Boolean mask of the rows that pass every filter; a value no indexed cell has is an error (a typo)."""
    mask = np.ones(len(cells), dtype=bool)
    for key, values in filters.items():
        column = cells[key]
        if key == "is_blast":
            wanted = {parse_bool(v) for v in values}
            matches = column.isin([w for w in wanted if w is not None]).fillna(False).to_numpy(dtype=bool)
            mask &= matches
            continue
        present = set(column.dropna().astype(str))
        unknown = sorted(values - present)
        if unknown:
            shown = ", ".join(sorted(present)[:12]) or "none"
            raise MarrowLensError(f"no indexed cell has {key}={unknown[0]} (values in the index: {shown})")
        mask &= column.astype("string").isin(values).fillna(False).to_numpy(dtype=bool)
    return mask


def vote(neighbours: pd.DataFrame) -> dict[str, list[tuple[str, int]]]:
    """The k-NN vote: how many neighbours carry each label, most common first (missing labels skipped)."""
    summary = {}
    for column in VOTE_COLUMNS:
        values = [v for v in neighbours[column].tolist() if not pd.isna(v)]
        if column == "is_blast":
            values = ["blast" if v else "non-blast" for v in values]
        if values:
            summary[column] = [(str(label), count) for label, count in Counter(map(str, values)).most_common()]
    return summary


def load_query_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Decode query images with the cohort's safe decoder; an undecodable one is a one-line error."""
    images = []
    for path in paths:
        try:
            images.append(load_rgb(path))
        except ImageDecodeError as exc:
            raise MarrowLensError(f"query image {path} cannot be used: {exc}") from None
    return images


def backbone_reference(
    model_meta: BackboneRecord,
    override: str | Path | None,
    folder: Path,
    what: str = "index",
    hint: str = "pass --model with where it is now",
) -> tuple[str | Path, Path | None]:
    """Where the backbone of an index (or a store: ``what``) lives: (run folder or timm name, weights file or None)."""
    if override is not None:
        path = Path(override)
        if path.is_dir():
            return path, None
        if path.is_file():
            return model_meta.timm_name, path
        return str(override), None
    source = model_meta.source
    if source == "random init":
        return model_meta.timm_name, None
    path = Path(source)
    if path.is_dir():
        return path, None
    if path.is_file():
        return model_meta.timm_name, path
    raise MarrowLensError(f"the backbone of {what} {folder} ({source}) no longer exists; {hint}")


@dataclass
class Searcher:
    """An index plus the backbone that embeds queries for it; safe to share between threads."""

    index: CellIndex
    model: nn.Module
    info: BackboneRecord

    def __post_init__(self) -> None:
        self.stain = stain_target_of(self.index.meta)  # queries get the cells' stain normalisation
        self._lock = threading.Lock()  # one forward pass at a time; torch uses all cores for it
        self._ids = pd.Index(self.index.cells["cell_id"].astype(str))
        self._batcher: BatchingEmbedder | None = None

    def start_batching(self, max_batch: int = 32) -> None:
        """Serve many threads: concurrent :meth:`embed` calls share forward passes from now on."""
        if self._batcher is None:
            self._batcher = BatchingEmbedder(self.model, eval_transform(self.info.preprocessing, self.stain), max_batch)

    def stop_batching(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    @classmethod
    def open(cls, index_dir: str | Path, model: str | Path | None = None) -> Searcher:
        """Load an index and its backbone; refuse a backbone whose fingerprint is not the index's."""
        index = load_index(index_dir)
        model_meta = index.meta.model
        reference, weights = backbone_reference(model_meta, model, Path(index_dir))
        backbone, info = load_backbone(reference, weights=weights, image_size=model_meta.image_size)
        require_same_fingerprint(
            "backbone fingerprint",
            index.model_fingerprint,
            f"index {index_dir}",
            info.fingerprint,
            f"model {reference}",
        )
        return cls(index=index, model=backbone, info=info)

    def __len__(self) -> int:
        return len(self.index)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed query images exactly as ``marrowlens embed`` embeds cells."""
        if self._batcher is not None:
            return self._batcher.embed(images)
        with self._lock:
            return embed_images(self.model, self.info, list(images), stain=self.stain)

    def exact_row(self, cell_id: str) -> int | None:
        """Row of the indexed cell with exactly this id, or None."""
        return int(cast(int, self._ids.get_loc(cell_id))) if cell_id in self._ids else None  # ids are unique

    def row_of(self, cell_id: str) -> int:
        """Row of an indexed cell, by full id or a unique prefix of at least 6 characters."""
        cell_id = cell_id.strip()
        row = self.exact_row(cell_id)
        if row is not None:
            return row
        if len(cell_id) >= MIN_ID_PREFIX:
            rows = np.flatnonzero(self._ids.str.startswith(cell_id))
            if len(rows) == 1:
                return int(rows[0])
            if len(rows) > 1:
                raise MarrowLensError(f"cell id prefix {cell_id!r} matches {len(rows)} indexed cells; give more of it")
        raise UnknownCellError(f"no indexed cell has id {cell_id!r}")

    def search_images(
        self, images: Sequence[Image.Image], k: int, filters: dict[str, set[str]] | None = None
    ) -> list[pd.DataFrame]:
        """Neighbours of query images. A query that is an indexed cell (its very vector comes back first)
        is left out of its own neighbours and vote, as a ``--cell-id`` query is; the table's
        ``attrs["query_cell"]`` then names that cell."""
        vectors = self.embed(images)
        tables = self.search_vectors(vectors, k, filters, spare=1)
        return [self._without_itself(table, vector, k) for table, vector in zip(tables, vectors)]

    def _without_itself(self, table: pd.DataFrame, vector: np.ndarray, k: int) -> pd.DataFrame:
        if len(table) and self._identical(table.iloc[0], vector):
            query_cell = str(table["cell_id"].iloc[0])
            table = table.iloc[1:].assign(rank=np.arange(1, len(table)))
            table.attrs["query_cell"] = query_cell
        return table.iloc[:k].reset_index(drop=True)

    def _identical(self, hit: pd.Series, vector: np.ndarray) -> bool:
        """The hit is the query's own vector, up to float noise of another batch composition."""
        if self.index.metric == "cosine":
            return bool(hit["similarity"] >= IDENTICAL_SIMILARITY)
        return bool(hit["distance"] <= (1 - IDENTICAL_SIMILARITY) * max(1.0, float(np.linalg.norm(vector))))

    def search_cells(
        self, rows: Sequence[int], k: int, filters: dict[str, set[str]] | None = None
    ) -> list[pd.DataFrame]:
        """Neighbours of indexed cells, not counting the cell itself."""
        vectors = np.stack([self.index.vector(r) for r in rows])
        return self.search_vectors(vectors, k, filters, exclude=list(rows))

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        filters: dict[str, set[str]] | None = None,
        exclude: Sequence[int] | None = None,
        spare: int = 0,
    ) -> list[pd.DataFrame]:
        """The k nearest cells of each query vector that pass ``filters``, as one table per query
        (plus up to ``spare`` more where the index has them, for a caller that may drop one)."""
        mask = filter_mask(self.index.cells, filters) if filters else None
        available = int(mask.sum()) if mask is not None else len(self)
        if exclude is not None:
            available -= 1
        if k < 1:
            raise MarrowLensError(f"k must be at least 1, not {k}")
        if k > available:
            what = "cells match the filter" if mask is not None else "cells are in the index"
            self_note = " besides the query cell" if exclude is not None else ""
            raise MarrowLensError(f"k={k} is larger than the index allows: only {available} {what}{self_note}")
        selector = _bitmap_selector(mask) if mask is not None else None
        k += min(spare, available - k)
        fetch = k + (1 if exclude is not None else 0)
        # A filter passing a fraction f of the cells leaves an approximate index ~f of its usual
        # candidates; 1/f times the effort keeps the candidate count (capped at a full scan).
        effort = math.ceil(len(self) / max(int(mask.sum()), 1)) if mask is not None else 1
        scores, rows = self._search_complete(vectors, fetch, selector, effort)
        tables = []
        for q in range(len(vectors)):
            skip = exclude[q] if exclude is not None else -1
            keep = [(s, r) for s, r in zip(scores[q], rows[q]) if r >= 0 and r != skip][:k]
            tables.append(self._table(keep))
        return tables

    def _search_complete(
        self, vectors: np.ndarray, k: int, selector: faiss.IDSelector | None, effort: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search; queries that came back with fewer than k rows are asked again with 4x the effort."""
        scores, rows = self.index.search(vectors, k, selector, effort)
        while True:
            short = (rows < 0).any(axis=1)
            if not short.any() or self.index.exhaustive(effort):
                return scores, rows
            effort *= 4
            scores[short], rows[short] = self.index.search(vectors[short], k, selector, effort)

    def _table(self, hits: list[tuple[float, int]]) -> pd.DataFrame:
        rows = [int(r) for _, r in hits]
        raw = np.array([s for s, _ in hits], dtype=np.float64)
        labels = self.index.cells.iloc[rows]
        columns = {c: labels[c].to_numpy() for c in NEIGHBOUR_COLUMNS[2:-2] if c in labels}
        if self.index.metric == "cosine":
            similarity, distance = raw, 1.0 - raw
        else:
            similarity, distance = np.full(len(raw), np.nan), np.sqrt(np.maximum(raw, 0.0))
        return pd.DataFrame(
            {
                "rank": np.arange(1, len(rows) + 1),
                "row": rows,
                **columns,
                "similarity": similarity,
                "distance": distance,
            }
        )


def query(
    index_dir: str | Path,
    images: Sequence[str | Path] = (),
    cell_ids: Sequence[str] = (),
    k: int = 10,
    filters: Sequence[str] = (),
    model: str | Path | None = None,
) -> list[tuple[str, pd.DataFrame]]:
    """``marrowlens search``: the neighbours of each query image and each indexed cell, labelled by query."""
    if not images and not cell_ids:
        raise MarrowLensError("give at least one --image or --cell-id to search for")
    wanted = parse_filters(filters)
    decoded = load_query_images(images)  # before loading the model: a bad image fails fast
    searcher = Searcher.open(index_dir, model)
    rows = [searcher.row_of(c) for c in cell_ids]
    results: list[tuple[str, pd.DataFrame]] = []
    if decoded:
        results += zip(map(str, images), searcher.search_images(decoded, k, wanted))
    if rows:
        labels = [f"cell {searcher.index.cells['cell_id'].iloc[r]}" for r in rows]
        results += zip(labels, searcher.search_cells(rows, k, wanted))
    return results


def format_table(table: pd.DataFrame) -> str:
    """Neighbours as an aligned text table (12-digit ids: enough for ``--cell-id``)."""
    shown = pd.DataFrame(
        {
            "rank": table["rank"],
            "cell": table["cell_id"].str.slice(0, 12),
            "patient": table["patient_id"],
            "cell_type": table["cell_type"],
            "blast": table["is_blast"].map({True: "yes", False: "no"}),
            "mutation": table["mutation"],
        }
    )
    if table["similarity"].notna().all():
        shown["similarity"] = table["similarity"].map("{:.4f}".format)
    else:
        shown["distance"] = table["distance"].map("{:.4f}".format)
    shown["path"] = table["path"]
    return shown.fillna("-").to_string(index=False)


def format_vote(table: pd.DataFrame) -> str:
    """One line: the neighbours' labels, most common first."""
    parts = [
        f"{column}: " + ", ".join(f"{label} {count}/{len(table)}" for label, count in counts)
        for column, counts in vote(table).items()
    ]
    return "k-NN vote: " + ("; ".join(parts) if parts else "the neighbours carry no labels")


def _bitmap_selector(mask: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector over row ids from a boolean mask (one bit per row: cheap even at 1M rows)."""
    # faiss's Python wrapper takes the array alone (its stubs only know the C++ (n, bitmap) form)
    return faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))  # type: ignore[call-arg, arg-type]


def _plain(value: Any) -> Any:
    """A pandas/numpy scalar as a JSON-able Python value (NA -> None)."""
    if pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def cell_record(cells: pd.DataFrame, row: int) -> dict[str, Any]:
    """One row of a cells table as a plain dict, with its row number."""
    return {"row": row, **{str(k): _plain(v) for k, v in cells.iloc[row].items()}}


def neighbour_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A neighbours table as JSON-able dicts."""
    return [{str(k): _plain(v) for k, v in record.items()} for record in table.to_dict("records")]
