"""Real cohorts (issue #6): blasts, APL vs other AML, and white-cell types across sources.

On the public cells in DATA (e.g. ../shared/data; never copied, never in tests), for three
representations of every cell:
  ssl     the backbone of a ``marrowlens pretrain`` run (--ssl-run), trained on all these cells
  random  the same timm architecture and input size, randomly initialised (seeded)
  pixels  raw pixels, each cell padded to square and resized to 24 x 24 x 3
it reports, with patient-grouped 5-fold CV on the DeepAPL Discovery cohort (82 patients):
  - blast detection ("Blast, no lineage spec" vs every other class): balanced accuracy, ROC-AUC;
  - APL (PML::RARA) vs other AML per patient, through a blast + promyelocyte filter, CE vs GCE:
    patient-level ROC-AUC and balanced accuracy with 95% bootstrap intervals over patients;
and, over all five sources (DeepAPL, Matek, Acevedo, Zheng 2018, BCCD), the five shared white-cell
classes with leave-one-source-out macro-F1, for the SSL backbone with and without Reinhard stain
normalisation at embedding time and, given --ssl-run-without-stain (the same pretraining with
``views.stain_jitter_prob=0``), without stain augmentation in the SSL views.

    python bench/real_cohorts.py --data ../shared/data --ssl-run runs/real \
        [--ssl-run-without-stain runs/real_nostain] --workdir work/real_bench --out bench/out/real
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from torchvision import transforms as T
from tqdm.auto import tqdm

from marrowlens.cohort.images import load_rgb, pad_to_square
from marrowlens.cohort.manifest import IndexOptions, index_cohort, load_cohort
from marrowlens.contracts import EmbeddingsOrigin
from marrowlens.embeddings import load_embeddings, write_embeddings
from marrowlens.probes import commands as probes
from marrowlens.ssl.embed import embed_cohort

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["deepapl_jhu", "matek_aml_lmu_sample", "acevedo_pbc_sample", "zheng2018_wbc", "bccd_wbc_crops"]
PIXELS = 24


def cohort(data: Path, workdir: Path) -> Path:
    folder = workdir / "cohort"
    if not (folder / "cells.parquet").is_file():
        index_cohort([data / s for s in SOURCES], folder, IndexOptions())
    return folder


def pixel_store(cohort_dir: Path, out: Path) -> Path:
    """Raw pixels as an embedding store, so the same probes run on them."""
    if (out / "meta.json").is_file():
        return out
    loaded = load_cohort(cohort_dir)
    resize = T.Resize((PIXELS, PIXELS), antialias=True)
    rows = [
        np.asarray(resize(pad_to_square(load_rgb(loaded.image_path(p)))), dtype=np.float32).ravel() / 255.0
        for p in tqdm(loaded.cells["path"], desc="raw pixels", disable=None)
    ]
    meta = {
        "model": {
            "timm_name": "raw-pixels",
            "image_size": PIXELS,
            "mean": [0.0] * 3,
            "std": [1.0] * 3,
            "num_features": PIXELS * PIXELS * 3,
            "fingerprint": f"raw-pixels:{PIXELS}",
            "source": "raw pixels",
        },
        "cohort": {"folder": str(cohort_dir), "fingerprint": loaded.meta.fingerprint},
    }
    write_embeddings(out, np.stack(rows), loaded.cells, meta)
    return out


def stores(
    cohort_dir: Path, ssl_run: Path, workdir: Path, ssl_run_without_stain: Path | None = None
) -> dict[str, Path]:
    info = json.loads((ssl_run / "backbone.json").read_text())
    made = {}
    variants = [("ssl", ssl_run, "none"), ("ssl+reinhard", ssl_run, "reinhard"), ("random", info["timm_name"], "none")]
    if ssl_run_without_stain is not None:
        variants.append(("ssl-no-stain-aug", ssl_run_without_stain, "none"))
    for name, model, stain in variants:
        folder = workdir / f"emb_{name}"
        if not (folder / "meta.json").is_file():
            embed_cohort(
                model,
                cohort_dir,
                folder,
                image_size=info["image_size"],
                num_workers=2,
                stain_normalize=stain,
                overwrite=True,
            )
        made[name] = folder
    made["pixels"] = pixel_store(cohort_dir, workdir / "emb_pixels")
    return made


def deepapl_only(store: Path) -> Path:
    """The DeepAPL rows of a store (blast and APL tasks are defined on that cohort)."""
    out = store.parent / f"{store.name}_deepapl"
    if not (out / "meta.json").is_file():
        emb = load_embeddings(store)
        rows = np.flatnonzero(emb.cells["domain"].to_numpy() == "deepapl_jhu")
        origin = EmbeddingsOrigin(model=emb.meta.model, cohort=emb.meta.cohort, preprocessing=emb.meta.preprocessing)
        write_embeddings(out, np.asarray(emb.vectors[rows]), emb.cells.iloc[rows].reset_index(drop=True), origin)
    return out


def _value(entry) -> float | None:
    return None if entry is None else entry["value"] if isinstance(entry, dict) else entry


def _ci(entry) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "–"
    low, high = entry.get("ci") or (None, None)
    return f"{entry['value']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def fit(task: str, store: Path, out: Path, sets: list[str], blast: Path | None = None) -> dict:
    config = probes.probe_config(task, REPO / "configs" / "probes" / f"{task}.yaml", {}, sets)
    probes.fit(task, store, out, config, blast_probe=blast, overwrite=True)
    return json.loads((out / "report.json").read_text())


def measure(name: str, store: Path, workdir: Path) -> dict:
    results: dict = {"representation": name}
    deepapl = deepapl_only(store)
    probe_root = workdir / "probes" / name
    blast = fit("blast", deepapl, probe_root / "blast", [])
    results["blast_balanced_accuracy"] = _ci(blast["cell"]["balanced_accuracy"])
    results["blast_auc"] = _ci(blast["cell"]["roc_auc_ovr"])
    leukemic = ["blast.source=cell_type", "blast.blast_types=['Blast, no lineage spec', Promyelocyte]", "eval.cv=0"]
    fit("blast", deepapl, probe_root / "leukemic", leukemic)
    for loss in ("ce", "gce"):
        report = fit(
            "mutation",
            deepapl,
            probe_root / f"apl_{loss}",
            [f"loss.name={loss}", "mutation.control=null"],
            blast=probe_root / "leukemic",
        )
        patient = report["patient"]
        results[f"apl_{loss}_patient_auc"] = _ci(patient.get("roc_auc_ovr"))
        results[f"apl_{loss}_patient_balanced_accuracy"] = _ci(patient.get("balanced_accuracy"))
        results[f"apl_{loss}_patients"] = patient.get("n_patients")
    return results


def wbc_across_sources(name: str, store: Path, workdir: Path) -> dict:
    folder = workdir / "probes" / name / "wbc"
    fit("cell_type", store, folder, ["eval.cv=0"])
    probes.evaluate(folder, store, leave_one_domain_out=True)
    report = json.loads((folder / "report.json").read_text())
    rows = {row["held_out_domain"]: row for row in report["leave_one_domain_out"]}
    f1 = {domain: rows[domain].get("macro_f1") for domain in rows}
    return {
        "representation": name,
        **{f"loso_macro_f1[{d}]": (round(v, 3) if v is not None else None) for d, v in f1.items()},
        "loso_macro_f1_mean": round(float(np.mean([v for v in f1.values() if v is not None])), 3),
    }


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "–")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ssl-run", type=Path, required=True)
    parser.add_argument(
        "--ssl-run-without-stain",
        type=Path,
        default=None,
        help="the same pretraining without stain augmentation, for the white-cell comparison",
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    cohort_dir = cohort(args.data, args.workdir)
    made = stores(cohort_dir, args.ssl_run, args.workdir, args.ssl_run_without_stain)
    deepapl_rows = [measure(name, made[name], args.workdir) for name in ("ssl", "random", "pixels")]
    wbc_names = ["ssl", "ssl+reinhard", "ssl-no-stain-aug", "random", "pixels"]
    wbc_rows = [wbc_across_sources(name, made[name], args.workdir) for name in wbc_names if name in made]
    result = {
        "machine": f"{platform.node()} {platform.machine()}, CPU only",
        "ssl_run": str(args.ssl_run),
        "ssl_run_without_stain": str(args.ssl_run_without_stain) if args.ssl_run_without_stain else None,
        "seconds": round(time.time() - started),
        "deepapl": deepapl_rows,
        "white_cells_across_sources": wbc_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_cohorts.json").write_text(json.dumps(result, indent=2) + "\n")
    tables = [markdown_table(deepapl_rows), markdown_table(wbc_rows)]
    (args.out / "real_cohorts.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
