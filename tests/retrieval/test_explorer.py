"""The explorer's API: facets, filters from the page, the similarity percentile, the embedding map (UMAP),
``marrowlens index map`` and the server's lazy map of a small index."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from marrowlens.maps import MAP_FILE, index_map, map_is_current, read_map, sample_rows, umap_2d, write_map
from marrowlens.retrieval.index import load_index
from marrowlens.retrieval.scale import SimilarityScale
from marrowlens.retrieval.web import create_app
from marrowlens.retrieval.web.explore import facets
from tests.conftest import MUTATIONS, Cli
from tests.retrieval.conftest import ImageIndex, MutationProbe

LOCAL = "http://127.0.0.1:8765"


def copy_index(image_index: ImageIndex, to: Path) -> Path:
    """A private copy of the session's index (its map.parquet is this test's own)."""
    shutil.copytree(image_index.idx, to)
    (to / MAP_FILE).unlink(missing_ok=True)
    return to


def ready_map(client: TestClient, color: str = "cell_type", within: float = 240) -> dict:
    """GET /api/map until it is ready (a lazy map compiles numba's UMAP first: tens of seconds)."""
    deadline = time.monotonic() + within
    while True:
        answer = client.get("/api/map", params={"color": color})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if body["status"] != "computing" or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(image_index: ImageIndex):
    with TestClient(create_app(image_index.idx, default_k=5), base_url=LOCAL) as client:
        yield client


class TestFacets:
    def test_facets_list_the_index_values(self, client: TestClient, image_index: ImageIndex) -> None:
        body = client.get("/api/facets").json()
        cells = load_index(image_index.idx).cells
        assert set(body["values"]) == {"patient_id", "mutation", "cell_type", "domain"}
        assert sorted(body["values"]["mutation"]) == sorted(MUTATIONS)
        assert sorted(body["values"]["patient_id"]) == sorted(cells["patient_id"].astype(str).unique())
        assert body["truncated"] == []

    def test_facets_are_capped_most_common_first(self) -> None:
        cells = pd.DataFrame({"patient_id": ["a", "b", "b", "c", "c", "c"], "mutation": [None] * 6})
        values, truncated = facets(cells, limit=2)
        assert values["patient_id"] == ["c", "b"] and truncated == ["patient_id"]
        assert values["mutation"] == [] and values["cell_type"] == []


class TestFiltersAndPercentile:
    def test_filters_sent_by_the_page_are_applied(self, client: TestClient, image_index: ImageIndex) -> None:
        cells = load_index(image_index.idx).cells
        query = str(cells["cell_id"].iloc[0])
        for mutation in MUTATIONS:
            answer = client.post("/api/search", data={"cell_id": query, "k": "4", "filter": f"mutation={mutation}"})
            assert answer.status_code == 200, answer.text
            assert {n["mutation"] for n in answer.json()["neighbours"]} == {mutation}
        patient = str(cells["patient_id"].iloc[-1])
        answer = client.post(
            "/api/search",
            data={"cell_id": query, "k": "3", "filter": [f"patient_id={patient}", "mutation=NPM1,control"]},
        )
        assert {n["patient_id"] for n in answer.json()["neighbours"]} == {patient}
        too_many = client.post("/api/search", data={"cell_id": query, "k": "20", "filter": f"patient_id={patient}"})
        assert too_many.status_code == 400 and "match the filter" in too_many.json()["detail"]

    def test_each_neighbour_has_its_percentile(self, client: TestClient, image_index: ImageIndex) -> None:
        answer = client.post("/api/search", files={"image": ("c.png", image_index.image("NPM1", 0, 1).read_bytes())})
        neighbours = answer.json()["neighbours"]
        percentiles = [n["percentile"] for n in neighbours]
        assert all(0 <= p <= 100 for p in percentiles)
        assert percentiles == sorted(percentiles, reverse=True)  # neighbours come most similar first
        assert percentiles[0] > 50  # the nearest of 23 cells beats a random pair

    def test_percentile_is_monotone_in_similarity(self, image_index: ImageIndex) -> None:
        index = load_index(image_index.idx)
        scale = SimilarityScale.of(index, pairs=5000)
        assert scale.sample.shape == (5000,) and np.all(np.diff(scale.sample) >= 0)
        grid = np.linspace(-1.05, 1.05, 201)
        values = [scale.percentile(float(s)) for s in grid]
        assert values[0] == 0 and values[-1] == 100
        assert all(0 <= v <= 100 for v in values) and values == sorted(values)
        assert scale.percentile(None) is None and scale.percentile(float("nan")) is None
        assert SimilarityScale.of(index, pairs=5000).sample.tolist() == scale.sample.tolist()  # fixed seed

    def test_l2_percentile_ranks_smaller_distances_higher(self) -> None:
        scale = SimilarityScale(metric="l2", sample=np.array([1.0, 2.0, 3.0, 4.0]))
        assert scale.percentile(0.5) == 100 and scale.percentile(2.5) == 50 and scale.percentile(9.0) == 0


class TestMaps:
    def test_umap_is_seeded_and_tiny_inputs_work(self) -> None:
        vectors = np.random.default_rng(0).normal(size=(30, 8))
        first, again = umap_2d(vectors, seed=3), umap_2d(vectors, seed=3)
        assert first.shape == (30, 2) and np.isfinite(first).all() and np.array_equal(first, again)
        assert umap_2d(vectors[:2]).shape == (2, 2) and umap_2d(vectors[:1]).shape == (1, 2)
        assert sample_rows(10, 20).tolist() == list(range(10))
        rows = sample_rows(100, 7, seed=1)
        assert (
            len(rows) == 7
            and rows.tolist() == sorted(set(rows.tolist()))
            and rows.tolist() == sample_rows(100, 7, 1).tolist()
        )

    def test_index_map_command_writes_map_parquet(self, image_index: ImageIndex, tmp_path: Path) -> None:
        folder = copy_index(image_index, tmp_path / "idx")
        code, output = Cli()("index", "map", folder, "--max-cells", "10")
        assert code == 0, output
        assert "10 of 24 cells mapped" in output
        frame = read_map(folder)
        assert frame is not None and list(frame.columns) == ["cell_id", "x", "y"] and len(frame) == 10
        index = load_index(folder)
        assert frame["cell_id"].isin(index.cells["cell_id"]).all() and map_is_current(frame, index)
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # written atomically

        with TestClient(create_app(folder), base_url=LOCAL) as client:  # served as it is: 10 of 24 cells
            body = client.get("/api/map", params={"color": "mutation"}).json()
        assert body["status"] == "ready" and len(body["points"]) == 10 and body["n_indexed"] == 24

    def test_small_index_gets_a_lazy_map_coloured_by_a_column(self, image_index: ImageIndex, tmp_path: Path) -> None:
        folder = copy_index(image_index, tmp_path / "idx")
        cells = load_index(folder).cells.set_index("cell_id")
        with TestClient(create_app(folder), base_url=LOCAL) as client:
            body = ready_map(client, "mutation")
            assert body["status"] == "ready", body
            points = body["points"]
            assert len(points) == 24 and {"cell_id", "x", "y", "value"} == set(points[0])
            assert all(cells.loc[p["cell_id"], "mutation"] == p["value"] for p in points)
            assert sorted(body["values"]) == sorted(MUTATIONS)
            assert "prediction" not in body["colors"] and {"cell_type", "mutation", "patient_id"} <= set(body["colors"])
            blast = client.get("/api/map", params={"color": "is_blast"}).json()
            assert {p["value"] for p in blast["points"]} <= {"blast", "non-blast", "unknown"}
            assert client.get("/api/map", params={"color": "path"}).status_code == 400
            assert client.get("/api/map", params={"color": "prediction"}).status_code == 400
        assert (folder / MAP_FILE).is_file()  # cached for the next start
        assert map_is_current(read_map(folder), load_index(folder))

    def test_big_index_without_a_map_names_the_command(self, image_index: ImageIndex, tmp_path: Path) -> None:
        folder = copy_index(image_index, tmp_path / "idx")
        with TestClient(create_app(folder, lazy_map_cells=10), base_url=LOCAL) as client:
            body = client.get("/api/map").json()
        assert body["status"] == "missing" and f"marrowlens index map {folder}" in body["message"]
        assert body["points"] == [] and not (folder / MAP_FILE).exists()

    def test_a_stale_map_is_not_served(self, image_index: ImageIndex, tmp_path: Path) -> None:
        folder = copy_index(image_index, tmp_path / "idx")
        index = load_index(folder)
        frame = pd.DataFrame({"cell_id": index.cells["cell_id"].astype(str)[:5], "x": 0.0, "y": 1.0})
        frame.attrs["source"] = {"model_fingerprint": "sha256:other", "count": len(index)}
        write_map(folder, frame)
        assert not map_is_current(read_map(folder), index)
        with TestClient(create_app(folder, lazy_map_cells=10), base_url=LOCAL) as client:
            body = client.get("/api/map").json()
        assert body["status"] == "missing" and "another version" in body["message"]

    def test_probe_prediction_colours_the_map(
        self, image_index: ImageIndex, mutation_probe: MutationProbe, tmp_path: Path
    ) -> None:
        folder = copy_index(image_index, tmp_path / "idx")
        write_map(folder, index_map(load_index(folder)))
        predicted = {p["patient_id"]: p["predicted"] for p in mutation_probe.report["patients"]}
        cells = load_index(folder).cells.set_index("cell_id")
        with TestClient(create_app(folder, probe=mutation_probe.folder), base_url=LOCAL) as client:
            body = client.get("/api/map", params={"color": "prediction"}).json()
        assert body["status"] == "ready" and "prediction" in body["colors"]
        for point in body["points"]:
            assert point["value"] == predicted.get(str(cells.loc[point["cell_id"], "patient_id"]), "unknown")
