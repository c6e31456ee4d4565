"""``marrowlens run``: one command for a whole study, pretrain -> embed -> probes -> index -> report.

Every stage is the library call behind its own command. A stage is skipped when its output is
complete and was made from the same inputs and settings (a key of both, kept in ``stages.json``);
an unfinished pretraining resumes from its last checkpoint and an unfinished embedding from its
last written row; anything whose inputs changed is redone, and so is everything after it.

With a test cohort (``test_cohort:``, ``--test-cohort``), it is embedded by the study's backbone and
every probe tested on it as is (``probe test``); the report sets internal CV beside the external test.

Unless ``baselines: false`` (``--no-baselines``), every probe is also fitted, with the same config, on two
baselines: a random-init backbone of the same architecture and size, and raw pixels; the reports
(``report.md`` and the self-contained ``report.html``) set their figures beside the backbone's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marrowlens.artifacts import artifact_kind, read_meta, write_json_atomic, write_meta, write_text_atomic
from marrowlens.cohort.manifest import Cohort, load_cohort
from marrowlens.config import (
    IndexStageConfig,
    PretrainConfig,
    PretrainStageConfig,
    ProbeConfig,
    ProbeStageConfig,
    RunConfig,
    load_config,
    override_texts,
    read_yaml,
    shipped_probe_config,
    validate_config,
)
from marrowlens.contracts import CohortMeta, CohortRef, StudyMeta
from marrowlens.errors import Interrupted, MarrowLensError
from marrowlens.provenance import command_line, python_api, recording

if TYPE_CHECKING:
    from marrowlens.reports.study import StudyPage

STAGES_FILE = "stages.json"
REPORT_FILE = "report.md"
BASELINES_DIR = "baselines"
RANDOM_INIT, RAW_PIXELS = "random-init backbone", "raw pixels"


def load_run_config(path: Path, overrides: list[str], pretrain_overrides: list[str]) -> RunConfig:
    """The run config with its stage config paths made absolute and extra pretrain overrides added."""
    from marrowlens.config import apply_overrides, check_override_keys

    check_override_keys(RunConfig, overrides)
    data = apply_overrides(read_yaml(path), overrides)
    config = validate_config(RunConfig, data, str(path)).resolve_paths(Path(path).resolve().parent)
    config.pretrain.set = [*config.pretrain.set, *pretrain_overrides]
    return config


def stage_pretrain_config(stage: PretrainStageConfig) -> PretrainConfig:
    """The pretrain stage's YAML <- its ``override`` mapping <- its ``set`` strings."""
    return load_config(PretrainConfig, stage.config, stage.set, values=stage.override)


def stage_probe_config(stage: ProbeStageConfig) -> ProbeConfig:
    """A probe stage's YAML (the task's shipped one by default) <- ``override`` <- ``set``, for its task."""
    path = stage.config or shipped_probe_config(stage.task)
    return load_config(ProbeConfig, path, [*stage.set, f"task={stage.task}"], values=stage.override)


def _weights_key(config: PretrainConfig) -> list[str]:
    """Starting weights count by content (a file replaced at the same path redoes pretraining); none add nothing,
    so studies without weights keep their keys."""
    if config.model.weights is None:
        return []
    from marrowlens.ssl.backbones import weights_fingerprint
    from marrowlens.ssl.weights import locate_weights

    return [weights_fingerprint(locate_weights(config.model.weights))]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Study:
    """Bookkeeping of one results folder: which stage was made from what."""

    out: Path
    say: Callable[[str], None]
    stages: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        path = self.out / STAGES_FILE
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str, key: str, complete: bool) -> bool:
        if complete and self.stages.get(stage) == key:
            self.say(f"[{stage}] up to date, skipped")
            return True
        self.say(f"[{stage}] running")
        return False

    def begin(self, stage: str, key: str) -> bool:
        """Note that ``stage`` starts with ``key``; True when an unfinished run of the same key can resume."""
        resumable = self.stages.get(f"{stage} (started)") == key
        self.stages.pop(stage, None)
        self.record(f"{stage} (started)", key)
        return resumable

    def record(self, stage: str, key: str) -> None:
        self.stages[stage] = key
        write_json_atomic(self.out / STAGES_FILE, self.stages)


@python_api
def run_study(cohort_dir: Path, config: RunConfig, out: Path, say: Callable[[str], None] = print) -> Path | None:
    """Run (or finish) a study; returns the report path on the main process, None on other ranks."""
    from marrowlens.ssl.backbones import INFO_FILE
    from marrowlens.ssl.train import LAST_CKPT, pretrain

    out = Path(out)
    _refuse_foreign_results(out, cohort_dir)
    out.mkdir(parents=True, exist_ok=True)
    cohort = load_cohort(cohort_dir)
    test_cohort = _test_cohort(config, cohort)
    study = Study(out, say)
    run_dir, emb_dir = out / "run", out / "emb"

    pretrain_config = stage_pretrain_config(config.pretrain)
    key = _key(pretrain_config.model_dump(mode="json"), cohort.meta.fingerprint, *_weights_key(pretrain_config))
    finished = (run_dir / INFO_FILE).is_file()
    if not study.done("pretrain", key, finished):
        resume = study.begin("pretrain", key) and (run_dir / LAST_CKPT).is_file()
        try:
            with recording(_pretrain_command(config, cohort_dir, run_dir, resume)):
                result = pretrain(pretrain_config, cohort_dir, run_dir, resume=resume, overwrite=not resume)
        except Interrupted as exc:
            raise Interrupted(f"pretraining interrupted; {_how_to_continue(run_dir / LAST_CKPT)}") from exc
        if result is None:
            return None  # a secondary DDP process: the main one carries on alone
        study.record("pretrain", key)
    backbone = json.loads((run_dir / INFO_FILE).read_text())
    study.lines.append(f"- backbone: `{backbone['timm_name']}` at {backbone['image_size']} px ({run_dir})")

    emb_key = _key(backbone["fingerprint"], cohort.meta.fingerprint, config.embed.model_dump(mode="json"))
    _embed_stage("embed", emb_key, config, run_dir, cohort_dir, emb_dir, study)
    from marrowlens.embeddings import load_embeddings

    store = load_embeddings(emb_dir)
    study.lines.append(f"- embeddings: {len(store)} cells x {store.meta.dim} ({emb_dir})")
    probe_keys = _probe_stages(config, store.fingerprint, emb_dir, out, study)
    embeddings = {f"SSL backbone ({backbone['timm_name']})": out}
    if config.baselines:
        embeddings.update(_baseline_stages(config, backbone, cohort, out / BASELINES_DIR, study))
    if config.index.enabled:
        _index_stage(config, store.fingerprint, emb_dir, out / "idx", study)
    if test_cohort is not None:
        _external_test_stages(config, backbone["fingerprint"], test_cohort, probe_keys, out, study)
    return _write_report(out, cohort_dir, cohort.meta, study, config, embeddings)


def _baseline_stages(
    config: RunConfig, backbone: dict[str, Any], cohort: Cohort, out: Path, study: Study
) -> dict[str, Path]:
    """Embed the cohort with a random-init backbone (same timm name and size) and as raw pixels, then fit every
    probe on each with the same config; returns each baseline's folder (its probes in ``probes/NAME``)."""
    from marrowlens.baselines import PIXEL_SIDE, pixel_store

    name, size = backbone["timm_name"], backbone["image_size"]
    random_dir, pixels_dir = out / "random_init", out / "raw_pixels"
    key = _key("random-init", name, size, cohort.meta.fingerprint, config.embed.model_dump(mode="json"))
    _embed_stage("embed random-init", key, config, name, cohort.folder, random_dir / "emb", study, image_size=size)
    key = _key("raw-pixels", PIXEL_SIDE, cohort.meta.fingerprint)
    if not study.done("raw pixels", key, (pixels_dir / "emb" / "meta.json").is_file()):
        study.begin("raw pixels", key)
        pixel_store(cohort.folder, pixels_dir / "emb", PIXEL_SIDE)
        study.record("raw pixels", key)
    from marrowlens.embeddings import load_embeddings

    for label, folder in ((RANDOM_INIT, random_dir), (RAW_PIXELS, pixels_dir)):
        store = load_embeddings(folder / "emb")
        _probe_stages(config, store.fingerprint, folder / "emb", folder, study, prefix=f"{label}: ")
    return {f"{RANDOM_INIT} ({name})": random_dir, f"{RAW_PIXELS} ({PIXEL_SIDE} x {PIXEL_SIDE} RGB)": pixels_dir}


def _embed_stage(
    stage: str,
    key: str,
    config: RunConfig,
    run_dir: Path | str,
    cohort_dir: Path,
    emb_dir: Path,
    study: Study,
    image_size: int | None = None,
) -> None:
    """Embed ``cohort_dir`` with the study's backbone (or a bare timm name at ``image_size``: random init) and
    embed settings, resuming an unfinished store."""
    if study.done(stage, key, (emb_dir / "meta.json").is_file()):
        return
    from marrowlens.ssl.embed import embed_cohort

    resume = study.begin(stage, key)
    overwrite = not resume or (emb_dir / "meta.json").is_file()
    with recording(_embed_command(config, run_dir, cohort_dir, emb_dir, overwrite, image_size)):
        embed_cohort(
            run_dir,
            cohort_dir,
            emb_dir,
            image_size=image_size,
            batch_size=config.embed.batch_size,
            precision=config.embed.precision,
            num_workers=config.embed.num_workers,
            stain_normalize=config.embed.stain_normalize,
            overwrite=overwrite,
        )
    study.record(stage, key)


def _how_to_continue(last: Path) -> str:
    """Re-running ``marrowlens run`` resumes pretraining from ``last`` if an epoch finished, else restarts it."""
    if last.is_file():
        return f"run the same `marrowlens run` command again to continue from {last}"
    return "no epoch had finished: run the same `marrowlens run` command again to start pretraining over"


def _probe_stages(
    config: RunConfig, emb_fingerprint: str, emb_dir: Path, out: Path, study: Study, prefix: str = ""
) -> dict[str, str]:
    """Fit every probe (skipping those up to date); returns each probe's stage key. A ``prefix`` (a baseline's
    probes) names the stages and keeps them out of the report's list (its table shows them)."""
    from marrowlens.probes import commands as probes

    keys: dict[str, str] = {}
    for name, stage in config.probes.items():
        probe_config = stage_probe_config(stage)
        blast_dir = out / "probes" / stage.blast_probe if stage.blast_probe else None
        keys[name] = _key(emb_fingerprint, probe_config.model_dump(mode="json"), keys.get(stage.blast_probe or ""))
        folder = out / "probes" / name
        if study.done(f"{prefix}probe {name}", keys[name], (folder / "report.md").is_file()):
            if not prefix:
                study.lines += [f"- probe `{name}` ({stage.task}): see {folder / 'report.md'}"]
            continue
        with recording(_probe_command(stage, emb_dir, folder, blast_dir)):
            outcome = probes.fit(stage.task, emb_dir, folder, probe_config, blast_probe=blast_dir, overwrite=True)
        study.record(f"{prefix}probe {name}", keys[name])
        for line in outcome.headline:
            study.say(f"  {line}")
        if prefix:
            continue
        study.lines += [
            f"- probe `{name}` ({stage.task}): see {folder / 'report.md'}",
            *[f"  - {line}" for line in outcome.headline],
        ]
    return keys


def _test_cohort(config: RunConfig, cohort: Cohort) -> Cohort | None:
    """The test cohort, checked before any stage runs: another cohort than the study's."""
    if config.test_cohort is None:
        return None
    test_cohort = load_cohort(config.test_cohort)
    if test_cohort.meta.fingerprint == cohort.meta.fingerprint:
        raise MarrowLensError(
            f"test cohort {config.test_cohort} is the study's own cohort; an external test needs another one"
        )
    return test_cohort


def _external_test_stages(
    config: RunConfig,
    backbone_fingerprint: str,
    test_cohort: Cohort,
    probe_keys: dict[str, str],
    out: Path,
    study: Study,
) -> None:
    """Embed the test cohort with the study's backbone, test every probe on it as is, and set CV beside test."""
    from marrowlens.embeddings import load_embeddings

    test_dir = test_cohort.folder
    emb_dir = out / "test" / "emb"
    key = _key(backbone_fingerprint, test_cohort.meta.fingerprint, config.embed.model_dump(mode="json"))
    _embed_stage("embed test cohort", key, config, out / "run", test_dir, emb_dir, study)
    store = load_embeddings(emb_dir)
    study.lines += [
        "",
        "## Internal CV and external test",
        "",
        (
            f"Test cohort {test_dir}: {test_cohort.meta.n_cells} cells, {test_cohort.meta.n_patients} patients, "
            f"embedded by the study's backbone ({emb_dir}); each fitted probe applied as is, nothing refitted."
        ),
        "",
    ]
    for name in config.probes:
        study.lines += _external_test(name, _key(probe_keys[name], store.fingerprint), emb_dir, out, study)


def _external_test(name: str, key: str, emb_dir: Path, out: Path, study: Study) -> list[str]:
    """One probe's test (skipped when done); its lines of the study report, or why it could not be tested."""
    from marrowlens.probes import commands as probes
    from marrowlens.probes.report import REPORT_JSON, comparison_markdown

    probe_dir, folder = out / "probes" / name, out / "test" / "probes" / name
    stage = f"test {name}"
    if not study.done(stage, key, (folder / "meta.json").is_file()):
        try:
            with recording(_test_command(probe_dir, emb_dir, folder)):
                outcome = probes.external_test(probe_dir, emb_dir, folder, overwrite=True)
        except MarrowLensError as exc:  # a test cohort may lack this probe's labels: the other probes go on
            study.say(f"  not tested: {exc}")
            return [f"- probe `{name}`: not tested on this cohort ({exc})", ""]
        study.record(stage, key)
        for line in outcome.headline:
            study.say(f"  {line}")
    internal, external = (json.loads((where / REPORT_JSON).read_text()) for where in (probe_dir, folder))
    return [
        *comparison_markdown(name, internal, external),
        f"Reports: {probe_dir / 'report.md'}, {folder / 'report.md'}",
        "",
    ]


def _index_stage(config: RunConfig, emb_fingerprint: str, emb_dir: Path, index_dir: Path, study: Study) -> None:
    from marrowlens.retrieval.index import build_index

    # An empty override leaves the key as it was before overrides existed: finished indexes stay finished.
    override = [config.index.override] if config.index.override else []
    key = _key(emb_fingerprint, config.index.model_dump(mode="json", exclude={"override"}), *override)
    if not study.done("index", key, (index_dir / "meta.json").is_file()):
        with recording(_index_command(config.index, emb_dir, index_dir)):
            build_index(
                emb_dir,
                index_dir,
                kind=config.index.kind,
                metric=config.index.metric,
                overrides=config.index.set,
                values=config.index.override,
                overwrite=True,
            )
        study.record("index", key)
    study.lines.append(f"- similar-cell index: {index_dir}; browse with `marrowlens serve --index {index_dir}`")


def _write_report(
    out: Path, cohort_dir: Path, cohort_meta: CohortMeta, study: Study, config: RunConfig, embeddings: dict[str, Path]
) -> Path:
    """``report.md`` and the self-contained ``report.html`` (training curves, every probe beside its baselines)."""
    from marrowlens.reports.curves import CURVES_FILE, write_training_curves
    from marrowlens.reports.study import StudyPage, write_study_html

    counts = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for name, values in cohort_meta.counts.items()
    )
    cohort_line = (
        f"{cohort_dir} ({cohort_meta.n_cells} cells, {cohort_meta.n_patients} patients, "
        f"{cohort_meta.n_quarantined} quarantined)"
    )
    curves = write_training_curves(out / "run", out / CURVES_FILE)
    page = StudyPage(
        out=out,
        facts=[("cohort", cohort_line), ("labels", counts), *_facts(study.lines)],
        config=config.model_dump(mode="json"),
        curves=curves,
        probes=list(config.probes),
        embeddings=embeddings,
        tests=out / "test" if config.test_cohort is not None else None,
    )
    text = "\n".join(
        [
            "# MarrowLens study",
            "",
            f"- cohort: {cohort_line}",
            f"- labels: {counts}",
            *study.lines,
            "",
            "Everything below, with every figure embedded: report.html.",
            "",
            *_curves_markdown(curves),
            *_baselines_markdown(page, config.baselines),
        ]
    )
    write_text_atomic(out / REPORT_FILE, text)
    write_study_html(page)
    cohort = CohortRef(folder=str(Path(cohort_dir).resolve()), fingerprint=cohort_meta.fingerprint)
    write_meta(out, StudyMeta(cohort=cohort, stages=study.stages))
    return out / REPORT_FILE


def _facts(lines: list[str]) -> list[tuple[str, str]]:
    """The report's top-level "- label: value" lines (backbone, embeddings, index) as rows."""
    rows = []
    for line in lines:
        if line.startswith("- ") and ": " in line and not line.startswith("- probe "):
            label, value = line[2:].split(": ", 1)
            rows.append((label, value.replace("`", "")))
    return rows


def _curves_markdown(curves: Path | str) -> list[str]:
    from marrowlens.reports.curves import CURVES_FILE

    shown = curves if isinstance(curves, str) else f"![training curves]({CURVES_FILE})"
    return ["## Training curves", "", shown, ""]


def _baselines_markdown(page: StudyPage, enabled: bool) -> list[str]:
    """Per probe: its headline figures on the study's backbone beside its baselines."""
    from marrowlens.reports.compare import baseline_table
    from marrowlens.reports.study import probe_reports

    lines = ["## Baselines", ""]
    if not enabled:
        lines += ["Baselines turned off (`baselines: false` / `--no-baselines`): chance and majority class only.", ""]
    for name in page.probes:
        reports = probe_reports(page, name)
        if next(iter(reports.values())) is None:
            continue
        header, rows, _ = baseline_table(reports)
        lines += [f"### Probe `{name}`", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        lines += [""]
    return lines


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _refuse_foreign_results(out: Path, cohort_dir: Path) -> None:
    """A results folder belongs to one cohort; another cohort needs another folder."""
    if artifact_kind(out) == "study":
        meta = read_meta(out, StudyMeta)
        if meta.cohort.fingerprint != load_cohort(cohort_dir).meta.fingerprint:
            raise MarrowLensError(f"{out} holds a study of another cohort ({meta.cohort.folder}); choose another --out")


# ---------------------------------------------------------------- the command each stage stands for


def _options(stage: PretrainStageConfig | ProbeStageConfig | IndexStageConfig) -> list[Any]:
    """A stage's ``--config`` (if any), its ``override:`` mapping and ``set:`` strings, as ``--set`` words."""
    config = getattr(stage, "config", None)
    model: type[PretrainConfig | ProbeConfig] | None = None  # an index override holds flat FAISS parameters
    if isinstance(stage, PretrainStageConfig):
        model = PretrainConfig
    elif isinstance(stage, ProbeStageConfig):
        model = ProbeConfig
    settings = [*override_texts(model, stage.override), *stage.set]
    return [*(["--config", config] if config else []), *[word for item in settings for word in ("--set", item)]]


def _pretrain_command(config: RunConfig, cohort_dir: Path, run_dir: Path, resume: bool) -> str:
    """`marrowlens pretrain` with the study's config and overrides (``--pretrain-set`` among them)."""
    again = "--resume" if resume else "--overwrite"
    return command_line("pretrain", "--cohort", cohort_dir, "--out", run_dir, *_options(config.pretrain), again)


def _embed_command(
    config: RunConfig, run_dir: Path | str, cohort_dir: Path, emb_dir: Path, overwrite: bool, size: int | None = None
) -> str:
    embed = config.embed
    words: list[Any] = ["embed", "--model", run_dir, *(["--image-size", size] if size else [])]
    words += ["--cohort", cohort_dir, "--out", emb_dir]
    words += ["--batch-size", embed.batch_size, "--precision", embed.precision]
    words += ["--num-workers", embed.num_workers] if embed.num_workers is not None else []
    words += ["--stain-normalize", embed.stain_normalize, *(["--overwrite"] if overwrite else [])]
    return command_line(*words)


def _probe_command(stage: ProbeStageConfig, emb_dir: Path, folder: Path, blast_dir: Path | None) -> str:
    blast = ["--blast-probe", blast_dir] if blast_dir else []
    options = [*_options(stage), *blast, "--overwrite"]
    return command_line("probe", "fit", stage.task, "--embeddings", emb_dir, "--out", folder, *options)


def _test_command(probe_dir: Path, emb_dir: Path, folder: Path) -> str:
    return command_line("probe", "test", probe_dir, "--embeddings", emb_dir, "--out", folder, "--overwrite")


def _index_command(stage: IndexStageConfig, emb_dir: Path, index_dir: Path) -> str:
    build = ["index", "build", "--embeddings", emb_dir, "--out", index_dir]
    return command_line(*build, "--kind", stage.kind, "--metric", stage.metric, *_options(stage), "--overwrite")
