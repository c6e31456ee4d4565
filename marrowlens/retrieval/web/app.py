"""The similar-cell web page and its JSON API (FastAPI): upload a cell, see its nearest cells.

``create_app(index_dir)`` loads the index and its backbone once, at start-up (lifespan), and
serves:

- ``GET /``: the page (one Jinja2 template, static JS/CSS, nothing fetched from the network);
- ``POST /api/search``: an uploaded image *or* an indexed cell id -> k neighbours + k-NN vote;
- ``GET /api/cells/{cell_id}``: one indexed cell's labels;
- ``GET /api/facets``: the values each filter column takes (the page's filter controls);
- ``GET /api/map?color=COLUMN``: the embedding map (UMAP, :mod:`marrowlens.maps`) coloured by a column
  (:mod:`marrowlens.retrieval.web.explore`);
- ``GET /thumbs/{cell_id}``: a small JPEG of an indexed cell;
- with a mutation probe (``probe``): ``GET /patients`` and ``/patients/{patient_id}``, pages of the
  probe's patient calls and of each patient's cells by contribution, and their JSON twins under
  ``/api/patients`` (:mod:`marrowlens.retrieval.web.patients`). Without one these routes answer 404.

Safety: uploads are capped (FastAPI's per-route ``max_body_size`` answers 413 before the body is
read) and must decode as an image (400 otherwise; images declaring too many pixels are refused
before decoding, see :mod:`marrowlens.cohort.images`); thumbnails are looked up by indexed cell id
only, so no request names a file path (404 for anything else). Requests whose ``Host`` header is
not a loopback name or one the server was told about get 400 (Starlette's ``TrustedHostMiddleware``),
so a web page whose DNS name was rebound to 127.0.0.1 cannot read the cells; every response says
``X-Content-Type-Options: nosniff``; no CORS headers are sent, so other origins cannot read answers.

Endpoints are plain ``def``s, so FastAPI runs them in its threadpool and concurrent requests are
served side by side: uploads are decoded and preprocessed in parallel, their forward passes are
merged into shared batches (:mod:`marrowlens.retrieval.batching`), and FAISS searches run
concurrently.

Admission control: at most ``max_queue`` searches are in flight (from the first byte of the request
to the last of the answer); the next one is answered at once with 503 and ``Retry-After: 1``
instead of waiting in the threadpool, so under overload the server refuses rather than stalls
(bench/RESULTS.md: at 20 clients on two cores, p99 0.2-0.3 s with the default 8 against 0.8-0.9 s
without a limit).

Similarity scale: each neighbour carries ``percentile``, the share of random pairs of indexed cells
that are less similar (:mod:`marrowlens.retrieval.scale`, sampled once at start-up).
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pandas as pd
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from marrowlens import __version__
from marrowlens.cohort.images import ImageDecodeError, decode_bytes, load_rgb
from marrowlens.contracts import IndexSource
from marrowlens.errors import MarrowLensError
from marrowlens.retrieval.scale import SimilarityScale
from marrowlens.retrieval.search import Searcher, UnknownCellError, cell_record, neighbour_records, parse_filters, vote
from marrowlens.retrieval.web.explore import (
    COLOR_COLUMNS,
    LAZY_MAX_CELLS,
    PREDICTION,
    MapState,
    color_values,
    facets,
)
from marrowlens.retrieval.web.patients import PatientRecord, Patients

HERE = Path(__file__).parent
THUMB_QUALITY = 88
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_QUEUE = 8  # searches in flight; bench/RESULTS.md (admission control)


class Cell(BaseModel):
    """An indexed cell and its labels (null where unknown)."""

    row: int
    cell_id: str
    patient_id: str | None = None
    cell_type: str | None = None
    is_blast: bool | None = None
    mutation: str | None = None
    domain: str | None = None
    split: str | None = None
    path: str
    thumbnail: str


class Neighbour(Cell):
    rank: int
    similarity: float | None = None
    distance: float
    percentile: float | None = None  # share (0-100) of random pairs of indexed cells that are less similar


class VoteEntry(BaseModel):
    label: str
    count: int


class Query(BaseModel):
    """What was searched for; ``cell`` is the indexed cell queried (or uploaded), left out of its own neighbours."""

    kind: Literal["upload", "cell"]
    filename: str | None = None
    cell: Cell | None = None


class SearchResult(BaseModel):
    """The neighbours of one query and the k-NN vote over their labels."""

    query: Query
    k: int
    metric: str
    index_kind: str
    elapsed_ms: float
    neighbours: list[Neighbour]
    vote: dict[str, list[VoteEntry]]


class Error(BaseModel):
    detail: str


class Facets(BaseModel):
    """The values each filter column takes, most common first (``truncated``: columns with more than shown)."""

    values: dict[str, list[str]]
    truncated: list[str]


class MapPoint(BaseModel):
    cell_id: str
    x: float
    y: float
    value: str


class MapAnswer(BaseModel):
    """The embedding map: ``status`` ready (with points), computing (ask again) or missing (``message`` says why)."""

    status: Literal["ready", "computing", "missing"]
    message: str = ""
    color: str
    colors: list[str]
    n_indexed: int
    values: list[str]  # the colour values, most common first
    points: list[MapPoint]


class PatientSummary(BaseModel):
    """One patient's call; ``correct`` is null where the probe's store had no truth."""

    patient_id: str
    truth: str | None = None
    predicted: str
    confidence: float | None = None
    n_cells: int
    correct: bool | None = None


class PatientCell(Cell):
    """A patient's indexed cell, whether the blast filter kept it, and its contribution (null: unused)."""

    kept: bool
    contribution: float | None = None


class PatientDetail(PatientSummary):
    """A patient's call, its class probabilities and its indexed cells, highest contribution first."""

    n_kept: int
    n_not_indexed: int
    probabilities: dict[str, float]
    head: str
    contribution_meaning: str
    cells: list[PatientCell]


class Thumbnails:
    """JPEG thumbnails of indexed cells, rendered on first request and kept in an LRU cache."""

    def __init__(self, searcher: Searcher, size: int, cache_size: int = 4096) -> None:
        self.searcher, self.size = searcher, size
        self.roots = [image_root(source) for source in searcher.index.meta.sources]
        self.render = functools.lru_cache(maxsize=cache_size)(self._render)

    def _render(self, row: int) -> bytes:
        cells = self.searcher.index.cells
        root = self.roots[int(cells["source"].iloc[row])]
        if root is None:
            raise HTTPException(404, "the images of this cell's cohort are not on this machine")
        path = (root / str(cells["path"].iloc[row])).resolve()
        if not path.is_relative_to(root):
            raise HTTPException(404, "this cell's image lies outside its cohort")
        try:
            image = load_rgb(path)
        except ImageDecodeError as exc:
            raise HTTPException(404, f"this cell's image cannot be read: {exc}") from None
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMB_QUALITY)
        return buffer.getvalue()


def image_root(source: IndexSource) -> Path | None:
    """The folder a source's cell paths are relative to, if it is still there."""
    cohort = source.cohort
    if cohort.root and Path(cohort.root).is_dir():
        return Path(cohort.root).resolve()
    if cohort.folder:
        from marrowlens.cohort.manifest import load_cohort

        try:
            return load_cohort(cohort.folder).root.resolve()
        except MarrowLensError:
            return None
    return None


def trusted_hosts(hosts: Sequence[str] = ()) -> list[str]:
    """Host header names to answer: loopback plus ``hosts``, IPv6 literals bracketed as in the header."""
    names = dict.fromkeys(name.strip().lower() for name in (*LOOPBACK_HOSTS, *hosts) if name.strip())
    return [f"[{name}]" if ":" in name and not name.startswith("[") else name for name in names]


class NoSniff:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_nosniff if scope["type"] == "http" else send)


class SearchAdmission:
    """ASGI middleware: at most ``limit`` requests to ``path`` in flight; the rest get 503 + Retry-After at once.

    Every request runs on the one event loop, so a plain counter is exact. The refusal is sent
    before the body is read; uvicorn discards the rest of it and keeps the connection.
    """

    def __init__(self, app: ASGIApp, limit: int, path: str = "/api/search") -> None:
        self.app, self.limit, self.path = app, limit, path
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
        elif self.in_flight >= self.limit:
            detail = f"the server is busy ({self.limit} searches in progress); retry in a second"
            await JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})(scope, receive, send)
        else:
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1


def create_app(
    index_dir: str | Path,
    model: str | Path | None = None,
    searcher: Searcher | None = None,
    max_upload_mb: float = 10.0,
    default_k: int = 10,
    thumb_px: int = 160,
    hosts: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    probe: str | Path | None = None,
    patients: Patients | None = None,
    lazy_map_cells: int = LAZY_MAX_CELLS,
) -> FastAPI:
    """The app for one index; pass ``searcher`` to reuse one already loaded (the CLI checks it before serving).

    ``hosts``: Host header names answered besides loopback (``serve`` passes its ``--host``);
    ``max_queue``: searches in flight before the next is refused with 503;
    ``probe``: a mutation probe folder for the patient pages (``patients``: one already read);
    ``lazy_map_cells``: an index this small without a map gets one computed when first asked for.
    """
    max_body = int(max_upload_mb * 2**20) + 64 * 1024  # the image plus the form's own fields

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = searcher or Searcher.open(index_dir, model)
        loaded.start_batching()
        app.state.searcher = loaded
        app.state.thumbs = Thumbnails(loaded, thumb_px)
        app.state.patients = patients or (Patients.open(probe, loaded) if probe is not None else None)
        app.state.scale = SimilarityScale.of(loaded.index)
        app.state.map = MapState(loaded.index, lazy_map_cells)
        try:
            yield
        finally:
            loaded.stop_batching()

    app = FastAPI(
        title="MarrowLens similar-cell search",
        version=__version__,
        description="Upload a cell image (or name an indexed cell) and get the most similar cells of the cohort.",
        lifespan=lifespan,
        docs_url=None,  # served below from the packaged Swagger UI: FastAPI's own page loads it from a CDN
        redoc_url=None,
    )
    app.add_middleware(SearchAdmission, limit=max_queue)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(hosts))
    app.add_middleware(NoSniff)  # outermost: the host check's 400 carries it too
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        """The interactive API docs, working offline."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    templates = Jinja2Templates(directory=HERE / "templates")

    @app.exception_handler(UnknownCellError)
    async def _unknown_cell(request: Request, exc: UnknownCellError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(MarrowLensError)
    async def _bad_request(request: Request, exc: MarrowLensError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def thumb_url(cell_id: str) -> str:
        return f"/thumbs/{cell_id}"

    def cell_model(searcher: Searcher, row: int) -> Cell:
        record = cell_record(searcher.index.cells, row)
        return Cell(
            **{k: v for k, v in record.items() if k in Cell.model_fields}, thumbnail=thumb_url(record["cell_id"])
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        searcher: Searcher = request.app.state.searcher
        context = {
            "count": len(searcher),
            "index_kind": searcher.index.kind,
            "model": searcher.info.timm_name,
            "default_k": min(default_k, len(searcher) - 1) if len(searcher) > 1 else 1,
            "max_upload_mb": max_upload_mb,
            "has_patients": request.app.state.patients is not None,
            "metric": searcher.index.metric,
            "scale": request.app.state.scale.quantiles(),
        }
        return templates.TemplateResponse(request, "index.html", context)

    def loaded_patients(request: Request) -> Patients:
        patients: Patients | None = request.app.state.patients
        if patients is None:
            raise HTTPException(404, "no probe is loaded: start the server with --probe PROBE")
        return patients

    def patient_record(patients: Patients, patient_id: str) -> PatientRecord:
        record = patients.record(patient_id)
        if record is None:
            raise HTTPException(404, f"probe {patients.folder} has no patient {patient_id!r}")
        return record

    def summary(record: PatientRecord) -> PatientSummary:
        return PatientSummary(**record.model_dump(include=set(PatientSummary.model_fields)), correct=record.correct)

    def patient_detail(request: Request, patient_id: str) -> PatientDetail:
        searcher: Searcher = request.app.state.searcher
        patients = loaded_patients(request)
        record = patient_record(patients, patient_id)
        cells = [
            PatientCell(**cell_model(searcher, cell.row).model_dump(), kept=cell.kept, contribution=cell.contribution)
            for cell in patients.cells[patient_id]
        ]
        return PatientDetail(
            **summary(record).model_dump(),
            n_kept=record.n_kept,
            n_not_indexed=patients.not_indexed[patient_id],
            probabilities=patients.probabilities[patient_id],
            head=patients.report.patient_head.name,
            contribution_meaning=patients.report.patient_head.contribution,
            cells=cells,
        )

    @app.get("/patients", response_class=HTMLResponse, include_in_schema=False)
    def patients_page(request: Request) -> HTMLResponse:
        patients = loaded_patients(request)
        context = {"patients": [summary(r) for r in patients.ordered()], "probe": patients.folder.name}
        return templates.TemplateResponse(request, "patients.html", context)

    @app.get("/patients/{patient_id:path}", response_class=HTMLResponse, include_in_schema=False)
    def patient_page(request: Request, patient_id: str) -> HTMLResponse:
        return templates.TemplateResponse(request, "patient.html", {"patient": patient_detail(request, patient_id)})

    @app.get("/api/patients", response_model=list[PatientSummary], responses={404: {"model": Error}})
    def list_patients(request: Request) -> list[PatientSummary]:
        """The probe's patient calls, misclassified first."""
        return [summary(record) for record in loaded_patients(request).ordered()]

    @app.get("/api/patients/{patient_id:path}", response_model=PatientDetail, responses={404: {"model": Error}})
    def get_patient(request: Request, patient_id: str) -> PatientDetail:
        """A patient's call and its indexed cells, highest contribution first (cells the head did not use last)."""
        return patient_detail(request, patient_id)

    @app.post(
        "/api/search",
        response_model=SearchResult,
        max_body_size=max_body,
        responses={
            400: {"model": Error},
            404: {"model": Error},
            413: {"description": "upload larger than the cap"},
            503: {"model": Error, "description": "too many searches in flight; retry after the Retry-After seconds"},
        },
    )
    def search(
        request: Request,
        image: UploadFile | None = File(None, description="a cell image (PNG, JPEG, TIFF, ...)"),
        cell_id: str | None = Form(None, description="an indexed cell id (or unique prefix) instead of an image"),
        k: int = Form(default_k, ge=1, description="number of neighbours"),
        filter: list[str] = Form([], description="column=value[,value] filters, e.g. mutation=NPM1"),
    ) -> SearchResult:
        """The k most similar indexed cells to an uploaded image or to an indexed cell (itself excluded:
        an upload that is an indexed cell is named in ``query.cell`` and left out too)."""
        searcher: Searcher = request.app.state.searcher
        if (image is None) == (cell_id is None or not cell_id.strip()):
            raise HTTPException(422, "send exactly one of: an image file, or a cell_id")
        filters = parse_filters(filter)
        started = time.perf_counter()
        if image is not None:
            data = image.file.read()
            try:
                decoded = decode_bytes(data, Path(image.filename or "").suffix)
            except ImageDecodeError as exc:
                raise HTTPException(400, f"the upload is not a usable image: {exc}") from None
            table = searcher.search_images([decoded], k, filters)[0]
            itself = searcher.exact_row(table.attrs["query_cell"]) if "query_cell" in table.attrs else None
            query = Query(
                kind="upload", filename=image.filename, cell=None if itself is None else cell_model(searcher, itself)
            )
        else:
            row = searcher.row_of(str(cell_id))  # not None: exactly one of image and cell_id was sent
            table = searcher.search_cells([row], k, filters)[0]
            query = Query(kind="cell", cell=cell_model(searcher, row))
        scale: SimilarityScale = request.app.state.scale
        neighbours = [
            Neighbour(
                **record,
                thumbnail=thumb_url(record["cell_id"]),
                percentile=scale.percentile(record["similarity"] if scale.metric == "cosine" else record["distance"]),
            )
            for record in neighbour_records(table)
        ]
        return SearchResult(
            query=query,
            k=k,
            metric=searcher.index.metric,
            index_kind=searcher.index.kind,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
            neighbours=neighbours,
            vote={column: [VoteEntry(label=l, count=c) for l, c in counts] for column, counts in vote(table).items()},
        )

    @app.get("/api/facets", response_model=Facets)
    def get_facets(request: Request) -> Facets:
        """The values of the filter columns (patient_id, mutation, cell_type, domain), at most 200 per column."""
        values, truncated = facets(request.app.state.searcher.index.cells)
        return Facets(values=values, truncated=truncated)

    @app.get("/api/map", response_model=MapAnswer, responses={400: {"model": Error}})
    def get_map(request: Request, color: str = "cell_type") -> MapAnswer:
        """The embedding map's points, each with its value of ``color`` (a label column, or ``prediction``:
        the probe's call of the cell's patient, with --probe)."""
        searcher: Searcher = request.app.state.searcher
        patients: Patients | None = request.app.state.patients
        predictions = {r.patient_id: r.predicted for r in patients.report.patients} if patients else None
        colors = [*COLOR_COLUMNS, *([PREDICTION] if predictions is not None else [])]
        state: MapState = request.app.state.map
        frame = state.wait(timeout=20)
        values = color_values(
            searcher.index.cells, [] if frame is None else frame["row"].to_numpy(), color, predictions
        )
        answer = {"color": color, "colors": colors, "n_indexed": len(searcher)}
        if frame is None:
            status: Literal["computing", "missing"] = "missing" if state.message else "computing"
            message = state.message or "the map is being computed (UMAP); ask again in a few seconds"
            return MapAnswer(status=status, message=message, values=[], points=[], **answer)
        order = pd.Series(values).value_counts()
        points = [
            MapPoint(cell_id=c, x=x, y=y, value=v)
            for c, x, y, v in zip(frame["cell_id"], frame["x"].tolist(), frame["y"].tolist(), values)
        ]
        return MapAnswer(status="ready", values=[str(v) for v in order.index], points=points, **answer)

    @app.get("/api/cells/{cell_id}", response_model=Cell, responses={404: {"model": Error}})
    def get_cell(request: Request, cell_id: str) -> Cell:
        """An indexed cell's labels, by id (or unique prefix)."""
        searcher: Searcher = request.app.state.searcher
        return cell_model(searcher, searcher.row_of(cell_id))

    @app.get(
        "/thumbs/{cell_id}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}, 404: {"model": Error}},
    )
    def thumbnail(request: Request, cell_id: str) -> Response:
        """A thumbnail of an indexed cell (full id only); nothing else on disk can be reached."""
        searcher: Searcher = request.app.state.searcher
        row = searcher.exact_row(cell_id)
        if row is None:
            raise HTTPException(404, "no indexed cell has this id")
        return Response(
            request.app.state.thumbs.render(row),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return app
