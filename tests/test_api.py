"""The Python API (``marrowlens/api.py``): the README's example runs, and each function agrees with its command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import marrowlens as ml
from tests.conftest import REPO_ROOT, Cli, make_store

README = (REPO_ROOT / "README.md").read_text()


def _cell_image(path: Path, blast: bool, seed: int) -> None:
    """A blast is a large purple disk, another cell a small blue one: a random backbone tells them apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    radius = 40 * (0.4 if blast else 0.2) * rng.uniform(0.9, 1.1)
    array = np.full((40, 40, 3), 230, dtype=np.int64)
    array[(yy - 20) ** 2 + (xx - 20) ** 2 < radius**2] = (120, 40, 150) if blast else (40, 60, 160)
    array = np.clip(array + rng.integers(-10, 10, array.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's folders, made by the commands: cohort/, emb/ (random-init test_resnet at 32 px),
    probes/blast, probes/mutation, idx/, and cell.png (a copy of the first cell's image)."""
    base = tmp_path_factory.mktemp("api")
    lines = ["path,patient_id,mutation,cell_type"]
    seed = 0
    for mutation in ("NPM1", "control"):
        for patient in range(2):
            for cell in range(6):
                seed += 1
                path = f"{mutation}_p{patient}/cell{cell}.png"
                _cell_image(base / "images" / path, cell % 2 == 0, seed)
                cell_type = "myeloblast" if cell % 2 == 0 else "lymphocyte"
                lines.append(f"{path},{mutation}_p{patient},{mutation},{cell_type}")
    (base / "images" / "labels.csv").write_text("\n".join(lines) + "\n")
    cli = Cli()
    embed = ("--model", "test_resnet", "--image-size", "32", "--num-workers", "0", "--accelerator", "cpu")
    for args in (
        ("cohort", "index", base / "images", "--out", base / "cohort", "--workers", "1"),
        ("embed", *embed, "--cohort", base / "cohort", "--out", base / "emb"),
        ("probe", "fit", "blast", "--embeddings", base / "emb", "--out", base / "probes/blast", "--cv", "0"),
        (
            "probe",
            "fit",
            "mutation",
            "--embeddings",
            base / "emb",
            "--blast-probe",
            base / "probes/blast",
            "--out",
            base / "probes/mutation",
            "--cv",
            "0",
        ),
        ("index", "build", "--embeddings", base / "emb", "--out", base / "idx"),
    ):
        code, output = cli(*args)
        assert code == 0, output
    shutil.copy(base / "images/NPM1_p0/cell0.png", base / "cell.png")
    return base


def _readme_example() -> str:
    match = re.search(r"## Python API\n.*?```python\n(.*?)```", README, flags=re.DOTALL)
    assert match, "README.md has no python block under '## Python API'"
    return match.group(1)


def test_the_readme_example_runs(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)
    names: dict[str, object] = {}
    exec(compile(_readme_example(), "README.md", "exec"), names)  # noqa: S102 (the README's own example)
    emb, result, hits = names["emb"], names["result"], names["hits"]
    assert isinstance(emb, ml.Embeddings) and emb.vectors.shape == (24, 96)
    assert isinstance(result, ml.Predictions) and len(result.cells) == 24
    assert {"cell_id", "patient_id", "kept", "predicted", "p_NPM1", "p_control"} <= set(result.cells.columns)
    assert result.patients is not None and sorted(result.patients["patient_id"]) == [
        "NPM1_p0",
        "NPM1_p1",
        "control_p0",
        "control_p1",
    ]
    assert isinstance(hits, pd.DataFrame) and len(hits) == 5
    first_cell = emb.cells["cell_id"][emb.cells["path"] == "NPM1_p0/cell0.png"].item()
    assert hits["cell_id"].iloc[0] == first_cell and hits["similarity"].iloc[0] == pytest.approx(1, abs=1e-5)
    neighbours = names["neighbours"]
    assert isinstance(neighbours, pd.DataFrame) and len(neighbours) == 5
    assert first_cell not in set(neighbours["cell_id"]) and neighbours["is_blast"].all()
    vectors = names["vectors"]
    assert isinstance(vectors, np.ndarray) and vectors.shape == (1, 96) and vectors.dtype == np.float32
    new = names["new"]
    assert isinstance(new, pd.DataFrame) and list(new.columns) == [
        "kept",
        "predicted",
        "confidence",
        "p_NPM1",
        "p_control",
    ]


def _modules_after(code: str) -> str:
    """Which of torch, FAISS and the API module a fresh interpreter has imported after running ``code``."""
    probe = f"import sys; {code}; print(sorted({{'torch', 'faiss', 'marrowlens.api'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    return done.stdout.strip()


def test_import_marrowlens_imports_neither_torch_nor_faiss() -> None:
    assert _modules_after("import marrowlens; assert 'search' in dir(marrowlens)") == "[]"
    assert _modules_after("from marrowlens import load_cohort, load_embeddings") == "['marrowlens.api']"


def test_the_package_exports_the_api() -> None:
    from marrowlens import api

    assert set(ml.__all__) - {"__version__"} == set(api.__all__)
    for name in api.__all__:
        assert getattr(ml, name) is getattr(api, name)
        assert getattr(api, name).__doc__, f"{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ml.nothing  # noqa: B018


def test_load_cohort_and_embeddings(world: Path) -> None:
    cohort = ml.load_cohort(world / "cohort")
    emb = ml.load_embeddings(world / "emb", mmap=False)
    assert len(cohort.cells) == len(emb) == 24
    assert list(emb.cells["cell_id"]) == list(cohort.cells["cell_id"])
    assert cohort.image_path(cohort.cells["path"].iloc[0]).is_file()
    with pytest.raises(ml.MarrowLensError):
        ml.load_embeddings(world / "cohort")
    with pytest.raises(ml.MarrowLensError):
        ml.load_cohort(world / "emb")


def test_embed_images_equals_the_stores_vectors(world: Path) -> None:
    emb = ml.load_embeddings(world / "emb")
    cohort = ml.load_cohort(world / "cohort")
    paths = [cohort.image_path(p) for p in cohort.cells["path"]]
    expected = np.asarray(emb.vectors)
    index = ml.load_index(world / "idx")
    for model in (index, emb, "test_resnet"):
        vectors = ml.embed_images(model, paths, batch_size=5, image_size=32)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    image = Image.open(paths[3])
    np.testing.assert_allclose(ml.embed_images(index, image), expected[3:4], atol=1e-5)  # one PIL image, RGBA or not
    with pytest.raises(ml.MarrowLensError, match="missing.png"):
        ml.embed_images(index, [world / "missing.png"])


def test_predict_equals_probe_predict(world: Path, tmp_path: Path) -> None:
    emb = ml.load_embeddings(world / "emb")
    cli = Cli()
    for name in ("mutation", "blast"):
        out = tmp_path / f"{name}.parquet"
        code, output = cli("probe", "predict", world / "probes" / name, "--embeddings", world / "emb", "--out", out)
        assert code == 0, output
        probe = ml.load_probe(world / "probes" / name, emb)
        result = ml.predict(probe, emb)
        assert result.patients is not None
        pd.testing.assert_frame_equal(result.cells, pd.read_parquet(out), check_dtype=False)
        patients = pd.read_parquet(out.with_name(f"{name}.patients.parquet"))
        pd.testing.assert_frame_equal(result.patients, patients, check_dtype=False)
        if name == "blast":
            assert probe.patient_head is None  # predict pooled with the mean without changing the probe
        vectors = ml.predict(probe, np.asarray(emb.vectors)).cells
        assert result.patients is not None and vectors.columns.tolist() == result.cells.columns[2:-1].tolist()
        pd.testing.assert_frame_equal(vectors, result.cells[vectors.columns])


def test_load_probe_without_a_store_loads_its_training_store(world: Path) -> None:
    probe = ml.load_probe(world / "probes/mutation")
    assert probe.classes == ["NPM1", "control"] and probe.blast is not None and probe.patient_head is not None


def test_a_store_or_vectors_of_another_model_are_refused(world: Path, tmp_path: Path) -> None:
    other = make_store(tmp_path / "other", n=20, dim=96, fingerprint="sha256:" + "ef" * 32)
    with pytest.raises(ml.MarrowLensError, match="model fingerprint mismatch"):
        ml.load_probe(world / "probes/blast", other)
    with pytest.raises(ml.MarrowLensError, match="model fingerprint mismatch"):
        ml.load_probe(world / "probes/blast", tmp_path / "other")
    probe = ml.load_probe(world / "probes/blast")
    with pytest.raises(ml.MarrowLensError, match="model fingerprint mismatch"):
        ml.predict(probe, other)
    with pytest.raises(ml.MarrowLensError, match="backbone fingerprint mismatch"):
        ml.embed_images(other, world / "cell.png")  # its recorded backbone is not the one that loads
    with pytest.raises(ml.MarrowLensError, match="N x 96 vectors"):
        ml.predict(probe, np.zeros((2, 16), dtype=np.float32))


def test_search(world: Path) -> None:
    index = ml.load_index(world / "idx")
    emb = ml.load_embeddings(world / "emb")
    cell = str(emb.cells["cell_id"].iloc[2])
    by_image = ml.search(index, Image.open(world / "cell.png"), k=3)
    assert by_image["rank"].tolist() == [1, 2, 3] and by_image["similarity"].iloc[0] == pytest.approx(1, abs=1e-5)
    by_vector = ml.search(index, np.asarray(emb.vectors[2]), k=3)
    assert by_vector["cell_id"].iloc[0] == cell
    by_id = ml.search(index, cell[:8], k=3, filters=["mutation=control"])
    assert cell not in set(by_id["cell_id"]) and (by_id["mutation"] == "control").all()
    assert by_id.attrs["query_cell"] == cell
    assert (
        by_id["cell_id"].tolist() == ml.search(index, cell, k=3, filters={"mutation": ["control"]})["cell_id"].tolist()
    )
    with pytest.raises(ml.MarrowLensError, match="neither an image file nor the id of an indexed cell"):
        ml.search(index, "nothing.png")
    with pytest.raises(ml.MarrowLensError, match="96 values"):
        ml.search(index, np.zeros(16, dtype=np.float32))
    with pytest.raises(ml.MarrowLensError, match="cannot filter on 'colour'"):
        ml.search(index, cell, filters={"colour": "red"})
