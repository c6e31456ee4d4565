"""Known label noise, injected into training labels only (the noise-sweep experiment).

- ``symmetric``: each training cell's label is replaced, with probability ``rate``, by one of the
  other classes chosen uniformly (Zhang & Sabuncu's and Wang et al.'s setting).
- ``bag``: with probability ``rate`` a whole training patient is relabelled to another class
  (every cell of the patient shifted by the same non-zero class offset): a wrong patient-level
  label, the kind of noise a mislabelled diagnosis puts into every one of a patient's cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

NoiseKind = Literal["symmetric", "bag"]
_STREAM = 0x6E6F6973  # "nois": separates the noise stream from other generators seeded alike


@dataclass(frozen=True)
class NoiseSpec:
    rate: float
    kind: NoiseKind = "symmetric"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"noise rate must be in [0, 1], not {self.rate}")
        if self.kind not in ("symmetric", "bag"):
            raise ValueError(f"noise kind must be symmetric or bag, not {self.kind!r}")


def inject_noise(labels: np.ndarray, classes: Sequence[str], spec: NoiseSpec, groups: np.ndarray) -> np.ndarray:
    """A noisy copy of ``labels``; the input is left alone."""
    labels = np.asarray(labels).astype(str)
    classes = list(classes)
    rng = np.random.default_rng([spec.seed, _STREAM])  # its own stream: never the data's draws for seed 0
    codes = np.array([classes.index(c) for c in labels], dtype=np.int64)
    if spec.kind == "symmetric":
        flip = rng.random(len(codes)) < spec.rate
        shift = rng.integers(1, len(classes), size=len(codes))
    else:
        patients, which = np.unique(np.asarray(groups), return_inverse=True)
        flip = (rng.random(len(patients)) < spec.rate)[which]
        shift = rng.integers(1, len(classes), size=len(patients))[which]
    noisy = np.where(flip, (codes + shift) % len(classes), codes)
    return np.asarray(classes, dtype=object)[noisy].astype(str)
