"""``report.html`` of a probe: the report's figures and headline metrics in one self-contained page.

Everything comes from ``report.json``'s dict and the PNGs already written beside it (embedded as ``data:``
URIs): headline metrics with their 95% intervals and baselines, ROC curves, confusion matrices,
calibration, the UMAP, the worst errors and the per-patient contact sheets (misclassified first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marrowlens.artifacts import write_text_atomic
from marrowlens.probes.report import FIGURE_TITLES
from marrowlens.reports.html import esc, figure, fmt, note, page, paragraph, section, table

REPORT_HTML = "report.html"

HEADLINE = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("roc_auc_ovr", "ROC-AUC"),
    ("ece", "ECE"),
)
SECTIONS = (
    ("roc", "ROC curves", ("roc_cell", "roc_patient")),
    ("confusion", "Confusion matrices", ("confusion_cell", "confusion_patient")),
    ("calibration", "Calibration", ("calibration",)),
    ("umap", "UMAP of the embedding", ("umap",)),
    ("errors", "Worst errors", ("errors",)),
)

EMBEDDED_SHEETS = 24  # patient sheets embedded in the page (~0.3 MB each); the rest stay linked files


def write_html(folder: Path, report: dict[str, Any]) -> Path:
    path = Path(folder) / REPORT_HTML
    write_text_atomic(path, render_html(Path(folder), report))
    return path


def with_ci(entry: Any) -> str:
    """A metric as "value [low, high]" (or just the value)."""
    if isinstance(entry, dict) and "value" in entry:
        ci = entry.get("ci")
        return fmt(entry["value"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
    return fmt(entry)


def headline_rows(block: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    """The probe's row, then its baselines' rows (chance, majority class), and each row's CSS class."""
    rows: list[list[Any]] = [["probe", *(with_ci(block.get(key)) for key, _ in HEADLINE)]]
    base = block.get("baselines")
    if base:
        chance = base["chance_balanced_accuracy"]
        rows.append([f"chance (1/{base['classes_present']})", None, chance, None, base["chance_roc_auc"], None])
        majority = base["majority_accuracy"]
        rows.append([f"majority class ({base['majority_class']})", majority, chance, None, 0.5, None])
    return rows, ["", *["baseline"] * (len(rows) - 1)]


def headline_table(block: dict[str, Any]) -> str:
    rows, kinds = headline_rows(block)
    return table(["", *(label for _, label in HEADLINE)], rows, kinds)


def render_html(folder: Path, report: dict[str, Any]) -> str:
    ev = report.get("evaluation") or {}
    title = ("External test" if ev.get("kind") == "external-test" else "Probe report") + f": {report['task']}"
    parts = [_summary(report)]
    nav = [("summary", "summary")]
    if report.get("cell") is not None:
        parts.append(_headline(report))
        nav.append(("headline", "headline"))
        figures = report.get("figures") or {}
        for anchor, heading, names in SECTIONS:
            shown = [
                figure(folder / f"{name}.png", FIGURE_TITLES[name])
                if figures.get(name) is None
                else note(figures[name])
                for name in names
                if name in figures
            ]
            if shown:
                parts.append(section(anchor, heading, shown))
                nav.append((anchor, heading.split()[0].lower() if anchor != "umap" else "UMAP"))
    else:
        parts.append(paragraph("No evaluation was run."))
    patients = _patients(folder, report)
    if patients:
        parts.append(patients)
        nav.append(("patients", "patients"))
    return page(title, parts, nav)


def _figure(folder: Path, name: str, why_not: str | None) -> str:
    return figure(folder / f"{name}.png", FIGURE_TITLES[name]) if why_not is None else note(why_not)


def _summary(report: dict[str, Any]) -> str:
    ev = report.get("evaluation") or {}
    emb = report.get("embeddings") or {}
    rows: list[list[Any]] = [
        ["task", report.get("task")],
        ["head", report.get("head")],
        ["patient head", (report.get("patient_head") or {}).get("name")],
        ["loss", report.get("loss")],
        ["classes", ", ".join(report.get("classes") or [])],
        ["evaluation", ev.get("description")],
        ["grouping", ev.get("grouping")],
        ["blast filter", ev.get("blast_filter")],
        ["hyper-parameters", ev.get("hyper_parameters")],
        ["embeddings", f"{emb.get('folder')} ({emb.get('fingerprint')})"],
        ["model", emb.get("model_fingerprint")],
    ]
    return section("summary", "Summary", [table(["", ""], rows)])


def _headline(report: dict[str, Any]) -> str:
    cell = report["cell"]
    parts = [
        "<h3>Cell level</h3>",
        paragraph(
            f"{cell['n']} cells, {cell.get('n_groups', '?')} patients; 95% intervals from "
            f"{(cell.get('bootstrap') or {}).get('resamples', '?')} bootstrap resamples of patients."
        ),
        headline_table(cell),
    ]
    patient = report.get("patient") or {}
    if "accuracy" in patient:
        parts += [
            "<h3>Patient level</h3>",
            paragraph(
                f"{patient['n_patients']} patients, {patient['n_determined']} determined, "
                f"{patient['n_undetermined']} undetermined (no kept cell)."
            ),
            headline_table(patient),
        ]
    elif "blast_fraction_mae" in patient:
        parts += [
            "<h3>Patient level</h3>",
            paragraph(
                f"{patient['n_patients']} patients; blast fraction mean absolute error "
                f"{with_ci(patient['blast_fraction_mae'])}, Pearson r {fmt(patient.get('blast_fraction_pearson_r'))}."
            ),
        ]
    return section("headline", "Headline metrics and baselines", parts)


def _patients(folder: Path, report: dict[str, Any]) -> str | None:
    figures = report.get("figures") or {}
    sheets = report.get("sheets") or {}
    parts = []
    if "patients" in figures:
        parts.append(figure(folder / "patients.png", FIGURE_TITLES["patients"]))
    entries = sheets.get("patients") or []
    if entries:
        parts.append(
            paragraph(
                f"Per patient, its top {sheets.get('per_sheet', '')} cells by their out-of-fold contribution to the "
                f"call of the {sheets.get('head', 'mean')} head ({sheets.get('contribution', '')}); "
                "misclassified patients first."
            )
        )
        ordered = sorted(entries, key=lambda e: not e["misclassified"])
        for entry in ordered[:EMBEDDED_SHEETS]:
            wrong = " (misclassified)" if entry["misclassified"] else ""
            caption = f"{entry['patient_id']}: truth {entry['truth']}, predicted {entry['predicted']}{wrong}"
            parts.append(figure(folder / entry["sheet"], caption))
        if len(ordered) > EMBEDDED_SHEETS:
            parts.append(
                note(
                    f"{len(ordered) - EMBEDDED_SHEETS} more patient sheet(s), correctly called ones last, are in the "
                    "probe folder's patients/ (linked from report.md); embedding them all would make this page too "
                    "heavy to e-mail"
                )
            )
    if sheets.get("note"):
        parts.append(note(sheets["note"]))
    if not parts:
        return None
    return section("patients", "Patients", parts)


__all__ = ["REPORT_HTML", "esc", "render_html", "write_html"]
