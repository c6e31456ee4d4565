"""The synthetic cohort: procedurally drawn cells with known ground truth (demo, tests, benchmarks).

Hand-written (no library makes AML smears). Patients get one of five classes (four AML subtypes
and ``control``) round-robin after a seeded shuffle, a stain/scanner domain balanced within each
class (so domain never stands in for class), a blast fraction (0.2-0.9 when leukaemic, 0-2% in
controls) and their own slide staining. Each cell draws from its own generator seeded by
(seed, patient, cell), so a cohort is the same whatever the number of worker processes.

The images go to ``DIR/images/<mutation>/<patient>/<cell>.png`` with ``DIR/labels.csv`` (and the
per-patient truth in ``DIR/patients.csv``); the standard indexer then makes ``DIR`` a cohort
folder, so the format is exactly that of a real cohort. The drawing itself is in
:mod:`marrowlens.cohort.drawing`.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from marrowlens.artifacts import META_FILE, write_text_atomic
from marrowlens.cohort.drawing import BLAST, FEATURE_RATES, Stain, domain_stain, draw_cell, prepare_size, slide_stain
from marrowlens.cohort.labels import MUTATIONS
from marrowlens.cohort.manifest import CELLS_FILE, QUARANTINE_FILE, Cohort, IndexOptions, index_cohort
from marrowlens.errors import MarrowLensError

__all__ = [
    "GENERATOR_VERSION",
    "Patient",
    "draw_cell",
    "make_synthetic_cohort",
    "plan_cells",
    "plan_patients",
    "render_cells",
]

GENERATOR_VERSION = 1
LEUKAEMIC = tuple(m for m in MUTATIONS if m != "control")
LABELS_FILE = "labels.csv"
PATIENTS_FILE = "patients.csv"
IMAGES_DIR = "images"
_OWN_FILES = {IMAGES_DIR, LABELS_FILE, PATIENTS_FILE, CELLS_FILE, QUARANTINE_FILE, META_FILE}
# Normal white-cell differential of the non-blasts; inv(16) (CBFB_MYH11) marrow has more eosinophils.
WHITE_CELL_MIX = {"neutrophil": 0.55, "lymphocyte": 0.28, "monocyte": 0.11, "eosinophil": 0.06}
CBFB_MIX = {"neutrophil": 0.5, "lymphocyte": 0.26, "monocyte": 0.1, "eosinophil": 0.14}
BLAST_FRACTION = {"leukaemic": (0.2, 0.9), "control": (0.0, 0.02)}
# Stream tags keep the generators of class assignment, patients and cells apart (and non-zero:
# numpy seeds [a, b] and [a, b, 0] alike).
_ASSIGN, _PATIENT, _CELL = 0xA551, 0xBA7, 0xCE11
_CHUNK = 128


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: class, domain, blast fraction and slide staining."""

    index: int
    patient_id: str
    mutation: str
    domain: int
    blast_fraction: float
    stain: Stain

    @property
    def domain_name(self) -> str:
        return f"domain{self.domain}"


def plan_patients(patients: int, seed: int = 0, domains: int = 2) -> list[Patient]:
    """Classes round-robin after a seeded shuffle; domains round-robin within each class."""
    order = np.random.default_rng([seed, _ASSIGN]).permutation(patients)
    width = max(4, len(str(patients - 1)))
    plan: dict[int, Patient] = {}
    seen = dict.fromkeys(MUTATIONS, 0)
    for rank, index in enumerate(order):
        k = rank % len(MUTATIONS)
        mutation = MUTATIONS[k]
        domain = (seen[mutation] + k) % domains
        seen[mutation] += 1
        rng = np.random.default_rng([seed, int(index), _PATIENT])
        low, high = BLAST_FRACTION["control" if mutation == "control" else "leukaemic"]
        plan[int(index)] = Patient(
            index=int(index),
            patient_id=f"P{index:0{width}d}",
            mutation=mutation,
            domain=domain,
            blast_fraction=float(rng.uniform(low, high)),
            stain=slide_stain(domain_stain(domain), rng),
        )
    return [plan[i] for i in range(patients)]


def _cell_generator(seed: int, patient: Patient, cell: int) -> tuple[np.random.Generator, str]:
    """The cell's own generator, after it has drawn the cell's type (first draws, always the same)."""
    rng = np.random.default_rng([seed, patient.index, cell, _CELL])
    if rng.random() < patient.blast_fraction:
        return rng, BLAST
    mix = CBFB_MIX if patient.mutation == "CBFB_MYH11" else WHITE_CELL_MIX
    pick = rng.random() * sum(mix.values())
    for cell_type, share in mix.items():
        pick -= share
        if pick < 0:
            break
    return rng, cell_type


def cell_name(patient: Patient, cell: int) -> str:
    """Path of a cell's PNG relative to the cohort folder: images/<mutation>/<patient>/<cell>.png."""
    return f"{IMAGES_DIR}/{patient.mutation}/{patient.patient_id}/{patient.patient_id}_{cell:05d}.png"


def plan_cells(plan: list[Patient], cells_per_patient: int, seed: int = 0) -> pd.DataFrame:
    """Ground truth of every cell (no drawing): the rows of ``labels.csv``, in order."""
    rows = []
    for patient in plan:
        for cell in range(cells_per_patient):
            _, cell_type = _cell_generator(seed, patient, cell)
            rows.append(
                {
                    "path": cell_name(patient, cell),
                    "patient_id": patient.patient_id,
                    "mutation": patient.mutation,
                    "cell_type": cell_type,
                    "is_blast": cell_type == BLAST,
                    "domain": patient.domain_name,
                }
            )
    return pd.DataFrame(rows)


def render_cells(
    plan: list[Patient], cells_per_patient: int, image_size: int = 64, seed: int = 0
) -> tuple[pd.DataFrame, npt.NDArray[np.uint8]]:
    """A whole cohort in memory: (ground truth as :func:`plan_cells`, N x S x S x 3 uint8 images).

    The same pixels as the PNGs :func:`make_synthetic_cohort` writes; handy for tests and benches.
    """
    images = np.empty((len(plan) * cells_per_patient, image_size, image_size, 3), np.uint8)
    with _one_blas_thread():
        for i, patient in enumerate(plan):
            for cell in range(cells_per_patient):
                images[i * cells_per_patient + cell] = _draw(seed, patient, cell, image_size)
    return plan_cells(plan, cells_per_patient, seed), images


def _draw(seed: int, patient: Patient, cell: int, image_size: int) -> npt.NDArray[np.uint8]:
    rng, cell_type = _cell_generator(seed, patient, cell)
    return draw_cell(rng, cell_type, patient.mutation, patient.stain, image_size)


def _one_blas_thread() -> threadpool_limits:
    """The blur's small matrix products run several times faster on one BLAS thread than on many."""
    return threadpool_limits(limits=1, user_api="blas")


def _write_chunk(out: Path, seed: int, patient: Patient, cells: range, image_size: int) -> int:
    folder = out / Path(cell_name(patient, 0)).parent
    folder.mkdir(parents=True, exist_ok=True)
    with _one_blas_thread():
        for cell in cells:
            Image.fromarray(_draw(seed, patient, cell, image_size)).save(
                out / cell_name(patient, cell), format="PNG", compress_level=1
            )
    return len(cells)


def _check_arguments(
    patients: int, cells_per_patient: int, image_size: int, seed: int, domains: int, workers: int
) -> None:
    checks = [
        (patients >= 1, f"--patients must be at least 1, not {patients}"),
        (cells_per_patient >= 1, f"--cells-per-patient must be at least 1, not {cells_per_patient}"),
        (16 <= image_size <= 512, f"--image-size must be between 16 and 512 pixels, not {image_size}"),
        (seed >= 0, f"--seed must be 0 or more, not {seed}"),
        (1 <= domains <= 64, f"--domains must be between 1 and 64, not {domains}"),
        (workers >= 1, f"--workers must be at least 1, not {workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MarrowLensError(message)


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder; with ``overwrite``, empty one that holds only a synthetic cohort."""
    if out.exists() and not out.is_dir():
        raise MarrowLensError(f"{out} exists and is not a folder")
    children = list(out.iterdir()) if out.is_dir() else []
    if children and not overwrite:
        raise MarrowLensError(f"{out} is not empty; pass --overwrite to replace the synthetic cohort in it")
    foreign = sorted(
        c.name
        for c in children
        if c.name not in _OWN_FILES and not (c.name.startswith(".") and c.name.endswith(".tmp"))
    )
    if foreign:
        raise MarrowLensError(
            f"refusing to overwrite {out}: it holds {foreign[0]!r}, which a synthetic cohort does not write"
        )
    for child in children:
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _jobs(plan: list[Patient], cells_per_patient: int) -> list[tuple[Patient, range]]:
    return [
        (p, range(start, min(start + _CHUNK, cells_per_patient)))
        for p in plan
        for start in range(0, cells_per_patient, _CHUNK)
    ]


def _draw_all(out: Path, plan: list[Patient], cells_per_patient: int, image_size: int, seed: int, workers: int) -> None:
    jobs = _jobs(plan, cells_per_patient)
    with tqdm(total=len(plan) * cells_per_patient, desc="drawing cells", unit="cell", disable=None) as bar:
        if workers == 1:
            for patient, cells in jobs:
                bar.update(_write_chunk(out, seed, patient, cells, image_size))
            return
        # fork: workers start at once, share the per-size banks built here and need no importable
        # __main__; they only use numpy and Pillow.
        prepare_size(image_size)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_write_chunk, out, seed, patient, cells, image_size) for patient, cells in jobs]
            for future in as_completed(futures):
                bar.update(future.result())


def make_synthetic_cohort(
    out: str | Path,
    patients: int,
    cells_per_patient: int,
    image_size: int = 64,
    seed: int = 0,
    domains: int = 2,
    workers: int = 1,
    overwrite: bool = False,
) -> Cohort:
    """Draw a synthetic cohort into ``out`` and index it; returns the loaded cohort."""
    _check_arguments(patients, cells_per_patient, image_size, seed, domains, workers)
    out = Path(out)
    _prepare(out, overwrite)
    plan = plan_patients(patients, seed, domains)
    _draw_all(out, plan, cells_per_patient, image_size, seed, workers)
    truth = pd.DataFrame(
        [
            {
                "patient_id": p.patient_id,
                "mutation": p.mutation,
                "domain": p.domain_name,
                "blast_fraction": round(p.blast_fraction, 4),
            }
            for p in plan
        ]
    )
    write_text_atomic(out / PATIENTS_FILE, truth.to_csv(index=False))
    write_text_atomic(out / LABELS_FILE, plan_cells(plan, cells_per_patient, seed).to_csv(index=False))
    settings = {
        "generator_version": GENERATOR_VERSION,
        "patients": patients,
        "cells_per_patient": cells_per_patient,
        "image_size": image_size,
        "seed": seed,
        "domains": domains,
        "classes": list(MUTATIONS),
        "blast_fraction": BLAST_FRACTION,
        "white_cell_mix": WHITE_CELL_MIX,
        "blast_feature_rates": FEATURE_RATES,
        "patients_file": PATIENTS_FILE,
    }
    options = IndexOptions(layout="csv", workers=max(2, workers))
    return index_cohort([out / LABELS_FILE], out, options, synthetic=settings)
