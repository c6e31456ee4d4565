"""Embedding a cohort: alignment, fingerprints, resume, baselines without SSL, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from marrowlens.cohort.images import load_rgb
from marrowlens.config import PretrainConfig, load_config
from marrowlens.contracts import Preprocessing
from marrowlens.embeddings import EmbeddingWriter, load_embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.ssl import train
from marrowlens.ssl.backbones import load_backbone
from marrowlens.ssl.embed import embed_cohort, embed_images
from tests.conftest import REPO_ROOT
from tests.ssl.conftest import TINY


@pytest.fixture(scope="module")
def run_dir(labelled_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        PretrainConfig,
        REPO_ROOT / "configs/pretrain/tiny_cpu.yaml",
        [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=1"],
    )
    out = tmp_path_factory.mktemp("run") / "simclr"
    train.pretrain(config, labelled_cohort, out)
    return out


class TestEmbedCli:
    def test_store_is_aligned_and_fingerprinted(
        self, cli, run_dir: Path, labelled_cohort: Path, tmp_path: Path
    ) -> None:
        code, output = cli(
            "embed",
            "--model",
            run_dir,
            "--cohort",
            labelled_cohort,
            "--out",
            tmp_path / "emb",
            "--batch-size",
            "5",
            "--num-workers",
            "0",
        )
        assert code == 0, output
        store = load_embeddings(tmp_path / "emb")
        cohort_cells = pd.read_parquet(labelled_cohort / "cells.parquet")
        assert store.vectors.shape == (32, 96)
        assert store.cells["cell_id"].tolist() == cohort_cells["cell_id"].tolist()
        backbone = json.loads((run_dir / "backbone.json").read_text())
        assert store.model_fingerprint == backbone["fingerprint"]
        # the stored row of a cell is that cell's embedding, computed on its own
        model, info = load_backbone(run_dir)
        row = 17
        alone = embed_images(model, info, [load_rgb(labelled_cohort.parent / store.cells["path"].iloc[row])])[0]
        np.testing.assert_allclose(store.vectors[row], alone, rtol=1e-4, atol=1e-5)
        code, output = cli("embed", "--model", run_dir, "--cohort", labelled_cohort, "--out", tmp_path / "emb")
        assert code == 2 and "--overwrite" in output

    def test_bare_timm_name_with_local_weights(self, cli, labelled_cohort: Path, tmp_path: Path) -> None:
        torch.manual_seed(5)
        model = timm.create_model("test_resnet", num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
        code, output = cli(
            "embed",
            "--model",
            "test_resnet",
            "--weights",
            tmp_path / "w.safetensors",
            "--image-size",
            "32",
            "--cohort",
            labelled_cohort,
            "--out",
            tmp_path / "emb",
            "--num-workers",
            "0",
        )
        assert code == 0, output
        store = load_embeddings(tmp_path / "emb")
        assert store.meta.model.fingerprint.startswith("sha256:")
        code, output = cli(
            "embed",
            "--model",
            "test_vit",
            "--weights",
            tmp_path / "w.safetensors",
            "--image-size",
            "32",
            "--cohort",
            labelled_cohort,
            "--out",
            tmp_path / "emb2",
        )
        assert code == 2 and "do not fit test_vit" in output

    def test_random_baseline_is_reproducible(self, labelled_cohort: Path, tmp_path: Path) -> None:
        first = embed_cohort("test_resnet", labelled_cohort, tmp_path / "a", image_size=32, num_workers=0)
        second = embed_cohort("test_resnet", labelled_cohort, tmp_path / "b", image_size=32, num_workers=0)
        assert first.fingerprint == second.fingerprint and first.model_fingerprint == "random:test_resnet:seed0"


def test_interrupted_embedding_resumes_only_missing_rows(
    run_dir: Path, labelled_cohort: Path, tmp_path: Path, monkeypatch
) -> None:
    whole = embed_cohort(run_dir, labelled_cohort, tmp_path / "whole", batch_size=4, num_workers=0)
    original_write = EmbeddingWriter.write
    calls = {"n": 0}

    def dying_write(self, rows, vectors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original_write(self, rows, vectors)

    monkeypatch.setattr(EmbeddingWriter, "write", dying_write)
    with pytest.raises(MarrowLensError, match="interrupted; run the same command again"):
        embed_cohort(run_dir, labelled_cohort, tmp_path / "cut", batch_size=4, num_workers=0)
    monkeypatch.setattr(EmbeddingWriter, "write", original_write)
    assert not (tmp_path / "cut" / "meta.json").exists()
    written = []
    monkeypatch.setattr(
        EmbeddingWriter,
        "write",
        lambda self, rows, vectors: (written.extend(rows), original_write(self, rows, vectors)),
    )
    resumed = embed_cohort(run_dir, labelled_cohort, tmp_path / "cut", batch_size=4, num_workers=0)
    assert len(written) == 32 - 8
    assert resumed.fingerprint == whole.fingerprint


def test_fingerprint_guard_on_a_tampered_run(run_dir: Path, labelled_cohort: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "run"
    tampered.mkdir()
    for name in ("backbone.json", "backbone.safetensors"):
        (tampered / name).write_bytes((run_dir / name).read_bytes())
    with open(tampered / "backbone.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(MarrowLensError, match="does not match the fingerprint"):
        embed_cohort(tampered, labelled_cohort, tmp_path / "emb")
    with pytest.raises(MarrowLensError, match="holds no trained backbone"):
        embed_cohort(tmp_path, labelled_cohort, tmp_path / "emb")


def test_stain_normalised_store_records_its_target(cli, labelled_cohort: Path, tmp_path: Path) -> None:
    code, output = cli(
        "embed",
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--cohort",
        labelled_cohort,
        "--out",
        tmp_path / "emb",
        "--num-workers",
        "0",
        "--stain-normalize",
        "reinhard",
    )
    assert code == 0, output
    store = load_embeddings(tmp_path / "emb")
    stain = store.meta.preprocessing.stain
    assert stain["method"] == "reinhard" and len(stain["mean"]) == 3
    plain = embed_cohort("test_resnet", labelled_cohort, tmp_path / "plain", image_size=32, num_workers=0)
    assert plain.meta.preprocessing.stain is None
    assert not np.allclose(np.asarray(plain.vectors), np.asarray(store.vectors))
    code, output = cli(
        "embed",
        "--model",
        "test_resnet",
        "--cohort",
        labelled_cohort,
        "--out",
        tmp_path / "x",
        "--stain-normalize",
        "macenko",
    )
    assert code == 2 and "unknown stain normalisation" in output


@pytest.mark.parametrize("workers", [0, 1])
def test_a_deleted_image_is_named_in_one_line(
    cli, cohort_missing_a_cell: tuple[Path, Path], tmp_path: Path, workers: int
) -> None:
    folder, gone = cohort_missing_a_cell
    code, output = cli(
        "embed",
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--cohort",
        folder,
        "--out",
        tmp_path / "emb",
        "--batch-size",
        "4",
        "--num-workers",
        str(workers),
    )
    assert code == 2 and "\n" not in output.strip(), output
    assert str(gone) in output and f"marrowlens cohort check {folder} --fix" in output


def test_a_run_folder_without_a_preprocessing_record_embeds_as_before(
    run_dir: Path, labelled_cohort: Path, tmp_path: Path
) -> None:
    """backbone.json written before the record existed: the record comes from its size, mean and std."""
    old = tmp_path / "old_run"
    old.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        (old / name).write_bytes((run_dir / name).read_bytes())
    info = json.loads((old / "backbone.json").read_text())
    record = info.pop("preprocessing")
    (old / "backbone.json").write_text(json.dumps(info))
    _, loaded = load_backbone(old)
    assert loaded.preprocessing == Preprocessing.model_validate(record)
    assert record == {
        **{k: info[k] for k in ("image_size", "mean", "std")},
        "interpolation": "bicubic",
        "pad_to_square": True,
        "crop": "full",
    }
    kwargs = {"num_workers": 0, "accelerator": "cpu"}
    new = embed_cohort(run_dir, labelled_cohort, tmp_path / "new_emb", **kwargs)
    before = embed_cohort(old, labelled_cohort, tmp_path / "old_emb", **kwargs)
    assert new is not None and before is not None
    assert np.array_equal(np.load(new.folder / "vectors.npy"), np.load(before.folder / "vectors.npy"))
