import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from marrowlens.cohort.manifest import IndexOptions, cell_id_of, check_cohort, index_cohort, load_cohort
from marrowlens.errors import MarrowLensError
from tests.conftest import write_cell


def _quarantine(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "quarantine.csv")


class TestMutationPatientLayout:
    def test_rows_labels_and_ids(self, mutation_tree: Path, tmp_path: Path) -> None:
        cohort = index_cohort([mutation_tree], tmp_path / "cohort")
        cells = cohort.cells
        assert len(cells) == 12 and cells["patient_id"].nunique() == 4
        assert set(cells["mutation"]) == {"NPM1", "control"}
        row = cells[cells["path"] == "NPM1/NPM1_p0/cell0.png"].iloc[0]
        assert row["cell_id"] == cell_id_of("NPM1/NPM1_p0/cell0.png")
        assert row["patient_id"] == "NPM1_p0" and row["width"] == 32
        assert cohort.meta.sources[0].layout == "mutation_patient"
        assert load_cohort(tmp_path / "cohort").cells.equals(cells)

    def test_bad_files_are_quarantined_not_fatal(self, mutation_tree: Path, tmp_path: Path) -> None:
        (mutation_tree / "NPM1" / "NPM1_p0" / "zero.png").write_bytes(b"")
        broken = write_cell(mutation_tree / "NPM1" / "NPM1_p1" / "trunc.jpg", seed=9, size=64, fmt="JPEG")
        broken.write_bytes(broken.read_bytes()[:200])
        (mutation_tree / "control" / "control_p0" / "notes.txt").write_text("scanner log")
        (mutation_tree / "control" / "control_p0" / "text.png").write_text("not a png")
        write_cell(mutation_tree / "control" / "stray.png", seed=3)
        cohort = index_cohort([mutation_tree], tmp_path / "cohort")
        assert len(cohort.cells) == 12
        quarantine = _quarantine(tmp_path / "cohort").set_index("path")["reason"]
        assert quarantine["NPM1/NPM1_p0/zero.png"].startswith("empty file")
        assert quarantine["NPM1/NPM1_p1/trunc.jpg"].startswith("truncated or corrupt")
        assert quarantine["control/control_p0/notes.txt"].startswith("not an image file type")
        assert quarantine["control/control_p0/text.png"].startswith("not an image")
        assert "outside" in quarantine["control/stray.png"]
        assert cohort.meta.n_quarantined == 5

    def test_a_tiff_bomb_is_quarantined_by_its_declared_size(
        self, mutation_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import numpy as np
        import tifffile

        monkeypatch.setenv("MARROWLENS_MAX_PIXELS", "100000")
        tifffile.imwrite(
            mutation_tree / "NPM1" / "NPM1_p0" / "bomb.tif", np.zeros((600, 600, 3), np.float32), compression="zlib"
        )
        cohort = index_cohort([mutation_tree], tmp_path / "cohort")
        assert len(cohort.cells) == 12
        reason = _quarantine(tmp_path / "cohort").set_index("path")["reason"]["NPM1/NPM1_p0/bomb.tif"]
        assert reason.startswith("too large (600x600 px, limit 100000 px")

    def test_greyscale_rgba_16bit_and_odd_sizes_are_kept(self, mutation_tree: Path, tmp_path: Path) -> None:
        folder = mutation_tree / "NPM1" / "NPM1_p0"
        write_cell(folder / "grey.png", seed=4, mode="L")
        write_cell(folder / "rgba.png", seed=5, mode="RGBA")
        Image.fromarray((pd.Series(range(30 * 17)).to_numpy().reshape(30, 17) * 100).astype("uint16")).save(
            folder / "g16.png"
        )
        cohort = index_cohort([mutation_tree], tmp_path / "cohort")
        assert len(cohort.cells) == 15
        assert (
            cohort.cells[cohort.cells["path"].str.endswith("g16.png")][["width", "height"]].values == [[17, 30]]
        ).all()

    def test_unknown_mutation_is_an_error_listing_allowed(self, mutation_tree: Path, tmp_path: Path) -> None:
        (mutation_tree / "NPM1").rename(mutation_tree / "FLT3")
        with pytest.raises(MarrowLensError, match=r"unknown mutation label\(s\) 'FLT3'.*allowed: PML_RARA"):
            index_cohort([mutation_tree], tmp_path / "cohort")
        cohort = index_cohort([mutation_tree], tmp_path / "cohort", IndexOptions(map_mutation={"FLT3": "FLT3_ITD"}))
        assert set(cohort.cells["mutation"]) == {"FLT3_ITD", "control"}

    def test_spelling_variants_are_canonical(self, mutation_tree: Path, tmp_path: Path) -> None:
        (mutation_tree / "NPM1").rename(mutation_tree / "PML::RARA")
        cohort = index_cohort([mutation_tree], tmp_path / "cohort")
        assert set(cohort.cells["mutation"]) == {"PML_RARA", "control"}

    def test_class_without_readable_cells(self, mutation_tree: Path, tmp_path: Path) -> None:
        for image in (mutation_tree / "NPM1").rglob("*.png"):
            image.write_bytes(b"broken")
        with pytest.raises(MarrowLensError, match="class 'NPM1' has no readable cells"):
            index_cohort([mutation_tree], tmp_path / "cohort")

    def test_empty_folder(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(MarrowLensError, match="no images found"):
            index_cohort([tmp_path / "empty"], tmp_path / "cohort")

    def test_patient_in_two_classes(self, mutation_tree: Path, tmp_path: Path) -> None:
        write_cell(mutation_tree / "control" / "NPM1_p0" / "x.png", seed=7)
        with pytest.raises(MarrowLensError, match="appears under both"):
            index_cohort([mutation_tree], tmp_path / "cohort")


class TestOtherLayouts:
    def test_cell_type_layout_with_matek_codes(self, tmp_path: Path) -> None:
        for code in ("MYO", "MOB", "LYT", "EBO"):
            for i in range(2):
                write_cell(tmp_path / "lmu" / code / f"{code}_{i}.png", seed=i)
        cells = index_cohort([tmp_path / "lmu"], tmp_path / "cohort").cells
        blasts = dict(zip(cells["cell_type"], cells["is_blast"]))
        assert blasts == {"myeloblast": True, "monoblast": True, "lymphocyte": False, "erythroblast": False}
        assert cells["patient_id"].isna().all()

    def test_deepapl_labels_csv(self, tmp_path: Path) -> None:
        root = tmp_path / "deepapl"
        rows = []
        for patient, diagnosis in (("P0", "APL"), ("P1", "AML")):
            for label in ("Blast, no lineage spec", "Promyelocyte", "Lymphocyte"):
                path = f"images/{patient}/{label.split(',')[0]}.jpg"
                write_cell(root / path, seed=len(rows), fmt="JPEG")
                rows.append({"path": path, "label": label, "patient": patient, "diagnosis": diagnosis})
        pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
        cohort = index_cohort([root], tmp_path / "cohort")
        cells = cohort.cells
        assert cohort.meta.sources[0].layout == "deepapl"
        assert set(cells["mutation"]) == {"PML_RARA", "other_AML"}
        assert cells.loc[cells["cell_type"] == "Blast, no lineage spec", "is_blast"].all()
        assert not cells.loc[cells["cell_type"] != "Blast, no lineage spec", "is_blast"].any()
        remapped = index_cohort([root], tmp_path / "c2", IndexOptions(map_mutation={"AML": "non_APL"})).cells
        assert set(remapped["mutation"]) == {"PML_RARA", "non_APL"}

    def test_the_images_folder_of_a_labels_csv_source_points_to_its_parent(self, tmp_path: Path) -> None:
        """`cohort index deepapl_jhu/images` read 82 patient folders as mutations; say to index the parent."""
        root = tmp_path / "deepapl"
        rows = []
        for patient in range(12):
            path = f"images/Patient_{patient:02d}/Blast/c.jpg"
            write_cell(root / path, seed=patient, fmt="JPEG")
            rows.append({"path": path, "label": "Blast", "patient": f"Patient_{patient:02d}", "diagnosis": "AML"})
        pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
        with pytest.raises(
            MarrowLensError,
            match=rf"^{root / 'images'} is the image folder of {root}, .*labels.csv.*: index {root} instead$",
        ):
            index_cohort([root / "images"], tmp_path / "cohort")
        (root / "labels.csv").unlink()  # no labels.csv beside it: the folder is read as a layout, and
        with pytest.raises(MarrowLensError) as error:  # the unknown labels are listed, but only the first few
            index_cohort([root / "images"], tmp_path / "cohort", IndexOptions(layout="mutation_patient"))
        message = str(error.value)
        assert "12 unknown mutation label(s) 'Patient_00'" in message and "and 7 more" in message
        assert "Patient_11" not in message and len(message) < 400

    def test_user_csv_with_column_map_and_blast_truths(self, tmp_path: Path) -> None:
        write_cell(tmp_path / "imgs" / "a.png", seed=1)
        write_cell(tmp_path / "imgs" / "b.png", seed=2)
        pd.DataFrame(
            {"path": ["imgs/a.png", "imgs/b.png"], "pid": ["x", "y"], "is_blast": ["yes", "0"], "centre": ["A", "B"]}
        ).to_csv(tmp_path / "cells.csv", index=False)
        options = IndexOptions(columns={"patient_id": "pid", "domain": "centre"})
        cells = index_cohort([tmp_path / "cells.csv"], tmp_path / "cohort", options).cells
        assert cells["patient_id"].tolist() == ["x", "y"]
        assert cells["is_blast"].tolist() == [True, False]
        assert cells["domain"].tolist() == ["A", "B"]

    def test_csv_missing_column_and_bad_truth_value(self, tmp_path: Path) -> None:
        write_cell(tmp_path / "a.png", seed=1)
        pd.DataFrame({"path": ["a.png"], "is_blast": ["maybe"]}).to_csv(tmp_path / "c.csv", index=False)
        with pytest.raises(MarrowLensError, match="not a truth value"):
            index_cohort([tmp_path / "c.csv"], tmp_path / "cohort")
        with pytest.raises(MarrowLensError, match="no column"):
            index_cohort([tmp_path / "c.csv"], tmp_path / "cohort", IndexOptions(columns={"patient_id": "nope"}))

    def test_two_sources_keep_their_domains(self, mutation_tree: Path, tmp_path: Path) -> None:
        for code in ("MYO", "LYT"):
            write_cell(tmp_path / "lmu" / code / "x.png", seed=1)
        cohort = index_cohort([mutation_tree, tmp_path / "lmu"], tmp_path / "cohort")
        assert cohort.cells["domain"].value_counts().to_dict() == {"aml": 12, "lmu": 2}
        assert cohort.cells["patient_id"].dropna().str.startswith("aml/").all()
        assert (cohort.root / cohort.cells["path"].iloc[-1]).is_file()


def test_check_finds_and_fixes_files_broken_later(mutation_tree: Path, tmp_path: Path) -> None:
    index_cohort([mutation_tree], tmp_path / "cohort")
    (mutation_tree / "control" / "control_p1" / "cell2.png").write_bytes(b"")
    _, problems = check_cohort(tmp_path / "cohort")
    assert problems == [("control/control_p1/cell2.png", "empty file (0 bytes)")]
    cohort, _ = check_cohort(tmp_path / "cohort", fix=True)
    assert len(cohort.cells) == 11
    assert "control/control_p1/cell2.png" in set(_quarantine(tmp_path / "cohort")["path"])


def test_cohort_cli_round_trip(cli, mutation_tree: Path, tmp_path: Path) -> None:
    code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort")
    assert code == 0, output
    assert "12 cells, 4 patients" in output and "quarantine.csv" in output
    code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort")
    assert code == 2 and "--overwrite" in output
    assert cli("cohort", "check", tmp_path / "cohort")[0] == 0
    code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "c2", "--layout", "nonsense")
    assert code == 2 and "unknown layout" in output


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class TestReplacingACohort:
    def test_failed_overwrite_leaves_the_old_cohort_untouched(self, cli, mutation_tree: Path, tmp_path: Path) -> None:
        (mutation_tree / "NPM1" / "NPM1_p0" / "bad.png").write_bytes(b"")
        assert cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort")[0] == 0
        before = _files(tmp_path / "cohort")
        for image in (mutation_tree / "control").rglob("*.png"):
            image.write_bytes(b"broken")
        code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort", "--overwrite")
        assert code == 2 and "class 'control' has no readable cells" in output
        assert _files(tmp_path / "cohort") == before

    def test_no_readable_images_names_a_reason_and_writes_nothing(self, mutation_tree: Path, tmp_path: Path) -> None:
        for image in mutation_tree.rglob("*.png"):
            image.write_bytes(b"")
        with pytest.raises(MarrowLensError, match=r"no readable images .*12 unreadable, e.g. .*: empty file"):
            index_cohort([mutation_tree], tmp_path / "cohort")
        assert not (tmp_path / "cohort" / "quarantine.csv").exists()

    def test_interrupted_swap_never_shows_a_mixed_cohort(
        self, mutation_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        index_cohort([mutation_tree], tmp_path / "cohort")
        write_cell(mutation_tree / "NPM1" / "NPM1_p0" / "new.png", seed=99)
        real = os.replace

        def killed_at_cells(src, dst):
            if Path(dst).name == "cells.parquet":
                raise OSError("killed")
            real(src, dst)

        monkeypatch.setattr(os, "replace", killed_at_cells)
        with pytest.raises(OSError, match="killed"):
            index_cohort([mutation_tree], tmp_path / "cohort")
        monkeypatch.setattr(os, "replace", real)
        with pytest.raises(MarrowLensError, match="meta.json is missing"):  # unfinished, not old meta + new quarantine
            load_cohort(tmp_path / "cohort")
        assert len(index_cohort([mutation_tree], tmp_path / "cohort").cells) == 13
        assert sorted(p.name for p in (tmp_path / "cohort").iterdir()) == [
            "cells.parquet",
            "meta.json",
            "quarantine.csv",
        ]

    def test_fix_writes_cells_quarantine_and_meta_together(self, mutation_tree: Path, tmp_path: Path) -> None:
        index_cohort([mutation_tree], tmp_path / "cohort")
        (tmp_path / "cohort" / "quarantine.csv").unlink()
        (mutation_tree / "control" / "control_p1" / "cell2.png").write_bytes(b"")
        cohort, _ = check_cohort(tmp_path / "cohort", fix=True)
        assert len(cohort.cells) == 11 and cohort.meta.n_quarantined == 1
        assert _quarantine(tmp_path / "cohort")["path"].tolist() == ["control/control_p1/cell2.png"]


class TestDuplicateCells:
    def test_symlink_to_another_patients_cell(self, cli, mutation_tree: Path, tmp_path: Path) -> None:
        (mutation_tree / "NPM1" / "NPM1_p0" / "link.png").symlink_to(
            mutation_tree / "control" / "control_p1" / "cell0.png"
        )
        code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort")
        assert (
            code == 2 and "NPM1/NPM1_p0/link.png and control/control_p1/cell0.png are the same image file" in output
        ), output
        assert not (tmp_path / "cohort" / "meta.json").exists()

    def test_csv_listing_one_file_under_two_spellings(self, tmp_path: Path) -> None:
        write_cell(tmp_path / "imgs" / "x.png", seed=1)
        write_cell(tmp_path / "imgs" / "y.png", seed=2)
        pd.DataFrame({"path": ["imgs/x.png", "imgs/y.png", "./imgs/x.png"], "patient_id": ["a", "a", "b"]}).to_csv(
            tmp_path / "c.csv", index=False
        )
        with pytest.raises(
            MarrowLensError, match=r"c.csv line 2 \(imgs/x.png\) and c.csv line 4 \(./imgs/x.png\) are the same image"
        ):
            index_cohort([tmp_path / "c.csv"], tmp_path / "cohort")


class TestOneLineErrors:
    def test_symlink_loop_under_root(self, cli, mutation_tree: Path, tmp_path: Path) -> None:
        loop = mutation_tree / "NPM1" / "NPM1_p0" / "loop.png"
        loop.symlink_to(loop)
        code, output = cli("cohort", "index", mutation_tree, "--out", tmp_path / "cohort")
        assert code == 2 and "loop.png cannot be resolved (a symlink loop?)" in output, output

    @pytest.mark.parametrize("name", ["cells.csv", "labels.csv"])
    def test_empty_csv(self, cli, tmp_path: Path, name: str) -> None:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / name).write_text("")
        source = tmp_path / "src" / name if name == "cells.csv" else tmp_path / "src"
        code, output = cli("cohort", "index", source, "--out", tmp_path / "cohort")
        assert code == 2 and f"{name} is empty" in output, output

    @pytest.mark.parametrize("damage", ["truncated cells", "meta list"])
    def test_check_of_a_damaged_cohort(self, cli, mutation_tree: Path, tmp_path: Path, damage: str) -> None:
        index_cohort([mutation_tree], tmp_path / "cohort")
        if damage == "truncated cells":
            table = tmp_path / "cohort" / "cells.parquet"
            table.write_bytes(table.read_bytes()[:100])
            expected = "cells.parquet is not a readable parquet table"
        else:
            (tmp_path / "cohort" / "meta.json").write_text("[]")
            expected = "meta.json is not a MarrowLens meta.json"
        code, output = cli("cohort", "check", tmp_path / "cohort")
        assert code == 2 and expected in output, output

    def test_check_fix_without_quarantine_list(self, cli, mutation_tree: Path, tmp_path: Path) -> None:
        index_cohort([mutation_tree], tmp_path / "cohort")
        (tmp_path / "cohort" / "quarantine.csv").unlink()
        (mutation_tree / "control" / "control_p1" / "cell2.png").write_bytes(b"")
        code, output = cli("cohort", "check", tmp_path / "cohort", "--fix")
        assert code == 0 and "quarantined 1 cell(s); 11 cells OK" in output, output

    def test_output_folder_inside_root_is_not_read_as_a_class(self, cli, mutation_tree: Path, tmp_path: Path) -> None:
        for out in (mutation_tree / "cohort", mutation_tree / "cohort", tmp_path / "elsewhere"):
            # made by this run; the same again; another run's artifacts (a MarrowLens meta.json)
            code, output = cli("cohort", "index", mutation_tree, "--out", out, "--overwrite")
            assert code == 0 and "12 cells, 4 patients" in output, output
        assert len(load_cohort(mutation_tree / "cohort").cells) == 12


def test_cohort_index_carries_extra_columns_through_to_the_store(cli, mutation_tree: Path, tmp_path: Path) -> None:
    """A labels CSV's other columns (site, scanner, date) reach cells.parquet and the embedding store as they are."""
    from marrowlens.embeddings import load_embeddings
    from tests.conftest import make_store

    root = tmp_path / "lab"
    rows = []
    for i, (patient, site) in enumerate((("P0", "north"), ("P0", "north"), ("P1", "south"))):
        write_cell(root / f"images/{i}.png", seed=i)
        rows.append(
            {
                "path": f"images/{i}.png",
                "patient": patient,
                "label": "MYO",
                "site": site,
                "scanner": 7 + i,
                "scan_date": "2024-05-0" + str(i + 1),
                "note": "" if i else "faint",
                "width": 999,  # a schema column: the index measures it, the CSV's is not carried
                "domain": "lab",
                "source": "x",  # beside a domain column, the column an index adds: never an extra column
            }
        )
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    code, output = cli("cohort", "index", root, mutation_tree, "--out", tmp_path / "cohort")
    assert code == 0, output
    assert "extra columns, carried as they are: site, scanner, scan_date, note" in output
    cells = pd.read_parquet(tmp_path / "cohort" / "cells.parquet")
    lab = cells[cells["domain"] == "lab"].sort_values("path")
    assert lab["site"].tolist() == ["north", "north", "south"] and cells["site"].dtype == "string"
    assert lab["scanner"].tolist() == [7, 8, 9] and pd.api.types.is_numeric_dtype(cells["scanner"])
    assert lab["scan_date"].tolist() == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert lab["note"].isna().tolist() == [False, True, True]
    assert (lab["width"] != 999).all() and "source" not in cells.columns
    assert cells.loc[cells["domain"] == "aml", "site"].isna().all()  # the folder source has no such column
    assert load_cohort(tmp_path / "cohort").cells.columns.tolist() == cells.columns.tolist()
    make_store(tmp_path / "emb", cells=cells)  # `marrowlens embed` writes the cohort's table as it is
    store = load_embeddings(tmp_path / "emb")
    assert store.cells["site"].tolist() == cells["site"].tolist()
