"""The web API through FastAPI's TestClient: search, cells, thumbnails, bad uploads, traversal, concurrency."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from marrowlens.cohort.images import ImageDecodeError, decode_bytes
from marrowlens.retrieval.web import create_app
from tests.conftest import write_cell
from tests.retrieval.conftest import ImageIndex

LOCAL = "http://127.0.0.1:8765"  # a real loopback Host header, as a browser on this machine sends


def local_client(app) -> TestClient:
    return TestClient(app, base_url=LOCAL)


@pytest.fixture(scope="module")
def client(image_index: ImageIndex):
    # max_queue above TestConcurrency's 12 simultaneous searches: none of those may be refused
    with local_client(create_app(image_index.idx, max_upload_mb=0.05, default_k=5, max_queue=16)) as client:
        yield client


def upload(client: TestClient, path: Path | None = None, data: bytes | None = None, name: str = "cell.png", **form):
    content = data if data is not None else path.read_bytes()
    return client.post("/api/search", files={"image": (name, content)}, data={k: str(v) for k, v in form.items()})


class TestPage:
    def test_page_loads_its_assets_locally(self, client: TestClient) -> None:
        page = client.get("/")
        assert page.status_code == 200 and "24 cells indexed" in page.text
        assert "Drop a cell image here" in page.text and "up to 0.1 MB" in page.text
        for asset in ("style.css", "app.js"):
            assert f"/static/{asset}" in page.text
            assert client.get(f"/static/{asset}").status_code == 200
        assert "http://" not in page.text.replace(f"{LOCAL}/", "") and "https://" not in page.text

    def test_openapi_documents_the_api(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/api/search", "/api/cells/{cell_id}", "/thumbs/{cell_id}"} <= set(paths)
        assert "413" in paths["/api/search"]["post"]["responses"]

    def test_api_docs_work_offline(self, client: TestClient) -> None:
        """FastAPI's /docs loads Swagger UI from a CDN: blank without a network. Ours ships its assets."""
        import re

        page = client.get("/docs")
        assert page.status_code == 200 and "/openapi.json" in page.text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert urls and all(url.startswith("/docs-assets/") for url in urls), urls
        for url in urls:
            assert client.get(url).status_code == 200 and len(client.get(url).content) > 500, url
        assert "cdn" not in page.text.lower()


class TestSearch:
    def test_upload_of_an_indexed_cell_names_it_and_leaves_it_out(
        self, client: TestClient, image_index: ImageIndex
    ) -> None:
        response = upload(client, image_index.image("control", 1, 3), k=6)
        assert response.status_code == 200, response.text
        result = response.json()
        itself = result["query"]["cell"]
        assert result["query"]["kind"] == "upload" and result["query"]["filename"] == "cell.png"
        assert (
            itself["path"] == "control/control_p1/cell3.png"
            and itself["patient_id"] == "control_p1"
            and itself["mutation"] == "control"
        )
        assert result["k"] == 6 and len(result["neighbours"]) == 6 and result["metric"] == "cosine"
        assert itself["cell_id"] not in {n["cell_id"] for n in result["neighbours"]}
        first = result["neighbours"][0]
        assert (
            first["rank"] == 1 and first["similarity"] < 0.99999 and first["thumbnail"] == f"/thumbs/{first['cell_id']}"
        )
        assert sum(entry["count"] for entry in result["vote"]["mutation"]) == 6

    def test_upload_of_a_new_cell_names_no_indexed_cell(self, client: TestClient, tmp_path: Path) -> None:
        result = upload(client, write_cell(tmp_path / "new.png", seed=4242, size=40), k=3).json()
        assert (
            result["query"] == {"kind": "upload", "filename": "cell.png", "cell": None}
            and len(result["neighbours"]) == 3
        )

    def test_default_k(self, client: TestClient, image_index: ImageIndex) -> None:
        assert len(upload(client, image_index.image()).json()["neighbours"]) == 5

    def test_search_from_a_result(self, client: TestClient, image_index: ImageIndex) -> None:
        first = upload(client, image_index.image("NPM1", 0, 4)).json()["neighbours"][1]
        response = client.post("/api/search", data={"cell_id": first["cell_id"], "k": "4"})
        assert response.status_code == 200
        result = response.json()
        assert result["query"]["kind"] == "cell" and result["query"]["cell"]["cell_id"] == first["cell_id"]
        assert first["cell_id"] not in [n["cell_id"] for n in result["neighbours"]]

    def test_filters(self, client: TestClient, image_index: ImageIndex) -> None:
        response = upload(client, image_index.image("NPM1"), k=4, filter="mutation=control")
        assert {n["mutation"] for n in response.json()["neighbours"]} == {"control"}

    @pytest.mark.parametrize(
        "form, status, detail",
        [
            ({"k": "30"}, 400, "k=30 is larger than the index allows"),
            ({"k": "0"}, 422, None),
            ({"filter": "mutation=FLT3"}, 400, "no indexed cell has mutation=FLT3"),
            ({"filter": "path=/etc/passwd"}, 400, "cannot filter on 'path'"),
        ],
    )
    def test_bad_requests(
        self, client: TestClient, image_index: ImageIndex, form: dict, status: int, detail: str | None
    ) -> None:
        response = upload(client, image_index.image(), **form)
        assert response.status_code == status
        if detail:
            assert detail in response.json()["detail"]

    def test_unknown_cell_is_404(self, client: TestClient) -> None:
        response = client.post("/api/search", data={"cell_id": "ffffffffffff"})
        assert response.status_code == 404 and "no indexed cell has id" in response.json()["detail"]

    @pytest.mark.parametrize("both", [False, True])
    def test_exactly_one_query(self, client: TestClient, image_index: ImageIndex, both: bool) -> None:
        if both:
            response = upload(client, image_index.image(), cell_id="abc")
        else:
            response = client.post("/api/search", data={"k": "3"})
        assert response.status_code == 422 and "exactly one of" in response.json()["detail"]


class TestBadUploads:
    @pytest.mark.parametrize(
        "data, name",
        [
            (b"", "empty.png"),
            (b"#!/bin/sh\nrm -rf /\n", "cell.png"),
            (b"GIF89a" + b"\x00" * 40, "cell.gif"),
            (b"II*\x00" + b"\x00" * 40, "cell.tif"),
            (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "no_suffix"),
        ],
    )
    def test_undecodable_upload_is_400_with_the_decoder_reason(
        self, client: TestClient, data: bytes, name: str
    ) -> None:
        with pytest.raises(ImageDecodeError) as reason:
            decode_bytes(data, Path(name).suffix)
        response = upload(client, data=data, name=name)
        assert response.status_code == 400
        assert response.json()["detail"] == f"the upload is not a usable image: {reason.value}"

    def test_tiny_image_is_400(self, client: TestClient) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG")
        response = upload(client, data=buffer.getvalue())
        assert response.status_code == 400 and "too small" in response.json()["detail"]

    def test_decompression_bomb_is_refused_before_decoding(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A small zlib TIFF declaring far more float pixels than the limit: 400, never decoded."""
        import numpy as np
        import tifffile

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, np.zeros((600, 600, 3), np.float32), compression="zlib")
        monkeypatch.setenv("MARROWLENS_MAX_PIXELS", "100000")
        monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *args, **kwargs: pytest.fail("the bomb was decoded"))
        response = upload(client, data=buffer.getvalue(), name="bomb.tif")
        assert response.status_code == 400
        assert response.json()["detail"].startswith(
            "the upload is not a usable image: too large (600x600 px, limit 100000 px"
        )

    def test_oversized_upload_is_413(self, client: TestClient, tmp_path: Path) -> None:
        big = write_cell(tmp_path / "big.png", seed=3, size=64).read_bytes() + b"\x00" * 200_000  # cap is 0.05 MB
        response = upload(client, data=big)
        assert response.status_code == 413

    def test_oversized_chunked_upload_is_413(self, client: TestClient) -> None:
        """No Content-Length to trust: the body is counted as it arrives."""

        def body():
            for _ in range(40):
                yield b"\x00" * 4096

        response = client.post(
            "/api/search", content=body(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
        assert response.status_code == 413

    def test_server_still_answers_after_bad_uploads(self, client: TestClient, image_index: ImageIndex) -> None:
        upload(client, data=b"junk")
        assert upload(client, image_index.image()).status_code == 200


class TestHosts:
    """DNS rebinding: a page on attacker.example rebound to 127.0.0.1 sends its own name as Host."""

    @pytest.mark.parametrize(
        "host",
        [
            "attacker.example:8765",
            "attacker.example",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example:8765",
            "",
        ],
    )
    def test_foreign_host_gets_400_and_no_cell_data(
        self, client: TestClient, image_index: ImageIndex, host: str
    ) -> None:
        cell_id = upload(client, image_index.image()).json()["neighbours"][0]["cell_id"]
        for response in (
            client.get(f"/api/cells/{cell_id}", headers={"Host": host}),
            client.post("/api/search", data={"cell_id": cell_id}, headers={"Host": host}),
            client.get(f"/thumbs/{cell_id}", headers={"Host": host}),
            client.get("/", headers={"Host": host}),
        ):
            assert response.status_code == 400 and response.text == "Invalid host header"
            assert response.headers["x-content-type-options"] == "nosniff"

    @pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.1"])
    def test_loopback_names_are_answered_with_nosniff(
        self, client: TestClient, image_index: ImageIndex, host: str
    ) -> None:
        cell_id = upload(client, image_index.image()).json()["neighbours"][0]["cell_id"]
        response = client.get(f"/api/cells/{cell_id}", headers={"Host": host})
        assert response.status_code == 200 and response.json()["patient_id"] == "NPM1_p0"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize(
        "path", ["/", "/static/app.js", "/api/cells/ffffffffffff", "/thumbs/nothing", "/openapi.json"]
    )
    def test_every_response_says_nosniff(self, client: TestClient, path: str) -> None:
        assert client.get(path).headers["x-content-type-options"] == "nosniff"

    def test_cross_origin_requests_get_no_cors_headers(self, client: TestClient) -> None:
        response = client.options(
            "/api/search", headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in response.headers

    def test_serve_trusts_its_host_and_allowed_names(
        self, image_index: ImageIndex, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import uvicorn

        from tests.conftest import Cli

        served = {}
        monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
        code, output = Cli()(
            "serve", "--index", image_index.idx, "--host", "10.1.2.3", "--allow-host", "cells.lab.example"
        )
        assert code == 0, output
        assert served["host"] == "10.1.2.3" and "clients must address it as 10.1.2.3" in output
        with TestClient(served["app"], base_url="http://10.1.2.3:8000") as client:
            assert client.get("/").status_code == 200
            assert client.get("/", headers={"Host": "cells.lab.example:8000"}).status_code == 200
            assert client.get("/", headers={"Host": "localhost:8000"}).status_code == 200
            assert client.get("/", headers={"Host": "attacker.example:8000"}).status_code == 400


class TestCellsAndThumbnails:
    def test_cell_record(self, client: TestClient, image_index: ImageIndex) -> None:
        neighbour = upload(client, image_index.image("NPM1", 1, 5)).json()["query"]["cell"]
        cell = client.get(f"/api/cells/{neighbour['cell_id']}").json()
        assert (
            cell["path"] == "NPM1/NPM1_p1/cell5.png" and cell["patient_id"] == "NPM1_p1" and cell["mutation"] == "NPM1"
        )
        assert client.get(f"/api/cells/{neighbour['cell_id'][:8]}").json()["cell_id"] == neighbour["cell_id"]

    def test_thumbnail_is_a_small_jpeg(self, client: TestClient, image_index: ImageIndex) -> None:
        cell_id = upload(client, image_index.image()).json()["neighbours"][0]["cell_id"]
        response = client.get(f"/thumbs/{cell_id}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and image.size == (40, 40)  # never enlarged
        assert client.get(f"/thumbs/{cell_id}").content == response.content  # cached

    @pytest.mark.parametrize(
        "path",
        [
            "/thumbs/..%2F..%2F..%2Fetc%2Fpasswd",
            "/thumbs/../../etc/passwd",
            "/thumbs/%2Fetc%2Fpasswd",
            "/thumbs/NPM1%2FNPM1_p0%2Fcell0.png",
            "/thumbs/NPM1/NPM1_p0/cell0.png",
            "/thumbs/....%2F%2F....%2F%2Fetc%2Fpasswd",
            "/thumbs/%00",
            "/thumbs/ffffffffffffffffffffffffffffffffffffffff",
            "/api/cells/..%2F..%2Fetc%2Fpasswd",
        ],
    )
    def test_nothing_but_indexed_cells_can_be_read(self, client: TestClient, path: str) -> None:
        response = client.get(path)
        assert response.status_code == 404
        assert b"root:" not in response.content

    def test_thumbnail_prefix_is_not_enough(self, client: TestClient, image_index: ImageIndex) -> None:
        cell_id = upload(client, image_index.image()).json()["neighbours"][0]["cell_id"]
        assert client.get(f"/thumbs/{cell_id[:10]}").status_code == 404


class TestAdmission:
    """Beyond ``max_queue`` searches in flight the server refuses at once (503) instead of queueing."""

    LIMIT = 2

    def test_overflow_gets_503_with_retry_after_then_service_resumes(
        self, image_index: ImageIndex, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from marrowlens.retrieval.search import Searcher

        searcher = Searcher.open(image_index.idx)
        entered, release = threading.Semaphore(0), threading.Event()
        search_cells = searcher.search_cells

        def held(*args, **kwargs):
            entered.release()
            release.wait(20)
            return search_cells(*args, **kwargs)

        monkeypatch.setattr(searcher, "search_cells", held)
        cell_id = str(searcher.index.cells["cell_id"].iloc[0])
        with local_client(create_app(image_index.idx, searcher=searcher, max_queue=self.LIMIT)) as client:
            with ThreadPoolExecutor(max_workers=self.LIMIT) as pool:
                admitted = [
                    pool.submit(client.post, "/api/search", data={"cell_id": cell_id, "k": "3"})
                    for _ in range(self.LIMIT)
                ]
                assert all(entered.acquire(timeout=20) for _ in range(self.LIMIT)), (
                    "the admitted searches never started"
                )
                overflow = [client.post("/api/search", data={"cell_id": cell_id}), upload(client, image_index.image())]
                other_endpoint = client.get(f"/api/cells/{cell_id}")
                release.set()
                answers = [future.result(timeout=60) for future in admitted]
            assert [response.status_code for response in answers] == [200] * self.LIMIT
            for response in overflow:
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                assert response.json()["detail"] == "the server is busy (2 searches in progress); retry in a second"
            assert other_endpoint.status_code == 200  # only searches are limited
            assert all(
                upload(client, image_index.image(cell=cell)).status_code == 200 for cell in range(self.LIMIT + 1)
            )

    def test_serve_passes_its_limit(self, image_index: ImageIndex, monkeypatch: pytest.MonkeyPatch) -> None:
        import uvicorn

        from marrowlens.retrieval.web.app import SearchAdmission
        from tests.conftest import Cli

        served = {}
        monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
        code, output = Cli()("serve", "--index", image_index.idx, "--max-queue", "3")
        assert code == 0, output
        limits = [m.kwargs["limit"] for m in served["app"].user_middleware if m.cls is SearchAdmission]
        assert limits == [3]


class TestConcurrency:
    def test_concurrent_searches_get_their_own_answers(self, client: TestClient, image_index: ImageIndex) -> None:
        queries = [image_index.image(m, p, c) for m in ("NPM1", "control") for p in range(2) for c in range(6)]

        def search(path: Path) -> str:
            response = upload(client, path, k=2)
            assert response.status_code == 200
            return response.json()["query"]["cell"]["path"]

        with ThreadPoolExecutor(max_workers=12) as pool:
            found = list(pool.map(search, queries))
        assert found == [str(q.relative_to(image_index.root)) for q in queries]


def test_missing_images_give_404_thumbnails_but_search_works(image_index: ImageIndex, tmp_path: Path) -> None:
    import json
    import shutil

    shutil.copytree(image_index.idx, tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["sources"][0]["cohort"] = {
        "folder": str(tmp_path / "gone"),
        "fingerprint": None,
        "root": str(tmp_path / "gone"),
    }
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    with local_client(create_app(tmp_path / "idx")) as client:
        neighbour = upload(client, image_index.image(), k=1).json()["neighbours"][0]
        response = client.get(neighbour["thumbnail"])
        assert response.status_code == 404 and "not on this machine" in response.json()["detail"]


def test_model_is_loaded_once_at_start_up(image_index: ImageIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    from marrowlens.retrieval.search import Searcher

    calls = []
    original = Searcher.open
    monkeypatch.setattr(
        Searcher, "open", classmethod(lambda cls, *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    )
    app = create_app(image_index.idx)
    assert calls == []  # creating the app loads nothing; start-up does
    with local_client(app) as client:
        assert len(calls) == 1
        for cell in range(3):
            assert upload(client, image_index.image(cell=cell), k=2).status_code == 200
    assert len(calls) == 1


def test_a_tampered_cells_table_cannot_reach_outside_the_cohort(image_index: ImageIndex, tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    shutil.copytree(image_index.idx, tmp_path / "idx")
    cells = pd.read_parquet(tmp_path / "idx" / "cells.parquet")
    cells.loc[0, "path"] = "../../../../../../etc/passwd"
    cells.to_parquet(tmp_path / "idx" / "cells.parquet", index=False)
    with local_client(create_app(tmp_path / "idx")) as client:
        response = client.get(f"/thumbs/{cells.loc[0, 'cell_id']}")
        assert response.status_code == 404 and "outside its cohort" in response.json()["detail"]
        assert client.get(f"/thumbs/{cells.loc[1, 'cell_id']}").status_code == 200
