"""The embedding store: ``vectors.npy`` (float32 N x D, memory-mapped) + ``cells.parquet`` + ``meta.json``.

Rows of ``vectors.npy`` and ``cells.parquet`` are aligned one to one. The writer fills a partial
file in place with ``os.pwrite`` (not a memory map, so the writer's resident memory does not grow
with the cohort) and keeps a one-byte-per-row "done" mask, so an interrupted embedding resumes
where it stopped. The finished file is renamed into place and fingerprinted, and every later step
names its embeddings by that fingerprint.

The fingerprint covers both files (sha256 of ``vectors.npy`` and of ``cells.parquet``): a store whose
rows were reordered or whose vectors were swapped would silently put every prediction and search
hit on another cell. Loading re-checks both digests; ``.verified.json`` remembers the (size, mtime,
ctime, inode) they were last verified at, so an unchanged store is not re-hashed on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import (
    clean_stale_temporaries,
    read_meta,
    read_parquet,
    sha256_file,
    write_json_atomic,
    write_meta,
    write_parquet_atomic,
)
from marrowlens.contracts import EmbeddingsMeta, EmbeddingsOrigin
from marrowlens.errors import MarrowLensError
from marrowlens.provenance import python_api

VECTORS_FILE = "vectors.npy"
CELLS_FILE = "cells.parquet"
_PARTIAL = "vectors.partial.npy"
_DONE = "done.partial.npy"
_PROGRESS = "progress.json"
_VERIFIED = ".verified.json"


@dataclass
class Embeddings:
    """A loaded store; ``vectors`` is a read-only memory map unless loaded into memory."""

    folder: Path
    vectors: np.ndarray
    cells: pd.DataFrame
    meta: EmbeddingsMeta

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def model_fingerprint(self) -> str:
        return self.meta.model.fingerprint

    def __len__(self) -> int:
        return len(self.cells)


def load_embeddings(folder: str | Path, mmap: bool = True, check_finite: bool = True) -> Embeddings:
    """Load a store; refuse missing files, misaligned rows and (by default) NaN/inf vectors."""
    folder = Path(folder)
    meta = read_meta(folder, EmbeddingsMeta)
    vectors_path = folder / VECTORS_FILE
    cells_path = folder / CELLS_FILE
    for path in (vectors_path, cells_path):
        if not path.is_file():
            raise MarrowLensError(f"{folder} is incomplete: {path.name} is missing")
    try:
        vectors = np.load(vectors_path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as exc:
        raise MarrowLensError(f"{vectors_path} is not a readable .npy array: {exc}") from exc
    cells = read_parquet(cells_path)
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise MarrowLensError(f"{vectors_path} must be a float32 N x D array, found {vectors.dtype} {vectors.shape}")
    if len(vectors) != len(cells):
        raise MarrowLensError(f"{folder}: {len(vectors)} vectors but {len(cells)} cells: the store is misaligned")
    if check_finite:
        bad = first_non_finite_row(vectors)
        if bad is not None:
            raise MarrowLensError(f"{vectors_path}: row {bad} (cell {cells['cell_id'].iloc[bad]}) holds NaN or inf")
    verify_store(folder, meta)
    return Embeddings(folder=folder, vectors=vectors, cells=cells, meta=meta)


def store_fingerprint(digests: dict[str, str]) -> str:
    """The store's name in later steps: one digest over the digests of its two files."""
    joined = "".join(f"{name}={digests[name]}\n" for name in (VECTORS_FILE, CELLS_FILE))
    return "sha256:" + hashlib.sha256(joined.encode("ascii")).hexdigest()


def _stats(folder: Path) -> dict[str, list[int]]:
    """What changes when a file is rewritten, replaced or touched: ctime and inode cannot be set back."""
    stats: dict[str, list[int]] = {}
    for name in (VECTORS_FILE, CELLS_FILE):
        st = (folder / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stats


def verify_store(folder: Path, meta: EmbeddingsMeta) -> None:
    """Refuse a store whose files are not the ones fingerprinted in its meta.json, naming the file.

    Hashing is skipped when ``.verified.json`` says this very fingerprint was checked against files
    with the same stats as now; a stale or missing record means hashing again.
    """
    digests = meta.digests or {}
    if set(digests) != {VECTORS_FILE, CELLS_FILE} or store_fingerprint(digests) != meta.fingerprint:
        raise MarrowLensError(
            f"{folder} was embedded before MarrowLens fingerprinted the cell table (or its meta.json was edited); "
            "embed it again with --overwrite"
        )
    stats = _stats(folder)
    record = folder / _VERIFIED
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()) == {"fingerprint": meta.fingerprint, "stats": stats}:
            return
    for name in (VECTORS_FILE, CELLS_FILE):
        if "sha256:" + sha256_file(folder / name) != digests[name]:
            raise MarrowLensError(
                f"{folder / name} does not match the fingerprint in {folder / 'meta.json'}: it was changed or replaced"
            )
    _remember_verified(folder, meta.fingerprint, stats)


def _remember_verified(folder: Path, fingerprint: str, stats: dict[str, list[int]]) -> None:
    """Record the stats the digests were checked at (taken before hashing); a read-only store just re-hashes."""
    with contextlib.suppress(OSError):
        write_json_atomic(folder / _VERIFIED, {"fingerprint": fingerprint, "stats": stats})


def first_non_finite_row(vectors: np.ndarray, block: int = 65536) -> int | None:
    """Index of the first row with NaN/inf, scanning in blocks (no full-size temporary)."""
    for start in range(0, len(vectors), block):
        finite = np.isfinite(vectors[start : start + block]).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


class EmbeddingWriter:
    """Fills a store row by row, resumably.

    ``key`` says what is being embedded (model and cohort fingerprints, image size); a partial
    store left by a run with another key is refused rather than mixed in. Several processes may
    write disjoint rows of the same store (one per device).
    """

    def __init__(self, folder: str | Path, n_rows: int, dim: int, key: dict[str, Any], create: bool = True) -> None:
        self.folder = Path(folder)
        self.n_rows, self.dim, self.key = n_rows, dim, key
        self.partial = self.folder / _PARTIAL
        self.done_path = self.folder / _DONE
        progress = self.folder / _PROGRESS
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(self.folder)
            if progress.is_file():
                old = json.loads(progress.read_text())
                if old != self._progress():
                    raise MarrowLensError(
                        f"{self.folder} holds an unfinished embedding of other inputs; pass --overwrite to discard it"
                    )
            else:
                self._create()
                write_json_atomic(progress, self._progress())
        header = np.load(self.partial, mmap_mode="r")
        if header.shape != (n_rows, dim):
            raise MarrowLensError(f"{self.partial} has shape {header.shape}, expected {(n_rows, dim)}")
        self._offset = header.offset
        del header
        self._fd = os.open(self.partial, os.O_WRONLY)
        self._done = np.load(self.done_path, mmap_mode="r+")

    def _progress(self) -> dict[str, Any]:
        return {"key": self.key, "n_rows": self.n_rows, "dim": self.dim}

    def _create(self) -> None:
        """Write the .npy header and size the file; the data area stays sparse until written."""
        for path in (self.partial, self.done_path):
            path.unlink(missing_ok=True)
        with open(self.partial, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (self.n_rows, self.dim),
                },
            )
            handle.truncate(handle.tell() + self.n_rows * self.dim * 4)
        np.save(self.done_path, np.zeros(self.n_rows, dtype=np.uint8))

    def pending(self) -> np.ndarray:
        """Row indices still to embed, in order."""
        return np.flatnonzero(self._done == 0)

    def write(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Write ``vectors`` at ``rows`` (any order), then mark them done."""
        rows = np.asarray(rows, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(rows), self.dim):
            raise ValueError(f"expected {(len(rows), self.dim)} vectors, got {vectors.shape}")
        bad = first_non_finite_row(vectors)
        if bad is not None:
            raise MarrowLensError(
                f"row {int(rows[bad])} holds NaN or inf (from a model: check its weights and precision)"
            )
        order = np.argsort(rows, kind="stable")
        rows, vectors = rows[order], vectors[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run_rows, run_vectors in zip(np.split(rows, breaks), np.split(vectors, breaks)):
            offset = self._offset + int(run_rows[0]) * self.dim * 4
            data = run_vectors.tobytes()
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + written)
        self._done[rows] = 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._done.flush()

    def finish(self, cells: pd.DataFrame, origin: EmbeddingsOrigin) -> Embeddings:
        """Check every row is written, fingerprint, move into place, write cells and meta."""
        self.close()
        missing = int((self._done == 0).sum())
        if missing:
            raise MarrowLensError(f"{self.folder}: {missing} rows were never embedded; run again to resume")
        if len(cells) != self.n_rows:
            raise ValueError("cells and vectors differ in length")
        fd = os.open(self.partial, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        (self.folder / _VERIFIED).unlink(missing_ok=True)
        digests = {VECTORS_FILE: "sha256:" + sha256_file(self.partial)}
        write_parquet_atomic(self.folder / CELLS_FILE, cells.reset_index(drop=True))
        digests[CELLS_FILE] = "sha256:" + sha256_file(self.folder / CELLS_FILE)
        os.replace(self.partial, self.folder / VECTORS_FILE)
        fingerprint = store_fingerprint(digests)
        meta = EmbeddingsMeta(
            n=self.n_rows,
            dim=self.dim,
            fingerprint=fingerprint,
            digests=digests,
            model=origin.model,
            cohort=origin.cohort,
            preprocessing=origin.preprocessing,
        )
        write_meta(self.folder, meta)
        _remember_verified(self.folder, fingerprint, _stats(self.folder))
        del self._done
        self.done_path.unlink(missing_ok=True)
        (self.folder / _PROGRESS).unlink(missing_ok=True)
        # Every row was checked as it was written; scanning the map again would page the whole
        # store into this process's resident memory.
        return load_embeddings(self.folder, check_finite=False)


@python_api
def write_embeddings(
    folder: str | Path, vectors: np.ndarray, cells: pd.DataFrame, origin: EmbeddingsOrigin | Mapping[str, Any]
) -> Embeddings:
    """Write a whole in-memory store at once (small stores, tests, derived stores).

    ``origin`` (or its JSON form: ``{"model": ..., "cohort": ..., "preprocessing": ...}``) says what made the vectors.
    """
    origin = EmbeddingsOrigin.model_validate(origin)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = EmbeddingWriter(
        folder, len(vectors), int(vectors.shape[1]), key={"in_memory": True, **origin.model.model_dump(mode="json")}
    )
    writer.write(np.arange(len(vectors)), vectors)
    return writer.finish(cells, origin)
