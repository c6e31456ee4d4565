"""A real browser against a real server: Debian's Chromium, driven by Playwright, uploads a cell
and walks from the patient pages to a search.

Never downloads a browser (``playwright install`` has no network here): ``make browser`` (which
``make test`` runs first) installs Debian's ``chromium`` package where root and apt are available.
The test is skipped, saying why, only where that executable is absent.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.retrieval.conftest import ODD_PATIENT, ImageIndex, MutationProbe

CHROMIUM = Path(os.environ.get("MARROWLENS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
K = 6
SHOTS = Path(os.environ.get("MARROWLENS_SCREENSHOTS", "/tmp"))  # explorer_*.png: looked at by whoever changes the page

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"Chromium is not installed at {CHROMIUM}; `make browser` installs Debian's package (needs root and apt)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(image_index: ImageIndex, *extra: str) -> Iterator[str]:
    """``marrowlens serve`` over the test index (plus ``extra`` arguments) until the block ends; yields its URL."""
    import httpx

    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marrowlens",
            "serve",
            "--index",
            str(image_index.idx),
            "--port",
            str(port),
            "-k",
            str(K),
            *extra,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"marrowlens serve exited: {process.stdout.read()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("marrowlens serve did not answer within 90 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def server(image_index: ImageIndex) -> Iterator[str]:
    with serving(image_index) as url:
        yield url


@pytest.fixture
def probe_server(image_index: ImageIndex, mutation_probe: MutationProbe) -> Iterator[str]:
    with serving(image_index, "--probe", str(mutation_probe.folder)) as url:
        yield url


@pytest.fixture(scope="module")
def mapped_index(image_index: ImageIndex, tmp_path_factory: pytest.TempPathFactory) -> ImageIndex:
    """A copy of the test index with its map.parquet made here (the server would otherwise compile UMAP first)."""
    from marrowlens.maps import index_map, write_map
    from marrowlens.retrieval.index import load_index

    folder = tmp_path_factory.mktemp("mapped") / "idx"
    shutil.copytree(image_index.idx, folder)
    write_map(folder, index_map(load_index(folder)))
    return dataclasses.replace(image_index, idx=folder)


@pytest.fixture(scope="module")
def map_server(mapped_index: ImageIndex) -> Iterator[str]:
    with serving(mapped_index) as url:
        yield url


@contextmanager
def browser(tmp_path: Path):
    """A headless Chromium page on a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 900},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def all_loaded(selector: str, count: int) -> str:
    """A page function: ``count`` images match ``selector`` and every one has loaded."""
    return f"""() => {{
        const images = [...document.querySelectorAll('{selector}')];
        return images.length === {count} && images.every((img) => img.complete && img.naturalWidth > 0);
    }}"""


def test_upload_shows_k_neighbour_thumbnails(server: str, image_index: ImageIndex, tmp_path: Path) -> None:
    with browser(tmp_path) as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server)
        page.set_input_files("#file", str(image_index.image("NPM1", 1, 2)))
        page.wait_for_function(all_loaded("#grid img", K), timeout=60_000)

        assert page.eval_on_selector("#query-image", "img => img.complete && img.naturalWidth > 0")
        captions = page.locator("#grid .card").all_inner_texts()
        assert len(captions) == K and "#1" in captions[0] and "patient" in captions[0]
        assert not any("sim 1.000" in caption for caption in captions)  # the query cell is not its own neighbour
        note = page.inner_text("#self-note")
        assert (
            note.startswith("This image is indexed cell")
            and "patient NPM1_p1" in note
            and "left out of its own neighbours and vote" in note
        )
        assert "mutation" in page.inner_text("#vote") and f"/{K}" in page.inner_text("#vote")
        assert page.inner_text("#status").startswith(f"{K} neighbours in")
        page.screenshot(path=str(tmp_path / "retrieval-page.png"), full_page=True)

        second = page.locator("#grid .card").nth(1)
        clicked = second.get_attribute("data-cell-id")
        second.click()
        page.wait_for_function(
            f"() => !document.querySelector('#grid .card[data-cell-id=\"{clicked}\"]')", timeout=60_000
        )
        page.wait_for_function(all_loaded("#grid img", K), timeout=60_000)
        assert "patient" in page.inner_text("#query-caption")
        assert page.inner_text("#self-note").startswith(f"The query is indexed cell {clicked[:12]}")

        assert all(url.startswith((server, "blob:")) for url in requests), requests


def test_patient_page_to_a_search(probe_server: str, tmp_path: Path) -> None:
    """/ -> /patients -> the odd patient's page (escaped) -> click its top cell -> its neighbours."""
    with browser(tmp_path) as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(probe_server)
        page.click("#patients-link")
        page.wait_for_url("**/patients")
        rows = page.locator("table.patients tbody tr").all_inner_texts()
        assert len(rows) == 4 and "misclassified" in rows[0]
        page.get_by_role("link", name=ODD_PATIENT).click()
        page.wait_for_function(all_loaded("#cells img", 6), timeout=60_000)

        assert page.inner_text("#patient-id") == ODD_PATIENT  # shown as text, not parsed as markup
        assert "correct" in page.inner_text("#verdict") and "attention weight" in page.inner_text("#meaning")
        scores = page.locator("#cells .sim").all_inner_texts()
        assert scores[-1] == "unused" and scores[:-1] == sorted(scores[:-1], reverse=True)
        page.screenshot(path=str(tmp_path / "patient-page.png"), full_page=True)

        top = page.locator("#cells .card").first.get_attribute("data-cell-id")
        page.locator("#cells .card a").first.click()
        page.wait_for_function(all_loaded("#grid img", K), timeout=60_000)
        assert page.inner_text("#self-note").startswith(f"The query is indexed cell {top[:12]}")
        assert page.inner_text("#status").startswith(f"{K} neighbours in")

        assert all(url.startswith(probe_server) for url in requests), requests


def cards_all(value: str, count: int) -> str:
    """A page function: ``count`` result cards, every one showing ``value``, their images loaded."""
    return f"""() => {{
        const cards = [...document.querySelectorAll('#grid .card')];
        return cards.length === {count} && cards.every((c) => c.innerText.includes('{value}'))
            && cards.every((c) => c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0);
    }}"""


def test_filters_percentiles_and_a_bad_upload(map_server: str, image_index: ImageIndex, tmp_path: Path) -> None:
    """Filter by mutation: only its cells come back (the search re-runs); each shows its percentile;
    a bad upload then clears the results and says why."""
    with browser(tmp_path) as page:
        page.goto(map_server)
        page.wait_for_selector('#filters label[data-column="mutation"]:not([hidden])')
        assert "percentile among 20,000 random pairs" in page.inner_text("#scale-note")
        page.set_input_files("#file", str(image_index.image("NPM1", 0, 1)))
        page.wait_for_function(all_loaded("#grid img", K), timeout=60_000)
        for mutation in ("control", "NPM1"):
            page.select_option("#filter-mutation", mutation)
            page.wait_for_function(cards_all(mutation, K), timeout=60_000)
            assert f"only cells with mutation={mutation}" in page.inner_text("#status")
            mutations = page.locator("#grid .card p:last-child").all_inner_texts()
            assert mutations == [mutation] * K
        percentiles = page.locator("#grid .card .pct").all_inner_texts()
        assert len(percentiles) == K and all(p.startswith("above ") and p.endswith("% of pairs") for p in percentiles)
        values = [float(p.split()[1].rstrip("%")) for p in percentiles]
        assert values == sorted(values, reverse=True) and all(0 <= v <= 100 for v in values)
        page.screenshot(path=str(SHOTS / "explorer_results.png"), full_page=True)

        page.set_input_files("#file", files=[{"name": "bad.png", "mimeType": "image/png", "buffer": b"not an image"}])
        page.wait_for_function("() => document.getElementById('result').hidden", timeout=60_000)
        assert page.locator("#grid .card").count() == 0
        status = page.inner_text("#status")
        assert status.startswith("error:") and "not a usable image" in status
        page.screenshot(path=str(SHOTS / "explorer_bad_upload.png"), full_page=True)

        page.click("#clear-filters")  # a filter change retries the failed query: the same error, still no results
        page.wait_for_function("() => !document.getElementById('status').textContent.includes('mutation=')")
        page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
        assert page.locator("#grid .card").count() == 0 and "not a usable image" in page.inner_text("#status")


NON_BLANK = """() => {
    const canvas = document.getElementById('map');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let coloured = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240) coloured++;
    return coloured;
}"""


LONELIEST = """() => {
    const map = window.marrowlensMap, ids = map.cellIds(), at = ids.map((id) => map.screenOf(id));
    const gap = (i) => Math.min(...at.map((q, j) => (j === i ? Infinity : Math.hypot(q.x - at[i].x, q.y - at[i].y))));
    let best = 0;
    ids.forEach((_, i) => { if (gap(i) > gap(best)) best = i; });
    return ids[best];
}"""


def test_map_draws_pans_and_searches_from_a_clicked_cell(map_server: str, tmp_path: Path) -> None:
    with browser(tmp_path) as page:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(map_server)
        page.click("#map-panel summary")
        page.wait_for_function("() => document.getElementById('map').dataset.points === '24'", timeout=60_000)
        assert page.evaluate(NON_BLANK) > 24 * 10  # 24 discs of a few pixels each, on white
        assert "24 cells, coloured by cell type" in page.inner_text("#map-note")

        page.select_option("#map-color", "mutation")
        page.wait_for_function("() => document.getElementById('legend').children.length === 2", timeout=30_000)
        assert sorted(page.locator("#legend li").all_inner_texts()) == ["NPM1", "control"]
        assert "coloured by mutation" in page.inner_text("#map-note")
        page.screenshot(path=str(SHOTS / "explorer_map.png"), full_page=True)

        box = page.locator("#map").bounding_box()
        cell = page.evaluate(LONELIEST)  # no other point near it: a click there can only pick it
        before = page.evaluate(f"() => window.marrowlensMap.screenOf('{cell}')")
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -300)  # zoom in about the centre
        zoomed = page.evaluate(f"() => window.marrowlensMap.screenOf('{cell}')")
        assert zoomed != before
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 25, steps=5)
        page.mouse.up()  # a drag pans (and is no click)
        panned = page.evaluate(f"() => window.marrowlensMap.screenOf('{cell}')")
        assert abs(panned["x"] - zoomed["x"] - 40) < 1 and abs(panned["y"] - zoomed["y"] - 25) < 1
        assert page.locator("#grid .card").count() == 0
        page.click("#map-reset")

        at = page.evaluate(f"() => window.marrowlensMap.screenOf('{cell}')")
        page.mouse.click(box["x"] + at["x"], box["y"] + at["y"])
        page.wait_for_function(all_loaded("#grid img", K), timeout=60_000)
        note = page.inner_text("#self-note")
        assert note.startswith(f"The query is indexed cell {cell[:12]}") and page.inner_text("#status").startswith(
            f"{K} neighbours"
        )
        page.locator("#map-panel").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "explorer_map_search.png"), full_page=True)
        assert all(url.startswith(map_server) for url in requests), requests
