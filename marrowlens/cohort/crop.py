"""Cell-centred crops: find the white cell of a single-cell image and cut a square around it.

A CellaVision-style crop (~360 px) shows one white cell in the middle with red cells around it;
shrinking the whole frame to 64-96 px loses the chromatin and granules that tell cell types apart.
Cutting a square around the white cell first keeps them. No library finds "the" cell of such a
crop, so this is hand-written on scikit-image: the haematoxylin channel of a colour deconvolution
(``rgb2hed``; nuclei and white-cell cytoplasm, not red cells) is thresholded by Otsu's method,
closed, and the connected component under the image centre (else the largest one near it) is the
cell; its bounding box grown by a margin on each side, squared, is the crop. An image where no
such component is found falls back to a centre crop, and is counted (:class:`CellCrop.counts`).

Two ways to cut (``data.crop``): ``cell`` fits the square to the cell, so every cell fills the frame and
its size is lost; ``centred`` cuts a square of fixed side (a fraction of the image) centred on the cell, so
the cell keeps its size against its neighbours (blasts and promyelocytes are large) while the input's
pixels still go to the middle of the frame.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops
from skimage.morphology import closing, disk, remove_small_objects

WORK_SIDE = 128  # the cell is found on a copy this small: the box only needs to be right to a few pixels
MARGIN = 0.3  # of the cell's size, added on each side (0.25 clipped some cytoplasm on DeepAPL blasts)
MIN_AREA = 0.01  # of the image: smaller components are debris or platelets
FALLBACK = 0.6  # side of the centre crop, and of every ``centred`` crop, as a fraction of the image's short side


@dataclass(frozen=True)
class Box:
    """A square in image pixels (left, top, side); it may reach past the image's edges."""

    left: int
    top: int
    side: int


def find_cell(image: Image.Image) -> Box | None:
    """The square around the white cell nearest the centre, or None when none is found."""
    scale = WORK_SIDE / max(image.size)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    haematoxylin = rgb2hed(np.asarray(small.convert("RGB"), dtype=np.float64) / 255.0)[..., 0]
    if np.ptp(haematoxylin) < 1e-6:
        return None
    mask = closing(haematoxylin > threshold_otsu(haematoxylin), disk(2))  # type: ignore[no-untyped-call]
    mask = remove_small_objects(mask, max_size=int(MIN_AREA * mask.size))
    labels = label(mask)  # type: ignore[no-untyped-call]
    regions = regionprops(labels)  # type: ignore[no-untyped-call]
    height, width = mask.shape
    centre = np.array([height / 2, width / 2])
    under_centre = labels[height // 2, width // 2]
    near = [r for r in regions if np.linalg.norm(np.asarray(r.centroid) - centre) < 0.25 * min(height, width)]
    chosen = [r for r in regions if r.label == under_centre] or near
    if not chosen:
        return None
    region = max(chosen, key=lambda r: r.area)
    top, left, bottom, right = (v / scale for v in region.bbox)
    side = max(bottom - top, right - left) * (1 + 2 * MARGIN)
    middle_y, middle_x = (top + bottom) / 2, (left + right) / 2
    return Box(round(middle_x - side / 2), round(middle_y - side / 2), max(1, round(side)))


def centre_box(image: Image.Image) -> Box:
    side = max(1, round(FALLBACK * min(image.size)))
    return Box((image.width - side) // 2, (image.height - side) // 2, side)


def centred_on(cell: Box, image: Image.Image) -> Box:
    """The fixed-side square of :func:`centre_box`, moved to the cell's centre: the cell keeps its size."""
    side = centre_box(image).side
    middle_x, middle_y = cell.left + cell.side / 2, cell.top + cell.side / 2
    return Box(round(middle_x - side / 2), round(middle_y - side / 2), side)


def cut(image: Image.Image, box: Box) -> Image.Image:
    """The square ``box`` of ``image``; parts past the edges are filled with the border's median colour."""
    array = np.asarray(image.convert("RGB"))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    square = Image.new("RGB", (box.side, box.side), fill)
    square.paste(image.convert("RGB"), (-box.left, -box.top))
    return square


class CellCrop:
    """A transform: the cell-centred square of an image (a centre crop when no cell is found).

    ``keep_size``: the square has a fixed side centred on the cell (``centred``) instead of fitting the cell
    (``cell``). ``counts`` (found, fell back) live in shared memory, so loader worker processes add to them.
    """

    def __init__(self, keep_size: bool = False) -> None:
        self.keep_size = keep_size
        self._found = multiprocessing.Value("q", 0)
        self._fallback = multiprocessing.Value("q", 0)

    def __call__(self, image: Image.Image) -> Image.Image:
        box = find_cell(image)
        counter = self._found if box is not None else self._fallback
        with counter.get_lock():
            counter.value += 1
        if box is None:
            return cut(image, centre_box(image))
        return cut(image, centred_on(box, image) if self.keep_size else box)

    @property
    def counts(self) -> tuple[int, int]:
        return int(self._found.value), int(self._fallback.value)

    def __repr__(self) -> str:
        return f"CellCrop(keep_size={self.keep_size}, margin={MARGIN}, fixed_side={FALLBACK})"
