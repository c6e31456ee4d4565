"""The SSL methods by name: adding one is its own module plus one line in ``config.METHOD_CLASSES``."""

from __future__ import annotations

from marrowlens.config import METHOD_CLASSES
from marrowlens.registry import load_registered
from marrowlens.ssl.base import SSLModule

METHODS: dict[str, type[SSLModule]] = load_registered(METHOD_CLASSES)
