"""MarrowLens from Python: load what the commands wrote, embed images in memory, predict, search.

Every name here is also importable from the package itself (``import marrowlens as ml``;
``ml.load_embeddings(...)``), loaded on first use, so ``import marrowlens`` stays light. Each function
is a thin front to the code the commands run (the same preprocessing, prediction and search), and
refuses bad input with a one-line :class:`~marrowlens.errors.MarrowLensError`, as the commands do::

    import marrowlens as ml

    emb = ml.load_embeddings("emb/")
    probe = ml.load_probe("probes/mutation", emb)
    result = ml.predict(probe, emb)  # result.cells, result.patients
    index = ml.load_index("idx/")
    hits = ml.search(index, "cell.png", k=5)
    vectors = ml.embed_images(index, ["cell.png"])

torch and FAISS are imported by the functions that need them, when first called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import pandas as pd
from PIL import Image

from marrowlens.cohort.manifest import Cohort
from marrowlens.cohort.manifest import load_cohort as _load_cohort
from marrowlens.embeddings import Embeddings
from marrowlens.embeddings import load_embeddings as _load_embeddings
from marrowlens.errors import MarrowLensError

if TYPE_CHECKING:
    from torch import nn

    from marrowlens.contracts import BackboneRecord
    from marrowlens.probes.tasks import Probe
    from marrowlens.retrieval.search import Searcher

__all__ = [
    "Cohort",
    "Embeddings",
    "MarrowLensError",
    "Predictions",
    "embed_images",
    "load_cohort",
    "load_embeddings",
    "load_index",
    "load_probe",
    "predict",
    "search",
]

ImageLike: TypeAlias = "Image.Image | str | Path"
"""An image in memory, or the path of an image file (decoded as ``marrowlens cohort index`` decodes cells)."""
ModelLike: TypeAlias = "Searcher | Embeddings | str | Path"
"""Whose backbone embeds: an index (:func:`load_index`), a store (its recorded backbone), a run folder, a timm name."""
Filters: TypeAlias = "Mapping[str, str | bool | Sequence[str]] | Sequence[str] | None"


def load_cohort(folder: str | Path) -> Cohort:
    """Load a cohort folder written by ``marrowlens cohort index``.

    Returns a :class:`~marrowlens.cohort.manifest.Cohort`: ``cells`` (a DataFrame, one row per cell:
    ``cell_id``, ``path``, ``patient_id``, ``cell_type``, ``is_blast``, ``mutation``, ...), ``root``
    (the folder the paths are relative to; ``cohort.image_path(cells.path[i])`` is a cell's file) and ``meta``.
    """
    return _load_cohort(folder)


def load_embeddings(folder: str | Path, mmap: bool = True) -> Embeddings:
    """Load an embedding store written by ``marrowlens embed``.

    Returns an :class:`~marrowlens.embeddings.Embeddings`: ``vectors`` (float32 N x D numpy array,
    read-only and memory-mapped unless ``mmap=False``), ``cells`` (a DataFrame row-aligned with the
    vectors) and ``meta`` (the backbone, cohort and preprocessing that made it). A store whose files do
    not match its fingerprint, or that holds NaN/inf, is refused.
    """
    return _load_embeddings(folder, mmap=mmap)


def load_probe(folder: str | Path, embeddings: Embeddings | str | Path | None = None) -> Probe:
    """Load a probe written by ``marrowlens probe fit``, to apply to ``embeddings`` (a store or its folder).

    Without ``embeddings`` the store the probe was fitted on is loaded (it must still be where it was).
    A store of another backbone is refused, naming both. Returns the
    :class:`~marrowlens.probes.tasks.Probe` (``classes``; for a mutation probe its ``blast`` filter and
    ``patient_head``), for :func:`predict`.
    """
    from marrowlens.probes.folder import load_probe as _load_probe
    from marrowlens.probes.folder import read_probe_info

    folder = Path(folder)
    if embeddings is None:
        where = read_probe_info(folder)["embeddings"]["folder"]
        try:
            embeddings = _load_embeddings(where)
        except MarrowLensError as exc:
            raise MarrowLensError(
                f"probe {folder} was fitted on {where}, which cannot be read ({exc}); pass the store to apply it to"
            ) from None
    elif not isinstance(embeddings, Embeddings):
        embeddings = _load_embeddings(embeddings)
    probe, _info = _load_probe(folder, embeddings)
    return probe


def load_index(folder: str | Path, model: str | Path | None = None) -> Searcher:
    """Load an index written by ``marrowlens index build`` and the backbone that made its vectors.

    ``model`` says where that backbone is now, if its run folder moved (its fingerprint is still checked).
    Returns a :class:`~marrowlens.retrieval.search.Searcher`: ``index.cells`` (a DataFrame, row = FAISS
    id), ``index.meta``; pass it to :func:`search` and :func:`embed_images`.
    """
    from marrowlens.retrieval.search import Searcher

    return Searcher.open(folder, model)


def _decode(images: ImageLike | Sequence[ImageLike]) -> list[Image.Image]:
    """PIL images as they are; paths decoded with the cohort's decoder (a bad file is a one-line error)."""
    from marrowlens.retrieval.search import load_query_images

    items: list[ImageLike] = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
    decoded: list[Image.Image] = []
    for item in items:
        if isinstance(item, Image.Image):
            decoded.append(item)
        elif isinstance(item, (str, Path)):
            decoded += load_query_images([item])
        else:
            raise MarrowLensError(
                f"an image must be a PIL image or the path of an image file, not {type(item).__name__}"
            )
    return decoded


def embed_images(
    model: ModelLike, images: ImageLike | Sequence[ImageLike], batch_size: int = 64, image_size: int | None = None
) -> np.ndarray:
    """Embed images in memory, exactly as ``marrowlens embed`` embeds a cohort's cells.

    ``model`` is an index from :func:`load_index` (its loaded backbone, the fastest for repeated calls),
    a store from :func:`load_embeddings` (its recorded backbone and stain normalisation, loaded per call
    and checked against its fingerprint), a pretraining run folder, or a timm name (random init, at
    ``image_size``). ``images``: one image or a list, each a PIL image or an image file's path;
    ``batch_size`` images go through the model at once (an index embeds with its own batching).
    Returns a float32 numpy array, one row per image, the store's width: the same image gives the
    vector its store holds.
    """
    from marrowlens.retrieval.search import Searcher
    from marrowlens.ssl.backbones import load_backbone
    from marrowlens.ssl.embed import embed_images as _embed
    from marrowlens.ssl.embed import stain_target_of

    if batch_size < 1:
        raise MarrowLensError(f"batch_size must be at least 1, not {batch_size}")
    decoded = _decode(images)
    if isinstance(model, Searcher):
        return model.embed(decoded)
    if isinstance(model, Embeddings):
        net, info = _store_backbone(model)
        return _embed(net, info, decoded, batch_size=batch_size, stain=stain_target_of(model.meta))
    net, info = load_backbone(model, image_size=image_size)
    return _embed(net, info, decoded, batch_size=batch_size)


def _store_backbone(emb: Embeddings) -> tuple[nn.Module, BackboneRecord]:
    """The backbone a store records, checked against its fingerprint."""
    from marrowlens.artifacts import require_same_fingerprint
    from marrowlens.retrieval.search import backbone_reference
    from marrowlens.ssl.backbones import load_backbone

    record = emb.meta.model
    hint = "pass its run folder (where it is now) instead of the store"
    reference, weights = backbone_reference(record, None, Path(emb.folder), what="embeddings", hint=hint)
    net, info = load_backbone(reference, weights=weights, image_size=record.image_size)
    require_same_fingerprint(
        "backbone fingerprint",
        emb.model_fingerprint,
        f"embeddings {emb.folder}",
        info.fingerprint,
        f"model {reference}",
    )
    return net, info


@dataclass
class Predictions:
    """What :func:`predict` returns.

    ``cells``: one row per cell, in the input's order: ``kept`` (False: the mutation probe's blast
    filter dropped it), ``predicted`` (a class; None when dropped), ``confidence``, ``p_<class>`` per
    class; for a store also ``cell_id`` and ``patient_id`` first and each cell's ``contribution`` to its
    patient's call last (the columns of ``marrowlens probe predict``'s parquet).
    ``patients``: for a store, one row per patient (``patient_id``, ``n_cells``, ``n_kept``, ``predicted``
    ("undetermined" when no cell was kept), ``confidence``, ``p_<class>``, ``frac_<class>``): the
    mutation probe's patient head, the mean of the cells' calls for other probes; None for bare vectors.
    """

    cells: pd.DataFrame
    patients: pd.DataFrame | None


def predict(probe: Probe, data: Embeddings | np.ndarray) -> Predictions:
    """Apply a probe from :func:`load_probe` to a store (every cell) or to vectors (e.g. from :func:`embed_images`).

    A store of another backbone than the probe's is refused; vectors of another width too (vectors
    carry no fingerprint: they must come from the probe's backbone). Same results as ``probe predict``.
    """
    from marrowlens.probes.commands import cell_predictions, predictions
    from marrowlens.probes.folder import read_probe_info, require_same_model

    if isinstance(data, Embeddings):
        if probe.source is not None:
            require_same_model(read_probe_info(probe.source), probe.source, data)
        cells, patients = predictions(probe, data)
        return Predictions(cells=cells, patients=patients)
    vectors = np.asarray(data, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    width = getattr(probe.head, "n_features_in_", None)
    if vectors.ndim != 2 or (width is not None and vectors.shape[1] != width):
        raise MarrowLensError(f"the probe takes N x {width} vectors, not an array of shape {np.shape(data)}")
    kept, proba = probe.predict_rows(vectors, np.arange(len(vectors)))
    return Predictions(cells=cell_predictions(probe.classes, kept, proba), patients=None)


def _filter_texts(filters: Filters) -> list[str]:
    """``{"mutation": ["NPM1", "control"], "is_blast": True}`` as the CLI's ``column=value,value`` strings."""
    if filters is None:
        return []
    if isinstance(filters, Mapping):
        texts = []
        for column, values in filters.items():
            given = [values] if isinstance(values, (str, bool)) else list(values)
            texts.append(f"{column}=" + ",".join(map(str, given)))
        return texts
    if isinstance(filters, str):
        return [filters]
    return list(filters)


def search(
    index: Searcher,
    query: ImageLike | np.ndarray,
    k: int = 10,
    filters: Filters = None,
) -> pd.DataFrame:
    """The ``k`` indexed cells nearest to ``query``, nearest first.

    ``query``: a PIL image or an image file (embedded as ``marrowlens embed`` embeds cells; an image of an
    indexed cell finds that cell first, similarity ~1), a vector of the index's width, or the id (or a
    unique prefix of 6+ characters) of an indexed cell, which is left out of its own neighbours as with
    ``marrowlens search --cell-id``. A string is a file when one exists at that path, else a cell id.
    ``filters``: ``{"mutation": "NPM1", "is_blast": True}`` or ``["mutation=NPM1,control"]`` (every
    column must match, any of a column's values may).
    Returns a DataFrame: ``rank``, ``row`` (in the index), ``cell_id``, ``patient_id``, ``cell_type``,
    ``is_blast``, ``mutation``, ``domain``, ``split``, ``path``, ``similarity`` (cosine; NaN for an L2
    index) and ``distance``.
    """
    from marrowlens.retrieval.search import UnknownCellError, parse_filters

    wanted = parse_filters(_filter_texts(filters))
    if isinstance(query, np.ndarray):
        vectors = np.asarray(query, dtype=np.float32).reshape(1, -1) if query.ndim == 1 else query
        dim = index.index.meta.dim
        if vectors.shape != (1, dim):
            raise MarrowLensError(f"a query vector has {dim} values (the index's width), not shape {query.shape}")
        return index.search_vectors(np.ascontiguousarray(vectors, dtype=np.float32), k, wanted)[0]
    if isinstance(query, (Image.Image, Path)) or Path(query).is_file():
        return index.search_vectors(embed_images(index, [query]), k, wanted)[0]
    try:
        row = index.row_of(query)
    except UnknownCellError:
        raise UnknownCellError(f"{query!r} is neither an image file nor the id of an indexed cell") from None
    table = index.search_cells([row], k, wanted)[0]
    table.attrs["query_cell"] = str(index.index.cells["cell_id"].iloc[row])
    return table
