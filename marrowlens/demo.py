"""``make demo``: the whole pipeline on a built-in synthetic cohort, command by command.

Each step is the exact ``marrowlens`` command a user would type, run as a subprocess and printed
first, so the demo doubles as a tutorial. Re-running it starts over (``--overwrite``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from marrowlens.config import SHIPPED_CONFIGS

CONFIGS = Path(os.path.relpath(SHIPPED_CONFIGS))


def steps(out: Path, patients: int, cells: int) -> Iterator[list[object]]:
    """The demo's commands, made one at a time (the search query is a cell the first step drew)."""
    cohort, run, emb = out / "cohort", out / "runs" / "simclr", out / "emb"
    blast, mutation, index = out / "probes" / "blast", out / "probes" / "mutation", out / "idx"
    yield [
        "cohort",
        "synth",
        "--out",
        cohort,
        "--patients",
        patients,
        "--cells-per-patient",
        cells,
        "--image-size",
        64,
        "--seed",
        0,
        "--overwrite",
    ]
    yield [
        "pretrain",
        "--config",
        CONFIGS / "pretrain" / "tiny_cpu.yaml",
        "--cohort",
        cohort,
        "--out",
        run,
        "--overwrite",
    ]
    yield ["embed", "--model", run, "--cohort", cohort, "--out", emb, "--overwrite"]
    # without --config a probe runs its task's shipped config (configs/probes/TASK.yaml)
    yield ["probe", "fit", "blast", "--embeddings", emb, "--out", blast, "--overwrite"]
    yield ["probe", "fit", "mutation", "--embeddings", emb, "--blast-probe", blast, "--out", mutation, "--overwrite"]
    yield ["index", "build", "--embeddings", emb, "--out", index, "--overwrite"]
    yield ["search", "--index", index, "--image", next(iter(sorted((cohort / "images").rglob("*.png")))), "-k", 5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--cells-per-patient", type=int, default=60)
    args = parser.parse_args()
    started = time.time()
    for step in steps(args.out, args.patients, args.cells_per_patient):
        words = ["marrowlens", *map(str, step)]
        print(f"\n$ {shlex.join(words)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "marrowlens", *words[1:]], check=False)
        if result.returncode != 0:
            sys.exit(f"demo stopped: `{shlex.join(words)}` failed (exit {result.returncode})")
    print(f"\ndemo finished in {time.time() - started:.0f} s; everything is under {args.out}/")
    print(f"reports: {args.out}/probes/blast/report.md, {args.out}/probes/mutation/report.md")
    print(f"browse similar cells: marrowlens serve --index {args.out}/idx  (then open http://127.0.0.1:8000/)")


if __name__ == "__main__":
    main()
