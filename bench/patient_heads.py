"""The four patient heads of the mutation probe on the same stores and folds: mean, vote, abmil, composition.

For each dataset (DeepAPL from a finished ``marrowlens run``; optionally the synthetic demo cohort) three
stores are compared: the SSL backbone's, a random-init backbone's (``marrowlens embed --model resnet18``,
no weights) and raw pixels (each cell resized to ``--pixels`` px, flattened; written by this script with
``embeddings.write_embeddings``). On each store a blast filter is fitted with the study's own filter config,
then ``marrowlens probe fit mutation --aggregate HEAD`` cross-validates (patient-grouped 5 folds, the
probe's seed: the same folds for every head; every hyper-parameter chosen inside the training folds) with
CE, and with GCE for the heads that pool a cell head trained with it (mean, vote). Each command is a
subprocess timed from the outside, with the machine's load average beside it.

  python bench/patient_heads.py --study results/deepapl --cohort cohort/deepapl \
      --synthetic demo/ --out bench/out/patient_heads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from probe_solvers import REPO, figures, marrowlens, show  # the sibling bench's runner and readers, one copy

HEADS = ("mean", "vote", "abmil", "composition")
POOLING_HEADS = ("mean", "vote")  # their cell head trains with the loss; abmil and composition do not use it


def pixel_store(cohort: Path, out: Path, side: int) -> Path:
    """Raw pixels as a store (the library's :func:`marrowlens.baselines.pixel_store`, shared with `marrowlens run`)."""
    sys.path.insert(0, str(REPO))
    from marrowlens.baselines import pixel_store as make_pixel_store

    make_pixel_store(cohort, out, side)
    return out


def random_store(cohort: Path, out: Path, size: int) -> Path:
    if not (out / "meta.json").is_file():
        marrowlens("embed", "--model", "resnet18", "--image-size", size, "--cohort", cohort, "--out", out)
    return out


def compare(
    dataset: str, stores: dict[str, Path], blast_config: Path, mutation_config: Path, out: Path
) -> list[dict[str, Any]]:
    rows = []
    for store, emb in stores.items():
        blast = out / dataset / store / "blast"
        if not (blast / "probe.json").is_file():
            marrowlens(
                "probe", "fit", "blast", "--embeddings", emb, "--config", blast_config, "--cv", 0, "--out", blast
            )
        for head in HEADS:
            for loss in ("ce", "gce") if head in POOLING_HEADS else ("ce",):
                folder = out / dataset / store / f"{head}_{loss}"
                seconds, load = marrowlens(
                    *("probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast),
                    *("--config", mutation_config, "--aggregate", head, "--loss", loss, "--out", folder),
                    "--overwrite",
                )
                report = json.loads((folder / "report.json").read_text())
                row = {"dataset": dataset, "store": store, "head": head, "loss": loss, "seconds": round(seconds, 1)}
                rows.append({**row, "load": load, **figures(report)})
                print(json.dumps(rows[-1])[:400], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | store | head | loss | patient ROC-AUC [95% CI] | patient balanced acc | s (load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['store']} | {r['head']} | {r['loss']} | {show(r.get('patient_roc_auc_ovr'))} "
            f"| {show(r.get('patient_balanced_accuracy'))} | {r['seconds']} ({r['load']}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a finished `marrowlens run` on DeepAPL")
    parser.add_argument("--cohort", type=Path, required=True, help="the study's cohort folder")
    parser.add_argument("--synthetic", type=Path, help="a `make demo` folder (cohort/, emb/)")
    parser.add_argument("--image-size", type=int, default=64, help="the random-init backbone's input size")
    parser.add_argument("--pixels", type=int, default=24, help="side of the raw-pixel store's images")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    probes = args.study / "probes"
    deepapl = {
        "ssl": args.study / "emb",
        "random_init": random_store(args.cohort, args.out / "stores" / "deepapl_random", args.image_size),
        "raw_pixels": pixel_store(args.cohort, args.out / "stores" / "deepapl_pixels", args.pixels),
    }
    rows = compare("deepapl", deepapl, probes / "leukemic" / "config.yaml", probes / "apl" / "config.yaml", args.out)
    if args.synthetic is not None:
        synthetic = {
            "ssl": args.synthetic / "emb",
            "random_init": random_store(args.synthetic / "cohort", args.out / "stores" / "synth_random", 64),
            "raw_pixels": pixel_store(args.synthetic / "cohort", args.out / "stores" / "synth_pixels", args.pixels),
        }
        shipped = REPO / "configs" / "probes"
        rows += compare("synthetic", synthetic, shipped / "blast.yaml", shipped / "mutation.yaml", args.out)
    (args.out / "patient_heads.json").write_text(json.dumps(rows, indent=1))
    (args.out / "patient_heads.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
