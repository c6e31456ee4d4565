"""Generation speed of the synthetic cohort, against a reference measured in the same run.

Measures, for one cohort size: drawing alone in memory (one process); the reference, Pillow
writing the same arrays as PNG files (one process, the floor any PNG cohort pays);
``make_synthetic_cohort`` end to end (draw, write PNGs, index) with each worker count; and the
indexing step alone (the standard indexer decoding every PNG once), which end to end includes.
Timings on a shared machine are noisy: read the ratios to the reference first.

Example: python bench/synthetic_speed.py --scratch work/synth_speed --out bench/out/synthetic_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from PIL import Image

from marrowlens.cohort.manifest import IndexOptions, index_cohort
from marrowlens.cohort.synthetic import LABELS_FILE, make_synthetic_cohort, plan_patients, render_cells


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the cohorts written (emptied first)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--cells-per-patient", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    n = args.patients * args.cells_per_patient
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)

    plan = plan_patients(args.patients, seed=0)
    render_cells(plan[:1], 2, args.image_size)  # build the per-size banks once, outside the timings
    images: list = []
    draw = timed(lambda: images.append(render_cells(plan, args.cells_per_patient, args.image_size)[1]))

    def write_reference() -> None:
        folder = args.scratch / "reference"
        folder.mkdir()
        for i, image in enumerate(images[0]):
            Image.fromarray(image).save(folder / f"{i:06d}.png", format="PNG", compress_level=1)

    reference = timed(write_reference)
    rates = {"draw_only_1_process": n / draw, "reference_png_write_1_process": n / reference}
    for workers in map(int, args.workers.split(",")):
        out = args.scratch / f"cohort_w{workers}"
        seconds = timed(
            lambda out=out, workers=workers: make_synthetic_cohort(
                out, args.patients, args.cells_per_patient, args.image_size, workers=workers
            )
        )
        rates[f"end_to_end_{workers}_workers"] = n / seconds
    labels = args.scratch / f"cohort_w{workers}" / LABELS_FILE
    index = timed(lambda: index_cohort([labels], args.scratch / "reindexed", IndexOptions(layout="csv", workers=2)))
    rates["index_only_2_threads"] = n / index
    report = {
        "cells": n,
        "image_size": args.image_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.platform()}",
        "cells_per_second": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_reference": {k: round(v / rates["reference_png_write_1_process"], 2) for k, v in rates.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
