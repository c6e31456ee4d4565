"""Reports of a probe: ``report.json`` (everything), ``report.md`` (readable tables), PNG plots, and the
lines a command prints (returned as strings: only the CLI prints).

Plots use matplotlib's Agg backend (no display needed): cell- and patient-level confusion
matrices, a reliability diagram (the picture behind the ECE), and per patient the blast fraction
against the predicted confidence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from marrowlens.artifacts import atomic_path, write_json_atomic, write_text_atomic
from marrowlens.config import ProbeConfig
from marrowlens.probes.figures import OutOfFold, write_figures
from marrowlens.probes.sheets import CellCalls, sheets_markdown, write_patient_cells, write_sheets

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def reliability_bins(y: np.ndarray, proba: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Per confidence bin: cells, mean confidence, accuracy (for the reliability diagram)."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "n": int(inside.sum()),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                }
            )
    return out


def write_report(
    folder: Path,
    report: dict[str, Any],
    patients: pd.DataFrame | None,
    calls: CellCalls | None = None,
    cells: OutOfFold | None = None,
) -> list[Path]:
    """Write the plots, JSON, Markdown and a self-contained ``report.html`` (and, given ``calls``, a contact sheet
    per patient; given ``cells``, the ROC, UMAP and error figures); returns the paths written."""
    from marrowlens.probes.html import REPORT_HTML, write_html

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sheets: list[Path] = []
    if patients is not None:
        report["patients"] = _records(patients)
        if calls is not None:
            sheets.append(write_patient_cells(folder, calls))
        if calls is not None and "truth" in patients:
            report["sheets"], drawn = write_sheets(folder, patients, calls)
            sheets += drawn
    for level in ("cell", "patient"):
        block = report.get(level)
        if isinstance(block, dict) and block.get("per_class"):
            block["baselines"] = baselines(block)
    plots = write_plots(folder, report, patients, cells)
    write_json_atomic(folder / REPORT_JSON, report)
    write_text_atomic(folder / REPORT_MD, render_markdown(report))
    write_html(folder, report)
    return [folder / REPORT_JSON, folder / REPORT_MD, folder / REPORT_HTML, *plots, *sheets]


def baselines(block: dict[str, Any]) -> dict[str, Any] | None:
    """What a probe must beat, from the block's own class counts: chance (balanced accuracy 1/K over the K classes
    present, ROC-AUC 0.5) and always calling the majority class (its share is the accuracy)."""
    support = {name: int(entry["support"]) for name, entry in (block.get("per_class") or {}).items()}
    support = {name: n for name, n in support.items() if n > 0}
    if not support:
        return None
    majority = max(support, key=lambda name: support[name])
    return {
        "classes_present": len(support),
        "chance_balanced_accuracy": 1 / len(support),
        "chance_roc_auc": 0.5,
        "majority_class": majority,
        "majority_accuracy": support[majority] / sum(support.values()),
    }


def baseline_line(block: dict[str, Any]) -> str | None:
    """The baselines in one line, for report.md (and the study report)."""
    base = block.get("baselines")
    if not base:
        return None
    return (
        f"Baselines: chance balanced accuracy {_fmt(base['chance_balanced_accuracy'])} "
        f"(1/{base['classes_present']}), chance ROC-AUC {_fmt(base['chance_roc_auc'])}; "
        f"majority class ({base['majority_class']}) accuracy {_fmt(base['majority_accuracy'])}."
    )


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain JSON rows (pandas turns numpy scalars into Python ones and NaN into null)."""
    rows: list[dict[str, Any]] = json.loads(frame.to_json(orient="records", double_precision=6))
    return rows


# ---------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _with_ci(entry: Any) -> tuple[str, str]:
    if isinstance(entry, dict) and "value" in entry:
        ci = entry.get("ci")
        return _fmt(entry["value"]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–"
    return _fmt(entry), "–"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _level(title: str, block: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", ""]
    names = [
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("macro_f1", "macro-F1"),
        ("roc_auc_ovr", "ROC-AUC (one-vs-rest, macro)"),
        ("ece", "ECE (top-label)"),
    ]
    lines += _table(["metric", "value", "95% CI"], [[label, *_with_ci(block.get(key))] for key, label in names])
    line = baseline_line(block)
    if line:
        lines += [line, ""]
    per_class = block.get("per_class") or {}
    if per_class:
        rows = []
        for name, entry in per_class.items():
            cells = [name]
            for metric in ("precision", "recall", "f1"):
                value, ci = _with_ci(entry[metric])
                cells.append(f"{value} {ci}")
            rows.append([*cells, entry["support"]])
        lines += _table(["class", "precision [95% CI]", "recall [95% CI]", "F1 [95% CI]", "support"], rows)
    cm = block.get("confusion_matrix")
    if cm:
        lines += ["Confusion matrix (rows: truth, columns: prediction):", ""]
        lines += _table(
            ["truth \\ predicted", *cm["labels"]], [[label, *row] for label, row in zip(cm["labels"], cm["matrix"])]
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    ev = report.get("evaluation", {})
    title = "External test" if ev.get("kind") == "external-test" else "Probe report"
    lines = [f"# {title}: {report['task']}", ""]
    lines += _table(
        ["", ""],
        [
            ["task", report["task"]],
            ["head", report.get("head")],
            ["patient head", (report.get("patient_head") or {}).get("name")],
            ["loss", report.get("loss")],
            ["classes", ", ".join(report.get("classes", []))],
            ["evaluation", ev.get("description")],
            ["grouping", ev.get("grouping")],
            ["blast filter", ev.get("blast_filter")],
            ["hyper-parameters", ev.get("hyper_parameters")],
            ["embeddings", report.get("embeddings", {}).get("fingerprint")],
            ["model", report.get("embeddings", {}).get("model_fingerprint")],
        ],
    )
    if ev.get("left_out"):
        lines += [unseen_note(ev["left_out"]), ""]
    if ev.get("shared_patients"):
        lines += [shared_note(ev["shared_patients"]), ""]
    if report.get("cell") is None:
        lines += ["No evaluation was run.", ""]
    else:
        cell = report["cell"]
        lines += [
            "## Cell level",
            "",
            (
                f"{cell['n']} cells evaluated ({cell.get('n_kept', cell['n'])} kept of "
                f"{cell.get('n_evaluated', cell['n'])}), {cell['n_groups']} patients; intervals: "
                f"{cell['bootstrap']['resamples']} bootstrap resamples of patients."
            ),
            "",
        ]
        lines += _level("Metrics", cell)
    patient = report.get("patient")
    if patient:
        lines += ["## Patient level", ""]
        if "accuracy" in patient:
            lines += [
                (
                    f"{patient['n_patients']} patients: {patient['n_determined']} determined, "
                    f"{patient['n_undetermined']} undetermined (no kept cell; coverage {_fmt(patient['coverage'])}). "
                    "Patient prediction = argmax of the mean log-probability of its kept cells. "
                    "Accuracy counting undetermined patients as wrong: "
                    f"{_fmt(patient.get('accuracy_counting_undetermined_as_wrong'))}."
                ),
                "",
            ]
            if patient["undetermined"]:
                lines += ["Undetermined: " + ", ".join(patient["undetermined"]), ""]
            lines += _level("Metrics", patient)
        elif "blast_fraction_mae" in patient:
            value, ci = _with_ci(patient["blast_fraction_mae"])
            lines += [
                (
                    f"{patient['n_patients']} patients. "
                    f"Blast fraction (true vs predicted) mean absolute error: {value} {ci}; "
                    f"Pearson r: {_fmt(patient.get('blast_fraction_pearson_r'))}."
                ),
                "",
            ]
        else:
            lines += [patient.get("note", ""), ""]
    if report.get("patients"):
        lines += ["### Patients", ""]
        keys = [k for k in report["patients"][0] if not k.startswith(("p_", "frac_"))]
        lines += _table(keys, [[row[k] for k in keys] for row in report["patients"]])
    if report.get("sheets"):
        lines += sheets_markdown(report["sheets"])
    if report.get("folds"):
        lines += ["## Folds", ""]
        keys = list(dict.fromkeys(k for row in report["folds"] for k in row))
        lines += _table(keys, [[row.get(k) for k in keys] for row in report["folds"]])
    lines += figures_markdown(report.get("figures") or {})
    if ev.get("group_by"):
        groups = ev["group_by"]
        note = f"Every fold holds out whole values of `{groups['column']}` (a cell without a patient id is a patient)."
        lines += ["## Held-out groups", "", note, ""]
        keys = ["fold", "held_out", "test_patients", "test_cells", "train_patients", "train_cells"]
        rows = [[", ".join(row["held_out"]) if k == "held_out" else row[k] for k in keys] for row in groups["folds"]]
        lines += _table(keys, rows)
    if report.get("leave_one_domain_out"):
        lines += [
            "## Leave one domain out",
            "",
            "Trained on every other domain (without any patient of the held-out one).",
            "",
        ]
        keys = list(dict.fromkeys(k for row in report["leave_one_domain_out"] for k in row))
        lines += _table(keys, [[row.get(k) for k in keys] for row in report["leave_one_domain_out"]])
    return "\n".join(lines)


FIGURE_TITLES = {
    "confusion_cell": "Confusion matrix, cell level",
    "confusion_patient": "Confusion matrix, patient level",
    "calibration": "Calibration (reliability diagram)",
    "patients": "Per patient",
    "roc_cell": "ROC curves, cell level",
    "roc_patient": "ROC curves, patient level",
    "umap": "UMAP of the evaluated cells (cell type, patient, domain, prediction)",
    "errors": "The most confident wrong calls",
}


def figures_markdown(figures: dict[str, str | None]) -> list[str]:
    """The report.md section linking every figure of the folder (or saying why one is missing)."""
    if not figures:
        return []
    lines = ["## Figures", "", "Every figure is in report.html too, embedded.", ""]
    for name, note in figures.items():
        title = FIGURE_TITLES.get(name, name)
        lines.append(f"- {title}: {note}" if note else f"- [{title}]({name}.png)")
    return [*lines, ""]


# The headline metrics a study report sets side by side: (level, key, label).
COMPARED = (
    ("cell", "accuracy", "cell accuracy"),
    ("cell", "balanced_accuracy", "cell balanced accuracy"),
    ("cell", "macro_f1", "cell macro-F1"),
    ("cell", "roc_auc_ovr", "cell ROC-AUC"),
    ("patient", "accuracy", "patient accuracy"),
    ("patient", "balanced_accuracy", "patient balanced accuracy"),
    ("patient", "roc_auc_ovr", "patient ROC-AUC"),
    ("patient", "blast_fraction_mae", "patient blast-fraction MAE"),
)


def comparison_markdown(name: str, internal: dict[str, Any], external: dict[str, Any]) -> list[str]:
    """One probe's headline metrics with 95% intervals: internal CV beside the external test.

    A gap between the columns is what CV on one cohort cannot show (e.g. APL: 0.87-0.90 in CV, 0.71 outside).
    """

    def entry(report: dict[str, Any], level: str, key: str) -> Any:
        return (report.get(level) or {}).get(key)

    def shown(value: Any) -> str:
        point, ci = _with_ci(value)
        return point if ci == "–" else f"{point} {ci}"

    rows = [
        [label, shown(entry(internal, level, key)), shown(entry(external, level, key))]
        for level, key, label in COMPARED
        if entry(internal, level, key) is not None or entry(external, level, key) is not None
    ]
    header = ["metric", _column("internal CV", internal), _column("external test", external)]
    evaluation = external.get("evaluation") or {}
    left_out, shared = evaluation.get("left_out"), evaluation.get("shared_patients")
    note = [*([unseen_note(left_out), ""] if left_out else []), *([shared_note(shared), ""] if shared else [])]
    return [f"### Probe `{name}` ({external['task']})", "", *note, *_table(header, rows)]


def _column(title: str, report: dict[str, Any]) -> str:
    if report.get("cell") is None:
        return f"{title} (not run)"
    units = report.get("units") or {}
    return f"{title} ({units.get('cells', '?')} cells, {units.get('patients', '?')} patients)"


# ---------------------------------------------------------------- what the commands print


def outcome_text(headline: list[str], written: list[Path]) -> str:
    """What a probe command prints: its headline figures, then each file it wrote."""
    return "\n".join([*headline, *(f"wrote {path}" for path in written)])


def headline(report: dict[str, Any]) -> list[str]:
    """The few lines a command prints about a report: cell and patient figures with their intervals."""

    def show(name: str, entry: Any) -> str:
        if not isinstance(entry, dict) or entry.get("value") is None:
            return f"{name} –"
        ci = entry.get("ci")
        return f"{name} {entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    def measured(block: dict[str, Any], keys: tuple[tuple[str, str], ...]) -> str:
        """The named metrics, plus ROC-AUC where it could be computed (the APL figure of merit)."""
        auc = block.get("roc_auc_ovr")
        extra = (("roc_auc_ovr", "ROC-AUC"),) if isinstance(auc, dict) and auc.get("value") is not None else ()
        return ", ".join(show(label, block.get(key)) for key, label in keys + extra)

    lines = []
    cell = report.get("cell")
    if cell:
        lines.append(
            f"cell level ({cell['n']} cells): "
            + measured(
                cell, (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"))
            )
        )
    patient = report.get("patient") or {}
    if "accuracy" in patient:
        lines.append(
            f"patient level ({patient['n_determined']} of {patient['n_patients']} determined): "
            + measured(patient, (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")))
        )
    elif "blast_fraction_mae" in patient:
        lines.append(
            f"patient level ({patient['n_patients']} patients): "
            + show("blast-fraction MAE", patient["blast_fraction_mae"])
        )
    for row in report.get("leave_one_domain_out") or []:
        lines.append(
            f"held-out domain {row['held_out_domain']}: accuracy {row.get('accuracy', float('nan')):.3f}, "
            f"macro-F1 {row.get('macro_f1', float('nan')):.3f}"
        )
    return lines


def unseen_note(unseen: dict[str, dict[str, int]]) -> str:
    """One line: the test cells of classes the probe never learned, left out of every figure."""
    parts = [f"{name} ({n['cells']} cells, {n['patients']} patients)" for name, n in unseen.items()]
    return f"left out, classes the probe never learned: {', '.join(parts)}"


def shared_note(shared: list[str]) -> str:
    """One line: test patients whose ids the training store has too (a leak if they are the same patients)."""
    return (
        f"warning: {len(shared)} test patient id(s) are in the probe's training store too (e.g. {shared[0]}); "
        "if they are the same patients, this is no external test"
    )


def predict_headline(n_kept: int, n_cells: int, filtered: bool, n_patients: int, n_undetermined: int) -> list[str]:
    """What ``probe predict`` prints: cells kept by the blast filter (if any), and undetermined patients."""
    return [
        f"{n_kept} of {n_cells} cells kept" if filtered else f"{n_cells} cells predicted",
        f"{n_patients} patients, {n_undetermined} undetermined (no kept cell)",
    ]


def selection_note(info: list[dict[str, Any]], config: ProbeConfig) -> str | None:
    """How every hyper-parameter was chosen, fold by fold (always inside the training folds), so a reader
    sees edge picks and which settings were fixed rather than tuned."""
    notes = [note for note in (_cell_head_note(info, config), _patient_head_note(info, config)) if note]
    return "; ".join(notes) or None


def _cell_head_note(info: list[dict[str, Any]], config: ProbeConfig) -> str | None:
    """The linear head's regularisation: scikit-learn's records its C and the score that chose it; the
    torch head its weight decay, chosen by held-out loss. Probes without a choice (k-NN) have no note."""
    heads = [fold.get("head", {}) for fold in info]
    picks = [head["C"] for head in heads if "C" in head]
    if picks:
        grid = sorted(config.linear.c_values)
        edges = sum(c in (grid[0], grid[-1]) for c in picks)
        how = next((head["selection"] for head in heads if "selection" in head), "")
        return (
            f"C (inverse L2) chosen inside each training fold by {how}: {', '.join(f'{c:g}' for c in picks)} "
            f"(grid {', '.join(f'{c:g}' for c in grid)}; {edges} of {len(picks)} folds chose an end of the grid)"
        )
    decays = [head["weight_decay"] for head in heads if "weight_decay" in head]
    if not decays:
        return None
    top = max(config.linear.weight_decays)
    return (
        f"weight decay chosen inside each training fold by loss on held-out training patients: "
        f"{', '.join(f'{w:g}' for w in decays)} (grid {', '.join(f'{w:g}' for w in config.linear.weight_decays)}; "
        f"{decays.count(top)} of {len(decays)} folds chose its largest value)"
    )


def _patient_head_note(info: list[dict[str, Any]], config: ProbeConfig) -> str | None:
    """The patient head's own choices per fold, and the blast threshold (fixed, never tuned on the folds)."""
    if config.task != "mutation":
        return None
    picks = [fold["patient_head"]["selection"] for fold in info if (fold.get("patient_head") or {}).get("selection")]
    own = (
        "; ".join(f"fold {i}: {pick}" for i, pick in enumerate(picks))
        if picks
        else f"{config.mutation.aggregate}: nothing to choose"
    )
    return f"patient head {own}; blast threshold {config.mutation.blast_threshold:g} fixed (not tuned)"


def sweep_line(row: dict[str, Any]) -> str:
    """One row of a noise sweep, as the command prints it."""
    text = f"{row['loss']:>5} noise {row['noise']:.2f}: cell balanced accuracy {row['cell_balanced_accuracy']:.3f}"
    if row.get("patient_accuracy") is not None:
        text += f", patient accuracy {row['patient_accuracy']:.3f}"
    return text


def sweep_markdown(result: dict[str, Any]) -> str:
    """``sweep.md``: every loss at every noise rate, one table."""
    keys = [
        "loss",
        "noise",
        "cell_accuracy",
        "cell_balanced_accuracy",
        "cell_macro_f1",
        "patient_accuracy",
        "patient_balanced_accuracy",
        "undetermined_patients",
    ]
    keys = [k for k in keys if any(k in r for r in result["rows"])]
    lines = [
        f"# Noise sweep: {result['task']} ({result['kind']} noise in training labels only)",
        "",
        (
            f"{result['folds']}-fold patient-grouped CV, the same folds and the same injected noise for every loss. "
            f"Blast filter: {result['blast_filter'] or 'n/a'}."
        ),
        "",
    ]
    lines += _table(keys, [[r.get(k) for k in keys] for r in result["rows"]])
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def write_plots(
    folder: Path, report: dict[str, Any], patients: pd.DataFrame | None, cells: OutOfFold | None = None
) -> list[Path]:
    """Every PNG of the report; ``report["figures"]`` says which were drawn (None) or why not (a note)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figures: dict[str, str | None] = {}
    for level in ("cell", "patient"):
        block = report.get(level) or {}
        if block.get("confusion_matrix"):
            written.append(
                _save(
                    plt,
                    _confusion(plt, block["confusion_matrix"], f"{report['task']}: {level} level"),
                    folder / f"confusion_{level}.png",
                )
            )
            figures[f"confusion_{level}"] = None
    bins = (report.get("cell") or {}).get("calibration_bins")
    if bins:
        written.append(
            _save(
                plt, _reliability(plt, bins, (report["cell"].get("ece") or {}).get("value")), folder / "calibration.png"
            )
        )
        figures["calibration"] = None
    if patients is not None and len(patients):
        written.append(_save(plt, _patients(plt, patients, report["task"]), folder / "patients.png"))
        figures["patients"] = None
    if report.get("cell") is not None:
        notes, drawn = write_figures(plt, folder, report, cells)
        figures.update(notes)
        written += drawn
    report["figures"] = figures
    return written


def _save(plt: ModuleType, figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _confusion(plt: ModuleType, cm: dict[str, Any], title: str) -> Figure:
    matrix = np.asarray(cm["matrix"], dtype=float)
    labels = cm["labels"]
    size = 2.5 + 0.6 * len(labels)
    figure: Figure  # pyplot is imported lazily, so mypy sees its calls as untyped
    figure, ax = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    shown = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if shown[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    return figure


def _reliability(plt: ModuleType, bins: list[dict[str, float]], ece: float | None) -> Figure:
    figure: Figure  # pyplot is imported lazily, so mypy sees its calls as untyped
    figure, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        align="edge",
        edgecolor="black",
        alpha=0.7,
    )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability (ECE {_fmt(ece)})")
    return figure


def _patients(plt: ModuleType, table: pd.DataFrame, task: str) -> Figure:
    figure: Figure  # pyplot is imported lazily, so mypy sees its calls as untyped
    figure, ax = plt.subplots(figsize=(5, 4))
    if "true_blast_fraction" in table:
        ax.scatter(table["true_blast_fraction"], table["mean_p_blast"], s=18)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("true blast fraction of the patient")
        ax.set_ylabel("mean predicted P(blast)")
    else:
        determined = table["predicted"] != "undetermined"
        right = determined & (table["predicted"] == table.get("truth"))
        for mask, label, colour in ((right, "correct", "tab:green"), (determined & ~right, "wrong", "tab:red")):
            ax.scatter(table.loc[mask, "kept_fraction"], table.loc[mask, "confidence"], s=18, color=colour, label=label)
        if (~determined).any():
            ax.scatter(
                table.loc[~determined, "kept_fraction"],
                np.zeros(int((~determined).sum())),
                marker="x",
                color="grey",
                label="undetermined",
            )
        ax.set_xlabel("blast fraction (cells kept by the blast filter)")
        ax.set_ylabel("confidence of the patient prediction")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{task}: per patient")
    return figure


def write_sweep_plot(out: Path, result: dict[str, Any]) -> Path:
    """``sweep.png``: the patient accuracy (else cell balanced accuracy) of each loss against the noise rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = (
        "patient_accuracy"
        if any(r.get("patient_accuracy") is not None for r in result["rows"])
        else "cell_balanced_accuracy"
    )
    figure, ax = plt.subplots(figsize=(5, 4))
    for loss in result["losses"]:
        rows = [r for r in result["rows"] if r["loss"] == loss]
        ax.plot([r["noise"] for r in rows], [r.get(metric) for r in rows], marker="o", label=loss)
    ax.set_xlabel(f"injected {result['kind']} noise rate")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"{result['task']}: noise sweep")
    return _save(plt, figure, out / "sweep.png")
