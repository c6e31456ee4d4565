"""Which L2 strengths the linear probe's early-stopping split picks, and what each grid scores.

The torch linear head (``linear.solver: torch``) trains every weight decay of ``linear.weight_decays``
at once and keeps the one with the best loss on held-out training patients (inside each CV fold, so
the choice never sees the fold's test patients). Is a pick at the grid's edge a grid that is too narrow? This runs the
blast task's patient-grouped CV once per grid and prints, per grid, the weight decay each fold chose
and the cell-level balanced accuracy and ROC-AUC; as a reference, scikit-learn's lbfgs
LogisticRegression (balanced class weights) with C chosen by an inner patient-grouped 3-fold CV
inside each of the same outer folds.

  python bench/linear_grid.py --embeddings emb/ --out bench/out/linear_grid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRIDS = {
    "old (0..0.1)": [0.0, 1e-4, 1e-3, 1e-2, 1e-1],
    "wide (0..3)": [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0],
}


def main() -> None:
    from marrowlens.embeddings import load_embeddings
    from marrowlens.probes.commands import cross_validation_report, probe_config
    from marrowlens.probes.tasks import make_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, required=True)
    parser.add_argument("--task", default="blast")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="probe override (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    emb = load_embeddings(args.embeddings, mmap=True)
    rows, lines = (
        {},
        ["| grid | weight decay chosen per fold | balanced accuracy | ROC-AUC | fit s |", "|---|---|---|---|---|"],
    )
    for name, grid in GRIDS.items():
        config = probe_config(
            args.task,
            None,
            {},
            [*args.overrides, "linear.solver=torch", f"linear.weight_decays={grid}", "eval.bootstrap=200"],
        )
        started = time.perf_counter()
        report, *_ = cross_validation_report(make_task(config, emb), config)
        seconds = time.perf_counter() - started
        chosen = Counter(fold["head"]["weight_decay"] for fold in report["folds"])
        cell = report["cell"]
        rows[name] = {
            "grid": grid,
            "chosen": dict(chosen),
            "balanced_accuracy": cell["balanced_accuracy"],
            "roc_auc": cell.get("roc_auc_ovr"),
            "seconds": seconds,
        }
        picks = ", ".join(f"{w:g} x{n}" for w, n in sorted(chosen.items()))
        auc = cell.get("roc_auc_ovr") or {}
        lines.append(
            f"| {name} | {picks} | {cell['balanced_accuracy']['value']:.3f} {cell['balanced_accuracy']['ci']} | "
            f"{auc.get('value', float('nan')):.3f} | {seconds:.0f} |"
        )
    rows["sklearn"] = sklearn_reference(make_task(config, emb), config)
    chosen = ", ".join(f"C={c:g} x{n}" for c, n in sorted(rows["sklearn"]["chosen"].items()))
    lines.append(
        f"| scikit-learn lbfgs, C by inner grouped CV | {chosen} | {rows['sklearn']['balanced_accuracy']:.3f} | "
        f"{rows['sklearn']['roc_auc']:.3f} | {rows['sklearn']['seconds']:.0f} |"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear_grid.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (args.out / "linear_grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sklearn_reference(task, config) -> dict:
    """Nested: the outer folds of the probe's own CV, C chosen on inner patient-grouped folds of each training part."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from marrowlens.probes.commands import cv_folds

    X, y, groups = np.asarray(task.emb.vectors[task.rows]), task.y, task.groups
    proba, chosen = np.zeros(len(y)), Counter()
    started = time.perf_counter()
    for _, train, test in cv_folds(task, config):
        model = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)),
            {"logisticregression__C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
            scoring="balanced_accuracy",
            cv=StratifiedGroupKFold(3, shuffle=True, random_state=0),
        )
        model.fit(X[train], y[train], groups=groups[train])
        chosen[model.best_params_["logisticregression__C"]] += 1
        proba[test] = model.predict_proba(X[test])[:, 1]
    positive = np.unique(y)[1]
    return {
        "chosen": dict(chosen),
        "balanced_accuracy": balanced_accuracy_score(y == positive, proba >= 0.5),
        "roc_auc": roc_auc_score(y == positive, proba),
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    main()
