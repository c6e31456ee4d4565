"""What a learned embedding must beat, made as ordinary stores so that the same probes run on them: raw pixels
(each cell resized, flattened) here; a random-init backbone is ``embed_cohort`` with a bare timm name."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from marrowlens.artifacts import META_FILE
from marrowlens.cohort.images import load_rgb
from marrowlens.cohort.manifest import load_cohort
from marrowlens.contracts import CohortRef
from marrowlens.embeddings import Embeddings, load_embeddings, write_embeddings
from marrowlens.provenance import python_api

PIXEL_SIDE = 24


@python_api
def pixel_store(cohort_dir: Path, out: Path, side: int = PIXEL_SIDE) -> Embeddings:
    """Raw pixels as a store: each cell resized to ``side`` x ``side`` RGB, scaled to [0, 1], flattened.

    A finished store of the same cohort and side is kept as it is.
    """
    cohort_dir, out = Path(cohort_dir), Path(out)
    cohort = load_cohort(cohort_dir)
    name = f"raw_pixels_{side}"
    fingerprint = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    if (out / META_FILE).is_file():
        store = load_embeddings(out)
        made_from = store.meta.cohort.fingerprint if store.meta.cohort is not None else None
        if store.model_fingerprint == fingerprint and made_from == cohort.meta.fingerprint:
            return store
    cells = cohort.cells
    vectors = np.zeros((len(cells), side * side * 3), dtype=np.float32)
    for i, path in enumerate(tqdm(cells["path"].astype(str), desc="raw pixels", unit="cell", disable=None)):
        image = load_rgb(cohort.image_path(path)).resize((side, side))
        vectors[i] = np.asarray(image, dtype=np.float32).ravel() / 255
    model = {
        "timm_name": name,
        "image_size": side,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "num_features": vectors.shape[1],
        "fingerprint": fingerprint,
        "source": f"raw pixels, {side} x {side} RGB",
    }
    ref = CohortRef(folder=str(cohort_dir.resolve()), fingerprint=cohort.meta.fingerprint)
    return write_embeddings(out, vectors, cells, {"model": model, "cohort": ref.model_dump()})
