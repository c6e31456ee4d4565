"""Stain normalisation (Reinhard et al. 2001): match each image's colour statistics in CIE-Lab to
a target, so cells from another centre, stain batch or scanner look like the training cohort.

Hand-written (a few lines; none of our libraries ships it); scikit-image does the colour-space
conversions. The target is fitted on a sample of the cohort being embedded and stored in the
embedding store's meta.json, so query images at search time are normalised the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage.color import lab2rgb, rgb2lab


@dataclass(frozen=True)
class ReinhardTarget:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"method": "reinhard", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReinhardTarget | None:
        if not data or data.get("method") != "reinhard":
            return None
        return cls(tuple(data["mean"]), tuple(data["std"]))


def _lab_stats(image: Image.Image) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    lab = rgb2lab(np.asarray(image, dtype=np.float64) / 255.0).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0) + 1e-6


def fit_reinhard(images: Iterable[Image.Image]) -> ReinhardTarget:
    """The average Lab mean and spread of ``images``."""
    stats = [_lab_stats(image) for image in images]
    if not stats:
        raise ValueError("no images to fit a stain target on")
    means, stds = zip(*stats)
    return ReinhardTarget(
        tuple(np.mean(means, axis=0).round(4).tolist()), tuple(np.mean(stds, axis=0).round(4).tolist())
    )


class ReinhardNormalize:
    """A transform: re-colour an RGB image to the target's Lab statistics."""

    def __init__(self, target: ReinhardTarget) -> None:
        self.mean, self.std = np.asarray(target.mean), np.asarray(target.std)

    def __call__(self, image: Image.Image) -> Image.Image:
        lab = rgb2lab(np.asarray(image, dtype=np.float64) / 255.0)
        flat = lab.reshape(-1, 3)
        lab = (lab - flat.mean(axis=0)) / (flat.std(axis=0) + 1e-6) * self.std + self.mean
        rgb = np.clip(lab2rgb(lab), 0, 1)
        return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))

    def __repr__(self) -> str:
        return f"ReinhardNormalize(mean={self.mean.tolist()}, std={self.std.tolist()})"
