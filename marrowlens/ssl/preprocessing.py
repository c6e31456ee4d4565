"""How a backbone sees a cell at eval time: one record (after timm's ``PretrainedCfg``) and one transform.

The record (``marrowlens.contracts.Preprocessing``) is saved with the backbone (``backbone.json``).
Training's online k-NN check, ``embed``, ``search`` and the web page all build their preprocessing
from it by :func:`eval_transform`, so a query image is fed to the backbone exactly as the indexed
cells were.
"""

from __future__ import annotations

from typing import Any, Literal

import timm
from torchvision import transforms as T

from marrowlens.cohort.crop import CellCrop
from marrowlens.cohort.images import pad_to_square
from marrowlens.cohort.stain import ReinhardNormalize, ReinhardTarget
from marrowlens.contracts import Preprocessing

# ImageNet's statistics: what timm models without a pretrained config are normalised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB = tuple[float, float, float]
Crop = Literal["full", "cell", "centred"]


def crop_counts(transform: T.Compose) -> tuple[int, int] | None:
    """(cells found, centre crops) of a transform's cell-crop step so far; None without one."""
    for step in transform.transforms:
        if isinstance(step, CellCrop):
            return step.counts
        if isinstance(step, T.Compose):
            inner = crop_counts(step)
            if inner is not None:
                return inner
    return None


def default_norm(timm_name: str) -> tuple[RGB, RGB]:
    """The mean and std of the timm model's pretrained config (ImageNet's when it has none)."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return _rgb(cfg.mean), _rgb(cfg.std)


def _rgb(values: Any) -> RGB:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def for_backbone(timm_name: str, image_size: int, crop: Crop = "full") -> Preprocessing:
    """A timm model's record at ``image_size``: what training normalises its views with."""
    mean, std = default_norm(timm_name)
    return Preprocessing(image_size=image_size, mean=mean, std=std, crop=crop)


def resize_transform(record: Preprocessing) -> T.Compose:
    """The geometric part: (the cell's square,) pad to square (cells sit in the centre), resize to the input size."""
    steps: list[Any] = [CellCrop(keep_size=record.crop == "centred")] if record.crop != "full" else []
    steps += [T.Lambda(pad_to_square)] if record.pad_to_square else []
    size = (record.image_size, record.image_size)
    steps.append(T.Resize(size, interpolation=T.InterpolationMode(record.interpolation), antialias=True))
    return T.Compose(steps)


def eval_transform(record: Preprocessing, stain: ReinhardTarget | None = None) -> T.Compose:
    """The one eval-time feature-extractor input: resize, (stain-normalise), to tensor, normalise."""
    steps: list[Any] = [resize_transform(record)]
    if stain is not None:
        steps.append(ReinhardNormalize(stain))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(record.mean, record.std)])
