"""The similar-cell web page: a FastAPI app factory, one template, static JS/CSS (no build step, no CDN)."""

from marrowlens.retrieval.web.app import create_app

__all__ = ["create_app"]
