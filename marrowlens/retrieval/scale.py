"""What a similarity means in one index: its percentile among random pairs of the indexed cells.

A cosine of 0.88 is high in one embedding space and ordinary in another, so the web page shows
each neighbour's similarity beside the share of random cell pairs of *this* index that are less
similar. :meth:`SimilarityScale.of` samples ``pairs`` pairs of distinct rows with a fixed seed
(20,000 dot products of stored vectors: milliseconds, done once when the server starts). For an
L2 index the scale is over distances, and a smaller distance ranks higher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marrowlens.retrieval.index import CellIndex

DEFAULT_PAIRS = 20_000
SEED = 0


@dataclass(frozen=True)
class SimilarityScale:
    """Sorted similarities (cosine) or distances (l2) of random pairs of indexed cells."""

    metric: str
    sample: np.ndarray  # sorted ascending

    @classmethod
    def of(cls, index: CellIndex, pairs: int = DEFAULT_PAIRS, seed: int = SEED) -> SimilarityScale:
        n = len(index)
        if n < 2:
            return cls(metric=index.metric, sample=np.empty(0))
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=pairs)
        second = (first + rng.integers(1, n, size=pairs)) % n  # never the same row
        rows, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
        vectors = np.asarray(index.index.reconstruct_batch(rows.astype(np.int64)), dtype=np.float64)
        a, b = vectors[inverse[:pairs]], vectors[inverse[pairs:]]
        if index.metric == "cosine":
            values = np.einsum("ij,ij->i", a, b)
        else:
            values = np.linalg.norm(a - b, axis=1)
        return cls(metric=index.metric, sample=np.sort(values))

    def percentile(self, value: float | None) -> float | None:
        """Share (0-100) of random pairs less similar than ``value`` (a similarity, or an l2 distance)."""
        if value is None or not np.isfinite(value) or len(self.sample) == 0:
            return None
        if self.metric == "cosine":
            below = np.searchsorted(self.sample, value, side="left")
        else:  # farther pairs are less similar
            below = len(self.sample) - np.searchsorted(self.sample, value, side="right")
        return round(100.0 * float(below) / len(self.sample), 1)

    def quantiles(self) -> dict[str, float]:
        """The sample's median and upper percentiles, for the page's one-line explanation."""
        if len(self.sample) == 0:
            return {}
        return {f"p{q}": round(float(np.percentile(self.sample, q)), 3) for q in (50, 90, 99)}
