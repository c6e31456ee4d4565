"""The SSL methods by name: adding one is its own module plus one line here (and its name in
``config.METHOD_NAMES``, which loading a config checks without importing torch)."""

from __future__ import annotations

from marrowlens.config import METHOD_NAMES
from marrowlens.errors import MarrowLensError
from marrowlens.ssl.base import SSLModule
from marrowlens.ssl.byol import BYOL
from marrowlens.ssl.dino import DINO
from marrowlens.ssl.simclr import SimCLR
from marrowlens.ssl.vicreg import VICReg

METHODS: dict[str, type[SSLModule]] = {"simclr": SimCLR, "dino": DINO, "byol": BYOL, "vicreg": VICReg}

if tuple(METHODS) != METHOD_NAMES:
    raise MarrowLensError(f"ssl.methods.METHODS {tuple(METHODS)} and config.METHOD_NAMES {METHOD_NAMES} differ")
