"""The synthetic cohort: plan, drawing, files on disk, and the signal it carries."""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from marrowlens.cohort.drawing import CELL_TYPES, domain_stain, draw_cell
from marrowlens.cohort.labels import MUTATIONS
from marrowlens.cohort.manifest import load_cohort
from marrowlens.cohort.schema import CELL_COLUMNS
from marrowlens.cohort.synthetic import make_synthetic_cohort, plan_cells, plan_patients, render_cells
from marrowlens.errors import MarrowLensError

LEUKAEMIC = [m for m in MUTATIONS if m != "control"]


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class TestPlan:
    @pytest.mark.parametrize("patients", [5, 12, 61])
    @pytest.mark.parametrize("domains", [1, 2, 3])
    def test_classes_and_domains_are_balanced(self, patients: int, domains: int) -> None:
        plan = plan_patients(patients, seed=3, domains=domains)
        classes = Counter(p.mutation for p in plan)
        assert set(classes) <= set(MUTATIONS) and max(classes.values()) - min(classes.values()) <= 1
        assert len(classes) == min(patients, len(MUTATIONS))
        overall = Counter(p.domain for p in plan)
        assert max(overall.values()) - min(overall.values()) <= max(2, patients // 10)
        for mutation in classes:
            per_class = Counter(p.domain for p in plan if p.mutation == mutation)
            counts = [per_class.get(d, 0) for d in range(domains)]
            assert max(counts) - min(counts) <= 1, (mutation, counts)

    def test_ids_are_neutral_and_assignment_seeded(self) -> None:
        plan = plan_patients(60, seed=0)
        assert [p.patient_id for p in plan] == [f"P{i:04d}" for i in range(60)]
        assert [p.mutation for p in plan] == [p.mutation for p in plan_patients(60, seed=0)]
        assert [p.mutation for p in plan] != [p.mutation for p in plan_patients(60, seed=1)]
        assert plan_patients(12345, seed=0)[-1].patient_id == "P12344"

    def test_blast_fractions(self) -> None:
        plan = plan_patients(50, seed=5)
        fractions = {m: [p.blast_fraction for p in plan if p.mutation == m] for m in MUTATIONS}
        assert all(0.0 <= f <= 0.02 for f in fractions["control"])
        for mutation in LEUKAEMIC:
            assert all(0.2 <= f <= 0.9 for f in fractions[mutation])
        cells = plan_cells(plan, 300, seed=5)
        observed = cells.groupby("patient_id")["is_blast"].mean()
        for patient in plan:
            tolerance = 4 * np.sqrt(patient.blast_fraction * (1 - patient.blast_fraction) / 300) + 0.01
            assert abs(observed[patient.patient_id] - patient.blast_fraction) <= tolerance

    def test_cell_truth(self) -> None:
        cells = plan_cells(plan_patients(10, seed=2), 40, seed=2)
        assert set(cells["cell_type"]) == set(CELL_TYPES)
        assert (cells["is_blast"] == (cells["cell_type"] == "myeloblast")).all()
        assert cells["path"].str.match(r"images/[A-Za-z0-9_]+/P\d{4}/P\d{4}_\d{5}\.png$").all()
        assert (cells["path"].str.split("/").str[1] == cells["mutation"]).all()


class TestDrawCell:
    @pytest.mark.parametrize("cell_type", CELL_TYPES)
    @pytest.mark.parametrize("size", [32, 64, 97])
    def test_shape_dtype_determinism(self, cell_type: str, size: int) -> None:
        image = draw_cell(rng(1, size), cell_type, "PML_RARA", domain_stain(1), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert np.array_equal(image, draw_cell(rng(1, size), cell_type, "PML_RARA", domain_stain(1), size))
        assert not np.array_equal(image, draw_cell(rng(2, size), cell_type, "PML_RARA", domain_stain(1), size))

    @pytest.mark.parametrize("cell_type", CELL_TYPES)
    def test_one_centred_cell_on_a_pale_background(self, cell_type: str) -> None:
        darkness = np.stack([255 - draw_cell(rng(7, i), cell_type).mean(-1) for i in range(12)]).mean(0)
        yy, xx = np.mgrid[:64, :64] - 31.5
        radius = np.hypot(yy, xx)
        assert darkness[radius < 8].mean() > 3 * darkness[radius > 28].mean()
        centroid = [(darkness * (radius < 24) * axis).sum() / (darkness * (radius < 24)).sum() for axis in (yy, xx)]
        assert np.hypot(*centroid) < 2.5

    def test_blasts_are_larger_than_lymphocytes(self) -> None:
        def cell_area(cell_type: str) -> float:
            return np.mean([(draw_cell(rng(3, i), cell_type).min(-1) < 150).sum() for i in range(20)])

        assert cell_area("myeloblast") > 2 * cell_area("lymphocyte")

    @pytest.mark.parametrize("cell_type", ["neutrophil", "lymphocyte", "monocyte"])
    @pytest.mark.parametrize("mutation", LEUKAEMIC)
    def test_subtype_shows_only_in_blasts(self, cell_type: str, mutation: str) -> None:
        for i in range(5):
            assert np.array_equal(draw_cell(rng(4, i), cell_type, mutation), draw_cell(rng(4, i), cell_type, "control"))

    @pytest.mark.parametrize("mutation", LEUKAEMIC)
    def test_subtype_changes_blasts(self, mutation: str) -> None:
        changed = [
            not np.array_equal(
                draw_cell(rng(5, i), "myeloblast", mutation), draw_cell(rng(5, i), "myeloblast", "control")
            )
            for i in range(10)
        ]
        assert sum(changed) >= 5

    def test_domains_differ_in_colour(self) -> None:
        means = [
            np.mean([draw_cell(rng(6, i), "neutrophil", stain=domain_stain(d)).mean((0, 1)) for i in range(10)], axis=0)
            for d in range(3)
        ]
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.abs(means[a] - means[b]).max() > 3

    def test_unknown_cell_type(self) -> None:
        with pytest.raises(ValueError, match="unknown cell type 'basophil'"):
            draw_cell(rng(0), "basophil")


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "images").rglob("*.png"))}


class TestCohortOnDisk:
    def test_cohort_folder_and_ground_truth(self, tmp_path: Path) -> None:
        cohort = make_synthetic_cohort(
            tmp_path / "c", patients=7, cells_per_patient=6, image_size=32, seed=4, domains=2
        )
        loaded = load_cohort(tmp_path / "c")
        cells = loaded.cells
        assert list(cells.columns) == CELL_COLUMNS and len(cells) == 42 and cells.equals(cohort.cells)
        for column in ("patient_id", "mutation", "cell_type", "is_blast", "domain"):
            assert cells[column].notna().all(), column
        assert str(cells["is_blast"].dtype) == "boolean"
        assert set(cells["domain"]) == {"domain0", "domain1"}
        assert (cells["width"] == 32).all() and (cells["height"] == 32).all()
        assert pd.read_csv(tmp_path / "c" / "quarantine.csv").empty
        truth = plan_cells(plan_patients(7, seed=4), 6, seed=4)
        for column in ("path", "patient_id", "mutation", "cell_type", "is_blast", "domain"):
            assert cells[column].astype(object).tolist() == truth[column].tolist(), column
        meta = json.loads((tmp_path / "c" / "meta.json").read_text())
        assert meta["kind"] == "cohort" and meta["n_cells"] == 42
        assert {
            k: meta["synthetic"][k] for k in ("patients", "cells_per_patient", "image_size", "seed", "domains")
        } == {
            "patients": 7,
            "cells_per_patient": 6,
            "image_size": 32,
            "seed": 4,
            "domains": 2,
        }
        assert meta["synthetic"]["generator_version"] >= 1
        patients = pd.read_csv(tmp_path / "c" / "patients.csv")
        assert patients["patient_id"].tolist() == sorted(set(cells["patient_id"]))

    def test_files_hold_the_drawn_pixels(self, tmp_path: Path) -> None:
        cohort = make_synthetic_cohort(tmp_path / "c", patients=3, cells_per_patient=4, image_size=32, seed=8)
        truth, images = render_cells(plan_patients(3, seed=8), 4, image_size=32, seed=8)
        for row, image in zip(truth.itertuples(), images):
            assert np.array_equal(np.asarray(Image.open(cohort.image_path(row.path))), image)

    def test_deterministic_and_independent_of_workers(self, tmp_path: Path) -> None:
        args = {"patients": 5, "cells_per_patient": 5, "image_size": 32, "seed": 11}
        one = make_synthetic_cohort(tmp_path / "one", workers=1, **args)
        two = make_synthetic_cohort(tmp_path / "two", workers=2, **args)
        assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")
        assert one.meta.fingerprint == two.meta.fingerprint
        other = make_synthetic_cohort(tmp_path / "other", **{**args, "seed": 12})
        assert _tree_bytes(tmp_path / "one") != _tree_bytes(tmp_path / "other")
        assert one.meta.fingerprint != other.meta.fingerprint

    def test_refuses_non_empty_folder_and_overwrites_only_its_own(self, tmp_path: Path) -> None:
        out = tmp_path / "c"
        make_synthetic_cohort(out, patients=2, cells_per_patient=3, image_size=32)
        with pytest.raises(MarrowLensError, match="not empty; pass --overwrite"):
            make_synthetic_cohort(out, patients=2, cells_per_patient=3, image_size=32)
        cohort = make_synthetic_cohort(out, patients=1, cells_per_patient=2, image_size=32, overwrite=True)
        assert len(cohort.cells) == 2 and len(list((out / "images").rglob("*.png"))) == 2
        (out / "notes.txt").write_text("mine")
        with pytest.raises(MarrowLensError, match="holds 'notes.txt'"):
            make_synthetic_cohort(out, patients=1, cells_per_patient=2, image_size=32, overwrite=True)
        assert (out / "notes.txt").exists() and (out / "cells.parquet").exists()

    @pytest.mark.parametrize(
        "change, message",
        [
            ({"patients": 0}, "--patients"),
            ({"cells_per_patient": 0}, "--cells-per-patient"),
            ({"image_size": 8}, "--image-size"),
            ({"image_size": 600}, "--image-size"),
            ({"seed": -1}, "--seed"),
            ({"domains": 0}, "--domains"),
            ({"domains": 65}, "--domains"),
            ({"workers": 0}, "--workers"),
        ],
    )
    def test_bad_arguments(self, tmp_path: Path, change: dict, message: str) -> None:
        args = {
            "patients": 4,
            "cells_per_patient": 2,
            "image_size": 32,
            "seed": 0,
            "domains": 2,
            "workers": 1,
            **change,
        }
        with pytest.raises(MarrowLensError, match=message):
            make_synthetic_cohort(tmp_path / "c", **args)
        assert not (tmp_path / "c").exists()


@lru_cache(maxsize=1)
def _signal_cohort() -> tuple[pd.DataFrame, np.ndarray]:
    """24 patients x 50 cells at 64 px, in memory (about a second to draw)."""
    return render_cells(plan_patients(24, seed=21), 50, image_size=64, seed=21)


def _mean_std(images: np.ndarray) -> np.ndarray:
    pixels = images.reshape(len(images), -1, 3).astype(np.float32)
    return np.concatenate([pixels.mean(1), pixels.std(1)], axis=1)


def _grouped_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return cross_val_predict(model, x, y, groups=groups, cv=GroupKFold(n_splits=4))


class TestSignal:
    def test_pixel_means_do_not_reveal_the_subtype(self) -> None:
        cells, images = _signal_cohort()
        rows = (cells["is_blast"] & (cells["mutation"] != "control")).to_numpy()
        y = cells["mutation"].to_numpy()[rows]
        assert len(set(y)) == 4 and rows.sum() > 300
        predicted = _grouped_cv(_mean_std(images[rows]), y, cells["patient_id"].to_numpy()[rows])
        assert (predicted == y).mean() < 0.4  # chance is 0.25

    def test_blasts_are_detectable_from_pixel_statistics(self) -> None:
        cells, images = _signal_cohort()
        y = cells["is_blast"].to_numpy()
        predicted = _grouped_cv(_mean_std(images), y, cells["patient_id"].to_numpy())
        assert balanced_accuracy_score(y, predicted) > 0.85

    def test_subtype_texture_is_there(self) -> None:
        """Hypergranular PML_RARA blasts carry more fine detail than agranular NPM1 blasts."""
        cells, images = _signal_cohort()
        grey = images.astype(np.float32).mean(-1)
        detail = np.abs(
            grey[:, 1:-1, 1:-1] * 4 - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
        )
        centre = detail[:, 12:-12, 12:-12].mean((1, 2))
        blasts = cells["is_blast"].to_numpy()
        by_class = {m: centre[blasts & (cells["mutation"] == m).to_numpy()].mean() for m in ("PML_RARA", "NPM1")}
        assert by_class["PML_RARA"] > 1.15 * by_class["NPM1"]


class TestCli:
    def test_round_trip(self, cli, tmp_path: Path) -> None:
        out = tmp_path / "synth"
        args = (
            "cohort",
            "synth",
            "--out",
            out,
            "--patients",
            5,
            "--cells-per-patient",
            4,
            "--image-size",
            32,
            "--seed",
            3,
        )
        code, output = cli(*args)
        assert code == 0, output
        assert "20 cells, 5 patients" in output and "labels.csv" in output and "cells.parquet" in output
        assert len(load_cohort(out).cells) == 20
        code, output = cli(*args)
        assert code == 2 and "--overwrite" in output and len(output.strip().splitlines()) == 1
        code, output = cli(*args, "--overwrite", "--domains", 1)
        assert code == 0, output
        assert set(load_cohort(out).cells["domain"]) == {"domain0"}

    def test_help_and_bad_input(self, cli, tmp_path: Path) -> None:
        code, output = cli("cohort", "synth", "--help")
        assert code == 0 and "Example: marrowlens cohort synth" in output
        code, output = cli("cohort", "synth", "--out", tmp_path / "x", "--patients", 0)
        assert code == 2 and output.startswith("error: --patients must be at least 1")
