"""MarrowLens: self-supervised representations, probes and retrieval for single-cell AML images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("marrowlens")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
