"""FAISS index kinds: one class per kind, and the ``INDEX_KINDS`` registry the index code dispatches on.

A kind declares its ``--set`` parameters (a pydantic model: types, bounds, defaults), how it
derives the rest from the cohort size, its FAISS factory string, what it does before vectors are
added (training, build settings), how a search spends more effort (nprobe / efSearch), and
whether ``auto`` ever picks it. A new kind is its own class (in a module of its own, or here) plus
one line in the table ``config.INDEX_KIND_CLASSES``, which the CLI and run configs offer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import faiss
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from marrowlens.config import INDEX_KIND_CLASSES
from marrowlens.errors import MarrowLensError
from marrowlens.registry import load_registered

# ``auto``, from bench/RESULTS.md ("Retrieval"; 384-d, 2 shared cores). Exact search reads all
# N x D floats per query: single-query p50 3.3 ms at 50k cells, 11 ms at 100k, 113 ms at 1M, so
# it is the choice (exact, no training, instant build) only up to 50k. Above, IVF: at 1M with its
# default nprobe (62) it answered in 2.2 ms at recall@10 1.000 (0.975 at 100k), built in 2 min
# and needs no more memory than flat; HNSW (M=32, efConstruction=40) answered faster but reached
# only 0.79 recall@10 at 1M with efSearch 64 (0.947 even at 1024) and took 3.4x as long to build.
# PQ compression (``ivfpq``, for > 10M cells) trades recall for memory, so it is never automatic.
EXACT_MAX_CELLS = 50_000

# Draws a prepared (float32, normalised for cosine) training sample: (size, seed) -> vectors.
SampleDrawer = Callable[[int, int], npt.NDArray[np.float32]]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IndexKind:
    """Base: an exact-search-like kind with no parameters, no training and nothing to tune per search."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = _Params
    # ``auto`` builds this kind for cohorts of up to this many cells (the smallest bound that fits wins); None: never.
    auto_up_to: ClassVar[float | None] = None
    # The parameter a search's ``effort`` multiplies (what a latency/recall sweep varies); None: exact.
    effort_param: ClassVar[str | None] = None

    @property
    def param_keys(self) -> tuple[str, ...]:
        return tuple(self.Params.model_fields)

    def derive(self, params: dict[str, Any], n: int, dim: int) -> dict[str, Any]:
        """Fill the parameters left ``None`` from the cohort size ``n`` and dimension ``dim``."""
        return params

    def factory(self, params: dict[str, Any]) -> str:
        """The inner part of the FAISS ``index_factory`` description."""
        raise NotImplementedError

    def prepare(self, index: faiss.Index, params: dict[str, Any], draw: SampleDrawer) -> None:
        """Train / configure the fresh ``IDMap2`` index before vectors are added."""

    def search_parameters(
        self, params: dict[str, Any], n: int, selector: faiss.IDSelector | None, effort: int
    ) -> faiss.SearchParameters:
        """Per-call FAISS parameters at ``effort`` times the usual search effort."""
        # faiss's stubs declare no-argument constructors; its class wrappers accept every field as a keyword
        return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]

    def exhaustive(self, params: dict[str, Any], n: int, effort: int) -> bool:
        """Whether a search at ``effort`` already visits all ``n`` vectors."""
        return True


class Flat(IndexKind):
    """Exact search: no training, instant build; ``auto`` up to ``EXACT_MAX_CELLS``."""

    name = "flat"
    auto_up_to = EXACT_MAX_CELLS

    def factory(self, params: dict[str, Any]) -> str:
        return "Flat"


class HNSWParams(_Params):
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW: links per node")
    ef_construction: int = Field(40, ge=8, description="HNSW: candidate list while building")
    ef_search: int = Field(64, ge=1, description="HNSW: candidate list while searching")


class HNSW(IndexKind):
    """Graph search: fast queries, but lower recall at 1M cells than IVF (never automatic)."""

    name = "hnsw"
    Params = HNSWParams
    effort_param = "ef_search"

    def factory(self, params: dict[str, Any]) -> str:
        return f"HNSW{params['hnsw_m']}"

    def prepare(self, index: faiss.Index, params: dict[str, Any], draw: SampleDrawer) -> None:
        # faiss types the fresh IDMap2 wrapper and what it wraps as the base Index
        inner = faiss.downcast_index(cast(faiss.IndexIDMap2, index).index)
        cast(faiss.IndexHNSW, inner).hnsw.efConstruction = params["ef_construction"]

    def search_parameters(
        self, params: dict[str, Any], n: int, selector: faiss.IDSelector | None, effort: int
    ) -> faiss.SearchParameters:
        # faiss's stubs (1.15) omit SearchParametersHNSW, which its extension module defines
        hnsw: faiss.SearchParameters = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            sel=selector, efSearch=min(n, params["ef_search"] * effort) or 1
        )
        return hnsw

    def exhaustive(self, params: dict[str, Any], n: int, effort: int) -> bool:
        return int(params["ef_search"]) * effort >= n


class IVFParams(_Params):
    nlist: int | None = Field(None, ge=1, description="IVF: number of inverted lists (default ~4*sqrt(N))")
    nprobe: int | None = Field(None, ge=1, description="IVF: lists visited per query")
    train_size: int | None = Field(None, ge=1, description="IVF: vectors sampled to train the coarse quantiser")
    seed: int = Field(0, description="sampling of the IVF training set")


class IVF(IndexKind):
    """Inverted lists over a trained coarse quantiser; ``auto`` above ``EXACT_MAX_CELLS``."""

    name = "ivf"
    Params = IVFParams
    auto_up_to: ClassVar[float | None] = math.inf
    effort_param = "nprobe"

    def derive(self, params: dict[str, Any], n: int, dim: int) -> dict[str, Any]:
        """``nlist`` ~ 4 sqrt(N) (FAISS's guideline), capped so every list gets >= 39 training points;
        ``nprobe`` = nlist/64 (>= 16): recall@10 0.975 at 100k and 1.000 at 1M in the benchmark, p50
        2.2 ms at 1M (nlist/16 cost 8 ms there for no gain); the quantiser is trained on 64 points
        per list (FAISS warns below 39), at most N.
        """
        nlist = params["nlist"] or max(1, min(round(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise MarrowLensError(f"nlist={nlist} exceeds the {n} vectors to index")
        params["nlist"] = nlist
        params["nprobe"] = min(nlist, params["nprobe"] or max(16, nlist // 64))
        params["train_size"] = min(n, params["train_size"] or max(64 * nlist, 10_000))
        if params["train_size"] < nlist:
            raise MarrowLensError(f"train_size={params['train_size']} is smaller than nlist={nlist}")
        return params

    def factory(self, params: dict[str, Any]) -> str:
        return f"IVF{params['nlist']},Flat"

    def prepare(self, index: faiss.Index, params: dict[str, Any], draw: SampleDrawer) -> None:
        sample = draw(params["train_size"], params["seed"])
        with tqdm(total=1, desc=f"training IVF{params['nlist']} on {len(sample)} vectors", disable=None) as bar:
            index.train(sample)
            bar.update()
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct(row) for query-by-cell

    def search_parameters(
        self, params: dict[str, Any], n: int, selector: faiss.IDSelector | None, effort: int
    ) -> faiss.SearchParameters:
        nprobe = min(params["nlist"], params["nprobe"] * effort)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]  # as in the base class

    def exhaustive(self, params: dict[str, Any], n: int, effort: int) -> bool:
        return int(params["nprobe"]) * effort >= int(params["nlist"])


class IVFPQParams(IVFParams):
    pq_m: int | None = Field(None, ge=1, description="IVFPQ: sub-quantisers (must divide the dimension)")
    pq_nbits: int = Field(8, ge=4, le=12, description="IVFPQ: bits per sub-quantiser code")


class IVFPQ(IVF):
    """IVF with product-quantised codes: for > 10M cells, trades recall for memory (never automatic)."""

    name = "ivfpq"
    Params = IVFPQParams
    auto_up_to = None

    def derive(self, params: dict[str, Any], n: int, dim: int) -> dict[str, Any]:
        params = super().derive(params, n, dim)
        pq_m = params["pq_m"] or _default_pq_m(dim)
        if dim % pq_m:
            raise MarrowLensError(f"pq_m={pq_m} must divide the dimension {dim}")
        params["pq_m"] = pq_m
        return params

    def factory(self, params: dict[str, Any]) -> str:
        return f"IVF{params['nlist']},PQ{params['pq_m']}x{params['pq_nbits']}"


def _default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` up to dim/8: 8 dimensions per one-byte code."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


# config.INDEX_KIND_CLASSES names them (this module's own classes resolve from it as it finishes importing).
INDEX_KINDS: dict[str, IndexKind] = {name: kind() for name, kind in load_registered(INDEX_KIND_CLASSES).items()}
