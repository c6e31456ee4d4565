"""Standard exports: a run's backbone for timm, a store as AnnData, an index's neighbours as CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from marrowlens.cohort.images import load_rgb
from marrowlens.config import PretrainConfig, load_config
from marrowlens.embeddings import load_embeddings
from marrowlens.retrieval.search import Searcher
from marrowlens.ssl import train
from marrowlens.ssl.backbones import load_backbone
from marrowlens.ssl.preprocessing import eval_transform
from tests.conftest import REPO_ROOT, Cli, make_store, random_cells
from tests.ssl.conftest import TINY, labelled_cohort  # noqa: F401 (a session fixture, shared)

ad = pytest.importorskip("anndata")  # the `anndata` extra


@pytest.fixture(scope="module")
def run_and_store(labelled_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:  # noqa: F811
    """A one-epoch test_resnet SimCLR run at 32 px and its store of the 32 cells (40 x 40 px, square)."""
    config = load_config(
        PretrainConfig,
        REPO_ROOT / "configs/pretrain/tiny_cpu.yaml",
        [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=1"],
    )
    base = tmp_path_factory.mktemp("exports")
    train.pretrain(config, labelled_cohort, base / "run")
    code, output = Cli()(
        "embed", "--model", base / "run", "--cohort", labelled_cohort, "--out", base / "emb", "--num-workers", "0"
    )
    assert code == 0, output
    return base / "run", base / "emb"


class TestTimm:
    def test_timm_loads_the_backbone_and_gives_the_store_vectors(
        self,
        cli,
        run_and_store: tuple[Path, Path],
        labelled_cohort: Path,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        run, emb = run_and_store
        out = tmp_path / "timm"
        code, output = cli("export", "timm", run, out)
        assert code == 0, output
        assert "pad_to_square" in output and "local-dir:" in output
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessing.json"]
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == "test_resnet" and config["num_classes"] == 0
        assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
        recipe = json.loads((out / "preprocessing.json").read_text())
        assert [s["step"] for s in recipe["steps"]] == ["convert", "pad_to_square", "resize", "to_tensor", "normalize"]

        store = load_embeddings(emb)
        _, info = load_backbone(run)
        ours = eval_transform(info.preprocessing)
        images = [load_rgb(labelled_cohort.parent / p) for p in store.cells["path"]]
        batch = torch.stack([ours(im) for im in images])
        by_file = timm.create_model(
            "test_resnet",
            pretrained=True,
            pretrained_cfg_overlay={"file": str(out / "model.safetensors")},
            num_classes=0,
        ).eval()
        by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.inference_mode():
            for model in (by_file, by_folder):
                np.testing.assert_allclose(model(batch).numpy(), store.vectors, rtol=1e-4, atol=1e-5)
            # timm's own transform, from the exported config, on these square cells: the very same tensor
            data = timm.data.resolve_data_config(model=by_folder)
            assert data["crop_pct"] == 1.0 and data["crop_mode"] == "squash"
            theirs = timm.data.create_transform(**data)
            assert torch.equal(torch.stack([theirs(im) for im in images]), batch)

    def test_timm_transform_differs_only_by_padding_a_non_square_image(
        self, run_and_store: tuple[Path, Path], tmp_path: Path
    ) -> None:
        from marrowlens.cohort.images import pad_to_square
        from marrowlens.exports.timm_folder import export_timm

        run, _ = run_and_store
        result = export_timm(run, tmp_path / "timm")
        assert len(result.differences) == 1 and "pad_to_square" in result.differences[0]
        model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
        theirs = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
        ours = eval_transform(result.info.preprocessing)
        wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
        assert not torch.allclose(theirs(wide), ours(wide))  # timm squashes, we pad
        assert torch.equal(theirs(pad_to_square(wide)), ours(wide))  # padded first, they agree

    def test_refusals(self, cli, run_and_store: tuple[Path, Path], tmp_path: Path) -> None:
        run, emb = run_and_store
        for not_a_run in (tmp_path / "missing", emb):
            code, output = cli("export", "timm", not_a_run, tmp_path / "out")
            assert code == 2 and "not a" in output and "pretrain" in output and "\n" not in output.strip()
        taken = tmp_path / "taken"
        taken.mkdir()
        (taken / "notes.txt").write_text("mine")
        code, output = cli("export", "timm", run, taken)
        assert code == 2 and "--overwrite" in output
        code, output = cli("export", "timm", run, taken, "--overwrite")
        assert code == 0, output
        assert (taken / "config.json").is_file() and not list(taken.glob(".*.tmp"))


def test_a_vit_backbone_keeps_its_input_size(cli, tmp_path: Path) -> None:
    """A transformer is built at our input size: config.json's model_args carry img_size for timm."""
    from marrowlens.ssl.backbones import create_backbone, export_backbone
    from marrowlens.ssl.preprocessing import for_backbone

    torch.manual_seed(1)
    export_backbone(create_backbone("test_vit", 32), "test_vit", for_backbone("test_vit", 32), tmp_path / "run")
    code, output = cli("export", "timm", tmp_path / "run", tmp_path / "timm")
    assert code == 0 and "img_size=32" in output, output
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["img_size"] == 32
    ours, _ = load_backbone(tmp_path / "run")
    by_folder = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    overlay = {"file": str(tmp_path / "timm" / "model.safetensors")}
    by_file = timm.create_model(
        "test_vit", pretrained=True, num_classes=0, img_size=32, pretrained_cfg_overlay=overlay
    ).eval()
    batch = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        for model in (by_folder, by_file):
            torch.testing.assert_close(model(batch), ours(batch))


def _odd_cells(n: int) -> pd.DataFrame:
    cells = random_cells(n)
    cells["is_blast"] = pd.array([None if i % 4 == 0 else i % 3 == 0 for i in range(n)], dtype="boolean")
    return cells


class TestAnnData:
    def test_vectors_cells_and_meta(self, cli, tmp_path: Path) -> None:
        store = make_store(tmp_path / "emb", n=40, cells=_odd_cells(40))
        code, output = cli("export", "anndata", tmp_path / "emb", tmp_path / "cells.h5ad")
        assert code == 0, output
        adata = ad.read_h5ad(tmp_path / "cells.h5ad")
        assert adata.shape == (40, 16) and adata.X.dtype == np.float32
        np.testing.assert_array_equal(adata.X, store.vectors)
        assert list(adata.obs.index) == store.cells["cell_id"].tolist() and adata.obs.index.name == "cell_id"
        assert list(adata.obs["cell_type"].astype(str)) == store.cells["cell_type"].tolist()
        blast = adata.obs["is_blast"]
        assert blast.isna().sum() == 10 and blast.dropna().tolist() == store.cells["is_blast"].dropna().tolist()
        meta = adata.uns["marrowlens"]
        assert meta["model"]["fingerprint"] == store.model_fingerprint and meta["fingerprint"] == store.fingerprint
        assert meta["model"]["timm_name"] == "test_resnet" and meta["model"]["preprocessing"]["image_size"] == 32
        code, output = cli("export", "anndata", tmp_path / "emb", tmp_path / "cells.h5ad")
        assert code == 2 and "--overwrite" in output

    def test_obsm_mode(self, cli, tmp_path: Path) -> None:
        store = make_store(tmp_path / "emb", n=30)
        code, output = cli("export", "anndata", tmp_path / "emb", tmp_path / "cells.h5ad", "--obsm")
        assert code == 0 and "obsm" in output, output
        adata = ad.read_h5ad(tmp_path / "cells.h5ad")
        assert adata.shape == (30, 0) and adata.X is None
        np.testing.assert_array_equal(adata.obsm["X_marrowlens"], store.vectors)
        assert not list(tmp_path.glob(".*.tmp"))


class TestNeighbours:
    def _index(self, cli, tmp_path: Path) -> Path:
        make_store(tmp_path / "emb", n=60)
        code, output = cli("index", "build", "--embeddings", tmp_path / "emb", "--out", tmp_path / "idx")
        assert code == 0, output
        return tmp_path / "idx"

    def test_every_cell_k_neighbours_without_itself(self, cli, tmp_path: Path) -> None:
        idx = self._index(cli, tmp_path)
        code, output = cli("export", "neighbours", idx, tmp_path / "nn.csv", "--k", "5")
        assert code == 0, output
        table = pd.read_csv(tmp_path / "nn.csv", dtype={"query_cell_id": str, "neighbour_cell_id": str})
        assert list(table.columns) == [
            "query_cell_id", "rank", "neighbour_cell_id", "similarity", "neighbour_patient_id", "neighbour_cell_type"
        ]  # fmt: skip
        assert len(table) == 60 * 5 and (table.groupby("query_cell_id").size() == 5).all()
        assert not (table["query_cell_id"] == table["neighbour_cell_id"]).any()
        for _, hits in table.groupby("query_cell_id"):
            assert hits["rank"].tolist() == [1, 2, 3, 4, 5]
            assert (np.diff(hits["similarity"].to_numpy()) <= 1e-6).all()
        searcher = Searcher.open(idx)
        for row in (0, 17, 59):
            expected = searcher.search_cells([row], 5)[0]
            got = table[table["query_cell_id"] == searcher.index.cells["cell_id"].iloc[row]]
            assert got["neighbour_cell_id"].tolist() == expected["cell_id"].tolist()
            np.testing.assert_allclose(got["similarity"], expected["similarity"], rtol=1e-5)
        code, output = cli("export", "neighbours", idx, tmp_path / "nn.csv")
        assert code == 2 and "--overwrite" in output

    def test_another_store_of_the_same_model(self, cli, tmp_path: Path) -> None:
        idx = self._index(cli, tmp_path)
        make_store(tmp_path / "other", n=7, seed=3, prefix="q")
        code, output = cli(
            "export", "neighbours", idx, tmp_path / "nn.csv", "--k", "3", "--embeddings", tmp_path / "other"
        )
        assert code == 0, output
        table = pd.read_csv(tmp_path / "nn.csv")
        assert len(table) == 21 and set(table["query_cell_id"]) == {f"q{i:06d}" for i in range(7)}

    def test_an_l2_index_adds_distances(self, cli, tmp_path: Path) -> None:
        make_store(tmp_path / "emb", n=20)
        code, output = cli(
            "index", "build", "--embeddings", tmp_path / "emb", "--out", tmp_path / "idx", "--metric", "l2"
        )
        assert code == 0, output
        code, output = cli("export", "neighbours", tmp_path / "idx", tmp_path / "nn.csv", "--k", "2")
        assert code == 0, output
        table = pd.read_csv(tmp_path / "nn.csv")
        assert len(table) == 40 and "distance" in table and (table["distance"] > 0).all()
        assert (table.groupby("query_cell_id")["distance"].diff().dropna() >= 0).all()

    def test_a_store_of_another_model_is_refused(self, cli, tmp_path: Path) -> None:
        idx = self._index(cli, tmp_path)
        make_store(tmp_path / "other", n=7, fingerprint="sha256:" + "ab" * 32)
        code, output = cli("export", "neighbours", idx, tmp_path / "nn.csv", "--embeddings", tmp_path / "other")
        assert code == 2 and "fingerprint mismatch" in output
        assert not (tmp_path / "nn.csv").exists()


def test_export_help_imports_neither_torch_nor_faiss_nor_anndata() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from marrowlens.cli import app; "
        "r = CliRunner().invoke(app, ['export', 'neighbours', '--help']); assert r.exit_code == 0, r.output; "
        "print(sorted({'torch', 'faiss', 'anndata', 'timm'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.strip() == "[]"
