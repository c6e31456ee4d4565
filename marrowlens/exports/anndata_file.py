"""An embedding store as an AnnData ``.h5ad`` file (scanpy and friends read it directly).

Vectors go to ``.X`` (float32, one row per cell) or, with ``obsm=True``, to ``.obsm["X_marrowlens"]``
with an empty ``.X``; the cell table becomes ``.obs`` indexed by ``cell_id``; the store's meta.json
goes to ``.uns["marrowlens"]``. The vectors are copied from the memory-mapped ``vectors.npy`` into
the file block by block (h5py), so a 100k x 512 store never sits in memory twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path
from marrowlens.embeddings import load_embeddings
from marrowlens.errors import MarrowLensError

OBSM_KEY = "X_marrowlens"
BLOCK_ROWS = 8192
_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}


@dataclass
class AnnDataExport:
    path: Path
    n: int
    dim: int
    where: str  # "X" or "obsm['X_marrowlens']"


def obs_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The cell table as h5ad stores it: indexed by ``cell_id`` (plain strings), text as categoricals.

    Text columns (pandas ``string``/object) become categoricals, missing values staying missing (what
    scanpy does too, and what every anndata release reads); nullable booleans and integers keep their
    ``<NA>`` (anndata's nullable encodings), so an unknown ``is_blast`` is not read back as False.
    """
    if "cell_id" not in cells:
        raise MarrowLensError("the store's cells.parquet has no cell_id column")
    ids = cells["cell_id"].astype(str)
    if ids.duplicated().any():
        raise MarrowLensError(
            f"cell ids are not unique (e.g. {ids[ids.duplicated()].iloc[0]!r}); h5ad needs unique ones"
        )
    obs = cells.drop(columns=["cell_id"])
    obs.index = pd.Index(ids.to_numpy(dtype=object), dtype=object, name="cell_id")
    for column in obs.columns:
        dtype = obs[column].dtype
        if isinstance(dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_string_dtype(dtype) or dtype == object:
            obs[column] = obs[column].astype("string").astype("category")
    return obs


def plain(value: Any) -> Any:
    """A JSON-able value h5ad can hold: None dropped from mappings, tuples as lists, no empty lists of None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value if v is not None]
    return value


def export_anndata(
    embeddings: str | Path, out: str | Path, obsm: bool = False, overwrite: bool = False
) -> AnnDataExport:
    """Write ``out`` (.h5ad) from a store; refuses an existing file unless ``overwrite``."""
    try:
        import anndata as ad
        import h5py
    except ImportError as exc:
        raise MarrowLensError(f"export anndata needs anndata ({exc}): pip install 'marrowlens[anndata]'") from None

    out = Path(out)
    if out.suffix != ".h5ad":
        raise MarrowLensError(f"{out} should end in .h5ad")
    if out.exists() and (out.is_dir() or not overwrite):
        raise MarrowLensError(f"{out} already exists; pass --overwrite to replace it")
    store = load_embeddings(embeddings, mmap=True)
    n, dim = store.vectors.shape
    obs = obs_table(store.cells)
    names = pd.Index([f"dim_{i}" for i in range(dim)], dtype=object)
    var = pd.DataFrame(index=pd.Index([], dtype=object) if obsm else names)
    uns = {"marrowlens": plain({"store": str(store.folder.resolve()), **store.meta.model_dump(mode="json")})}
    adata = ad.AnnData(obs=obs, var=var, uns=uns)
    with atomic_path(out) as tmp:
        with ad.settings.override(allow_write_nullable_strings=True):  # pandas 3 indexes are string arrays
            adata.write_h5ad(tmp)
        with h5py.File(tmp, "r+") as handle:
            group = handle["obsm"] if obsm else handle
            dataset = group.create_dataset(OBSM_KEY if obsm else "X", shape=(n, dim), dtype=np.float32)
            dataset.attrs.update(_ARRAY)
            for start in range(0, n, BLOCK_ROWS):
                dataset[start : start + BLOCK_ROWS] = store.vectors[start : start + BLOCK_ROWS]
    return AnnDataExport(path=out, n=n, dim=dim, where=f"obsm[{OBSM_KEY!r}]" if obsm else "X")
