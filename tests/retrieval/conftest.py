"""Fixtures for retrieval tests: one tiny image cohort (random stores: ``tests.conftest.make_store``).

The image cohort is embedded once per session with timm's random-init ``test_resnet`` at 32 px,
the cheapest real backbone, so CLI and web tests exercise the real embed -> index -> search path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MUTATIONS, Cli, write_cell


@dataclass
class ImageIndex:
    """A tiny real cohort: images on disk, its embeddings and a flat index over them."""

    root: Path
    cohort: Path
    emb: Path
    idx: Path

    def image(self, mutation: str = "NPM1", patient: int = 0, cell: int = 0) -> Path:
        return self.root / mutation / f"{mutation}_p{patient}" / f"cell{cell}.png"


@pytest.fixture(scope="session")
def image_index(tmp_path_factory: pytest.TempPathFactory) -> ImageIndex:
    base = tmp_path_factory.mktemp("image_index")
    root = base / "aml"
    seed = 100
    for mutation in MUTATIONS:
        for patient in range(2):
            for cell in range(6):
                seed += 1
                write_cell(root / mutation / f"{mutation}_p{patient}" / f"cell{cell}.png", seed, size=40)
    cli = Cli()
    for args in (
        ("cohort", "index", root, "--out", base / "cohort", "--workers", "2"),
        (
            "embed",
            "--model",
            "test_resnet",
            "--image-size",
            "32",
            "--cohort",
            base / "cohort",
            "--out",
            base / "emb",
            "--num-workers",
            "0",
            "--accelerator",
            "cpu",
        ),
        ("index", "build", "--embeddings", base / "emb", "--out", base / "idx"),
    ):
        code, output = cli(*args)
        assert code == 0, output
    return ImageIndex(root=root, cohort=base / "cohort", emb=base / "emb", idx=base / "idx")
