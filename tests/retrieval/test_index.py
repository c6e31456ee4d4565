"""Index build / load / add: round trips, recall of the approximate kinds, parameters, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.contracts import IndexFiles
from marrowlens.errors import MarrowLensError
from marrowlens.retrieval import index as index_module
from marrowlens.retrieval.index import (
    add_to_index,
    build_index,
    choose_kind,
    describe,
    kind_advice,
    load_index,
    resolve_params,
)
from marrowlens.retrieval.kinds import EXACT_MAX_CELLS, INDEX_KINDS
from tests.conftest import make_store, random_cells, random_vectors

# recall@10 against exact search, 2000 isotropic Gaussian vectors in 32-d (the hardest case for
# approximate search: no cluster structure) with 100 unseen queries, default parameters except
# where the kind's default would be exhaustive on so small a set.
RECALL_BOUND = {"hnsw": ([], 0.95), "ivf": (["nprobe=16"], 0.75)}


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store") / "emb"
    make_store(folder, n=2000, dim=32, seed=0)
    return folder


@pytest.fixture(scope="module")
def flat(store: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_index(store, tmp_path_factory.mktemp("flat") / "idx", kind="flat")


class TestChooseKind:
    @pytest.mark.parametrize(
        "n, kind",
        [(1, "flat"), (EXACT_MAX_CELLS, "flat"), (EXACT_MAX_CELLS + 1, "ivf"), (10_000_000, "ivf")],
    )
    def test_thresholds(self, n: int, kind: str) -> None:
        assert choose_kind(n) == kind

    def test_auto_build_of_a_small_store_is_exact(self, store: Path, tmp_path: Path) -> None:
        built = build_index(store, tmp_path / "idx")
        assert built.kind == "flat" and built.meta.requested_kind == "auto"


class TestRoundTrip:
    @pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
    @pytest.mark.parametrize("metric", ["cosine", "l2"])
    def test_every_cell_is_its_own_nearest_neighbour(self, store: Path, tmp_path: Path, kind: str, metric: str) -> None:
        build_index(store, tmp_path / "idx", kind=kind, metric=metric)
        loaded = load_index(tmp_path / "idx")  # through the files, not the object in memory
        vectors = np.load(store / "vectors.npy")
        rows = np.arange(0, len(vectors), 7)
        scores, found = loaded.search(vectors[rows], 1)
        assert (found[:, 0] == rows).all()
        expected_self = 1.0 if metric == "cosine" else 0.0
        np.testing.assert_allclose(scores[:, 0], expected_self, atol=1e-4)

    @pytest.mark.parametrize("metric", ["cosine", "l2"])
    def test_flat_scores_are_exact(self, store: Path, tmp_path: Path, metric: str) -> None:
        index = build_index(store, tmp_path / "idx", kind="flat", metric=metric)
        vectors = np.load(store / "vectors.npy").astype(np.float64)
        query = random_vectors(1, 32, seed=5).astype(np.float64)
        if metric == "cosine":
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            query /= np.linalg.norm(query)
            expected = np.sort(vectors @ query[0])[::-1][:5]
        else:
            expected = np.sort(((vectors - query) ** 2).sum(1))[:5]
        scores, _ = index.search(query.astype(np.float32), 5)
        np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-4)

    def test_rows_map_to_the_cells_table(self, store: Path, flat) -> None:
        vectors = np.load(store / "vectors.npy")
        _, found = flat.search(vectors[[3, 1234]], 1)
        assert list(flat.cells["cell_id"].iloc[found[:, 0]]) == ["c000003", "c001234"]

    def test_meta_records_what_made_the_index(self, flat, store: Path) -> None:
        meta = json.loads((flat.folder / "meta.json").read_text())
        assert meta["kind"] == "index" and meta["index_kind"] == "flat" and meta["metric"] == "cosine"
        assert meta["count"] == 2000 and meta["dim"] == 32 and meta["factory"] == "IDMap2,Flat"
        assert meta["model"]["fingerprint"] == "random:test_resnet:seed0"
        assert meta["sources"][0]["embeddings"] == str(store.resolve())
        assert meta["sources"][0]["fingerprint"].startswith("sha256:")

    def test_vector_reconstructs_the_normalised_vector(self, store: Path, flat) -> None:
        vector = np.load(store / "vectors.npy")[42]
        np.testing.assert_allclose(flat.vector(42), vector / np.linalg.norm(vector), atol=1e-6)

    def test_blocks_give_the_same_index(self, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        whole = build_index(store, tmp_path / "whole", kind="hnsw")
        monkeypatch.setattr(index_module, "BLOCK_ROWS", 333)
        blocks = build_index(store, tmp_path / "blocks", kind="hnsw")
        queries = random_vectors(20, 32, seed=9)
        np.testing.assert_array_equal(whole.search(queries, 5)[1], blocks.search(queries, 5)[1])

    def test_describe_says_what_is_inside(self, flat) -> None:
        text = "\n".join(describe(flat))
        assert "2000 cells x 32 dims, flat" in text and "mutation: " in text and "patients: 5" in text


class TestRecall:
    @pytest.mark.parametrize("kind", sorted(RECALL_BOUND))
    def test_recall_against_exact_search(self, store: Path, flat, tmp_path: Path, kind: str) -> None:
        overrides, bound = RECALL_BOUND[kind]
        approx = build_index(store, tmp_path / "idx", kind=kind, overrides=overrides)
        queries = random_vectors(100, 32, seed=77)
        truth = flat.search(queries, 10)[1]
        recall = recall_at_10(approx.search(queries, 10)[1], truth)
        assert recall >= bound, f"{kind} recall@10 {recall:.3f} < {bound}"

    @pytest.mark.slow  # FAISS's PQ training takes ~10 s even on 2000 vectors here
    def test_ivfpq_recall_against_exact_search(self, store: Path, flat, tmp_path: Path) -> None:
        approx = build_index(store, tmp_path / "idx", kind="ivfpq", overrides=["nprobe=16", "pq_m=16", "pq_nbits=6"])
        queries = random_vectors(100, 32, seed=77)
        assert recall_at_10(approx.search(queries, 10)[1], flat.search(queries, 10)[1]) >= 0.55

    def test_ivfpq_round_trip_on_a_small_store(self, tmp_path: Path) -> None:
        """Compressed codes: a cell is among its own 3 nearest, its vector comes back approximately."""
        make_store(tmp_path / "emb", n=400, dim=16)
        make_store(tmp_path / "emb2", n=20, dim=16, seed=2, prefix="x")
        build_index(tmp_path / "emb", tmp_path / "idx", kind="ivfpq", overrides=["pq_m=4", "pq_nbits=4"])
        index, _ = add_to_index(tmp_path / "idx", tmp_path / "emb2")
        assert index.meta.factory == "IDMap2,IVF10,PQ4x4" and len(index) == 420
        vectors = np.concatenate(
            [np.load(tmp_path / "emb" / "vectors.npy"), np.load(tmp_path / "emb2" / "vectors.npy")]
        )
        found = index.search(vectors, 3)[1]
        assert np.mean([row in hits for row, hits in enumerate(found)]) >= 0.9
        unit = vectors[405] / np.linalg.norm(vectors[405])
        assert float(index.vector(405) @ unit) > 0.8

    def test_more_probes_never_hurt(self, store: Path, flat, tmp_path: Path) -> None:
        queries = random_vectors(100, 32, seed=78)
        truth = flat.search(queries, 10)[1]
        recalls = [
            recall_at_10(
                build_index(store, tmp_path / f"p{p}", kind="ivf", overrides=[f"nprobe={p}"]).search(queries, 10)[1],
                truth,
            )
            for p in (1, 4, 51)
        ]
        assert recalls[0] <= recalls[1] <= recalls[2] == 1.0  # nprobe = nlist is exhaustive


class TestParams:
    def test_defaults_scale_with_the_cohort(self) -> None:
        params = resolve_params("ivf", 1_000_000, 384)
        assert params["nlist"] == 4000 and params["nprobe"] == 62 and params["train_size"] == 256_000
        assert resolve_params("ivf", 100_000, 384)["nprobe"] == 19

    def test_small_cohorts_keep_39_points_per_list(self) -> None:
        assert resolve_params("ivf", 2000, 32)["nlist"] == 2000 // 39

    def test_typed_values_come_before_key_value_overrides(self) -> None:
        """A run config's ``index: {override: {...}}`` mapping; its ``set`` strings win over it."""
        assert resolve_params("ivf", 2000, 32, values={"nprobe": 7, "nlist": 20})["nprobe"] == 7
        assert resolve_params("ivf", 2000, 32, ["nprobe=9"], {"nprobe": 7})["nprobe"] == 9
        with pytest.raises(MarrowLensError, match="do not apply to a flat index"):
            resolve_params("flat", 2000, 32, values={"nprobe": 7})

    def test_overrides_are_recorded(self, store: Path, tmp_path: Path) -> None:
        built = build_index(store, tmp_path / "idx", kind="hnsw", overrides=["ef_search=99", "hnsw_m=8"])
        assert load_index(tmp_path / "idx").params == {"hnsw_m": 8, "ef_construction": 40, "ef_search": 99}
        assert built.meta.factory == "IDMap2,HNSW8"

    @pytest.mark.parametrize(
        "kind, overrides, message",
        [
            ("flat", ["nprobe=4"], "do not apply to a flat index"),
            ("hnsw", ["nlist=4"], "do not apply to a hnsw index"),
            ("ivf", ["nprobe=zero"], "nprobe"),
            ("ivf", ["nlist=0"], "nlist"),
            ("ivf", ["nlist=5000"], "exceeds the 2000 vectors"),
            ("ivfpq", ["pq_m=5"], "must divide the dimension 32"),
            ("ivf", ["bogus=1"], "bogus"),
            ("cube", [], "unknown index kind"),
        ],
    )
    def test_bad_parameters_are_one_line_errors(
        self, store: Path, tmp_path: Path, kind: str, overrides: list[str], message: str
    ) -> None:
        with pytest.raises(MarrowLensError, match=message):
            build_index(store, tmp_path / "idx", kind=kind, overrides=overrides)
        assert not (tmp_path / "idx" / "meta.json").exists()

    def test_bad_metric(self, store: Path, tmp_path: Path) -> None:
        with pytest.raises(MarrowLensError, match="unknown metric"):
            build_index(store, tmp_path / "idx", metric="hamming")


class TestRefusals:
    def test_existing_index_needs_overwrite(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        with pytest.raises(MarrowLensError, match="--overwrite"):
            build_index(store, tmp_path / "idx")
        assert len(build_index(store, tmp_path / "idx", kind="hnsw", overwrite=True)) == 2000
        assert load_index(tmp_path / "idx").kind == "hnsw"

    def test_duplicate_cell_ids_in_a_store(self, tmp_path: Path) -> None:
        cells = random_cells(10)
        cells.loc[3, "cell_id"] = cells.loc[4, "cell_id"]
        make_store(tmp_path / "emb", cells=cells)
        with pytest.raises(MarrowLensError, match="1 duplicate cell id"):
            build_index(tmp_path / "emb", tmp_path / "idx")

    def test_not_an_index(self, store: Path) -> None:
        with pytest.raises(MarrowLensError, match="expected 'index'"):
            load_index(store)

    def test_interrupted_write_is_detected(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        cells = pd.read_parquet(tmp_path / "idx" / "cells.parquet")
        cells.iloc[:10].to_parquet(tmp_path / "idx" / "cells.parquet", index=False)
        with pytest.raises(MarrowLensError, match="inconsistent"):
            load_index(tmp_path / "idx")

    def test_corrupt_index_file(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        (tmp_path / "idx" / "index.faiss").write_bytes(b"not faiss")
        with pytest.raises(MarrowLensError, match="not a readable FAISS index"):
            load_index(tmp_path / "idx")


class TestAdd:
    @pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
    def test_added_cells_are_found_under_new_rows(self, store: Path, tmp_path: Path, kind: str) -> None:
        build_index(store, tmp_path / "idx", kind=kind)
        extra = make_store(tmp_path / "emb2", n=50, dim=32, seed=1, prefix="x")
        index, added = add_to_index(tmp_path / "idx", tmp_path / "emb2")
        assert added == 50 and len(index) == 2050
        loaded = load_index(tmp_path / "idx")
        assert len(loaded) == 2050 and loaded.meta.count == 2050 and len(loaded.meta.sources) == 2
        assert list(loaded.cells["source"].unique()) == [0, 1]
        _, found = loaded.search(np.asarray(extra.vectors), 1)
        np.testing.assert_array_equal(found[:, 0], np.arange(2000, 2050))
        assert list(loaded.cells["cell_id"].iloc[2000:2003]) == ["x000000", "x000001", "x000002"]

    def test_refuses_another_model_naming_both(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        make_store(tmp_path / "emb2", n=20, dim=32, prefix="x", fingerprint="sha256:" + "ab" * 32)
        with pytest.raises(
            MarrowLensError,
            match=(
                r"backbone fingerprint mismatch: index .*idx has random:test_resnet:seed0.* "
                r"but embeddings .*emb2 has abababab"
            ),
        ):
            add_to_index(tmp_path / "idx", tmp_path / "emb2")

    def test_refuses_cells_already_indexed_and_loses_nothing(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        before = {
            name: (tmp_path / "idx" / name).read_bytes() for name in ("index.faiss", "cells.parquet", "meta.json")
        }
        make_store(tmp_path / "emb2", n=20, dim=32, seed=3, prefix="c")  # same ids c000000..
        with pytest.raises(MarrowLensError, match="20 cell\\(s\\) of .* are already in index"):
            add_to_index(tmp_path / "idx", tmp_path / "emb2")
        after = {name: (tmp_path / "idx" / name).read_bytes() for name in before}
        assert before == after

    def test_refuses_another_dimension(self, store: Path, tmp_path: Path) -> None:
        build_index(store, tmp_path / "idx")
        make_store(tmp_path / "emb2", n=20, dim=8, prefix="x")
        with pytest.raises(MarrowLensError, match="dimension 8, the index 32"):
            add_to_index(tmp_path / "idx", tmp_path / "emb2")

    def test_outgrowing_the_auto_choice_is_noted(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        make_store(tmp_path / "emb", n=30, dim=8)
        make_store(tmp_path / "emb2", n=30, dim=8, prefix="x", seed=1)
        build_index(tmp_path / "emb", tmp_path / "idx")
        monkeypatch.setattr(INDEX_KINDS["flat"], "auto_up_to", 40)
        index, _ = add_to_index(tmp_path / "idx", tmp_path / "emb2")
        assert index.kind == "flat"
        assert kind_advice(index) == "note: at 60 cells `auto` would now build ivf; rebuild to switch"
        assert kind_advice(index) in describe(index)[-1]


class TestAddIsOldOrNew:
    @pytest.fixture
    def small(self, tmp_path: Path) -> Path:
        make_store(tmp_path / "emb", n=40, dim=8)
        make_store(tmp_path / "emb2", n=10, dim=8, prefix="x", seed=1)
        make_store(tmp_path / "emb3", n=5, dim=8, prefix="y", seed=2)
        build_index(tmp_path / "emb", tmp_path / "idx")
        return tmp_path

    @pytest.mark.parametrize("step", ["meta.json", "index.1.faiss"])
    def test_a_killed_add_leaves_the_old_index_searchable(
        self, small: Path, monkeypatch: pytest.MonkeyPatch, step: str
    ) -> None:
        real = os.replace

        def killed(src, dst):
            if Path(dst).name == step:
                raise KeyboardInterrupt  # kill -9 between the steps of add
            real(src, dst)

        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            add_to_index(small / "idx", small / "emb2")
        monkeypatch.setattr(os, "replace", real)
        old = load_index(small / "idx")
        assert len(old) == 40 and len(old.cells) == 40
        _, found = old.search(random_vectors(40, 8)[:3], 1)
        assert found[:, 0].tolist() == [0, 1, 2]
        assert len(add_to_index(small / "idx", small / "emb2")[0]) == 50  # and the next add works

    def test_each_add_is_a_new_version_and_the_old_one_goes(self, small: Path) -> None:
        add_to_index(small / "idx", small / "emb2")
        add_to_index(small / "idx", small / "emb3")
        loaded = load_index(small / "idx")
        assert len(loaded) == 55 and loaded.meta.version == 2
        assert sorted(p.name for p in (small / "idx").iterdir()) == ["cells.2.parquet", "index.2.faiss", "meta.json"]
        assert "0.0 MiB on disk" in describe(loaded)[1]
        build_index(small / "emb", small / "idx", overwrite=True)  # a rebuild goes back to the plain names
        assert sorted(p.name for p in (small / "idx").iterdir()) == ["cells.parquet", "index.faiss", "meta.json"]

    def test_index_from_before_versions_still_loads_and_grows(self, small: Path) -> None:
        meta_path = small / "idx" / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta["version"], meta["files"]
        meta_path.write_text(json.dumps(meta))
        assert len(load_index(small / "idx")) == 40
        assert len(add_to_index(small / "idx", small / "emb2")[0]) == 50
        assert load_index(small / "idx").meta.files == IndexFiles(index="index.1.faiss", cells="cells.1.parquet")
