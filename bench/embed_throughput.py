"""Embedding throughput and peak memory of ``marrowlens embed`` as the cohort grows.

For each cohort size (sub-cohorts of one synthetic cohort), in a fresh process each: cells/s and
peak resident memory (the main process, and the largest data-loading worker) of
``marrowlens embed``, against a plain loop that keeps every vector in a Python list and saves
them at the end (the usual notebook approach), on the same images, backbone, batch and workers.
The goal: marrowlens's peak RSS does not grow with the cohort; its speed matches the plain loop.

    python bench/embed_throughput.py --workdir work/embbench --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

from marrowlens.cohort.manifest import IndexOptions, index_cohort, load_cohort
from marrowlens.cohort.synthetic import make_synthetic_cohort

MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, torch
    from pathlib import Path
    mode, cohort, out, backbone, size, batch, workers = sys.argv[1:8]
    start = time.perf_counter()
    if mode == "marrowlens":
        from marrowlens.ssl.embed import embed_cohort
        store = embed_cohort(
            backbone, cohort, out, image_size=int(size), batch_size=int(batch), num_workers=int(workers), overwrite=True
        )
        n = len(store)
    else:
        from torch.utils.data import DataLoader
        from marrowlens.cohort.manifest import load_cohort
        from marrowlens.ssl.backbones import load_backbone
        from marrowlens.ssl.embed import CohortImages
        from marrowlens.ssl.preprocessing import eval_transform
        loaded = load_cohort(cohort)
        model, info = load_backbone(backbone, image_size=int(size))
        data = CohortImages(loaded, np.arange(len(loaded.cells)), eval_transform(info.preprocessing))
        vectors = []
        with torch.inference_mode():
            for images, _ in DataLoader(data, batch_size=int(batch), num_workers=int(workers)):
                vectors.append(model(images).numpy())
        Path(out).mkdir(parents=True, exist_ok=True)
        np.save(Path(out) / "vectors.npy", np.concatenate(vectors))
        n = len(loaded.cells)
    seconds = time.perf_counter() - start
    print(json.dumps({"cells": n, "seconds": seconds, "cells_per_s": n / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    """
)


def cohorts(workdir: Path, sizes: list[int], cells_per_patient: int, image_size: int, workers: int) -> dict[int, Path]:
    """One synthetic cohort of the largest size; smaller ones index a prefix of its labels."""
    largest = workdir / "synthetic"
    if not (largest / "cells.parquet").is_file() or len(load_cohort(largest).cells) != max(sizes):
        make_synthetic_cohort(
            largest,
            max(sizes) // cells_per_patient,
            cells_per_patient,
            image_size,
            seed=0,
            workers=workers,
            overwrite=True,
        )
    folders = {max(sizes): largest}
    labels = pd.read_csv(largest / "labels.csv")
    for size in sorted(sizes)[:-1]:
        subset_csv = workdir / f"labels_{size}.csv"  # beside, not inside, the synthetic cohort folder
        subset = labels.head(size).assign(path=lambda t: largest.name + "/" + t["path"])
        subset.to_csv(subset_csv, index=False)
        folders[size] = workdir / f"cohort_{size}"
        if not (folders[size] / "cells.parquet").is_file():
            index_cohort([subset_csv], folders[size], IndexOptions(layout="csv", workers=workers))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--cells-per-patient", type=int, default=200)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    folders = cohorts(args.workdir, sizes, args.cells_per_patient, args.image_size, args.workers)
    rows = []
    for size in sizes:
        for mode in ("plain", "marrowlens"):
            command = [
                sys.executable,
                "-c",
                MEASURE,
                mode,
                str(folders[size]),
                str(args.workdir / f"emb_{mode}_{size}"),
                args.backbone,
                str(args.image_size),
                str(args.batch_size),
                str(args.workers),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {"mode": mode, "size": size, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    speed = table.pivot(index="size", columns="mode", values="cells_per_s")
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, CPU only",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "speed_ratio_marrowlens_over_plain": {
            int(k): round(v, 3) for k, v in (speed["marrowlens"] / speed["plain"]).items()
        },
    }
    print(table.round(1).to_string(index=False))
    print(json.dumps(summary["speed_ratio_marrowlens_over_plain"]))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
