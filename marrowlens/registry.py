"""The classes ``config.py``'s registry tables name, imported when first needed.

Hand-written (a dozen lines) rather than entry points: the registries are internal, and a table of
``"module:Class"`` strings in ``config.py`` keeps each name next to the settings it is offered with.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from marrowlens.errors import MarrowLensError


def load_registered(table: Mapping[str, str]) -> dict[str, Any]:
    """``{"simclr": "marrowlens.ssl.simclr:SimCLR"}`` -> ``{"simclr": SimCLR}``, in the table's order."""
    loaded: dict[str, Any] = {}
    for name, where in table.items():
        module, _, attribute = where.partition(":")
        try:
            loaded[name] = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise MarrowLensError(f"registry entry {name!r} -> {where!r} does not import: {exc}") from exc
    return loaded
