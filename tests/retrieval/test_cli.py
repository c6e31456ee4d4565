"""The retrieval commands end to end on a tiny real cohort: images -> embed -> index -> search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from marrowlens.retrieval.index import load_index
from marrowlens.ssl.backbones import export_backbone, load_backbone
from tests.conftest import make_store, run_cli_subprocess, write_cell
from tests.retrieval.conftest import ImageIndex


def cell_id_of_path(index: Path, path: str) -> str:
    """The id an index gives the cell at ``path`` (relative to its cohort root)."""
    return load_index(index).cells.set_index("path").loc[path, "cell_id"]


class TestHelp:
    @pytest.mark.parametrize(
        "command", [["index", "build"], ["index", "add"], ["index", "info"], ["index", "map"], ["search"], ["serve"]]
    )
    def test_help_has_an_example(self, cli, command: list[str]) -> None:
        code, output = cli(*command, "--help")
        assert code == 0 and "Example: marrowlens " + command[0] in output


class TestBuildAndInfo:
    def test_build_prints_what_it_wrote(self, cli, image_index: ImageIndex, tmp_path: Path) -> None:
        code, output = cli(
            "index",
            "build",
            "--embeddings",
            image_index.emb,
            "--out",
            tmp_path / "idx",
            "--kind",
            "hnsw",
            "--set",
            "ef_search=20",
        )
        assert code == 0, output
        assert f"wrote {tmp_path / 'idx' / 'index.faiss'}: 24 cells, hnsw index (IDMap2,HNSW32, cosine)" in output
        meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
        assert meta["params"]["ef_search"] == 20 and meta["model"]["fingerprint"] == "random:test_resnet:seed0"
        assert meta["sources"][0]["cohort"]["root"] == str(image_index.root.resolve())

    def test_info(self, cli, image_index: ImageIndex) -> None:
        code, output = cli("index", "info", image_index.idx)
        assert code == 0
        assert "24 cells x 96 dims, flat (auto), cosine metric" in output
        assert "test_resnet @ 32 px, random:test_resnet:seed0 from random init" in output
        assert "mutation: NPM1=12, control=12" in output and f"images in {image_index.root.resolve()}" in output

    @pytest.mark.parametrize(
        "args, message",
        [
            (["--kind", "kd-tree"], "unknown index kind 'kd-tree'"),
            (["--metric", "dot"], "unknown metric 'dot'"),
            (["--kind", "flat", "--set", "nprobe=3"], "do not apply to a flat index"),
        ],
    )
    def test_bad_options(self, cli, image_index: ImageIndex, tmp_path: Path, args: list[str], message: str) -> None:
        code, output = cli("index", "build", "--embeddings", image_index.emb, "--out", tmp_path / "idx", *args)
        assert code == 2 and message in output

    def test_missing_embeddings(self, cli, tmp_path: Path) -> None:
        code, output = cli("index", "build", "--embeddings", tmp_path / "none", "--out", tmp_path / "idx")
        assert code == 2 and "meta.json is missing" in output


class TestSearch:
    def test_an_indexed_image_is_named_and_left_out_of_its_own_vote(self, cli, image_index: ImageIndex) -> None:
        """The demo searches with a cell of the index: it must not count itself among its neighbours."""
        code, output = cli("search", "--index", image_index.idx, "--image", image_index.image("NPM1", 1, 2), "-k", "4")
        assert code == 0, output
        lines = output.splitlines()
        assert lines[0] == f"query {image_index.image('NPM1', 1, 2)}:"
        assert (
            lines[1].startswith("  (this image is indexed cell ")
            and "left out of its own neighbours and vote" in lines[1]
        )
        assert lines[2].split() == ["rank", "cell", "patient", "cell_type", "blast", "mutation", "similarity", "path"]
        ranks = [line.split() for line in lines[3:7]]
        assert [r[0] for r in ranks] == ["1", "2", "3", "4"]
        assert "NPM1/NPM1_p1/cell2.png" not in output.split("similarity")[1] and all(
            float(r[6]) < 0.99999 for r in ranks
        )
        assert len(lines) == 8 and lines[7].startswith("k-NN vote: mutation: ") and "/4" in lines[7]

    def test_json_for_several_images(self, cli, image_index: ImageIndex) -> None:
        images = [image_index.image("control", 0, 1), image_index.image("NPM1", 0, 3)]
        code, output = cli(
            "search", "--index", image_index.idx, "--image", images[0], "--image", images[1], "-k", "3", "--json"
        )
        assert code == 0
        results = json.loads(output)
        assert [r["query"] for r in results] == [str(p) for p in images]
        for result, itself in zip(results, ["control/control_p0/cell1.png", "NPM1/NPM1_p0/cell3.png"]):
            assert result["query_cell"] == cell_id_of_path(image_index.idx, itself)
            assert len(result["neighbours"]) == 3 and itself not in {n["path"] for n in result["neighbours"]}
            assert [n["rank"] for n in result["neighbours"]] == [1, 2, 3]
            assert sum(count for _, count in result["vote"]["mutation"]) == 3

    def test_a_new_image_is_not_taken_for_an_indexed_cell(self, cli, image_index: ImageIndex, tmp_path: Path) -> None:
        new = write_cell(tmp_path / "new.png", seed=999, size=40)
        code, output = cli("search", "--index", image_index.idx, "--image", new, "-k", "24", "--json")
        assert code == 0, output
        result = json.loads(output)[0]
        assert result["query_cell"] is None and len(result["neighbours"]) == 24

    def test_filter(self, cli, image_index: ImageIndex) -> None:
        code, output = cli(
            "search",
            "--index",
            image_index.idx,
            "--image",
            image_index.image("NPM1", 0, 0),
            "-k",
            "12",
            "--filter",
            "mutation=control",
            "--json",
        )
        assert code == 0
        neighbours = json.loads(output)[0]["neighbours"]
        assert len(neighbours) == 12 and {n["mutation"] for n in neighbours} == {"control"}

    def test_by_cell_id_prefix_leaves_the_cell_out(self, cli, image_index: ImageIndex) -> None:
        code, output = cli(
            "search", "--index", image_index.idx, "--image", image_index.image("NPM1", 0, 0), "-k", "1", "--json"
        )
        cell_id = json.loads(output)[0]["query_cell"]
        code, output = cli("search", "--index", image_index.idx, "--cell-id", cell_id[:10], "-k", "5", "--json")
        assert code == 0, output
        result = json.loads(output)[0]
        assert result["query"] == f"cell {cell_id}"
        assert cell_id not in {n["cell_id"] for n in result["neighbours"]} and len(result["neighbours"]) == 5

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["-k", "25"], "k=25 is larger than the index allows: only 24 cells are in the index"),
            (["-k", "13", "--filter", "mutation=NPM1"], "only 12 cells match the filter"),
            (["--filter", "mutation=FLT3"], "no indexed cell has mutation=FLT3 (values in the index: NPM1, control)"),
            (["--filter", "colour=red"], "cannot filter on 'colour'"),
            (["--cell-id", "0000000000"], "no indexed cell has id '0000000000'"),
        ],
    )
    def test_bad_queries(self, cli, image_index: ImageIndex, extra: list[str], message: str) -> None:
        code, output = cli("search", "--index", image_index.idx, "--image", image_index.image(), *extra)
        assert code == 2 and message in output

    def test_needs_a_query(self, cli, image_index: ImageIndex) -> None:
        code, output = cli("search", "--index", image_index.idx)
        assert code == 2 and "give at least one --image or --cell-id" in output

    @pytest.mark.parametrize(
        "content, reason",
        [(b"", "empty file"), (b"plain text, not pixels", "not an image"), (None, "file not found")],
    )
    def test_undecodable_query_image(
        self, cli, image_index: ImageIndex, tmp_path: Path, content: bytes | None, reason: str
    ) -> None:
        path = tmp_path / "query.png"
        if content is not None:
            path.write_bytes(content)
        code, output = cli("search", "--index", image_index.idx, "--image", path)
        assert code == 2 and f"query image {path} cannot be used: {reason}" in output

    def test_truncated_query_image(self, cli, image_index: ImageIndex, tmp_path: Path) -> None:
        data = write_cell(tmp_path / "whole.png", seed=1, size=64).read_bytes()
        (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
        code, output = cli("search", "--index", image_index.idx, "--image", tmp_path / "half.png")
        assert code == 2 and "cannot be used: truncated or corrupt" in output

    def test_another_backbone_is_refused_naming_both(self, cli, image_index: ImageIndex) -> None:
        code, output = cli("search", "--index", image_index.idx, "--image", image_index.image(), "--model", "test_vit")
        assert code == 2
        assert (
            f"backbone fingerprint mismatch: index {image_index.idx} has random:test_resnet:seed0 "
            "but model test_vit has random:test_vit:seed0" in output
        )

    def test_error_is_one_line_with_status_2_from_a_real_process(self, image_index: ImageIndex) -> None:
        result = run_cli_subprocess("search", "--index", image_index.idx, "--image", image_index.image(), "-k", "99")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "error: k=99 is larger than the index allows: only 24 cells are in the index"
        ]


class TestRunFolderBackbone:
    """An index made from a trained run: found through meta.json, or through --model once moved."""

    @pytest.fixture(scope="class")
    def run_index(self, image_index: ImageIndex, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
        from tests.conftest import Cli

        base = tmp_path_factory.mktemp("run_index")
        model, info = load_backbone("test_resnet", image_size=32, seed=7)
        export_backbone(model, "test_resnet", info.preprocessing, base / "run")
        cli = Cli()
        for args in (
            (
                "embed",
                "--model",
                base / "run",
                "--cohort",
                image_index.cohort,
                "--out",
                base / "emb",
                "--num-workers",
                "0",
                "--accelerator",
                "cpu",
            ),
            ("index", "build", "--embeddings", base / "emb", "--out", base / "idx"),
        ):
            code, output = cli(*args)
            assert code == 0, output
        return base / "run", base / "idx"

    def test_moved_run_folder_needs_model_and_is_still_checked(
        self, cli, image_index: ImageIndex, run_index: tuple[Path, Path], tmp_path: Path
    ) -> None:
        run, idx = run_index
        query = image_index.image("control", 1, 4)
        code, output = cli("search", "--index", idx, "--image", query, "-k", "2", "--json")
        assert code == 0 and json.loads(output)[0]["query_cell"] == cell_id_of_path(idx, "control/control_p1/cell4.png")
        moved = tmp_path / "moved_run"
        shutil.move(run, moved)
        try:
            code, output = cli("search", "--index", idx, "--image", query)
            assert code == 2 and "no longer exists; pass --model with where it is now" in output
            code, output = cli("search", "--index", idx, "--image", query, "-k", "2", "--model", moved)
            assert code == 0 and f"indexed cell {cell_id_of_path(idx, 'control/control_p1/cell4.png')[:12]}" in output
            code, output = cli(
                "search", "--index", idx, "--image", query, "--model", "test_resnet"
            )  # same arch, other weights
            assert code == 2 and "backbone fingerprint mismatch" in output
        finally:
            shutil.move(moved, run)


class TestAdd:
    def test_add_a_second_cohort_and_find_its_cells(self, cli, image_index: ImageIndex, tmp_path: Path) -> None:
        shutil.copytree(image_index.idx, tmp_path / "idx")
        root = tmp_path / "more"
        for cell in range(4):
            write_cell(root / "NPM1" / "NPM1_p9" / f"new{cell}.png", seed=900 + cell, size=40)
        for args in (
            ("cohort", "index", root, "--out", tmp_path / "cohort2"),
            (
                "embed",
                "--model",
                "test_resnet",
                "--image-size",
                "32",
                "--cohort",
                tmp_path / "cohort2",
                "--out",
                tmp_path / "emb2",
                "--num-workers",
                "0",
                "--accelerator",
                "cpu",
            ),
        ):
            code, output = cli(*args)
            assert code == 0, output
        code, output = cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "emb2")
        assert code == 0, output
        assert f"wrote {tmp_path / 'idx' / 'index.1.faiss'}: added 4 cells, 28 in all" in output
        code, output = cli(
            "search",
            "--index",
            tmp_path / "idx",
            "--image",
            root / "NPM1" / "NPM1_p9" / "new2.png",
            "-k",
            "1",
            "--json",
        )
        assert json.loads(output)[0]["query_cell"] == cell_id_of_path(tmp_path / "idx", "NPM1/NPM1_p9/new2.png")
        code, output = cli("index", "add", tmp_path / "idx", "--embeddings", tmp_path / "emb2")
        assert code == 2 and "4 cell(s) of" in output and "are already in index" in output

    def test_add_refuses_a_store_of_another_backbone(
        self, cli, image_index: ImageIndex, tmp_path: Path, run_index_emb: Path
    ) -> None:
        shutil.copytree(image_index.idx, tmp_path / "idx")
        code, output = cli("index", "add", tmp_path / "idx", "--embeddings", run_index_emb)
        assert (
            code == 2
            and "backbone fingerprint mismatch: index" in output
            and "random:test_resnet:seed0 but embeddings" in output
        )


@pytest.fixture
def run_index_emb(tmp_path: Path) -> Path:
    """A store of the same cells from another backbone (written directly: only its fingerprint matters)."""
    make_store(tmp_path / "other_emb", n=5, dim=96, prefix="z", fingerprint="sha256:" + "cd" * 32)
    return tmp_path / "other_emb"


class TestStainNormalisation:
    """Cells embedded with Reinhard normalisation: queries must be normalised to the same target."""

    def test_query_gets_the_stores_normalisation_and_add_refuses_a_mismatch(
        self, cli, image_index: ImageIndex, tmp_path: Path
    ) -> None:
        code, output = cli(
            "embed",
            "--model",
            "test_resnet",
            "--image-size",
            "32",
            "--cohort",
            image_index.cohort,
            "--out",
            tmp_path / "emb",
            "--num-workers",
            "0",
            "--accelerator",
            "cpu",
            "--stain-normalize",
            "reinhard",
        )
        assert code == 0, output
        code, output = cli("index", "build", "--embeddings", tmp_path / "emb", "--out", tmp_path / "idx")
        assert code == 0, output
        assert (
            json.loads((tmp_path / "idx" / "meta.json").read_text())["preprocessing"]["stain"]["method"] == "reinhard"
        )
        assert "queries are stain-normalised (reinhard) like the cells" in cli("index", "info", tmp_path / "idx")[1]
        code, output = cli(
            "search", "--index", tmp_path / "idx", "--image", image_index.image("control", 0, 5), "-k", "1", "--json"
        )
        assert json.loads(output)[0]["query_cell"] == cell_id_of_path(tmp_path / "idx", "control/control_p0/cell5.png")
        code, output = cli("index", "add", tmp_path / "idx", "--embeddings", image_index.emb)
        assert code == 2 and "stain normalisation mismatch" in output and "with none" in output
