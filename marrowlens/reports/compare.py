"""One probe's headline figures on every embedding of a study (the SSL backbone and its baselines: a random-init
backbone, raw pixels), then chance and the majority class: the table a study report shows per probe."""

from __future__ import annotations

from typing import Any

from marrowlens.probes.html import with_ci

HEADLINE = (
    ("cell", "accuracy", "cell accuracy"),
    ("cell", "balanced_accuracy", "cell balanced accuracy"),
    ("cell", "roc_auc_ovr", "cell ROC-AUC"),
    ("patient", "accuracy", "patient accuracy"),
    ("patient", "balanced_accuracy", "patient balanced accuracy"),
    ("patient", "roc_auc_ovr", "patient ROC-AUC"),
    ("patient", "blast_fraction_mae", "patient blast-fraction MAE"),
)
CHANCE = {"balanced_accuracy": "chance_balanced_accuracy", "roc_auc_ovr": "chance_roc_auc"}


def _entry(report: dict[str, Any] | None, level: str, key: str) -> Any:
    return ((report or {}).get(level) or {}).get(key)


def baseline_table(reports: dict[str, dict[str, Any] | None]) -> tuple[list[str], list[list[Any]], list[str]]:
    """Header, rows and each row's kind ("" or "baseline"): one row per embedding (the first is the study's own;
    a report of None was not made), then chance and the majority class from the first report's class counts."""
    own = next(iter(reports.values()))
    columns = [c for c in HEADLINE if any(_entry(r, c[0], c[1]) is not None for r in reports.values())]
    rows: list[list[Any]] = [
        [label, *(with_ci(_entry(report, level, key)) if report else "not run" for level, key, _ in columns)]
        for label, report in reports.items()
    ]
    kinds = ["", *["baseline"] * (len(rows) - 1)]
    base = {level: (_entry(own, level, "baselines") or {}) for level in ("cell", "patient")}
    if base["cell"]:
        chance = [base[level].get(CHANCE.get(key, ""), None) if base[level] else None for level, key, _ in columns]
        rows.append([f"chance (1/{base['cell']['classes_present']} classes)", *chance])
        majority = [
            base[level].get("majority_accuracy") if key == "accuracy" and base[level] else None
            for level, key, _ in columns
        ]
        rows.append([f"majority class ({_majority(base)})", *majority])
        kinds += ["chance", "chance"]
    return ["embedding", *(label for _, _, label in columns)], rows, kinds


def _majority(base: dict[str, dict[str, Any]]) -> str:
    """The majority class, per level where the cells' and the patients' differ."""
    cell, patient = (
        base["cell"]["majority_class"],
        (base["patient"] or {}).get("majority_class", base["cell"]["majority_class"]),
    )
    return cell if cell == patient else f"cells: {cell}; patients: {patient}"
