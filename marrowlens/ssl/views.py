"""Augmented views for stained single cells, built from lightly's SimCLR/DINO transforms.

Two adjustments for cell images, applied to every view lightly builds:
- crops always hold the image centre, where the cell is (:class:`CentredResizedCrop`), so no view
  shows only background, whatever the crop scale (DINO's small local crops included);
- stain jitter in haematoxylin-eosin-DAB optical-density space (:class:`StainJitter`), the
  augmentation of Tellez et al. (2018) that targets stain and scanner shift; colour jitter alone
  moves hue globally, which is not how stains vary.
Images are padded to square first, so resizing never distorts a cell.

Which views a method trains on is the method's choice (its ``build_views``, see ``ssl/methods.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightly.transforms.dino_transform import DINOTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.simclr_transform import SimCLRTransform
from PIL import Image
from skimage.color import hed2rgb, rgb2hed
from torchvision import transforms as T
from torchvision.transforms import functional as F

from marrowlens.cohort.images import pad_to_square
from marrowlens.config import PretrainConfig


class CentredResizedCrop(T.RandomResizedCrop):  # type: ignore[misc]  # torchvision ships no types
    """A RandomResizedCrop re-drawn until the crop holds the image centre (a centre crop after 20 tries)."""

    def forward(self, img: Image.Image) -> Image.Image:
        width, height = F.get_image_size(img)
        for _ in range(20):
            top, left, crop_h, crop_w = self.get_params(img, self.scale, self.ratio)
            if top <= height / 2 <= top + crop_h and left <= width / 2 <= left + crop_w:
                break
        else:
            side = int(min(width, height) * np.sqrt(self.scale[1]))
            top, left, crop_h, crop_w = (height - side) // 2, (width - side) // 2, side, side
        cropped: Image.Image = F.resized_crop(
            img, top, left, crop_h, crop_w, self.size, self.interpolation, antialias=self.antialias
        )
        return cropped


class StainJitter:
    """Randomly rescale and shift each stain's optical density (HED), then back to RGB.

    Hand-written (torchvision and lightly have no stain augmentation); the colour deconvolution
    itself is scikit-image's. Draws come from torch's RNG so views stay reproducible.
    """

    def __init__(self, sigma: float, prob: float) -> None:
        self.sigma, self.prob = sigma, prob

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.sigma <= 0 or float(torch.rand(())) >= self.prob:
            return image
        draws = (torch.rand(2, 3, dtype=torch.float64).numpy() * 2 - 1) * self.sigma
        hed = rgb2hed(np.asarray(image, dtype=np.float64) / 255.0)
        hed = hed * (1 + draws[0]) + draws[1] * np.abs(hed).mean(axis=(0, 1))
        rgb = np.clip(hed2rgb(hed), 0, 1)
        return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))

    def __repr__(self) -> str:
        return f"StainJitter(sigma={self.sigma}, prob={self.prob})"


class ShrinkTo:
    """Downscale a square image (never upscale) to at most ``side`` pixels.

    Crops are resized to the model's input anyway; shrinking a 360-px cell to twice the input size
    first keeps every crop at full input resolution (a crop side is at least ~0.55 of the image)
    while cutting the cost of every later step several-fold.
    """

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image) -> Image.Image:
        if max(image.size) <= self.side:
            return image
        return image.resize((self.side, self.side), Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"ShrinkTo({self.side})"


def _adapt(view_transform: T.Compose, stain: StainJitter, work_side: int) -> None:
    """Pad and shrink first, swap lightly's crops for centred ones, stain-jitter right after the crop."""
    steps = []
    for step in view_transform.transforms:
        if isinstance(step, T.RandomResizedCrop):
            steps += [CentredResizedCrop(step.size, step.scale, step.ratio, step.interpolation, step.antialias), stain]
        else:
            steps.append(step)
    view_transform.transforms = [T.Lambda(pad_to_square), ShrinkTo(work_side), *steps]


def _common(config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The settings every lightly transform takes from ``views:``."""
    views = config.views
    return {
        "hf_prob": views.hflip_prob,
        "vf_prob": views.vflip_prob,
        "rr_prob": views.rotate90_prob,
        "cj_prob": views.color_jitter_prob,
        "cj_strength": views.color_jitter_strength,
        "cj_hue": views.hue,
        "random_gray_scale": views.grayscale_prob,
        "normalize": {"mean": list(mean), "std": list(std)},
    }


def _for_cells(transform: MultiViewTransform, config: PretrainConfig) -> MultiViewTransform:
    """Every view of a lightly transform adapted to single cells (see the module docstring)."""
    views, size = config.views, config.model.image_size
    stain = StainJitter(views.stain_jitter_sigma, views.stain_jitter_prob)
    seen: set[int] = set()
    for view in transform.transforms:
        if id(view.transform) not in seen:  # SimCLR reuses one view object for both views
            seen.add(id(view.transform))
            _adapt(view.transform, stain, work_side=2 * size)
    return transform


def two_global_views(config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
    """Two views of the whole cell (lightly's SimCLR transform), for SimCLR, BYOL and VICReg."""
    views = config.views
    transform = SimCLRTransform(
        input_size=config.model.image_size,
        min_scale=views.min_scale,
        gaussian_blur=views.blur_prob,
        **_common(config, mean, std),
    )
    return _for_cells(transform, config)


def multi_crop_views(config: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> MultiViewTransform:
    """Two global views, then ``dino.n_local_views`` smaller local crops (lightly's DINO transform)."""
    views, dino = config.views, config.dino
    transform = DINOTransform(
        global_crop_size=config.model.image_size,
        global_crop_scale=(views.min_scale, 1.0),
        local_crop_size=dino.local_crop_size,
        local_crop_scale=dino.local_crop_scale,
        n_local_views=dino.n_local_views,
        gaussian_blur=(views.blur_prob, views.blur_prob / 3, views.blur_prob),
        solarization_prob=views.solarization_prob,
        **_common(config, mean, std),
    )
    return _for_cells(transform, config)
