"""FAISS indexes over embedding stores: which index to build, building it, adding to it, loading it.

FAISS does all the searching. This module decides *which* FAISS index suits a cohort of a given
size (``auto``), feeds it vectors in blocks straight from a store's memory map (a million-cell
store is never copied whole), and writes ``idx/`` = ``index.faiss`` + ``cells.parquet`` (row ``i``
is FAISS id ``i``) + ``meta.json`` (kind, metric, parameters, count, the backbone that made the
vectors, and the stores and cohorts they came from, so queries are embedded the same way and
thumbnails can be found).

``index add`` writes the grown index and table as a new version (``index.N.faiss``,
``cells.N.parquet``) beside the old one and then rewrites ``meta.json``, which names the files of
the current version: that one atomic rename is the switch, so a killed ``add`` leaves the old
index intact. Folders written before versions existed (no ``files`` in meta.json) load as they are.

Every index is an ``IndexIDMap2``: ids are the rows of ``cells.parquet`` whatever the inner
index, id selectors (filters) work on those rows, and ``reconstruct(row)`` returns a cell's
vector for query-by-cell.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from marrowlens.artifacts import (
    META_FILE,
    atomic_path,
    prepare_out_dir,
    read_meta,
    read_parquet,
    require_same_fingerprint,
    short,
    write_meta,
)
from marrowlens.cohort.schema import CLASS_COLUMNS
from marrowlens.config import load_config
from marrowlens.contracts import IndexFiles, IndexMeta, IndexSource, SourceCohort, stain_record
from marrowlens.embeddings import Embeddings, load_embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.provenance import python_api
from marrowlens.retrieval.kinds import INDEX_KINDS, IndexKind

INDEX_FILE = "index.faiss"
CELLS_FILE = "cells.parquet"
# Every version's files: the unversioned names (a build) and those of ``add`` (``index.3.faiss``).
_VERSION_FILE = re.compile(r"(index(\.\d+)?\.faiss|cells(\.\d+)?\.parquet)")
METRICS = ("cosine", "l2")
BLOCK_ROWS = 32_768
# Fewer queries than this are searched on one OpenMP thread (the setting is per calling thread).
# FAISS parallelises over queries, so a single query gains nothing from more threads, but its
# OpenMP workers spin while waiting: on a busy 2-core machine that made a 0.12 ms HNSW query
# take 6 ms of CPU and 12 ms of wall time (bench/RESULTS.md).
SMALL_BATCH = 16


def index_kind(name: str) -> IndexKind:
    """The registered kind called ``name``; an unknown one is a one-line error naming the known ones."""
    if name not in INDEX_KINDS:
        raise MarrowLensError(f"unknown index kind {name!r}; choose one of {', '.join(('auto', *INDEX_KINDS))}")
    return INDEX_KINDS[name]


def choose_kind(n: int) -> str:
    """The index ``auto`` builds for ``n`` cells: the kind with the smallest ``auto_up_to`` that holds ``n``."""
    bounds = sorted((kind.auto_up_to, name) for name, kind in INDEX_KINDS.items() if kind.auto_up_to is not None)
    return next(name for bound, name in bounds if n <= bound)


def resolve_params(
    kind: str, n: int, dim: int, overrides: list[str] | None = None, values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The parameters of a ``kind`` index over ``n`` vectors: typed ``values``, then ``key=value`` overrides,
    then the kind's defaults."""
    chosen = index_kind(kind)
    given = {key for text in overrides or [] for key in [text.partition("=")[0].strip()]} | set(values or {})
    unused = sorted(given - set(chosen.param_keys))
    if unused:
        allowed = ", ".join(chosen.param_keys) or "none"
        raise MarrowLensError(f"parameter(s) {', '.join(unused)} do not apply to a {kind} index (it takes: {allowed})")
    return chosen.derive(load_config(chosen.Params, None, overrides, values).model_dump(), n, dim)


def factory_string(kind: str, params: dict[str, Any]) -> str:
    """FAISS ``index_factory`` description, always wrapped in ``IDMap2`` (ids = cell rows)."""
    return f"IDMap2,{index_kind(kind).factory(params)}"


def faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise MarrowLensError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """A C-contiguous float32 copy, L2-normalised for cosine (``normalize_L2`` works in place)."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        faiss.normalize_L2(out)
    return out


@dataclass
class CellIndex:
    """A loaded index: the FAISS object, its cells (row = id) and what made it."""

    folder: Path
    index: faiss.Index
    cells: pd.DataFrame
    meta: IndexMeta

    @property
    def kind(self) -> str:
        return self.meta.index_kind

    @property
    def metric(self) -> str:
        return self.meta.metric

    @property
    def params(self) -> dict[str, Any]:
        return self.meta.params

    @property
    def model_fingerprint(self) -> str:
        return self.meta.model.fingerprint

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search_parameters(self, selector: faiss.IDSelector | None = None, effort: int = 1) -> faiss.SearchParameters:
        """Per-call FAISS parameters (thread-safe: nothing is set on the shared index).

        ``effort`` multiplies nprobe / efSearch; a filtered search that came back short asks again
        with more effort, up to an exhaustive scan.
        """
        return index_kind(self.kind).search_parameters(self.params, len(self), selector, effort)

    def exhaustive(self, effort: int) -> bool:
        """Whether a search at ``effort`` already visits every vector."""
        return index_kind(self.kind).exhaustive(self.params, len(self), effort)

    def search(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None = None, effort: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of raw query vectors: (scores, rows); rows are -1 where fewer than k were found."""
        prepared = prepare_vectors(queries, self.metric)
        params = self.search_parameters(selector, effort)
        if len(prepared) >= SMALL_BATCH:
            return self.index.search(prepared, k, params=params)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(prepared, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)

    def vector(self, row: int) -> np.ndarray:
        """The stored (normalised for cosine; decoded for PQ, so approximate) vector of a cell."""
        return np.asarray(self.index.reconstruct(int(row)))


def _training_sample(vectors: np.ndarray, size: int, seed: int, metric: str) -> np.ndarray:
    """``size`` rows drawn without replacement, read in row order (friendly to a memory map)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return prepare_vectors(vectors[rows], metric)


def _add_blocks(index: faiss.Index, vectors: np.ndarray, first_id: int, metric: str, desc: str) -> None:
    """Add a store's vectors block by block, each block normalised on a copy; ids continue from ``first_id``."""
    n = len(vectors)
    with tqdm(total=n, desc=desc, unit="cell", disable=None) as bar:
        for start in range(0, n, BLOCK_ROWS):
            block = prepare_vectors(vectors[start : start + BLOCK_ROWS], metric)
            ids = np.arange(first_id + start, first_id + start + len(block), dtype=np.int64)
            index.add_with_ids(block, ids)
            bar.update(len(block))


def _source_record(store: Embeddings, first_row: int) -> IndexSource:
    """Where a store's cells came from, including the image root thumbnails are read from."""
    cohort = store.meta.cohort
    root = None
    if cohort is not None:
        from marrowlens.cohort.manifest import load_cohort

        try:
            root = str(load_cohort(cohort.folder).root)
        except MarrowLensError:
            root = None  # searchable without images; the server says thumbnails are unavailable
    return IndexSource(
        embeddings=str(store.folder.resolve()),
        fingerprint=store.fingerprint,
        first_row=first_row,
        count=len(store),
        cohort=SourceCohort(
            folder=cohort.folder if cohort else None, fingerprint=cohort.fingerprint if cohort else None, root=root
        ),
    )


def _refuse_duplicate_ids(cells: pd.DataFrame, where: str) -> None:
    duplicated = cells["cell_id"][cells["cell_id"].duplicated()]
    if len(duplicated):
        raise MarrowLensError(f"{where} holds {len(duplicated)} duplicate cell id(s), e.g. {duplicated.iloc[0]}")


def _version_files(version: int) -> IndexFiles:
    """File names of a version: version 0 (a build) keeps the plain names older releases used."""
    if version == 0:
        return IndexFiles(index=INDEX_FILE, cells=CELLS_FILE)
    return IndexFiles(index=f"index.{version}.faiss", cells=f"cells.{version}.parquet")


def current_files(meta: IndexMeta) -> IndexFiles:
    """The files meta.json points at (the plain names in folders from before versions)."""
    return meta.files or _version_files(0)


def _write(folder: Path, index: faiss.Index, cells: pd.DataFrame, meta: IndexMeta, version: int) -> IndexMeta:
    """Write ``version``'s index and cells (each atomic), then meta.json naming them, then drop other versions.

    meta.json is the commit record and the pointer to the current files: until it is renamed into
    place a reader sees the previous version whole. A folder without it, or whose counts disagree
    with the files, is refused by :func:`load_index`.
    """
    files = _version_files(version)
    with contextlib.ExitStack() as stack:
        cells_tmp = stack.enter_context(atomic_path(folder / files.cells))
        index_tmp = stack.enter_context(atomic_path(folder / files.index))
        cells.reset_index(drop=True).to_parquet(cells_tmp, index=False)
        faiss.write_index(index, str(index_tmp))
    meta = write_meta(folder, meta.renewed(version=version, files=files))
    for path in folder.iterdir():  # older versions, and any a killed ``add`` left unreferenced
        if _VERSION_FILE.fullmatch(path.name) and path.name not in (files.index, files.cells):
            path.unlink(missing_ok=True)
    return meta


@python_api
def build_index(
    embeddings: str | Path,
    out: str | Path,
    kind: str = "auto",
    metric: str = "cosine",
    overrides: list[str] | None = None,
    overwrite: bool = False,
    values: Mapping[str, Any] | None = None,
) -> CellIndex:
    """Build an index over one embedding store and write it to ``out``."""
    if kind != "auto":
        index_kind(kind)
    faiss_metric(metric)
    store = load_embeddings(embeddings)
    n, dim = store.vectors.shape
    if n == 0:
        raise MarrowLensError(f"{embeddings} holds no vectors")
    _refuse_duplicate_ids(store.cells, f"embeddings {embeddings}")
    chosen = choose_kind(n) if kind == "auto" else kind
    params = resolve_params(chosen, n, dim, overrides, values)
    factory = factory_string(chosen, params)
    out = prepare_out_dir(out, overwrite)
    (out / META_FILE).unlink(missing_ok=True)  # an interrupted rebuild must not look finished

    index = faiss.index_factory(dim, factory, faiss_metric(metric))
    index_kind(chosen).prepare(index, params, lambda size, seed: _training_sample(store.vectors, size, seed, metric))
    _add_blocks(index, store.vectors, 0, metric, desc=f"building {chosen} index")

    cells = store.cells.copy()
    cells["source"] = np.int32(0)
    meta = IndexMeta(
        index_kind=chosen,
        requested_kind=kind,
        factory=factory,
        metric=metric,
        params=params,
        count=n,
        dim=dim,
        model=store.meta.model,
        preprocessing=store.meta.preprocessing,
        sources=[_source_record(store, 0)],
    )
    meta = _write(out, index, cells, meta, version=0)
    return CellIndex(folder=out, index=index, cells=cells, meta=meta)


@python_api
def add_to_index(folder: str | Path, embeddings: str | Path) -> tuple[CellIndex, int]:
    """Append the cells of another store made by the same backbone; returns the index and how many were added."""
    current = load_index(folder)
    store = load_embeddings(embeddings)
    require_same_fingerprint(
        "backbone fingerprint",
        current.model_fingerprint,
        f"index {folder}",
        store.model_fingerprint,
        f"embeddings {embeddings}",
    )
    ours, theirs = stain_record(current.meta), stain_record(store.meta)
    if ours != theirs:
        raise MarrowLensError(
            f"stain normalisation mismatch: index {folder} was embedded with {ours or 'none'}, "
            f"embeddings {embeddings} with {theirs or 'none'}"
        )
    if store.vectors.shape[1] != current.meta.dim:
        raise MarrowLensError(
            f"embeddings {embeddings} have dimension {store.vectors.shape[1]}, the index {current.meta.dim}"
        )
    if len(store) == 0:
        raise MarrowLensError(f"{embeddings} holds no vectors")
    _refuse_duplicate_ids(store.cells, f"embeddings {embeddings}")
    already = store.cells["cell_id"].isin(set(current.cells["cell_id"]))
    if already.any():
        raise MarrowLensError(
            f"{int(already.sum())} cell(s) of {embeddings} are already in index {folder} "
            f"(e.g. {store.cells['cell_id'][already].iloc[0]}); nothing was added"
        )
    first = len(current)
    _add_blocks(current.index, store.vectors, first, current.metric, desc="adding to index")
    cells = store.cells.copy()
    cells["source"] = np.int32(len(current.meta.sources))
    merged = pd.concat([current.cells, cells], ignore_index=True)
    grown = current.meta.renewed(count=len(merged), sources=[*current.meta.sources, _source_record(store, first)])
    meta = _write(current.folder, current.index, merged, grown, version=current.meta.version + 1)
    return CellIndex(folder=current.folder, index=current.index, cells=merged, meta=meta), len(store)


def load_index(folder: str | Path) -> CellIndex:
    """Load ``idx/``; refuse a folder that is not an index or whose files disagree with each other."""
    folder = Path(folder)
    meta = read_meta(folder, IndexMeta)
    files = current_files(meta)
    for name in (files.index, files.cells):
        if not (folder / name).is_file():
            raise MarrowLensError(f"index {folder} is incomplete: {name} is missing")
    try:
        index = faiss.read_index(str(folder / files.index))
    except RuntimeError as exc:
        raise MarrowLensError(f"{folder / files.index} is not a readable FAISS index") from exc
    cells = read_parquet(folder / files.cells)
    if not (index.ntotal == len(cells) == meta.count) or index.d != meta.dim:
        raise MarrowLensError(
            f"index {folder} is inconsistent ({index.ntotal} vectors, {len(cells)} cells, meta.json says "
            f"{meta.count}): a write was interrupted; build it again"
        )
    return CellIndex(folder=folder, index=index, cells=cells, meta=meta)


def describe(index: CellIndex) -> list[str]:
    """Lines for ``index info``: what the index holds and how it searches."""
    meta, model = index.meta, index.meta.model
    size = (index.folder / current_files(meta).index).stat().st_size
    params = ", ".join(f"{k}={v}" for k, v in meta.params.items()) or "exact search"
    auto = " (auto)" if meta.requested_kind == "auto" else ""
    lines = [
        f"index {index.folder}: {len(index)} cells x {meta.dim} dims, {index.kind}{auto}, {index.metric} metric",
        f"  faiss: {meta.factory} ({params}), {size / 2**20:.1f} MiB on disk",
        f"  model: {model.timm_name} @ {model.image_size} px, {short(model.fingerprint)} from {model.source}",
    ]
    stain = stain_record(meta)
    if stain:
        lines.append(f"  queries are stain-normalised ({stain['method']}) like the cells")
    for source in meta.sources:
        root = source.cohort.root or "unknown (no thumbnails)"
        lines.append(
            f"  source: {source.count} cells from {source.embeddings} ({short(source.fingerprint)}), images in {root}"
        )
    cells = index.cells
    lines.append(
        f"  patients: {cells['patient_id'].nunique()} (cells without one: {int(cells['patient_id'].isna().sum())})"
    )
    for column in CLASS_COLUMNS:
        if cells[column].notna().any():
            counts = cells[column].value_counts()
            shown = ", ".join(f"{k}={v}" for k, v in counts.head(8).items())
            more = f", ... ({len(counts)} values)" if len(counts) > 8 else ""
            lines.append(f"  {column}: {shown}{more}")
    advice = kind_advice(index)
    if advice:
        lines.append(f"  {advice}")
    return lines


def kind_advice(index: CellIndex) -> str | None:
    """A note when cells added since an ``auto`` build have outgrown the kind it chose."""
    better = choose_kind(len(index))
    if index.meta.requested_kind == "auto" and better != index.kind:
        return f"note: at {len(index)} cells `auto` would now build {better}; rebuild to switch"
    return None
