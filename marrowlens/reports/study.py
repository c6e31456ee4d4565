"""``report.html`` of a ``marrowlens run`` study: its settings, the pretraining curves, and per probe its headline
figures beside its baselines (random-init backbone, raw pixels, chance, majority class) and key figures, all
embedded; each probe's own report.html holds the rest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from marrowlens.artifacts import write_text_atomic
from marrowlens.probes.html import REPORT_HTML
from marrowlens.probes.report import FIGURE_TITLES, REPORT_JSON
from marrowlens.reports.compare import baseline_table
from marrowlens.reports.html import esc, figure, note, page, paragraph, section, table

KEY_FIGURES = ("roc_cell", "roc_patient", "confusion_cell", "confusion_patient", "umap", "errors")


@dataclass
class StudyPage:
    """What the study page shows: its facts (label, value), run config, the pretraining's curves (or why
    none), and per probe the folders of its reports: the study's own first, then each baseline's."""

    out: Path
    facts: list[tuple[str, str]]
    config: dict[str, Any]
    curves: Path | str
    probes: list[str]
    embeddings: dict[str, Path] = field(default_factory=dict)  # label -> folder holding probes/NAME
    tests: Path | None = None  # folder holding probes/NAME of the external test, if any


def read_report(folder: Path) -> dict[str, Any] | None:
    path = folder / REPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def probe_reports(study: StudyPage, name: str) -> dict[str, dict[str, Any] | None]:
    return {label: read_report(folder / "probes" / name) for label, folder in study.embeddings.items()}


def write_study_html(study: StudyPage) -> Path:
    path = study.out / REPORT_HTML
    write_text_atomic(path, render_study(study))
    return path


def render_study(study: StudyPage) -> str:
    parts = [
        section("study", "Study", [table(["", ""], study.facts)]),
        section("config", "Run config", [_config(study.config)]),
        section("training", "Training curves", [_curves(study.curves)]),
    ]
    nav = [("study", "study"), ("config", "config"), ("training", "training")]
    for name in study.probes:
        anchor = f"probe-{name}"
        parts.append(_probe(study, name, anchor))
        nav.append((anchor, name))
    return page("MarrowLens study", parts, nav)


def _config(config: dict[str, Any]) -> str:
    text = esc(yaml.safe_dump(config, sort_keys=False))
    return f"<details><summary>the study's settings (YAML, defaults filled in)</summary><pre>{text}</pre></details>"


def _curves(curves: Path | str) -> str:
    if isinstance(curves, str):
        return note(curves)
    return figure(curves, "pretraining: loss, online k-NN accuracy and learning rate against the step")


def _probe(study: StudyPage, name: str, anchor: str) -> str:
    reports = probe_reports(study, name)
    own_folder = next(iter(study.embeddings.values())) / "probes" / name
    own = next(iter(reports.values()))
    if own is None:
        return section(anchor, f"Probe {name}", [note("no report")])
    header, rows, kinds = baseline_table(reports)
    link = (own_folder / REPORT_HTML).relative_to(study.out)
    parts = [
        paragraph(
            f"task {own['task']}, head {own.get('head')}, classes {', '.join(own.get('classes') or [])}; "
            f"{(own.get('evaluation') or {}).get('description')}"
        ),
        table(header, rows, kinds),
        f'<p>Full report: <a href="{esc(link)}">{esc(link)}</a></p>',
    ]
    if study.tests is not None:
        tested = read_report(study.tests / "probes" / name)
        if tested is not None and tested.get("cell") is not None:
            header, rows, kinds = baseline_table({"internal CV": own, "external test": tested})
            parts += ["<h3>Internal CV and external test</h3>", table(header, rows[:2], kinds[:2])]
    figures = own.get("figures") or {}
    for key in KEY_FIGURES:
        if key in figures and figures[key] is None:
            parts.append(figure(own_folder / f"{key}.png", f"{name}: {FIGURE_TITLES[key]}"))
    return section(anchor, f"Probe {name} ({own['task']})", parts)
