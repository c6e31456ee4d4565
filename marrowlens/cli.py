"""The ``marrowlens`` command line: parses arguments and calls one library function per command.

Errors a user can fix (:class:`MarrowLensError`) print as one line and exit with status 2; Ctrl-C exits
with status 130, saying what continues the interrupted work.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from marrowlens.config import (
    ACCELERATORS,
    CLASS_WEIGHTS,
    HEAD_NAMES,
    INDEX_KIND_NAMES,
    LAYOUTS,
    METHOD_NAMES,
    METRICS,
    NOISE_KINDS,
    PATIENT_HEAD_NAMES,
    PRECISIONS,
    PROBE_LOSSES,
    PROBE_TASKS,
    STAIN_NORMALIZATIONS,
    STRATEGIES,
)
from marrowlens.errors import Interrupted, MarrowLensError
from marrowlens.provenance import command_line, recording


class _RecordingGroup(TyperGroup):
    """The ``marrowlens`` group: what a command writes records the command line it was given."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **extra: Any) -> Any:
        words = sys.argv[1:] if args is None else list(args)  # None: click parses sys.argv too
        with recording(command_line(*words)):
            return super().main(args, *rest, **extra)


if TYPE_CHECKING:  # the commands import what they need when they run: `--help` stays fast
    from marrowlens.cohort.manifest import Cohort
    from marrowlens.probes.commands import Outcome

app = typer.Typer(
    cls=_RecordingGroup,
    help="MarrowLens: self-supervised representations, probes and retrieval for single-cell AML images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cohort_app = typer.Typer(help="Index, check or synthesise a cohort of cell images.", no_args_is_help=True)
app.add_typer(cohort_app, name="cohort")


def _one_of(names: tuple[str, ...]) -> str:
    """A help text's list of choices, from the one list in config.py."""
    return " | ".join(names)


def say(message: str) -> None:
    """What a command wrote, for the user (stdout)."""
    typer.echo(message)


def _map_option(text: str | None) -> dict[str, str]:
    from marrowlens.cohort.labels import parse_map

    return parse_map(text)


@cohort_app.command("index")
def cohort_index(
    roots: list[Path] = typer.Argument(..., help="image folder(s) or CSV file(s); several sources make one cohort"),
    out: Path = typer.Option(..., "--out", help="cohort folder to write"),
    layout: str = typer.Option("auto", help=_one_of(LAYOUTS)),
    map_mutation: str | None = typer.Option(None, help="rename mutation labels, e.g. APL=PML_RARA,AML=other_AML"),
    map_cell_type: str | None = typer.Option(None, help="rename cell types, e.g. 'Segmented neutrophils=neutrophil'"),
    blast_classes: str | None = typer.Option(None, help="comma-separated cell types that count as blasts"),
    column: str | None = typer.Option(None, help="CSV column map, e.g. patient_id=patient,cell_type=label"),
    domain: str | None = typer.Option(None, help="domain (centre/scanner/stain) of these sources"),
    workers: int = typer.Option(8, min=1, help="decoding threads"),
    overwrite: bool = typer.Option(False, help="replace an existing cohort in --out"),
) -> None:
    """Turn folders of cell images into a validated cohort (cells.parquet + quarantine.csv).

    Example: marrowlens cohort index data/AML_Hehr --out cohort/
    """
    from marrowlens.artifacts import prepare_out_dir
    from marrowlens.cohort.manifest import IndexOptions, index_cohort

    prepare_out_dir(out, overwrite)
    options = IndexOptions(
        layout=layout,
        map_mutation=_map_option(map_mutation),
        map_cell_type=_map_option(map_cell_type),
        blast_classes=[c.strip() for c in blast_classes.split(",")] if blast_classes else None,
        columns=_map_option(column),
        domain=domain,
        workers=workers,
    )
    cohort = index_cohort(roots, out, options)
    _print_cohort(cohort)


def _print_cohort(cohort: Cohort) -> None:
    meta = cohort.meta
    say(f"wrote {cohort.folder / 'cells.parquet'}: {meta.n_cells} cells, {meta.n_patients} patients")
    for name, counts in meta.counts.items():
        say(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    from marrowlens.cohort.schema import extra_columns

    extras = extra_columns(cohort.cells.columns)
    if extras:
        say(f"  extra columns, carried as they are: {', '.join(extras)}")
    say(f"wrote {cohort.folder / 'quarantine.csv'}: {meta.n_quarantined} unreadable file(s)")


@cohort_app.command("check")
def cohort_check(
    folder: Path = typer.Argument(..., help="cohort folder"),
    fix: bool = typer.Option(False, help="move cells that no longer decode to the quarantine list"),
    workers: int = typer.Option(8, min=1),
) -> None:
    """Re-validate a cohort: schema, ids, and that every image still decodes.

    Example: marrowlens cohort check cohort/
    """
    from marrowlens.cohort.manifest import check_cohort

    cohort, problems = check_cohort(folder, workers=workers, fix=fix)
    if problems and not fix:
        for path, reason in problems[:10]:
            say(f"  {path}: {reason}")
        raise MarrowLensError(
            f"{len(problems)} cell(s) of {folder} no longer decode; run again with --fix to quarantine them"
        )
    verb = f"quarantined {len(problems)} cell(s); " if problems else ""
    say(f"{folder}: {verb}{len(cohort.cells)} cells OK")


# ---------------------------------------------------------------- cohort synth (synthetic cohort)


@cohort_app.command("synth")
def cohort_synth(
    out: Path = typer.Option(..., "--out", help="cohort folder to write (images, labels.csv, cells.parquet, ...)"),
    patients: int = typer.Option(60, help="number of patients (classes round-robin: 4 AML subtypes + control)"),
    cells_per_patient: int = typer.Option(100, help="cells drawn per patient"),
    image_size: int = typer.Option(64, help="side of each square cell image in pixels"),
    seed: int = typer.Option(0, help="random seed; the same seed gives the same cohort, whatever --workers"),
    domains: int = typer.Option(2, help="stain/scanner domains, balanced within each class"),
    workers: int = typer.Option(1, help="drawing processes"),
    overwrite: bool = typer.Option(False, help="replace the synthetic cohort already in --out"),
) -> None:
    """Draw a synthetic AML cohort with known ground truth and index it as a cohort.

    Example: marrowlens cohort synth --out synth/ --patients 60 --cells-per-patient 100 --image-size 64 --seed 0
    """
    from marrowlens.cohort.synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(
        out,
        patients,
        cells_per_patient,
        image_size=image_size,
        seed=seed,
        domains=domains,
        workers=workers,
        overwrite=overwrite,
    )
    say(f"wrote {out / 'images'}: {len(cohort.cells)} PNG cells of {image_size}x{image_size} px")
    say(f"wrote {out / 'labels.csv'} (ground truth per cell) and {out / 'patients.csv'} (per patient)")
    _print_cohort(cohort)


@app.command("embed")
def embed(
    model: str = typer.Option(..., "--model", help="run folder of `marrowlens pretrain`, or a timm model name"),
    cohort: Path = typer.Option(..., "--cohort", help="cohort folder"),
    out: Path = typer.Option(..., "--out", help="embedding folder to write"),
    weights: Path | None = typer.Option(
        None, help="local weights for a bare timm name: .safetensors/.pth/.bin file or hub folder, e.g. DinoBloom"
    ),
    image_size: int | None = typer.Option(None, help="input size for a bare timm name (default 224)"),
    batch_size: int = typer.Option(256, min=1),
    devices: str = typer.Option("1", help="number of devices, or 'auto'"),
    accelerator: str = typer.Option("auto", help=_one_of(ACCELERATORS)),
    precision: str = typer.Option("32", help=_one_of(PRECISIONS)),
    num_workers: int | None = typer.Option(None, min=0, help="data-loading processes"),
    overwrite: bool = typer.Option(False, help="replace existing embeddings in --out"),
    stain_normalize: str = typer.Option(
        "none", help=f"{_one_of(STAIN_NORMALIZATIONS)}: reinhard matches colours to the cohort's average stain"
    ),
    crop: str | None = typer.Option(
        None,
        help="full|cell|centred for a bare timm name (cell: a square fitted to the white cell; centred: a fixed "
        "square centred on it); a run folder's own",
    ),
) -> None:
    """Embed every cell of a cohort with a frozen backbone (resumable, bounded memory).

    Example: marrowlens embed --model runs/simclr --cohort cohort/ --out emb/
    """
    from marrowlens.ssl.embed import embed_cohort

    store = embed_cohort(
        model,
        cohort,
        out,
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
        devices=_devices(devices),
        accelerator=accelerator,
        precision=precision,
        num_workers=num_workers,
        overwrite=overwrite,
        stain_normalize=stain_normalize,
        crop=crop,
    )
    if store is not None:
        counts = store.meta.preprocessing.cell_crop if store.meta.preprocessing else None
        if counts is not None:
            say(f"cell crop: cell found in {counts.found} cells, {counts.centre_crop} fell back to a centre crop")
        say(f"wrote {store.folder / 'vectors.npy'}: {len(store)} x {store.meta.dim} float32 ({store.fingerprint[:19]})")
        say(f"wrote {store.folder / 'cells.parquet'} and {store.folder / 'meta.json'}")


@app.command("pretrain")
def pretrain(
    cohort: Path = typer.Option(..., "--cohort", help="cohort folder (labels are not used for training)"),
    out: Path = typer.Option(..., "--out", help="run folder to write"),
    config: Path | None = typer.Option(None, "--config", help="YAML config, e.g. configs/pretrain/tiny_cpu.yaml"),
    method: str | None = typer.Option(None, help=f"{_one_of(METHOD_NAMES)} (byol exports its online backbone)"),
    backbone: str | None = typer.Option(None, help="any timm model name, e.g. resnet18, vit_small_patch16_224"),
    weights: Path | None = typer.Option(
        None, help="local weights to start from: .safetensors/.pth/.bin file or hub folder (no downloads)"
    ),
    devices: str | None = typer.Option(None, help="devices per node (number or 'auto')"),
    nodes: int | None = typer.Option(None, min=1, help="number of nodes"),
    strategy: str | None = typer.Option(None, help=_one_of(STRATEGIES)),
    precision: str | None = typer.Option(None, help=_one_of(PRECISIONS)),
    max_epochs: int | None = typer.Option(None, min=1),
    set_: list[str] = typer.Option([], "--set", help="config override key.sub=value (repeatable)"),
    resume: bool = typer.Option(False, help="continue the run in --out from checkpoints/last.ckpt"),
    overwrite: bool = typer.Option(False, help="delete the run in --out and start over"),
) -> None:
    """Pretrain a SimCLR, DINO, BYOL or VICReg backbone on every cell of a cohort (CPU, GPU, many GPUs/nodes).

    Example: marrowlens pretrain --config configs/pretrain/tiny_cpu.yaml --cohort cohort/ --out runs/tiny
    """
    from marrowlens.config import PretrainConfig, load_config, nest
    from marrowlens.ssl.train import pretrain as run_pretrain

    flags = nest(
        {
            "model.method": method,
            "model.backbone": backbone,
            "model.weights": weights,
            "trainer.devices": _devices(devices) if devices is not None else None,
            "trainer.nodes": nodes,
            "trainer.strategy": strategy,
            "trainer.precision": precision,
            "trainer.max_epochs": max_epochs,
        }
    )
    resolved = load_config(PretrainConfig, config, set_, values=flags)
    result = run_pretrain(resolved, cohort, out, resume=resume, overwrite=overwrite)
    if result is not None:
        say(f"wrote {out / 'backbone.safetensors'} and {out / 'backbone.json'} ({result.backbone.fingerprint[:19]})")
        say(
            f"wrote {out / 'checkpoints'} (last.ckpt, best), {out / 'logs'}, {out / 'config.yaml'}, {out / 'meta.json'}"
        )
        shown = {k: v for k, v in result.metrics.items() if k in ("train_loss_epoch", "val_knn_acc", "val_knn_bal_acc")}
        if shown:
            say("final: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))


def _devices(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise MarrowLensError(f"--devices must be a number or 'auto', not {text!r}") from None


# ---------------------------------------------------------------- retrieval: index, search, serve

index_app = typer.Typer(help="Build, extend or describe a similar-cell index (FAISS).", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder of `marrowlens embed`"),
    out: Path = typer.Option(..., "--out", help="index folder to write"),
    kind: str = typer.Option(
        "auto", help=f"{_one_of(('auto', *INDEX_KIND_NAMES))} (auto: exact search up to 50k cells, IVF above)"
    ),
    metric: str = typer.Option("cosine", help=_one_of(METRICS)),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help=(
            "FAISS parameter of the chosen --kind, e.g. --set nprobe=32 (ivf) or --set ef_search=128 (hnsw); "
            "a key the kind does not take is refused with the list of those it does"
        ),
    ),
    overwrite: bool = typer.Option(False, help="replace an existing index in --out"),
) -> None:
    """Build a FAISS index over an embedding store (rows = cells, ids = rows of cells.parquet).

    Example: marrowlens index build --embeddings emb/ --out idx/ --kind auto
    """
    from marrowlens.retrieval.index import build_index, current_files

    index = build_index(embeddings, out, kind=kind, metric=metric, overrides=set_, overwrite=overwrite)
    files = current_files(index.meta)
    say(
        f"wrote {index.folder / files.index}: {len(index)} cells, "
        f"{index.kind} index ({index.meta.factory}, {index.metric})"
    )
    say(f"wrote {index.folder / files.cells} and {index.folder / 'meta.json'}")


@index_app.command("add")
def index_add(
    folder: Path = typer.Argument(..., help="index folder"),
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder made by the same backbone"),
) -> None:
    """Add the cells of another embedding store (same backbone, new cell ids) to an index.

    Example: marrowlens index add idx/ --embeddings emb2/
    """
    from marrowlens.retrieval.index import add_to_index, current_files, kind_advice

    index, added = add_to_index(folder, embeddings)
    files = current_files(index.meta)
    say(f"wrote {index.folder / files.index}: added {added} cells, {len(index)} in all")
    say(f"wrote {index.folder / files.cells} and {index.folder / 'meta.json'}")
    advice = kind_advice(index)
    if advice:
        say(advice)


@index_app.command("info")
def index_info(folder: Path = typer.Argument(..., help="index folder")) -> None:
    """Print what an index holds: size, kind and parameters, model, sources, labels.

    Example: marrowlens index info idx/
    """
    from marrowlens.retrieval.index import describe, load_index

    for line in describe(load_index(folder)):
        say(line)


@index_app.command("map")
def index_map_command(
    folder: Path = typer.Argument(..., help="index folder"),
    max_cells: int = typer.Option(
        20_000, "--max-cells", min=1, help="map at most this many cells (a fixed-seed sample of a bigger index)"
    ),
) -> None:
    """Compute the index's 2-D embedding map (UMAP) for the web page: writes map.parquet into the index folder.

    Example: marrowlens index map idx/ --max-cells 20000
    """
    from marrowlens.maps import index_map, write_map
    from marrowlens.retrieval.index import load_index

    index = load_index(folder)
    frame = index_map(index, max_cells=max_cells)
    path = write_map(folder, frame)
    say(f"wrote {path}: {len(frame)} of {len(index)} cells mapped (UMAP, seed 0)")


@app.command("search")
def search(
    index: Path = typer.Option(..., "--index", help="index folder"),
    image: list[Path] = typer.Option([], "--image", help="query image (repeat for several)"),
    cell_id: list[str] = typer.Option(
        [], "--cell-id", help="query by an indexed cell (id or unique prefix; the cell itself is left out)"
    ),
    k: int = typer.Option(10, "-k", "--k", help="neighbours per query"),
    filter_: list[str] = typer.Option(
        [], "--filter", help="keep cells with column=value[,value], e.g. mutation=NPM1 (repeat: all must hold)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    model: str | None = typer.Option(
        None, help="where the index's backbone is now (run folder or weights file), if it moved"
    ),
) -> None:
    """Find the indexed cells most similar to a cell image (embedded like `embed` does).

    Example: marrowlens search --index idx/ --image cell.tif -k 10 --filter mutation=NPM1
    """
    import json

    from marrowlens.retrieval.search import format_table, format_vote, neighbour_records, query, vote

    results = query(index, images=image, cell_ids=cell_id, k=k, filters=filter_, model=model)
    if json_out:
        payload = [
            {
                "query": label,
                "query_cell": t.attrs.get("query_cell"),
                "neighbours": neighbour_records(t),
                "vote": vote(t),
            }
            for label, t in results
        ]
        say(json.dumps(payload, indent=2))
        return
    for label, table in results:
        say(f"query {label}:")
        if "query_cell" in table.attrs:
            say(
                f"  (this image is indexed cell {table.attrs['query_cell'][:12]}: "
                "left out of its own neighbours and vote)"
            )
        say(format_table(table))
        say(format_vote(table))


@app.command("serve")
def serve(
    index: Path = typer.Option(..., "--index", help="index folder"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback only unless you say otherwise)"),
    port: int = typer.Option(8000, min=1, max=65535),
    model: str | None = typer.Option(
        None, help="where the index's backbone is now (run folder or weights file), if it moved"
    ),
    max_upload_mb: float = typer.Option(10.0, min=0.01, help="largest accepted upload"),
    k: int = typer.Option(10, "-k", "--k", min=1, help="neighbours shown by default"),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        help=(
            "another name clients reach the server by (e.g. its DNS name with --host 0.0.0.0); "
            "other Host headers get 400"
        ),
    ),
    max_queue: int = typer.Option(
        8, min=1, help="searches in flight at once; more get 503 + Retry-After: 1 at once instead of waiting"
    ),
    probe: Path | None = typer.Option(
        None, "--probe", help="mutation probe folder (same backbone as the index): adds the patient pages at /patients"
    ),
) -> None:
    """Serve the similar-cell web page and its JSON API (docs at /docs).

    Example: marrowlens serve --index idx/ --port 8000 --probe probes/mutation
    """
    import uvicorn

    from marrowlens.retrieval.search import Searcher
    from marrowlens.retrieval.web import create_app
    from marrowlens.retrieval.web.app import LOOPBACK_HOSTS, image_root
    from marrowlens.retrieval.web.patients import Patients

    searcher = Searcher.open(index, model)
    patients = Patients.open(probe, searcher) if probe is not None else None
    for source in searcher.index.meta.sources:
        if image_root(source) is None:
            say(f"warning: the images of {source.embeddings} are not on this machine; their thumbnails will be missing")
    app_ = create_app(
        index,
        searcher=searcher,
        max_upload_mb=max_upload_mb,
        default_k=k,
        hosts=[host, *allow_host],
        max_queue=max_queue,
        patients=patients,
    )
    if patients is not None:
        hidden = sum(patients.not_indexed.values())
        note = f"; {hidden} of their cells are not in the index and are left out" if hidden else ""
        say(f"{len(patients.report.patients)} patients of probe {probe} at /patients{note}")
    if host not in LOOPBACK_HOSTS:
        say(f"warning: listening on {host}: anyone who can reach this machine can query the index and see its cells")
        say(f"clients must address it as {host}, a loopback name or an --allow-host name (other Host headers get 400)")
    say(f"serving {len(searcher)} cells at http://{host}:{port}/ (API docs at /docs; Ctrl-C to stop)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


# ---------------------------------------------------------------- probes: blast, mutation, cell type

probe_app = typer.Typer(
    help="Probe frozen embeddings: blasts, mutations (through a blast filter), cell types.", no_args_is_help=True
)
app.add_typer(probe_app, name="probe")


def _probe_task(task: str) -> str:
    if task not in PROBE_TASKS:
        raise MarrowLensError(f"unknown probe task {task!r}; choose one of {', '.join(PROBE_TASKS)}")
    return task


def _print_outcome(outcome: Outcome) -> None:
    from marrowlens.probes.report import outcome_text

    say(outcome_text(outcome.headline, outcome.written))


@probe_app.command("fit")
def probe_fit(
    task: str = typer.Argument(..., help=_one_of(PROBE_TASKS)),
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder (vectors.npy + cells.parquet)"),
    out: Path = typer.Option(..., "--out", help="probe folder to write"),
    head: str | None = typer.Option(None, "--head", help=_one_of(HEAD_NAMES)),
    loss: str | None = typer.Option(None, "--loss", help=f"{_one_of(PROBE_LOSSES)} (linear head)"),
    class_weight: str | None = typer.Option(None, "--class-weight", help=_one_of(CLASS_WEIGHTS)),
    cv: int | None = typer.Option(None, "--cv", min=0, help="patient-grouped CV folds for the report; 0 skips it"),
    group_by: str | None = typer.Option(
        None, "--group-by", help="cells.parquet column (source, site, scan date) whose values CV holds out whole"
    ),
    blast_probe: Path | None = typer.Option(None, "--blast-probe", help="blast probe folder (mutation task)"),
    blast_threshold: float | None = typer.Option(None, "--blast-threshold", help="keep cells with P(blast) >= this"),
    aggregate: str | None = typer.Option(
        None, "--aggregate", help=f"{_one_of(PATIENT_HEAD_NAMES)}: the patient head (mutation task)"
    ),
    config: Path | None = typer.Option(None, "--config", help="probe YAML, e.g. configs/probes/mutation.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="config override key.sub=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="replace an existing probe in --out"),
) -> None:
    """Fit a probe on frozen embeddings: CV report first (patient-grouped), then the final head on all cells.

    Example: marrowlens probe fit mutation --embeddings emb/ --blast-probe probes/blast --loss gce --out probes/mutation
    """
    from marrowlens.probes import commands

    flags = {
        "head": head,
        "loss.name": loss,
        "imbalance.class_weight": class_weight,
        "eval.cv": cv,
        "eval.group_by": group_by,
        "mutation.blast_threshold": blast_threshold,
        "mutation.aggregate": aggregate,
    }
    if aggregate is not None and task != "mutation":
        raise MarrowLensError(f"--aggregate only applies to the mutation task, not {task}")
    probe_config = commands.probe_config(_probe_task(task), config, flags, overrides)
    _print_outcome(commands.fit(task, embeddings, out, probe_config, blast_probe=blast_probe, overwrite=overwrite))


@probe_app.command("eval")
def probe_eval(
    probe: Path = typer.Argument(..., help="probe folder"),
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder (same model as the probe)"),
    out: Path | None = typer.Option(
        None, "--out", help="report folder (default: the probe folder, or PROBE/external-<fp> for another store)"
    ),
    cv: int | None = typer.Option(None, "--cv", min=0, help="folds (default: the probe's own setting)"),
    leave_one_domain_out: bool = typer.Option(
        False, "--leave-one-domain-out", help="also train on all domains but one and test on it, for each"
    ),
    bootstrap: int | None = typer.Option(
        None, "--bootstrap", min=0, help="bootstrap resamples of patients for the 95% intervals"
    ),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        help="cells.parquet column (source, site, scan date) whose values CV holds out whole; '' for patients "
        "(default: the probe's own setting)",
    ),
) -> None:
    """Report a probe: patient-grouped CV on its own store, or the fitted probe as is on another store.

    Example: marrowlens probe eval probes/mutation --embeddings emb/ --leave-one-domain-out
    Example: marrowlens probe eval probes/blast --embeddings emb/ --group-by site
    """
    from marrowlens.probes import commands

    _print_outcome(
        commands.evaluate(
            probe,
            embeddings,
            out=out,
            cv=cv,
            leave_one_domain_out=leave_one_domain_out,
            bootstrap=bootstrap,
            group_by=group_by,
        )
    )


@probe_app.command("test")
def probe_test(
    probe: Path = typer.Argument(..., help="fitted probe folder"),
    embeddings: Path = typer.Option(
        ..., "--embeddings", help="embeddings of another cohort, made by the probe's backbone"
    ),
    out: Path = typer.Option(..., "--out", help="report folder to write"),
    bootstrap: int | None = typer.Option(
        None, "--bootstrap", min=0, help="bootstrap resamples of patients for the 95% intervals"
    ),
    overwrite: bool = typer.Option(False, help="replace an existing report in --out"),
) -> None:
    """Test a fitted probe, as is, on a cohort it never saw: the measure of generalisation that CV is not.

    Example: marrowlens probe test probes/mutation --embeddings other_emb/ --out tests/mutation-other
    """
    from marrowlens.probes import commands

    _print_outcome(commands.external_test(probe, embeddings, out, bootstrap=bootstrap, overwrite=overwrite))


@probe_app.command("predict")
def probe_predict(
    probe: Path = typer.Argument(..., help="probe folder"),
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder (same model as the probe)"),
    out: Path = typer.Option(..., "--out", help="cell predictions .parquet; patients go to <stem>.patients.parquet"),
    overwrite: bool = typer.Option(False, help="replace existing prediction files"),
) -> None:
    """Predict every cell of a store, and aggregate per patient (undetermined when no cell is kept).

    Example: marrowlens probe predict probes/mutation --embeddings emb/ --out predictions.parquet
    """
    from marrowlens.probes import commands

    _print_outcome(commands.predict(probe, embeddings, out, overwrite=overwrite))


@probe_app.command("noise-sweep")
def probe_noise_sweep(
    embeddings: Path = typer.Option(..., "--embeddings", help="embedding folder"),
    task: str = typer.Option("mutation", "--task", help=_one_of(PROBE_TASKS)),
    noise: str = typer.Option("0,0.2,0.4", "--noise", help="comma-separated noise rates injected into training labels"),
    kind: str = typer.Option(
        "symmetric", "--kind", help=f"{_one_of(NOISE_KINDS)}: per cell, or whole patients relabelled"
    ),
    losses: str = typer.Option("ce,gce,sce", "--losses", help="comma-separated losses to compare"),
    out: Path = typer.Option(..., "--out", help="folder for sweep.json / sweep.md / sweep.png"),
    blast_probe: Path | None = typer.Option(
        None, "--blast-probe", help="blast probe (mutation; default: fit from the store's blast labels)"
    ),
    cv: int | None = typer.Option(None, "--cv", min=2, help="patient-grouped folds"),
    config: Path | None = typer.Option(None, "--config", help="probe YAML"),
    overrides: list[str] = typer.Option([], "--set", help="config override key.sub=value (repeatable)"),
    overwrite: bool = typer.Option(False, help="replace an existing sweep in --out"),
) -> None:
    """Inject known label noise into training labels only and compare losses (cell and patient level).

    Example: marrowlens probe noise-sweep --embeddings emb/ --task mutation --noise 0,0.2,0.4 --out sweeps/mutation
    """
    from marrowlens.probes import commands

    if kind not in NOISE_KINDS:
        raise MarrowLensError(f"--kind must be {' or '.join(NOISE_KINDS)}, not {kind!r}")
    try:
        rates = [float(x) for x in noise.split(",") if x.strip()]
    except ValueError:
        raise MarrowLensError(f"--noise {noise!r} must be comma-separated numbers, e.g. 0,0.2,0.4") from None
    loss_names = [x.strip() for x in losses.split(",") if x.strip()]
    probe_config = commands.probe_config(_probe_task(task), config, {"eval.cv": cv, "head": "linear"}, overrides)
    _print_outcome(
        commands.noise_sweep(
            embeddings, out, probe_config, rates, kind, loss_names, blast_probe=blast_probe, overwrite=overwrite
        )
    )


# ---------------------------------------------------------------- a whole study in one command


export_app = typer.Typer(
    help="Standard exports: a backbone for timm, embeddings as AnnData, neighbours as CSV.", no_args_is_help=True
)
app.add_typer(export_app, name="export")


@export_app.command("timm")
def export_timm_command(
    run: Path = typer.Argument(..., help="run folder of `marrowlens pretrain`"),
    out: Path = typer.Argument(..., help="folder to write (model.safetensors, config.json, preprocessing.json)"),
    overwrite: bool = typer.Option(False, help="replace an existing, non-empty OUT_DIR"),
) -> None:
    """Write the run's backbone as a folder timm loads in one line.

    Example: marrowlens export timm runs/simclr exports/simclr-timm
    """
    from marrowlens.exports.timm_folder import export_timm, model_args

    result = export_timm(run, out, overwrite=overwrite)
    info = result.info
    say(f"wrote {out}: {info.timm_name}, {info.num_features} features ({info.fingerprint[:19]})")
    extra = "".join(f", {k}={v!r}" for k, v in model_args(info).items() if k != "num_classes")
    say(f'load it: timm.create_model("local-dir:{out}", pretrained=True)')
    say(
        f'     or: timm.create_model("{info.timm_name}", pretrained=True, num_classes=0{extra}, '
        f'pretrained_cfg_overlay=dict(file="{out / "model.safetensors"}"))'
    )
    if result.differences:
        for difference in result.differences:
            say(f"timm's transform differs from marrowlens embed: {difference}")
        say(f"our full recipe: {out / 'preprocessing.json'}")
    else:
        say("timm's transform (resolve_data_config + create_transform) reproduces marrowlens embed's input")


@export_app.command("anndata")
def export_anndata_command(
    embeddings: Path = typer.Argument(..., help="embedding folder of `marrowlens embed`"),
    out: Path = typer.Argument(..., help=".h5ad file to write"),
    obsm: bool = typer.Option(False, "--obsm", help="vectors in .obsm['X_marrowlens'], .X empty"),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Write an embedding store as AnnData: vectors in .X, cells in .obs, meta in .uns['marrowlens'].

    Example: marrowlens export anndata emb/ cells.h5ad --obsm
    """
    from marrowlens.exports.anndata_file import export_anndata

    result = export_anndata(embeddings, out, obsm=obsm, overwrite=overwrite)
    say(f"wrote {result.path}: {result.n} cells x {result.dim} dims in .{result.where}")


@export_app.command("neighbours")
def export_neighbours_command(
    index: Path = typer.Argument(..., help="index folder of `marrowlens index build`"),
    out: Path = typer.Argument(..., help="CSV file to write"),
    k: int = typer.Option(10, "--k", min=1, help="neighbours per cell"),
    embeddings: Path | None = typer.Option(
        None, "--embeddings", help="query the cells of this store (same model) instead of the index's own"
    ),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Write every cell's k nearest indexed cells (the cell itself left out) as a CSV.

    Example: marrowlens export neighbours idx/ neighbours.csv --k 10
    """
    from marrowlens.exports.neighbours import export_neighbours

    result = export_neighbours(index, out, k=k, embeddings=embeddings, overwrite=overwrite)
    say(f"wrote {result.path}: {result.rows} rows ({result.queries} cells x {result.k} neighbours)")


@app.command("run")
def run_command(
    cohort: Path = typer.Option(..., "--cohort", help="cohort folder (`marrowlens cohort index`)"),
    config: Path = typer.Option(..., "--config", help="study YAML, e.g. configs/run/deepapl.yaml"),
    out: Path = typer.Option(..., "--out", help="results folder (re-running resumes and skips finished stages)"),
    set_: list[str] = typer.Option([], "--set", help="run-config override, e.g. embed.batch_size=64 (repeatable)"),
    pretrain_set: list[str] = typer.Option(
        [], "--pretrain-set", help="pretrain override, e.g. trainer.max_epochs=5 (repeatable)"
    ),
    test_cohort: Path | None = typer.Option(
        None, "--test-cohort", help="another cohort to test every probe on, as is (overrides the config's test_cohort)"
    ),
    no_baselines: bool = typer.Option(
        False, "--no-baselines", help="skip the random-init backbone and raw-pixel baselines (config: baselines)"
    ),
) -> None:
    """Pretrain -> embed -> probes (and their baselines) -> index -> [external test] -> report, resuming what is done.

    Example: marrowlens run --cohort cohort/ --config configs/run/deepapl.yaml --out results/deepapl
    """
    from marrowlens.pipeline import load_run_config, run_study

    run_config = load_run_config(config, set_, pretrain_set)
    if test_cohort is not None:
        run_config = run_config.model_copy(update={"test_cohort": test_cohort.resolve()})
    if no_baselines:
        run_config = run_config.model_copy(update={"baselines": False})
    report = run_study(cohort, run_config, out, say=say)
    if report is not None:
        say(f"wrote {report}")


def main() -> None:
    """Console entry point: one-line errors, status 2; Ctrl-C is status 130.

    Click runs outside its standalone mode so that its usage errors (a missing ``--out``, an
    unknown option) print as the same one line as every other error, not as a framed box.
    """
    try:
        code = app(standalone_mode=False, prog_name="marrowlens")
    except Interrupted as exc:  # Ctrl-C inside Lightning, which turns it into sys.exit(1)
        typer.echo(str(exc), err=True)
        sys.exit(130)
    except MarrowLensError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except TyperException as exc:  # click's usage errors
        command = getattr(getattr(exc, "ctx", None), "command_path", "marrowlens")
        if exc.format_message():  # empty after a bare group name, whose help has been printed
            typer.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
