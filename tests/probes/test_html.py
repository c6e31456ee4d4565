"""report.html of probe fit, eval and test: self-contained (every image an embedded PNG), every section there,
baselines computed from the report's own counts, odd patient ids escaped."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from marrowlens.embeddings import write_embeddings
from marrowlens.probes import commands
from marrowlens.probes.html import REPORT_HTML
from marrowlens.probes.report import REPORT_JSON, REPORT_MD
from tests.conftest import model_meta, write_cell
from tests.probes.helpers import SYNTHETIC_MODEL, synthetic_cells, synthetic_vectors

PNG = b"\x89PNG\r\n\x1a\n"
ODD = "NPM1 <p0> & co"
KNN = {"head": "knn", "loss.name": None}


class Page(HTMLParser):
    """The page's <img> sources, section ids and text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.sections: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        if tag == "section":
            self.sections.append(values.get("id") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    assert page.images, "no image in the page"
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix) :], validate=True)
        assert len(data) > 100 and data.startswith(PNG)
    return page


def _store(folder: Path, cohort: Path, seed: int, patients: int) -> Path:
    cells = synthetic_cells(mutations=("NPM1", "control"), patients_per_class=patients, cells_per_patient=8, seed=seed)
    cells["patient_id"] = cells["patient_id"].replace({"NPM1_p0": ODD})
    for i, path in enumerate(cells["path"]):
        if not (cohort / path).is_file():
            write_cell(cohort / path, seed=i)
    vectors = synthetic_vectors(cells, separation=0.6, seed=seed)  # some errors to show
    origin = {
        "model": model_meta(SYNTHETIC_MODEL, vectors.shape[1]),
        "cohort": {"folder": str(cohort), "fingerprint": f"{seed:02d}" * 32},
    }
    write_embeddings(folder, vectors, cells, origin)
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html")
    _store(root / "emb", root / "cohort", seed=0, patients=3)
    blast = commands.probe_config("blast", None, KNN, ["eval.cv=2", "eval.bootstrap=5"])
    commands.fit("blast", root / "emb", root / "blast", blast)
    mutation = commands.probe_config("mutation", None, KNN, ["eval.cv=2", "eval.bootstrap=5"])
    commands.fit("mutation", root / "emb", root / "mutation", mutation, blast_probe=root / "blast")
    return root


def test_fit_writes_a_self_contained_page_with_every_section(fitted: Path) -> None:
    folder = fitted / "blast"
    page = parse(folder / REPORT_HTML)
    for section in ("summary", "headline", "roc", "confusion", "calibration", "umap", "errors"):
        assert section in page.sections
    for name in ("roc_cell", "confusion_cell", "calibration", "umap", "errors"):
        assert (folder / f"{name}.png").stat().st_size > 0
    report = json.loads((folder / REPORT_JSON).read_text())
    assert all(note is None for name, note in report["figures"].items() if name != "roc_patient")
    markdown = (folder / REPORT_MD).read_text()
    for png in folder.glob("*.png"):
        assert f"]({png.name})" in markdown, png.name  # report.md links every figure


def test_baselines_come_from_the_reports_own_counts(fitted: Path) -> None:
    report = json.loads((fitted / "blast" / REPORT_JSON).read_text())
    support = {name: entry["support"] for name, entry in report["cell"]["per_class"].items()}
    base = report["cell"]["baselines"]
    assert base["chance_balanced_accuracy"] == pytest.approx(1 / len(support))
    assert base["majority_accuracy"] == pytest.approx(max(support.values()) / sum(support.values()))
    assert base["chance_roc_auc"] == 0.5
    text = " ".join(parse(fitted / "blast" / REPORT_HTML).text)
    assert f"chance (1/{len(support)})" in text and f"{1 / len(support):.3f}" in text
    assert f"majority class ({base['majority_class']})" in text and f"{base['majority_accuracy']:.3f}" in text


def test_the_mutation_page_has_patient_rocs_sheets_misclassified_first_and_escapes_ids(fitted: Path) -> None:
    folder = fitted / "mutation"
    html = (folder / REPORT_HTML).read_text()
    page = parse(folder / REPORT_HTML)
    assert "patients" in page.sections and "roc" in page.sections
    report = json.loads((folder / REPORT_JSON).read_text())
    assert report["figures"]["roc_patient"] is None and (folder / "roc_patient.png").stat().st_size > 0
    sheets = report["sheets"]["patients"]
    assert len(sheets) > 0 and len(page.images) >= len(sheets) + 5
    assert ODD not in html and "NPM1 &lt;p0&gt; &amp; co" in html
    flags = [entry["misclassified"] for entry in sheets]
    assert flags == sorted(flags, reverse=True)


def test_eval_and_test_write_the_page_too(fitted: Path, tmp_path: Path) -> None:
    commands.evaluate(fitted / "blast", fitted / "emb", out=tmp_path / "eval", cv=2, bootstrap=5)
    parse(tmp_path / "eval" / REPORT_HTML)
    other = _store(tmp_path / "other", tmp_path / "cohort", seed=5, patients=2)
    commands.external_test(fitted / "blast", other, tmp_path / "test", bootstrap=5)
    page = parse(tmp_path / "test" / REPORT_HTML)
    assert {"roc", "umap", "errors"} <= set(page.sections)
    assert "External test: blast" in " ".join(page.text)


def test_unreachable_images_leave_a_note_not_a_broken_page(fitted: Path, tmp_path: Path) -> None:
    cells = synthetic_cells(mutations=("NPM1", "control"), patients_per_class=2, cells_per_patient=8)
    vectors = synthetic_vectors(cells, separation=0.3)
    write_embeddings(tmp_path / "emb", vectors, cells, {"model": model_meta(SYNTHETIC_MODEL, vectors.shape[1])})
    config = commands.probe_config("blast", None, KNN, ["eval.cv=2", "eval.bootstrap=5"])
    commands.fit("blast", tmp_path / "emb", tmp_path / "probe", config)
    report = json.loads((tmp_path / "probe" / REPORT_JSON).read_text())
    assert report["figures"]["errors"] == (
        "error gallery skipped: the embeddings' meta.json records no cohort folder"
    ), report["figures"]["errors"]
    assert not (tmp_path / "probe" / "errors.png").exists()
    parse(tmp_path / "probe" / REPORT_HTML)
    assert np.isfinite(report["cell"]["baselines"]["majority_accuracy"])


def test_the_page_renders_offline_in_chromium(fitted: Path, tmp_path: Path) -> None:
    """Every image of the mutation page decodes in a real browser, which requests nothing beyond the file."""
    from tests.retrieval.test_browser import CHROMIUM, browser

    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}; `make browser` installs it")
    requested: list[str] = []
    with browser(tmp_path) as page:
        page.on("request", lambda request: requested.append(request.url))
        page.goto((fitted / "mutation" / REPORT_HTML).resolve().as_uri())
        page.wait_for_load_state("load")
        shown = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        title = page.title()
    assert shown and all(shown), shown
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
    assert title == "Probe report: mutation"
