"""The patient pages and their API (a mutation probe served beside the index): calls, cells, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from marrowlens.errors import MarrowLensError
from marrowlens.retrieval.search import Searcher
from marrowlens.retrieval.web import create_app
from marrowlens.retrieval.web.patients import Patients
from tests.retrieval.conftest import NOT_INDEXED, ODD_PATIENT, ImageIndex, MutationProbe, write_mutation_probe
from tests.retrieval.test_web import local_client

NO_PROBE = "no probe is loaded: start the server with --probe PROBE"


@pytest.fixture(scope="module")
def searcher(image_index: ImageIndex) -> Searcher:
    return Searcher.open(image_index.idx)


@pytest.fixture(scope="module")
def client(image_index: ImageIndex, mutation_probe: MutationProbe, searcher: Searcher):
    with local_client(create_app(image_index.idx, searcher=searcher, probe=mutation_probe.folder)) as client:
        yield client


@pytest.fixture(scope="module")
def bare_client(image_index: ImageIndex, searcher: Searcher):
    with local_client(create_app(image_index.idx, searcher=searcher)) as client:
        yield client


class TestApi:
    def test_list_puts_misclassified_first(self, client: TestClient) -> None:
        patients = client.get("/api/patients").json()
        assert [p["patient_id"] for p in patients] == ["NPM1_p1", "NPM1_p0", "control_p0", ODD_PATIENT]
        first = patients[0]
        assert first == {
            "patient_id": "NPM1_p1",
            "truth": "NPM1",
            "predicted": "control",
            "confidence": 0.7,
            "n_cells": 6,
            "correct": False,
        }
        assert all(p["correct"] for p in patients[1:])
        assert patients[1]["n_cells"] == 8  # its two cells the index lacks are counted by the probe

    def test_patient_cells_by_contribution_with_their_metadata(self, client: TestClient) -> None:
        patient = client.get("/api/patients/NPM1_p0").json()
        assert patient["predicted"] == "NPM1" and patient["correct"] is True and patient["n_kept"] == 7
        assert patient["probabilities"] == {"NPM1": 0.8, "control": pytest.approx(0.2)}
        assert patient["head"] == "abmil" and patient["contribution_meaning"] == "attention weight"
        assert patient["n_not_indexed"] == len(NOT_INDEXED)
        cells = patient["cells"]
        assert len(cells) == 6 and not {c["cell_id"] for c in cells} & set(NOT_INDEXED)
        scores = [c["contribution"] for c in cells]
        assert scores[-1] is None and scores[:-1] == sorted(scores[:-1], reverse=True)
        assert [c["kept"] for c in cells] == [True] * 5 + [False]
        for cell in cells:
            metadata = client.get(f"/api/cells/{cell['cell_id']}").json()
            assert {k: cell[k] for k in metadata} == metadata and cell["patient_id"] == "NPM1_p0"
        assert client.get(cells[0]["thumbnail"]).headers["content-type"] == "image/jpeg"

    def test_contribution_order_is_not_the_probe_file_order(
        self, image_index: ImageIndex, searcher: Searcher, tmp_path: Path
    ) -> None:
        probe = write_mutation_probe(tmp_path / "probe", image_index)
        cells = probe.cells.copy()
        cells["contribution"] = cells["contribution"][::-1].to_numpy()  # unused cells move to the front
        cells.to_parquet(probe.folder / "patient_cells.parquet", index=False)
        for rows in Patients.open(probe.folder, searcher).cells.values():
            scores = [row.contribution for row in rows]
            used = [s for s in scores if s is not None]
            assert used == sorted(used, reverse=True) and scores[: len(used)] == used

    def test_odd_patient_id(self, client: TestClient) -> None:
        response = client.get(f"/api/patients/{quote(ODD_PATIENT)}")
        assert response.status_code == 200 and response.json()["patient_id"] == ODD_PATIENT

    def test_unknown_patient_is_404(self, client: TestClient) -> None:
        for url in ("/api/patients/NPM1_p9", "/patients/NPM1_p9"):
            response = client.get(url)
            assert response.status_code == 404
            assert response.json()["detail"].endswith("has no patient 'NPM1_p9'")

    @pytest.mark.parametrize("url", ["/api/patients", "/api/patients/NPM1_p0", "/patients", "/patients/NPM1_p0"])
    def test_without_a_probe_patient_routes_are_404(self, bare_client: TestClient, url: str) -> None:
        response = bare_client.get(url)
        assert response.status_code == 404 and response.json() == {"detail": NO_PROBE}

    def test_openapi_documents_the_patient_routes(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/api/patients", "/api/patients/{patient_id}"} <= set(paths)


class TestPages:
    def test_main_page_links_to_the_patients_only_with_a_probe(
        self, client: TestClient, bare_client: TestClient
    ) -> None:
        assert 'href="/patients"' in client.get("/").text
        assert "/patients" not in bare_client.get("/").text

    def test_patient_list_escapes_and_links(self, client: TestClient) -> None:
        page = client.get("/patients").text
        assert "<b>" not in page and "odd &lt;b&gt;id&lt;/b&gt; &amp; &#39;x&#39;" in page
        assert f'href="/patients/{quote(ODD_PATIENT, safe="/")}"' in page
        assert page.index("NPM1_p1") < page.index("NPM1_p0")  # misclassified first
        assert "misclassified" in page and 'class="wrong"' in page

    def test_odd_patient_page_is_escaped(self, client: TestClient) -> None:
        response = client.get(f"/patients/{quote(ODD_PATIENT)}")
        assert response.status_code == 200
        assert "<b>" not in response.text and "odd &lt;b&gt;id&lt;/b&gt;" in response.text

    def test_patient_page_shows_the_call_and_cells_by_contribution(self, client: TestClient) -> None:
        page = client.get("/patients/NPM1_p1").text
        assert "misclassified" in page and "attention weight" in page and "abmil head" in page
        cells = client.get("/api/patients/NPM1_p1").json()["cells"]
        positions = [page.index(f'href="/?cell={cell["cell_id"]}"') for cell in cells]
        assert positions == sorted(positions)
        assert page.count('<li class="card') == 6 and "unused" in page and "filtered out" in page
        assert "not in the index" not in page
        assert "2 cells of this patient are not in the index" in client.get("/patients/NPM1_p0").text

    def test_main_page_searches_from_a_linked_cell(self, client: TestClient) -> None:
        script = client.get("/static/app.js").text
        assert 'URLSearchParams(window.location.search).get("cell")' in script


def _fingerprint(report: dict) -> None:
    report["embeddings"]["model_fingerprint"] = "sha256:" + "ab" * 32


class TestRefusals:
    @pytest.mark.parametrize(
        "spoil, message",
        [
            (lambda f: (f / "report.json").unlink(), "is not a probe folder: report.json is missing"),
            (lambda f: (f / "patient_cells.parquet").unlink(), "has no patient_cells.parquet"),
            (lambda f: (f / "report.json").write_text("{"), "report.json is unreadable"),
            (lambda f: (f / "patient_cells.parquet").write_bytes(b"PAR1"), "is not a readable parquet table"),
            (lambda f: shutil.rmtree(f), "does not exist"),
        ],
    )
    def test_missing_or_unreadable_files(
        self, image_index: ImageIndex, searcher: Searcher, tmp_path: Path, spoil, message
    ):
        probe = write_mutation_probe(tmp_path / "probe", image_index)
        spoil(probe.folder)
        with pytest.raises(MarrowLensError, match=message) as error:
            Patients.open(probe.folder, searcher)
        assert "\n" not in str(error.value)

    @pytest.mark.parametrize(
        "edit, message",
        [
            (lambda r: r.update(task="blast"), "is a 'blast' probe; patient pages need a mutation probe"),
            (lambda r: r.pop("patient_head"), "at patient_head: Field required"),
            (lambda r: r["patients"][0].pop("p_control"), "patient 'NPM1_p0' lacks a probability p_control"),
            (lambda r: r["patients"][0].update(confidence=float("nan")), None),
            (_fingerprint, "backbone fingerprint mismatch: index .* has random:test_resnet:seed0 but probe .* has ab"),
        ],
    )
    def test_report_contents(self, image_index: ImageIndex, searcher: Searcher, tmp_path: Path, edit, message):
        probe = write_mutation_probe(tmp_path / "probe", image_index)
        edit(probe.report)
        (probe.folder / "report.json").write_text(json.dumps(probe.report))
        if message is None:  # a NaN confidence is no confidence, not an error
            assert Patients.open(probe.folder, searcher).report.patients[0].confidence is None
            return
        with pytest.raises(MarrowLensError, match=message) as error:
            Patients.open(probe.folder, searcher)
        assert "\n" not in str(error.value)

    def test_missing_cell_columns(self, image_index: ImageIndex, searcher: Searcher, tmp_path: Path) -> None:
        probe = write_mutation_probe(tmp_path / "probe", image_index)
        probe.cells.drop(columns=["kept"]).to_parquet(probe.folder / "patient_cells.parquet")
        with pytest.raises(MarrowLensError, match="patient_cells.parquet lacks the column.s. kept"):
            Patients.open(probe.folder, searcher)


class TestServeCommand:
    def test_serve_reads_the_probe_before_serving(
        self, cli, image_index: ImageIndex, mutation_probe: MutationProbe, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import uvicorn

        served = []
        monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
        code, output = cli("serve", "--index", image_index.idx, "--probe", mutation_probe.folder)
        assert code == 0 and len(served) == 1, output
        assert "4 patients of probe" in output and "2 of their cells are not in the index" in output

    def test_serve_refuses_another_backbone_s_probe(self, cli, image_index: ImageIndex, tmp_path: Path) -> None:
        probe = write_mutation_probe(tmp_path / "probe", image_index)
        _fingerprint(probe.report)
        (probe.folder / "report.json").write_text(json.dumps(probe.report))
        code, output = cli("serve", "--index", image_index.idx, "--probe", probe.folder)
        assert code == 2 and output.count("\n") == 0
        assert f"index {image_index.idx}" in output and f"probe {probe.folder}" in output
