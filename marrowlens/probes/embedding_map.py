"""2-D UMAP coordinates of a probe's evaluated cells, for the report's embedding map.

TODO: merge with :mod:`marrowlens.maps` (umap-learn coordinates of vectors, fixed seed, subsampling), written
on another branch at the same time; this module exists only so that the two branches do not clash.
"""

from __future__ import annotations

import warnings

import numpy as np

MAX_POINTS = 5000
MIN_POINTS = 8  # fewer cells make no map worth drawing


def subsample(n: int, limit: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """At most ``limit`` of ``n`` row numbers, sorted, the same ones every time (fixed seed)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def umap_coordinates(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP of ``vectors`` (n x d) to n x 2, reproducible (``random_state``, hence single-threaded)."""
    import umap

    n = len(vectors)
    if n < MIN_POINTS:
        raise ValueError(f"{n} cells are too few for a map (at least {MIN_POINTS})")
    reducer = umap.UMAP(
        n_components=2,
        random_state=seed,
        n_neighbors=max(2, min(15, n - 1)),
        min_dist=0.1,
        init="spectral" if n > 32 else "random",
    )
    with warnings.catch_warnings():  # random_state's note that it disables parallelism; tiny-graph notes
        warnings.simplefilter("ignore")
        coords = reducer.fit_transform(np.asarray(vectors, dtype=np.float32))
    return np.asarray(coords, dtype=np.float64)
