"""MarrowLens: self-supervised representations, probes and retrieval for single-cell AML images."""

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while waiting make CPU training up to 100x slower whenever another
# process (a data-loading worker, a second DDP rank, a neighbour on a shared node) wants the same
# cores; measured on a 2-core machine: 3.1 s vs 0.04 s per step, and 485 vs 56 ms per served
# resnet18 forward pass (bench/RESULTS.md). It is set here, and only here, because OpenMP (torch's
# libgomp) reads it once, when the library loads at torch's first import, and every marrowlens
# module (the CLI's commands included) runs this file before it can import torch. Setting it any
# later changes nothing; a program that imports torch before marrowlens must set it itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("marrowlens")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

# The Python API (marrowlens/api.py), imported on first use (PEP 562): ``import marrowlens`` and
# ``marrowlens --help`` stay fast and import neither torch nor FAISS (a test checks).
__all__ = [
    "Cohort",
    "Embeddings",
    "MarrowLensError",
    "Predictions",
    "__version__",
    "embed_images",
    "load_cohort",
    "load_embeddings",
    "load_index",
    "load_probe",
    "predict",
    "search",
]
_API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from marrowlens.api import (
        Cohort,
        Embeddings,
        MarrowLensError,
        Predictions,
        embed_images,
        load_cohort,
        load_embeddings,
        load_index,
        load_probe,
        predict,
        search,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        from marrowlens import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
