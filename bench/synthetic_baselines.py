"""Pixel baselines on the synthetic cohort: is the blast signal there, and is the subtype hard?

Patient-grouped 5-fold CV (scikit-learn) of logistic regressions on two pixel features:
per-channel mean/std of a cell image (6 numbers) and the raw pixels downsampled to 32x32x3
(standardised; plain and after PCA). Tasks: (a) blast vs non-blast over all cells (balanced
accuracy); (b) the subtype of true blasts of leukaemic patients (4 classes, chance 0.25), per cell
and per patient (majority vote of the patient's blasts in the test fold).

Example: python bench/synthetic_baselines.py --out bench/out/baselines.json --patients 60 --cells-per-patient 100
         python bench/synthetic_baselines.py --out bench/out/baselines.json --cohort demo/cohort
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def load_images(args: argparse.Namespace) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Cells, images and generator settings: from a cohort folder, or drawn in memory (same pixels)."""
    settings = {k: getattr(args, k) for k in ("patients", "cells_per_patient", "image_size", "domains", "seed")}
    if args.cohort:
        from marrowlens.cohort.images import load_rgb
        from marrowlens.cohort.manifest import load_cohort

        cohort = load_cohort(args.cohort)
        images = np.stack([np.asarray(load_rgb(cohort.image_path(p))) for p in cohort.cells["path"]])
        return cohort.cells.reset_index(drop=True), images, cohort.meta.synthetic or {}
    from marrowlens.cohort.synthetic import GENERATOR_VERSION, plan_patients, render_cells

    plan = plan_patients(args.patients, args.seed, args.domains)
    return (
        *render_cells(plan, args.cells_per_patient, args.image_size, args.seed),
        {**settings, "generator_version": GENERATOR_VERSION},
    )


def mean_std(images: np.ndarray) -> np.ndarray:
    pixels = images.reshape(len(images), -1, 3).astype(np.float32)
    return np.concatenate([pixels.mean(1), pixels.std(1)], axis=1)


def raw_pixels(images: np.ndarray, side: int = 32) -> np.ndarray:
    """Block-average to side x side (images whose size is a multiple of side), flatten."""
    n, size = len(images), images.shape[1]
    factor = size // side
    small = (
        images[:, : side * factor, : side * factor]
        .reshape(n, side, factor, side, factor, 3)
        .astype(np.float32)
        .mean((2, 4))
    )
    return small.reshape(n, -1)


MODELS = {
    "meanstd": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
    "pixels": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=500)),
    "pixels_pca": lambda: make_pipeline(StandardScaler(), PCA(64, random_state=0), LogisticRegression(max_iter=2000)),
    "embeddings": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)),
}


def grouped_predictions(model_name: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    predictions = np.empty(len(y), dtype=object)
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for train, test in folds.split(x, y, groups):
        model = MODELS[model_name]().fit(x[train], y[train])
        predictions[test] = model.predict(x[test])
    return predictions


def patient_vote(predictions: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> float:
    frame = pd.DataFrame({"pred": predictions, "truth": truth, "patient": groups})
    votes = frame.groupby("patient").agg(pred=("pred", lambda s: s.value_counts().index[0]), truth=("truth", "first"))
    return float((votes["pred"] == votes["truth"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--cohort", type=Path, help="a synthetic cohort folder (else drawn in memory)")
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--cells-per-patient", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="meanstd,pixels,pixels_pca")
    parser.add_argument(
        "--embeddings",
        type=Path,
        help="an embedding store of --cohort (needs --cohort; e.g. SSL): adds the model 'embeddings'",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    cells, images, settings = load_images(args)
    features = {"meanstd": mean_std(images), "pixels": raw_pixels(images), "pixels_pca": raw_pixels(images)}
    models = args.models.split(",")
    if args.embeddings:
        from marrowlens.embeddings import load_embeddings

        store = load_embeddings(args.embeddings)
        order = pd.Series(np.arange(len(store.cells)), index=store.cells["cell_id"].to_numpy())
        features["embeddings"] = np.asarray(store.vectors)[order.loc[cells["cell_id"].to_numpy()].to_numpy()]
        models.append("embeddings")
    groups = cells["patient_id"].astype(str).to_numpy()
    blast = cells["is_blast"].astype(bool).to_numpy()
    subtype_rows = blast & (cells["mutation"] != "control").to_numpy()
    mutation = cells["mutation"].astype(str).to_numpy()
    results: dict[str, dict[str, float]] = {}
    for name in models:
        x = features[name]
        pred_blast = grouped_predictions(name, x, blast, groups, args.seed)
        pred_sub = grouped_predictions(name, x[subtype_rows], mutation[subtype_rows], groups[subtype_rows], args.seed)
        results[name] = {
            "blast_balanced_accuracy": float(balanced_accuracy_score(blast, pred_blast.astype(bool))),
            "subtype_cell_accuracy": float((pred_sub == mutation[subtype_rows]).mean()),
            "subtype_patient_accuracy": patient_vote(pred_sub, mutation[subtype_rows], groups[subtype_rows]),
        }
        print(f"{name:>10}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
    report = {
        "cohort": str(args.cohort) if args.cohort else "in memory",
        "embeddings": str(args.embeddings) if args.embeddings else None,
        "generator": {
            k: settings.get(k)
            for k in ("patients", "cells_per_patient", "image_size", "domains", "seed", "generator_version")
        },
        "n_cells": len(cells),
        "n_blasts_subtype_task": int(subtype_rows.sum()),
        "n_patients_subtype_task": len(set(groups[subtype_rows])),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
