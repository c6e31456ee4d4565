"""The linear probe's two solvers on the same store and folds: torch (Adam, weight decay by held-out loss)
against scikit-learn (lbfgs LogisticRegression, C by patient-grouped balanced accuracy).

Real cells: the probes of a finished ``marrowlens run`` (its ``emb/`` and ``probes/``) are copied once
per solver with ``linear.solver`` set in their ``config.yaml`` (and their blast filter's), and each is
cross-validated by ``marrowlens probe eval`` (patient-grouped 5-fold CV, the probe's own seed: the same
folds for both). Synthetic cells (optional): ``marrowlens probe fit`` of the blast and mutation probes
with ``--set linear.solver=...`` on a store of ``marrowlens cohort synth`` cells. Each command is a
subprocess timed from the outside, with the machine's load average beside it.

  python bench/probe_solvers.py --study results/deepapl --synthetic-embeddings emb_synth/ --out bench/out/solvers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SOLVERS = ("torch", "sklearn")
STUDY_PROBES = {"blast": "blast", "apl": "apl", "wbc": "wbc"}  # the study's probe folders compared


def marrowlens(*args: object) -> tuple[float, str]:
    """Run one CLI command; its wall time in seconds and the 1-minute load average when it ended."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "marrowlens", *map(str, args)], check=True, env=env, cwd=REPO)
    return time.perf_counter() - started, f"{os.getloadavg()[0]:.1f}"


def set_solver(folder: Path, solver: str) -> None:
    """Write ``linear.solver`` into a probe folder's config (and its blast filter's, recursively)."""
    path = folder / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.setdefault("linear", {})["solver"] = solver
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if (folder / "blast_filter").is_dir():
        set_solver(folder / "blast_filter", solver)


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """Balanced accuracy and ROC-AUC (value and 95% CI) at cell and patient level, and the C or L2 picks."""
    out: dict[str, Any] = {"hyper_parameters": report["evaluation"].get("hyper_parameters")}
    for level in ("cell", "patient"):
        block = report.get(level) or {}
        for metric in ("balanced_accuracy", "roc_auc_ovr"):
            if isinstance(block.get(metric), dict):
                out[f"{level}_{metric}"] = block[metric]
    return out


def show(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def real(study: Path, out: Path) -> list[dict[str, Any]]:
    rows = []
    for name, folder in STUDY_PROBES.items():
        for solver in SOLVERS:
            probe = out / "real" / solver / name
            shutil.rmtree(probe, ignore_errors=True)
            shutil.copytree(study / "probes" / folder, probe)
            set_solver(probe, solver)
            seconds, load = marrowlens("probe", "eval", probe, "--embeddings", study / "emb")
            report = json.loads((probe / "report.json").read_text())
            rows.append({"data": "deepapl", "probe": name, "solver": solver, "seconds": seconds, "load": load})
            rows[-1].update(figures(report))
    return rows


def synthetic(embeddings: Path, out: Path) -> list[dict[str, Any]]:
    rows = []
    for solver in SOLVERS:
        base = out / "synthetic" / solver
        for task in ("blast", "mutation"):
            extra = ["--blast-probe", base / "blast"] if task == "mutation" else []
            seconds, load = marrowlens(
                "probe", "fit", task, "--embeddings", embeddings, "--out", base / task,
                "--set", f"linear.solver={solver}", *extra, "--overwrite",
            )  # fmt: skip
            report = json.loads((base / task / "report.json").read_text())
            rows.append({"data": "synthetic", "probe": task, "solver": solver, "seconds": seconds, "load": load})
            rows[-1].update(figures(report))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="results folder of `marrowlens run`")
    parser.add_argument("--synthetic-embeddings", type=Path, help="embedding store of a synthetic cohort")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = real(args.study, args.out)
    if args.synthetic_embeddings:
        rows += synthetic(args.synthetic_embeddings, args.out)
    lines = [
        "| data | probe | solver | cell balanced acc. [95% CI] | cell ROC-AUC | patient ROC-AUC | s (load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [show(row.get(k)) for k in ("cell_balanced_accuracy", "cell_roc_auc_ovr", "patient_roc_auc_ovr")]
        timing = f"{row['seconds']:.1f} ({row['load']})"
        lines.append(f"| {row['data']} | {row['probe']} | {row['solver']} | {' | '.join(cells)} | {timing} |")
    lines += ["", *(f"- {r['data']} {r['probe']} {r['solver']}: {r['hyper_parameters']}" for r in rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_solvers.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "probe_solvers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
