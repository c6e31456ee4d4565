"""The CPU recipe study: input size x epochs x method at a fixed pretraining budget, on the real cells.

Each grid point is one ``marrowlens run`` of the DeepAPL study config with ``--pretrain-set`` overrides
and ``--no-baselines`` (the ``recipe`` point: the config as shipped, baselines included), run as a
subprocess and timed from the outside (end to end), with the 1-minute load average sampled every 15 s
beside it. The pretraining time is read from the run folder: from its
``config.yaml`` (written when training starts) to its ``meta.json`` (written when the backbone is
exported). Figures come from the probes' own ``report.json`` (patient-grouped 5-fold CV, bootstrap CIs).
Points run one after another (never two trainings at once); a finished point is skipped by ``run`` itself,
so re-running the bench only collects figures.

With ``--sources-cohort`` (the five sources of ``../shared/data`` indexed together), each point's backbone
also embeds those cells and the five-class white-cell probe is cross-validated holding out one source at a
time (``--group-by domain``): how the representation carries across stains and scanners.

  python bench/cpu_recipe.py --cohort cohort/deepapl --work WORK --out bench/out/cpu_recipe --points all
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Self

from probe_solvers import REPO, figures, marrowlens, show  # the sibling bench's runner and readers, one copy

# The fixed budget: about 14 min of pretraining on the 2-core VM. A SimCLR resnet18 epoch over DeepAPL's 3,739
# cells took 2.3 min at 64 px (load 1.8); epochs are set by pixel count (x2.25 at 96 px, x4 at 128 px) and for
# DINO by its extra views (2 local 32-px crops and the teacher's pass: ~1.5x SimCLR).
POINTS: dict[str, list[str]] = {
    "simclr_64_e6": ["model.image_size=64", "trainer.max_epochs=6"],
    "simclr_96_e3": ["model.image_size=96", "trainer.max_epochs=3"],
    "simclr_128_e2": ["model.image_size=128", "trainer.max_epochs=2"],
    "dino_64_e4": ["model.method=dino", "model.image_size=64", "trainer.max_epochs=4"],
    "centred_64_e6": ["model.image_size=64", "trainer.max_epochs=6", "data.crop=centred"],
    "cell_64_e6": ["model.image_size=64", "trainer.max_epochs=6", "data.crop=cell"],
    "recipe": [],  # the study config as shipped: the CPU recipe this study chose
}
PROBES = ("blast", "leukemic", "apl", "wbc")


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while a command runs (min, mean, max)."""

    def __init__(self, period: float = 15.0) -> None:
        self.period, self.samples, self._stop = period, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return f"{min(self.samples):.1f}/{sum(self.samples) / len(self.samples):.1f}/{max(self.samples):.1f}"


def pretrain_seconds(run: Path) -> float:
    return (run / "meta.json").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def run_point(name: str, cohort: Path, work: Path, base_config: str) -> dict[str, Any]:
    config = REPO / base_config
    sets = [arg for item in POINTS[name] for arg in ("--pretrain-set", item)]
    extra = [] if name == "recipe" else ["--no-baselines"]  # the recipe runs as the README's command does
    with LoadSampler() as load:
        seconds, _ = marrowlens("run", "--cohort", cohort, "--config", config, "--out", work / name, *sets, *extra)
    run = work / name / "run"
    meta = json.loads((run / "meta.json").read_text())
    row: dict[str, Any] = {
        "point": name,
        "config": str(config.relative_to(REPO)),
        "overrides": POINTS[name],
        "seconds_end_to_end": round(seconds, 1),
        "seconds_pretrain": round(pretrain_seconds(run), 1),
        "epochs": meta["epochs"],
        "online_knn": meta["metrics"].get("val_knn_acc"),
        "load_min_mean_max": load.summary(),
    }
    for probe in PROBES:
        row[probe] = figures(json.loads((work / name / "probes" / probe / "report.json").read_text()))
    return row


def by_source(name: str, work: Path, sources: Path) -> dict[str, Any]:
    """Leave-one-source-out white-cell figures of one point's backbone on the multi-source cohort."""
    emb, probe = work / name / "emb_sources", work / name / "wbc_by_source"
    if not (emb / "meta.json").is_file():
        marrowlens("embed", "--model", work / name / "run", "--cohort", sources, "--out", emb, "--overwrite")
    marrowlens(
        "probe", "fit", "cell_type", "--embeddings", emb, "--out", probe, "--group-by", "domain", "--overwrite",
        "--config", REPO / "configs/probes/cell_type.yaml",
    )  # fmt: skip
    report = json.loads((probe / "report.json").read_text())
    per_source = {fold["fold"]: round(fold["balanced_accuracy"], 3) for fold in report["folds"]}
    return figures(report) | {"per_source_balanced_accuracy": per_source}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| point | epochs | pretrain min | end to end min (load) | blast bal. acc [95% CI] | blast AUC "
            "| blast+promyelocyte bal. acc | APL patient AUC [95% CI] | wbc bal. acc | wbc, source held out "
            "| online k-NN |"
        ),
        "|---|---:|---:|---|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        knn = f"{r['online_knn']:.3f}" if r["online_knn"] is not None else "–"
        lines.append(
            f"| {r['point']} | {r['epochs']} | {r['seconds_pretrain'] / 60:.1f} | "
            f"{r['seconds_end_to_end'] / 60:.1f} ({r['load_min_mean_max']}) | "
            f"{show(r['blast'].get('cell_balanced_accuracy'))} | {show(r['blast'].get('cell_roc_auc_ovr'))} | "
            f"{show(r['leukemic'].get('cell_balanced_accuracy'))} | {show(r['apl'].get('patient_roc_auc_ovr'))} | "
            f"{show(r['wbc'].get('cell_balanced_accuracy'))} | "
            f"{show(r.get('wbc_by_source', {}).get('cell_balanced_accuracy'))} | {knn} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="`marrowlens cohort index` of DeepAPL Discovery")
    parser.add_argument("--work", type=Path, required=True, help="folder for the runs (several GB at 128 px)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", default="all", help=f"comma-separated subset of: {', '.join(POINTS)}")
    parser.add_argument("--sources-cohort", type=Path, help="all of ../shared/data indexed together (optional)")
    parser.add_argument("--config", default="configs/run/deepapl.yaml", help="the study config every point varies")
    args = parser.parse_args()
    names = list(POINTS) if args.points == "all" else args.points.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        started = time.strftime("%H:%M")
        rows.append(run_point(name, args.cohort.resolve(), args.work.resolve(), args.config))
        if args.sources_cohort:
            rows[-1]["wbc_by_source"] = by_source(name, args.work.resolve(), args.sources_cohort.resolve())
        print(f"{name}: started {started}, {rows[-1]['seconds_end_to_end'] / 60:.1f} min", flush=True)
        (args.out / "cpu_recipe.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "cpu_recipe.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
