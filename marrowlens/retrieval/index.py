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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
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
from marrowlens.config import load_config
from marrowlens.embeddings import Embeddings, load_embeddings
from marrowlens.errors import MarrowLensError

INDEX_FILE = "index.faiss"
CELLS_FILE = "cells.parquet"
# Every version's files: the unversioned names (a build) and those of ``add`` (``index.3.faiss``).
_VERSION_FILE = re.compile(r"(index(\.\d+)?\.faiss|cells(\.\d+)?\.parquet)")
KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
METRICS = ("cosine", "l2")
BLOCK_ROWS = 32_768
# Fewer queries than this are searched on one OpenMP thread (the setting is per calling thread).
# FAISS parallelises over queries, so a single query gains nothing from more threads, but its
# OpenMP workers spin while waiting: on a busy 2-core machine that made a 0.12 ms HNSW query
# take 6 ms of CPU and 12 ms of wall time (bench/RESULTS.md).
SMALL_BATCH = 16

# ``auto``, from bench/RESULTS.md ("Retrieval"; 384-d, 2 shared cores). Exact search reads all
# N x D floats per query: single-query p50 3.3 ms at 50k cells, 11 ms at 100k, 113 ms at 1M, so
# it is the choice (exact, no training, instant build) only up to 50k. Above, IVF: at 1M with its
# default nprobe (62) it answered in 2.2 ms at recall@10 1.000 (0.975 at 100k), built in 2 min
# and needs no more memory than flat; HNSW (M=32, efConstruction=40) answered faster but reached
# only 0.79 recall@10 at 1M with efSearch 64 (0.947 even at 1024) and took 3.4x as long to build.
# PQ compression (``ivfpq``, for > 10M cells) trades recall for memory, so it is never automatic.
EXACT_MAX_CELLS = 50_000


class IndexParams(BaseModel):
    """Tunable FAISS parameters; ``None`` means "derive from the cohort size" (see :func:`resolve_params`)."""

    model_config = ConfigDict(extra="forbid")

    nlist: int | None = Field(None, ge=1, description="IVF: number of inverted lists (default ~4*sqrt(N))")
    nprobe: int | None = Field(None, ge=1, description="IVF: lists visited per query")
    train_size: int | None = Field(None, ge=1, description="IVF: vectors sampled to train the coarse quantiser")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW: links per node")
    ef_construction: int = Field(40, ge=8, description="HNSW: candidate list while building")
    ef_search: int = Field(64, ge=1, description="HNSW: candidate list while searching")
    pq_m: int | None = Field(None, ge=1, description="IVFPQ: sub-quantisers (must divide the dimension)")
    pq_nbits: int = Field(8, ge=4, le=12, description="IVFPQ: bits per sub-quantiser code")
    seed: int = Field(0, description="sampling of the IVF training set")


PARAM_KEYS = {
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe", "train_size", "seed"),
    "ivfpq": ("nlist", "nprobe", "train_size", "pq_m", "pq_nbits", "seed"),
}


def choose_kind(n: int) -> str:
    """The index ``auto`` builds for ``n`` cells (measured, see ``EXACT_MAX_CELLS``)."""
    return "flat" if n <= EXACT_MAX_CELLS else "ivf"


def resolve_params(kind: str, n: int, dim: int, overrides: list[str] | None = None) -> dict[str, Any]:
    """The parameters of a ``kind`` index over ``n`` vectors, after ``key=value`` overrides.

    IVF: ``nlist`` ~ 4 sqrt(N) (FAISS's guideline), capped so every list gets >= 39 training points;
    ``nprobe`` = nlist/64 (>= 16): recall@10 0.975 at 100k and 1.000 at 1M in the benchmark, p50
    2.2 ms at 1M (nlist/16 cost 8 ms there for no gain); the quantiser is trained on 64 points
    per list (FAISS warns below 39), at most N.
    """
    if kind not in PARAM_KEYS:
        raise MarrowLensError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    config = load_config(IndexParams, None, overrides)
    given = {key for text in overrides or [] for key in [text.partition("=")[0].strip()]}
    unused = sorted(given - set(PARAM_KEYS[kind]))
    if unused:
        allowed = ", ".join(PARAM_KEYS[kind]) or "none"
        raise MarrowLensError(f"parameter(s) {', '.join(unused)} do not apply to a {kind} index (it takes: {allowed})")
    params = config.model_dump()
    if kind in ("ivf", "ivfpq"):
        nlist = params["nlist"] or max(1, min(round(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise MarrowLensError(f"nlist={nlist} exceeds the {n} vectors to index")
        params["nlist"] = nlist
        params["nprobe"] = min(nlist, params["nprobe"] or max(16, nlist // 64))
        params["train_size"] = min(n, params["train_size"] or max(64 * nlist, 10_000))
        if params["train_size"] < nlist:
            raise MarrowLensError(f"train_size={params['train_size']} is smaller than nlist={nlist}")
    if kind == "ivfpq":
        pq_m = params["pq_m"] or _default_pq_m(dim)
        if dim % pq_m:
            raise MarrowLensError(f"pq_m={pq_m} must divide the dimension {dim}")
        params["pq_m"] = pq_m
    return {key: params[key] for key in PARAM_KEYS[kind]}


def _default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` up to dim/8: 8 dimensions per one-byte code."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def factory_string(kind: str, params: dict[str, Any]) -> str:
    """FAISS ``index_factory`` description, always wrapped in ``IDMap2`` (ids = cell rows)."""
    inner = {
        "flat": lambda: "Flat",
        "hnsw": lambda: f"HNSW{params['hnsw_m']}",
        "ivf": lambda: f"IVF{params['nlist']},Flat",
        "ivfpq": lambda: f"IVF{params['nlist']},PQ{params['pq_m']}x{params['pq_nbits']}",
    }[kind]()
    return f"IDMap2,{inner}"


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
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["index_kind"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def params(self) -> dict[str, Any]:
        return self.meta["params"]

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model"]["fingerprint"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search_parameters(self, selector: faiss.IDSelector | None = None, effort: int = 1) -> faiss.SearchParameters:
        """Per-call FAISS parameters (thread-safe: nothing is set on the shared index).

        ``effort`` multiplies nprobe / efSearch; a filtered search that came back short asks again
        with more effort, up to an exhaustive scan.
        """
        if self.kind in ("ivf", "ivfpq"):
            nprobe = min(self.params["nlist"], self.params["nprobe"] * effort)
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=min(len(self), self.params["ef_search"] * effort) or 1)
        return faiss.SearchParameters(sel=selector)

    def exhaustive(self, effort: int) -> bool:
        """Whether a search at ``effort`` already visits every vector."""
        if self.kind in ("ivf", "ivfpq"):
            return self.params["nprobe"] * effort >= self.params["nlist"]
        if self.kind == "hnsw":
            return self.params["ef_search"] * effort >= len(self)
        return True

    def search(self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None = None, effort: int = 1) -> tuple[np.ndarray, np.ndarray]:
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
        return self.index.reconstruct(int(row))


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


def _source_record(store: Embeddings, first_row: int) -> dict[str, Any]:
    """Where a store's cells came from, including the image root thumbnails are read from."""
    cohort = dict(store.meta.get("cohort") or {})
    root = None
    if cohort.get("folder"):
        from marrowlens.cohort.manifest import load_cohort

        try:
            root = str(load_cohort(cohort["folder"]).root)
        except MarrowLensError:
            root = None  # searchable without images; the server says thumbnails are unavailable
    return {
        "embeddings": str(store.folder.resolve()),
        "fingerprint": store.fingerprint,
        "first_row": first_row,
        "count": len(store),
        "cohort": {"folder": cohort.get("folder"), "fingerprint": cohort.get("fingerprint"), "root": root},
    }


def _refuse_duplicate_ids(cells: pd.DataFrame, where: str) -> None:
    duplicated = cells["cell_id"][cells["cell_id"].duplicated()]
    if len(duplicated):
        raise MarrowLensError(f"{where} holds {len(duplicated)} duplicate cell id(s), e.g. {duplicated.iloc[0]}")


def _version_files(version: int) -> dict[str, str]:
    """File names of a version: version 0 (a build) keeps the plain names older releases used."""
    if version == 0:
        return {"index": INDEX_FILE, "cells": CELLS_FILE}
    return {"index": f"index.{version}.faiss", "cells": f"cells.{version}.parquet"}


def current_files(meta: dict[str, Any]) -> dict[str, str]:
    """The files meta.json points at (the plain names in folders from before versions)."""
    return meta.get("files") or _version_files(0)


def _write(folder: Path, index: faiss.Index, cells: pd.DataFrame, meta_fields: dict[str, Any], version: int) -> dict[str, Any]:
    """Write ``version``'s index and cells (each atomic), then meta.json naming them, then drop other versions.

    meta.json is the commit record and the pointer to the current files: until it is renamed into
    place a reader sees the previous version whole. A folder without it, or whose counts disagree
    with the files, is refused by :func:`load_index`.
    """
    files = _version_files(version)
    with contextlib.ExitStack() as stack:
        cells_tmp = stack.enter_context(atomic_path(folder / files["cells"]))
        index_tmp = stack.enter_context(atomic_path(folder / files["index"]))
        cells.reset_index(drop=True).to_parquet(cells_tmp, index=False)
        faiss.write_index(index, str(index_tmp))
    meta = write_meta(folder, "index", **meta_fields, version=version, files=files)
    for path in folder.iterdir():  # older versions, and any a killed ``add`` left unreferenced
        if _VERSION_FILE.fullmatch(path.name) and path.name not in files.values():
            path.unlink(missing_ok=True)
    return meta


def build_index(
    embeddings: str | Path,
    out: str | Path,
    kind: str = "auto",
    metric: str = "cosine",
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> CellIndex:
    """Build an index over one embedding store and write it to ``out``."""
    if kind not in KINDS:
        raise MarrowLensError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    faiss_metric(metric)
    store = load_embeddings(embeddings)
    n, dim = store.vectors.shape
    if n == 0:
        raise MarrowLensError(f"{embeddings} holds no vectors")
    _refuse_duplicate_ids(store.cells, f"embeddings {embeddings}")
    chosen = choose_kind(n) if kind == "auto" else kind
    params = resolve_params(chosen, n, dim, overrides)
    factory = factory_string(chosen, params)
    out = prepare_out_dir(out, overwrite)
    (out / META_FILE).unlink(missing_ok=True)  # an interrupted rebuild must not look finished

    index = faiss.index_factory(dim, factory, faiss_metric(metric))
    inner = faiss.downcast_index(index.index)
    if chosen == "hnsw":
        inner.hnsw.efConstruction = params["ef_construction"]
    if chosen in ("ivf", "ivfpq"):
        sample = _training_sample(store.vectors, params["train_size"], params["seed"], metric)
        with tqdm(total=1, desc=f"training IVF{params['nlist']} on {len(sample)} vectors", disable=None) as bar:
            index.train(sample)
            bar.update()
        inner.make_direct_map()  # reconstruct(row) for query-by-cell
        del sample
    _add_blocks(index, store.vectors, 0, metric, desc=f"building {chosen} index")

    cells = store.cells.copy()
    cells["source"] = np.int32(0)
    meta = _write(
        out,
        index,
        cells,
        {
            "index_kind": chosen,
            "requested_kind": kind,
            "factory": factory,
            "metric": metric,
            "params": params,
            "count": n,
            "dim": dim,
            "model": store.meta["model"],
            "preprocessing": store.meta.get("preprocessing") or {},
            "sources": [_source_record(store, 0)],
        },
        version=0,
    )
    return CellIndex(folder=out, index=index, cells=cells, meta=meta)


def add_to_index(folder: str | Path, embeddings: str | Path) -> tuple[CellIndex, int]:
    """Append the cells of another store made by the same backbone; returns the index and how many were added."""
    current = load_index(folder)
    store = load_embeddings(embeddings)
    require_same_fingerprint(
        "backbone fingerprint", current.model_fingerprint, f"index {folder}", store.model_fingerprint, f"embeddings {embeddings}"
    )
    ours, theirs = _stain(current.meta), _stain(store.meta)
    if ours != theirs:
        raise MarrowLensError(
            f"stain normalisation mismatch: index {folder} was embedded with {ours or 'none'}, embeddings {embeddings} with {theirs or 'none'}"
        )
    if store.vectors.shape[1] != current.meta["dim"]:
        raise MarrowLensError(f"embeddings {embeddings} have dimension {store.vectors.shape[1]}, the index {current.meta['dim']}")
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
    cells["source"] = np.int32(len(current.meta["sources"]))
    merged = pd.concat([current.cells, cells], ignore_index=True)
    fields = {k: v for k, v in current.meta.items() if k not in ("kind", "marrowlens_version", "created", "command", "version", "files")}
    fields.update(count=len(merged), sources=[*current.meta["sources"], _source_record(store, first)])
    meta = _write(current.folder, current.index, merged, fields, version=current.meta.get("version", 0) + 1)
    return CellIndex(folder=current.folder, index=current.index, cells=merged, meta=meta), len(store)


def _stain(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The stain normalisation target vectors were embedded with (None: no normalisation)."""
    return (meta.get("preprocessing") or {}).get("stain")


def load_index(folder: str | Path) -> CellIndex:
    """Load ``idx/``; refuse a folder that is not an index or whose files disagree with each other."""
    folder = Path(folder)
    meta = read_meta(folder, "index")
    files = current_files(meta)
    for name in files.values():
        if not (folder / name).is_file():
            raise MarrowLensError(f"index {folder} is incomplete: {name} is missing")
    try:
        index = faiss.read_index(str(folder / files["index"]))
    except RuntimeError as exc:
        raise MarrowLensError(f"{folder / files['index']} is not a readable FAISS index") from exc
    cells = read_parquet(folder / files["cells"])
    if not (index.ntotal == len(cells) == meta.get("count")) or index.d != meta.get("dim"):
        raise MarrowLensError(
            f"index {folder} is inconsistent ({index.ntotal} vectors, {len(cells)} cells, meta.json says "
            f"{meta.get('count')}): a write was interrupted; build it again"
        )
    return CellIndex(folder=folder, index=index, cells=cells, meta=meta)


def describe(index: CellIndex) -> list[str]:
    """Lines for ``index info``: what the index holds and how it searches."""
    meta, model = index.meta, index.meta["model"]
    size = (index.folder / current_files(meta)["index"]).stat().st_size
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "exact search"
    auto = " (auto)" if meta.get("requested_kind") == "auto" else ""
    lines = [
        f"index {index.folder}: {len(index)} cells x {meta['dim']} dims, {index.kind}{auto}, {index.metric} metric",
        f"  faiss: {meta['factory']} ({params}), {size / 2**20:.1f} MiB on disk",
        f"  model: {model['timm_name']} @ {model['image_size']} px, {short(model['fingerprint'])} from {model['source']}",
    ]
    if _stain(meta):
        lines.append(f"  queries are stain-normalised ({_stain(meta)['method']}) like the cells")
    for source in meta["sources"]:
        root = source["cohort"].get("root") or "unknown (no thumbnails)"
        lines.append(f"  source: {source['count']} cells from {source['embeddings']} ({short(source['fingerprint'])}), images in {root}")
    cells = index.cells
    lines.append(f"  patients: {cells['patient_id'].nunique()} (cells without one: {int(cells['patient_id'].isna().sum())})")
    for column in ("mutation", "cell_type", "is_blast"):
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
    if index.meta.get("requested_kind") == "auto" and better != index.kind:
        return f"note: at {len(index)} cells `auto` would now build {better}; rebuild to switch"
    return None
