"""Procedural drawing of one white blood cell on a smear-like background.

Hand-written: no library draws leukocytes. A picture is built as five stain-concentration maps
(nuclear purple, basophilic blue, eosin pink, eosinophil orange, azurophil red-purple) and turned
into RGB by Beer-Lambert absorption through a stain matrix, the way a stained smear forms colour.
A stain/scanner domain is then another stain matrix, illumination, blur and noise level, and a
slide (patient) jitters its domain a little, as real slides do.

Lengths are in units of the image half-width, so a cohort looks alike at every image size.
Speed comes from precomputing per image size: the polar geometry (radius, cos/sin of k*theta) on
a grid twice the image size, so a shape centred on any pixel is a slice and its Fourier outline is
one weighted sum, and banks of noise textures, granule fields and red-cell backgrounds that each
cell crops at random. Small shapes (nucleoli, rods, lobes) touch only their own window.

Subtype features appear only in blasts, each in a fraction of them and with random strength, and
are drawn so that they leave the blasts' mean colour, size and intensity unchanged (granules and
rods are zero-mean in optical density, a cup or fold keeps the nuclear area, "larger" RUNX1 blasts
are a mean-area-preserving mixture): pixel means alone cannot tell subtypes apart.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter
from scipy.special import ndtri

CELL_TYPES = ("myeloblast", "neutrophil", "lymphocyte", "monocyte", "eosinophil")
BLAST = "myeloblast"

# Stain maps, masks, textures and stain matrices: float32 throughout (half the memory, twice the speed).
Float32 = npt.NDArray[np.float32]

# Stains: optical density per RGB channel at concentration 1.
NUC, BASO, EOS, ORANGE, AZUR = range(5)
_STAINS = np.array(
    [
        [0.95, 1.49, 0.49],  # nuclear chromatin: purple
        [0.49, 0.28, 0.085],  # basophilic (RNA-rich) cytoplasm: blue
        [0.063, 0.395, 0.426],  # eosin: pink (red cells, pale cytoplasm)
        [0.085, 0.63, 1.25],  # eosinophil granules: orange
        [0.49, 1.41, 0.80],  # azurophil granules, Auer rods: red-purple
    ],
    dtype=np.float32,
).T  # (3 channels, 5 stains)

_DOMAIN_SALT = 0x5EED_D0


@dataclass(frozen=True)
class Stain:
    """How a slide looks: stain matrix (3 x 5), illumination (3,), blur and noise (image units)."""

    matrix: Float32
    illumination: Float32
    blur: float
    noise: float


def domain_stain(domain: int) -> Stain:
    """The look of a stain/scanner domain: 0 is crisp and pink, 1 purple-blue, blurrier and noisier,
    later ones are drawn from a fixed generator (the same for every cohort seed)."""
    if domain == 0:
        return Stain(_STAINS.copy(), np.array([0.96, 0.94, 0.95], np.float32), blur=0.012, noise=0.008)
    if domain == 1:
        tint = np.array([[1.18], [0.92], [0.98]], np.float32)  # more red absorbed: bluer, duller
        return Stain(_STAINS * tint * 1.12, np.array([0.90, 0.91, 0.96], np.float32), blur=0.03, noise=0.022)
    rng = np.random.default_rng([_DOMAIN_SALT, domain])
    tint = np.exp(rng.normal(0.0, 0.12, size=(3, 5))).astype(np.float32)
    return Stain(
        _STAINS * tint * np.float32(rng.uniform(0.85, 1.2)),
        rng.uniform(0.86, 0.99, size=3).astype(np.float32),
        blur=float(rng.uniform(0.008, 0.04)),
        noise=float(rng.uniform(0.005, 0.025)),
    )


def slide_stain(stain: Stain, rng: np.random.Generator) -> Stain:
    """One slide's (patient's) variation of its domain: staining strength, hue and lamp."""
    tint = np.exp(rng.normal(0.0, 0.05, size=stain.matrix.shape)).astype(np.float32)
    strength = np.float32(np.clip(rng.normal(1.0, 0.07), 0.8, 1.2))
    lamp = stain.illumination * np.exp(rng.normal(0.0, 0.015, size=3)).astype(np.float32)
    return replace(stain, matrix=stain.matrix * tint * strength, illumination=np.minimum(lamp, 1.0))


# ---------------------------------------------------------------- per-size precomputation


class _Kit:
    """Geometry and texture banks for one image size (built once per process and size).

    Banks hold 12 textures each at small sizes, fewer at large ones (memory grows as size**2).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.unit = size / 2.0
        self.bank = int(np.clip(2**22 // (2 * size) ** 2, 2, 12))
        offsets = (np.arange(2 * size) - size + 0.5) / self.unit
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        theta = np.arctan2(dy, dx)
        self.dy, self.dx = dy.astype(np.float32), dx.astype(np.float32)
        self.r = np.hypot(dy, dx).astype(np.float32)
        self.basis = np.stack([f(k * theta) for k in range(1, 6) for f in (np.cos, np.sin)]).astype(np.float32)
        rng = np.random.default_rng([_DOMAIN_SALT, size])
        self.fine = self._noise(rng, 0.022)  # open chromatin, ground-glass cytoplasm
        self.coarse = self._noise(rng, 0.055)  # clumped chromatin
        self.grain = self._noise(rng, 0.016)  # small granules
        self.beads = self._noise(rng, 0.034)  # large granules (eosinophil)
        self.smooth = self._noise(rng, 0.2)  # uneven staining
        self.pixel = rng.standard_normal((self.bank, 2 * size, 2 * size, 3), dtype=np.float32)
        self.red_cells = np.stack([self._red_cell_field(rng) for _ in range(self.bank)])
        self._blurs: dict[int, Float32] = {}

    def _noise(self, rng: np.random.Generator, scale: float) -> Float32:
        """Gaussian-filtered noise at a correlation length of ``scale`` (image units), unit std."""
        sigma = max(scale * self.unit, 0.35)
        bank = np.stack(
            [gaussian_filter(rng.standard_normal((2 * self.size,) * 2), sigma, mode="wrap") for _ in range(self.bank)]
        )
        bank -= bank.mean(axis=(1, 2), keepdims=True)
        bank /= bank.std(axis=(1, 2), keepdims=True)
        return bank.astype(np.float32)

    def _red_cell_field(self, rng: np.random.Generator) -> Float32:
        """Eosin concentration of a field of red cells (biconcave: paler centre), about a fifth covered."""
        side = 2 * self.size
        field = np.zeros((side, side), np.float32)
        centres: list[tuple[float, float, float]] = []
        for _ in range(400):
            radius = rng.uniform(0.27, 0.34)
            y, x = rng.uniform(-2, 2, size=2)
            if any((y - cy) ** 2 + (x - cx) ** 2 < (radius + cr) ** 2 * 0.8 for cy, cx, cr in centres):
                continue
            centres.append((y, x, radius))
            if len(centres) >= 11:
                break
        for y, x, radius in centres:
            d = np.hypot(self.dy - y, self.dx - x) / radius
            edge = np.clip((1 - d) * radius * self.unit + 0.5, 0, 1)
            field = np.maximum(field, edge * (0.5 + 0.5 * np.clip(d, 0, 1) ** 2))
        return field

    def crop(self, bank: Float32, rng: np.random.Generator) -> Float32:
        """A random size x size view of a random bank member, randomly flipped or transposed."""
        s = self.size
        i, oy, ox, turn = rng.integers(len(bank)), rng.integers(s + 1), rng.integers(s + 1), rng.integers(8)
        view = bank[i, ..., oy : oy + s, ox : ox + s]
        if turn & 1:
            view = view[..., ::-1, :]
        if turn & 2:
            view = view[..., :, ::-1]
        if turn & 4:
            view = np.swapaxes(view, -1, -2)
        return view

    def blur_matrix(self, sigma_px10: int) -> Float32:
        """Separable Gaussian blur as a size x size matrix (reflecting edges); sigma in 0.1 px."""
        if sigma_px10 not in self._blurs:
            identity = np.eye(self.size, dtype=np.float64)
            self._blurs[sigma_px10] = gaussian_filter(identity, (sigma_px10 / 10.0, 0), mode="reflect").astype(
                np.float32
            )
        return self._blurs[sigma_px10]


@lru_cache(maxsize=4)
def _kit(size: int) -> _Kit:
    return _Kit(size)


def prepare_size(image_size: int) -> None:
    """Build the geometry and texture banks of a size now (e.g. before forking workers)."""
    _kit(int(image_size))


# ---------------------------------------------------------------- painting primitives


class _Painter:
    """Stain maps of one picture and the shapes that add to them."""

    def __init__(self, kit: _Kit, rng: np.random.Generator) -> None:
        self.kit, self.rng, self.size = kit, rng, kit.size
        self.maps = np.zeros((5, kit.size, kit.size), np.float32)

    def _window(self, cy: float, cx: float, reach: float) -> tuple[slice, slice, slice, slice] | None:
        """Image slices around (cy, cx) +- reach and the matching slices of the double-size grids."""
        s, u = self.size, self.kit.unit
        py, px = round(s / 2 + cy * u), round(s / 2 + cx * u)
        pad = int(np.ceil(reach * u)) + 2
        y0, y1 = max(0, py - pad), min(s, py + pad)
        x0, x1 = max(0, px - pad), min(s, px + pad)
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(y0, y1), slice(x0, x1), slice(y0 + s - py, y1 + s - py), slice(x0 + s - px, x1 + s - px)

    def blob(self, cy: float, cx: float, radius: float, shape: Float32 | None = None) -> Float32:
        """Soft mask (full image) of a star-shaped outline r(t) = radius * (1 + sum_k shape_k . (cos kt, sin kt))."""
        mask = np.zeros((self.size, self.size), np.float32)
        reach = radius * (1 + (np.abs(shape).sum() if shape is not None else 0.0))
        window = self._window(cy, cx, reach)
        if window is None:
            return mask
        ys, xs, gy, gx = window
        edge = radius if shape is None else radius * (1 + np.einsum("k,kij->ij", shape, self.kit.basis[:, gy, gx]))
        mask[ys, xs] = np.clip((edge - self.kit.r[gy, gx]) * self.kit.unit + 0.5, 0, 1)
        return mask

    def segment(self, cy: float, cx: float, length: float, angle: float, half_width: float) -> Float32:
        """Soft mask of a rod centred at (cy, cx): a capsule of the given length, angle and half-width."""
        mask = np.zeros((self.size, self.size), np.float32)
        window = self._window(cy, cx, length / 2 + half_width)
        if window is None:
            return mask
        ys, xs, gy, gx = window
        vy, vx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        py, px = self.kit.dy[gy, gx], self.kit.dx[gy, gx]
        t = np.clip((py * vy + px * vx) / (vy * vy + vx * vx), -1, 1)
        dist = np.hypot(py - t * vy, px - t * vx)
        mask[ys, xs] = np.clip((half_width - dist) * self.kit.unit + 0.5, 0, 1)
        return mask

    def outline(self, elongation: float, roughness: float) -> Float32:
        """Fourier coefficients of an angular outline: an ellipse-like k=2 term plus k=3..5 wobble."""
        rng = self.rng
        shape = np.zeros(10, np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        shape[2:4] = elongation * np.array([np.cos(phase), np.sin(phase)])
        shape[4:] = rng.normal(0.0, roughness, size=6)
        return shape

    def texture(self, bank: Float32) -> Float32:
        return self.kit.crop(bank, self.rng)

    def granules(self, bank: Float32, density: float) -> Float32:
        """A random field of granules covering about ``density`` of the area (0..1 soft dots)."""
        threshold = float(_GAUSS_QUANTILES[int(np.clip(round(density * 100), 1, 99))])
        return ((self.texture(bank) - threshold) * 2.5).clip(0, 1)

    def add_zero_mean(self, stain: int, amount: Float32, region: Float32) -> None:
        """Add a feature, taking its mean back out of ``region``: changes texture, not mean colour."""
        area = float(region.sum())
        if area <= 0:
            return
        self.maps[stain] += amount - region * (float(amount.sum()) / area)


# z with P(N(0,1) > z) = p, for p = 0.00 .. 0.99 (index = percent): granule thresholds.
_GAUSS_QUANTILES: Float32 = ndtri(1 - np.arange(100) / 100.0).astype(np.float32)


# ---------------------------------------------------------------- cells


@dataclass
class _Body:
    """Where the cell and its nucleus are (image units) and their masks."""

    cy: float
    cx: float
    radius: float
    cell: Float32
    nucleus: Float32

    @property
    def cytoplasm(self) -> Float32:
        return self.cell * (1 - self.nucleus)


def _body(p: _Painter, radius: float, elongation: float, roughness: float) -> tuple[float, float, Float32]:
    rng = p.rng
    cy, cx = np.clip(rng.normal(0.0, 0.035, size=2), -0.08, 0.08)
    return cy, cx, p.blob(cy, cx, radius, p.outline(elongation, roughness))


def _cytoplasm(p: _Painter, body: _Body, levels: dict[int, float], grain: float = 0.0) -> None:
    """Cytoplasm stains with slightly uneven staining (and ground-glass grain)."""
    shade = 1 + 0.12 * p.texture(p.kit.smooth)
    if grain:
        shade = shade + grain * p.texture(p.kit.fine)
    region = body.cytoplasm * shade
    for stain, level in levels.items():
        p.maps[stain] += level * region


def _chromatin(p: _Painter, body: _Body, level: float, bank: Float32, contrast: float) -> None:
    p.maps[NUC] += body.nucleus * level * np.clip(1 + contrast * p.texture(bank), 0.2, None)


def _lobes(p: _Painter, centres: list[tuple[float, float]], radius: float, roughness: float, strand: float) -> Float32:
    """Nuclear lobes joined by thin chromatin strands (segmented and bilobed nuclei)."""
    mask = np.zeros((p.size, p.size), np.float32)
    for (y0, x0), (y1, x1) in itertools.pairwise(centres):
        length = float(np.hypot(y1 - y0, x1 - x0))
        mask = np.maximum(
            mask, p.segment((y0 + y1) / 2, (x0 + x1) / 2, length, float(np.arctan2(y1 - y0, x1 - x0)), strand)
        )
    for y, x in centres:
        mask = np.maximum(mask, p.blob(y, x, radius * p.rng.uniform(0.85, 1.15), p.outline(0.08, roughness)))
    return mask


def _neutrophil(p: _Painter) -> _Body:
    rng = p.rng
    radius = float(np.clip(rng.normal(0.51, 0.03), 0.42, 0.6))
    cy, cx, cell = _body(p, radius, rng.uniform(0, 0.06), 0.015)
    n_lobes = int(rng.choice([2, 3, 3, 4, 4, 5]))
    arc = rng.uniform(0.18, 0.28)
    start, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.1) * 2.4 / max(n_lobes - 1, 1)
    oy, ox = cy + rng.normal(0, 0.03), cx + rng.normal(0, 0.03)
    centres = [(oy + arc * np.sin(start + i * step), ox + arc * np.cos(start + i * step)) for i in range(n_lobes)]
    nucleus = _lobes(p, centres, rng.uniform(0.11, 0.14), 0.03, 0.022) * cell
    body = _Body(cy, cx, radius, cell, nucleus)
    _cytoplasm(p, body, {EOS: rng.uniform(0.16, 0.24), BASO: rng.uniform(0.03, 0.07)})
    p.maps[AZUR] += 0.22 * p.granules(p.kit.grain, rng.uniform(0.2, 0.35)) * body.cytoplasm
    _chromatin(p, body, rng.uniform(1.2, 1.45), p.kit.coarse, 0.25)
    return body


def _lymphocyte(p: _Painter) -> _Body:
    rng = p.rng
    radius = float(np.clip(rng.normal(0.36, 0.03), 0.28, 0.45))
    cy, cx, cell = _body(p, radius, rng.uniform(0, 0.05), 0.012)
    ratio = rng.uniform(0.80, 0.90)
    shift, angle = (1 - ratio) * radius * rng.uniform(0, 0.9), rng.uniform(0, 2 * np.pi)
    nucleus = (
        p.blob(cy + shift * np.sin(angle), cx + shift * np.cos(angle), ratio * radius, p.outline(0.05, 0.015)) * cell
    )
    body = _Body(cy, cx, radius, cell, nucleus)
    _cytoplasm(p, body, {BASO: rng.uniform(0.65, 0.9)})
    if rng.random() < 0.15:  # large granular lymphocyte
        p.maps[AZUR] += 0.5 * p.granules(p.kit.grain, 0.08) * body.cytoplasm
    _chromatin(p, body, rng.uniform(1.4, 1.7), p.kit.coarse, 0.35)
    return body


def _kidney(p: _Painter, cy: float, cx: float, radius: float, depth: float, cell: Float32) -> Float32:
    """A nucleus indented on one side (monocytoid kidney / folded shape)."""
    rng = p.rng
    nucleus = p.blob(cy, cx, radius, p.outline(rng.uniform(0.08, 0.2), 0.02))
    angle = rng.uniform(0, 2 * np.pi)
    bite = p.blob(cy + radius * np.sin(angle), cx + radius * np.cos(angle), depth * radius, p.outline(0.1, 0.02))
    return nucleus * (1 - bite) * cell


def _monocyte(p: _Painter) -> _Body:
    rng = p.rng
    radius = float(np.clip(rng.normal(0.66, 0.05), 0.54, 0.78))
    cy, cx, cell = _body(p, radius, rng.uniform(0, 0.1), 0.035)
    angle = rng.uniform(0, 2 * np.pi)
    shift = radius * rng.uniform(0.05, 0.2)
    ny, nx = cy + shift * np.sin(angle), cx + shift * np.cos(angle)
    nucleus = _kidney(p, ny, nx, radius * rng.uniform(0.55, 0.65), rng.uniform(0.45, 0.65), cell)
    body = _Body(cy, cx, radius, cell, nucleus)
    _cytoplasm(p, body, {BASO: rng.uniform(0.3, 0.42), EOS: rng.uniform(0.12, 0.2)}, grain=0.15)
    for _ in range(rng.integers(0, 6)):  # vacuoles
        vr, va = radius * rng.uniform(0.55, 0.9), rng.uniform(0, 2 * np.pi)
        hole = p.blob(cy + vr * np.sin(va), cx + vr * np.cos(va), rng.uniform(0.03, 0.06)) * body.cytoplasm
        p.maps *= 1 - 0.75 * hole
    _chromatin(p, body, rng.uniform(0.95, 1.15), p.kit.fine, 0.3)
    return body


def _eosinophil(p: _Painter, abnormal: bool) -> _Body:
    rng = p.rng
    radius = float(np.clip(rng.normal(0.54, 0.03), 0.46, 0.62))
    cy, cx, cell = _body(p, radius, rng.uniform(0, 0.06), 0.015)
    axis, gap = rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.32, 0.42)
    perp = rng.normal(0, 0.04)
    centres = [
        (cy + side * gap * np.sin(axis) + perp * np.cos(axis), cx + side * gap * np.cos(axis) - perp * np.sin(axis))
        for side in (-1, 1)
    ]
    nucleus = _lobes(p, centres, radius * rng.uniform(0.34, 0.4), 0.025, 0.03) * cell
    body = _Body(cy, cx, radius, cell, nucleus)
    _cytoplasm(p, body, {EOS: rng.uniform(0.12, 0.18)})
    p.maps[ORANGE] += (
        rng.uniform(0.6, 0.85) * p.granules(p.kit.beads, rng.uniform(0.4, 0.55)) * cell * (1 - 0.6 * nucleus)
    )
    if abnormal:  # inv(16): large dark purple-violet granules among the orange ones
        dark = p.granules(p.kit.beads, rng.uniform(0.08, 0.2)) * cell
        p.maps[AZUR] += 0.7 * dark
        p.maps[NUC] += 0.35 * dark
    _chromatin(p, body, rng.uniform(1.15, 1.35), p.kit.coarse, 0.25)
    return body


# Blast features by subtype: probability that a blast shows it.
FEATURE_RATES = {
    "PML_RARA": {"hypergranular": 0.6, "bilobed": 0.35, "auer_bundle": 0.25},
    "NPM1": {"cup": 0.6},
    "CBFB_MYH11": {"folded": 0.5, "monocytoid": 0.5},
    "RUNX1_RUNX1T1": {"auer_rod": 0.35, "hof": 0.5, "large": 0.3},
}
_LARGE = 1.15  # radius factor of a large RUNX1 blast; the others shrink so the mean area stays


def _blast(p: _Painter, mutation: str) -> _Body:
    """A myeloblast: large, high N:C, fine open chromatin, nucleoli, blue cytoplasm; plus, in
    leukaemic patients, the features of its subtype (each with its own rate and strength)."""
    rng = p.rng
    rates = FEATURE_RATES.get(mutation, {})
    has = {name: rng.random() < rate for name, rate in rates.items()}
    radius = float(np.clip(rng.normal(0.62, 0.045), 0.51, 0.73))
    ratio = rng.uniform(0.72, 0.84)
    if "large" in rates:
        rate = rates["large"]
        if has["large"]:
            radius *= _LARGE
        else:
            radius *= float(np.sqrt((1 - rate * _LARGE**2) / (1 - rate)))
    roughness = 0.02 * (2.5 if has.get("monocytoid") else 1.0)
    cy, cx, cell = _body(p, radius, rng.uniform(0, 0.07), roughness)
    n_radius = ratio * radius
    angle = rng.uniform(0, 2 * np.pi)
    shift = (1 - ratio) * radius * rng.uniform(0.2, 0.8)
    ny, nx = cy + shift * np.sin(angle), cx + shift * np.cos(angle)
    if has.get("cup"):  # NPM1: cup-like invagination, the nucleus grows to keep its area
        cup = rng.uniform(0.3, 0.5)
        nucleus = p.blob(ny, nx, n_radius / np.sqrt(1 - 0.6 * cup**2), p.outline(0.05, 0.015))
        ca = rng.uniform(0, 2 * np.pi)
        reach = n_radius * rng.uniform(0.45, 0.7)
        nucleus = nucleus * (
            1 - p.blob(ny + reach * np.sin(ca), nx + reach * np.cos(ca), cup * n_radius, p.outline(0.15, 0.02))
        )
    elif has.get("folded"):  # CBFB_MYH11: monocytoid folded / kidney nucleus
        depth = rng.uniform(0.4, 0.6)
        nucleus = _kidney(p, ny, nx, n_radius / np.sqrt(1 - 0.35 * depth**2), depth, cell)
    elif has.get("bilobed"):  # PML_RARA: bilobed (butterfly) nucleus
        axis, gap = rng.uniform(0, 2 * np.pi), n_radius * rng.uniform(0.4, 0.5)
        centres = [(ny + s * gap * np.sin(axis), nx + s * gap * np.cos(axis)) for s in (-1, 1)]
        nucleus = _lobes(p, centres, n_radius * 0.76, 0.02, 0.05)  # about the area of one round nucleus
    else:
        nucleus = p.blob(ny, nx, n_radius, p.outline(0.05, 0.015))
    body = _Body(cy, cx, radius, cell, nucleus * cell)
    _cytoplasm(p, body, {BASO: rng.uniform(0.48, 0.64)})
    cytoplasm = body.cytoplasm
    if has.get("hof"):  # RUNX1_RUNX1T1: pale perinuclear zone (Golgi), on the far side of the nucleus
        far = n_radius + rng.uniform(0.0, 0.05)
        pale = p.blob(ny - far * np.sin(angle), nx - far * np.cos(angle), radius * rng.uniform(0.25, 0.35)) * cytoplasm
        p.add_zero_mean(BASO, -p.maps[BASO] * pale * rng.uniform(0.7, 0.95), cytoplasm)
    if has.get("hypergranular"):  # PML_RARA: dense azurophil granules, over the nucleus too
        dots = p.granules(p.kit.grain, rng.uniform(0.25, 0.45)) * (cytoplasm + 0.5 * body.nucleus)
        p.add_zero_mean(AZUR, rng.uniform(0.25, 0.4) * dots, body.cell)
    elif mutation != "NPM1" and rng.random() < 0.3:  # a few azurophil granules; NPM1 blasts are agranular
        dots = p.granules(p.kit.grain, rng.uniform(0.04, 0.1)) * cytoplasm
        p.add_zero_mean(AZUR, 0.35 * dots, body.cell)
    if has.get("auer_bundle"):  # PML_RARA: bundles of short Auer rods ("faggot cells")
        _auer_rods(p, body, angle, n_radius - shift, count=int(rng.integers(3, 7)), length=(0.14, 0.26), width=0.013)
    if has.get("auer_rod"):  # RUNX1_RUNX1T1: one long slender rod
        _auer_rods(p, body, angle, n_radius - shift, count=1, length=(0.35, 0.55), width=0.014)
    _chromatin(p, body, rng.uniform(0.75, 0.92), p.kit.fine, 0.22)
    _nucleoli(p, body, ny, nx, n_radius)
    if has.get("folded"):  # a dark fold line across the nucleus
        crease = p.segment(ny, nx, n_radius * 1.2, rng.uniform(0, np.pi), 0.012) * body.nucleus
        p.add_zero_mean(NUC, 0.35 * crease, body.nucleus)
    return body


def _auer_rods(
    p: _Painter, body: _Body, nucleus_angle: float, inner: float, count: int, length: tuple[float, float], width: float
) -> None:
    """Rods lying along the widest part of the cytoplasm (beyond the eccentric nucleus, whose
    edge is ``inner`` from the cell centre), zero-mean in optical density."""
    rng = p.rng
    away = nucleus_angle + np.pi
    dist = (inner + body.radius) / 2
    cy, cx = body.cy + dist * np.sin(away), body.cx + dist * np.cos(away)
    base = away + np.pi / 2 + rng.normal(0, 0.2)  # tangential
    rods = np.zeros((p.size, p.size), np.float32)
    for _ in range(count):
        jitter = rng.normal(0, 0.025, size=2) if count > 1 else (0.0, 0.0)
        tilt = rng.normal(0, 0.45 if count > 1 else 0.1)
        rods = np.maximum(rods, p.segment(cy + jitter[0], cx + jitter[1], rng.uniform(*length), base + tilt, width))
    p.add_zero_mean(AZUR, rng.uniform(0.8, 1.2) * rods * body.cell, body.cell)


def _nucleoli(p: _Painter, body: _Body, ny: float, nx: float, n_radius: float) -> None:
    rng = p.rng
    for _ in range(rng.integers(1, 4)):
        d, a = n_radius * rng.uniform(0, 0.55), rng.uniform(0, 2 * np.pi)
        spot = p.blob(ny + d * np.sin(a), nx + d * np.cos(a), rng.uniform(0.045, 0.075)) * body.nucleus
        p.maps[NUC] *= 1 - 0.45 * spot
        p.maps[BASO] += 0.3 * spot


def draw_cell(
    rng: np.random.Generator,
    cell_type: str,
    mutation: str = "control",
    stain: Stain | None = None,
    image_size: int = 64,
) -> npt.NDArray[np.uint8]:
    """Draw one centred white cell on a smear background: an ``image_size`` square uint8 RGB array.

    ``mutation`` is the patient's class: it shapes blasts (subtype features) and, for CBFB_MYH11,
    some eosinophils (abnormal dark granules). ``stain`` is the slide's look (``domain_stain`` /
    ``slide_stain``; domain 0 when None). Everything random comes from ``rng``.
    """
    if cell_type not in CELL_TYPES:
        raise ValueError(f"unknown cell type {cell_type!r}; known: {', '.join(CELL_TYPES)}")
    stain = stain or domain_stain(0)
    kit = _kit(int(image_size))
    p = _Painter(kit, rng)
    if cell_type == BLAST:
        body = _blast(p, mutation)
    elif cell_type == "neutrophil":
        body = _neutrophil(p)
    elif cell_type == "lymphocyte":
        body = _lymphocyte(p)
    elif cell_type == "monocyte":
        body = _monocyte(p)
    else:
        body = _eosinophil(p, abnormal=mutation == "CBFB_MYH11" and rng.random() < 0.5)
    return _develop(p, body, stain)


def _develop(p: _Painter, body: _Body, stain: Stain) -> npt.NDArray[np.uint8]:
    """Background behind the cell, then stains -> light (Beer-Lambert), optics blur, sensor noise."""
    rng, kit, s = p.rng, p.kit, p.size
    background = p.texture(kit.red_cells) * rng.uniform(0.75, 0.95) + 0.03
    p.maps[EOS] += background * (1 - body.cell)
    strength = np.float32(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    # Zero-mean features leave some stain maps negative; only the total density must not be.
    density = np.maximum((stain.matrix * strength) @ p.maps.reshape(5, -1), 0)
    light = np.exp(np.negative(density, out=density), out=density) * stain.illumination[:, None]
    sigma = round(stain.blur * kit.unit * rng.uniform(0.8, 1.25) * 10)
    if sigma >= 2:  # separable blur as two matrix products: along x, then (transposed) along y
        blur = kit.blur_matrix(sigma)
        light = light.reshape(3 * s, s) @ blur.T
        light = (
            (light.reshape(3, s, s).transpose(0, 2, 1).reshape(3 * s, s) @ blur.T).reshape(3, s, s).transpose(2, 1, 0)
        )
    else:
        light = light.reshape(3, s, s).transpose(1, 2, 0)
    image = np.multiply(light, 255, out=np.empty((s, s, 3), np.float32))
    oy, ox = rng.integers(s + 1, size=2)
    image += (stain.noise * 255) * kit.pixel[rng.integers(len(kit.pixel)), oy : oy + s, ox : ox + s]
    return np.clip(image + 0.5, 0, 255, out=image).astype(np.uint8)
