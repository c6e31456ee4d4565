"""Searching an index: filters (id selector), k limits, query by cell, votes, batching of embeddings."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.errors import MarrowLensError
from marrowlens.retrieval.batching import BatchingEmbedder
from marrowlens.retrieval.index import build_index
from marrowlens.retrieval.search import (
    Searcher,
    UnknownCellError,
    filter_mask,
    format_table,
    format_vote,
    parse_filters,
    vote,
)
from marrowlens.ssl.backbones import load_backbone
from marrowlens.ssl.embed import embed_images
from marrowlens.ssl.preprocessing import eval_transform
from tests.conftest import make_store, random_cells, random_vectors, write_cell


def searcher_for(index_dir: Path) -> Searcher:
    """A Searcher over an index of random vectors, with the real (random-init) test backbone."""
    from marrowlens.retrieval.index import load_index

    model, info = load_backbone("test_resnet", image_size=32)
    return Searcher(index=load_index(index_dir), model=model, info=info)


@pytest.fixture(scope="module", params=["flat", "hnsw", "ivf"])
def searcher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Searcher:
    base = tmp_path_factory.mktemp(f"search_{request.param}")
    make_store(base / "emb", n=1200, dim=16)
    build_index(base / "emb", base / "idx", kind=request.param)
    return searcher_for(base / "idx")


class TestParseFilters:
    def test_values_are_alternatives_and_columns_combine(self) -> None:
        assert parse_filters(["mutation=NPM1,control", "is_blast=true", "mutation=other"]) == {
            "mutation": {"NPM1", "control", "other"},
            "is_blast": {"true"},
        }

    @pytest.mark.parametrize(
        "text, message",
        [
            ("mutation", "not of the form"),
            ("=NPM1", "not of the form"),
            ("mutation=", "not of the form"),
            ("path=x", "cannot filter on 'path'"),
        ],
    )
    def test_malformed(self, text: str, message: str) -> None:
        with pytest.raises(MarrowLensError, match=message):
            parse_filters([text])


class TestFilterMask:
    cells = random_cells(12)

    @pytest.mark.parametrize(
        "filters, expected",
        [
            ({"mutation": {"NPM1"}}, [i % 2 == 0 for i in range(12)]),
            ({"is_blast": {"yes"}}, [i % 3 == 0 for i in range(12)]),
            ({"is_blast": {"false"}, "mutation": {"control"}}, [i % 3 != 0 and i % 2 == 1 for i in range(12)]),
            ({"patient_id": {"P0", "P1"}}, [i % 5 in (0, 1) for i in range(12)]),
        ],
    )
    def test_masks(self, filters: dict, expected: list[bool]) -> None:
        assert filter_mask(self.cells, filters).tolist() == expected

    def test_unknown_value_lists_the_known_ones(self) -> None:
        with pytest.raises(
            MarrowLensError, match=r"no indexed cell has mutation=NPM2 \(values in the index: NPM1, control\)"
        ):
            filter_mask(self.cells, {"mutation": {"NPM2"}})

    def test_missing_labels_never_match(self) -> None:
        cells = self.cells.copy()
        cells["is_blast"] = pd.array([None] * 12, dtype="boolean")
        assert not filter_mask(cells, {"is_blast": {"true"}}).any()


class TestSearch:
    def test_filtered_neighbours_all_pass_the_filter(self, searcher: Searcher) -> None:
        queries = random_vectors(5, 16, seed=3)
        for table in searcher.search_vectors(queries, 10, {"mutation": {"NPM1"}, "is_blast": {"true"}}):
            assert len(table) == 10
            assert (table["mutation"] == "NPM1").all() and table["is_blast"].all()
            assert (table["row"] % 6 == 0).all()  # rows with i % 2 == 0 and i % 3 == 0

    def test_filtered_results_are_the_exact_filtered_neighbours(self, searcher: Searcher) -> None:
        """Even a selective filter (1 cell in 30) gets its true k nearest, however approximate the index."""
        queries = random_vectors(5, 16, seed=4)
        vectors = np.load(Path(searcher.index.meta.sources[0].embeddings) / "vectors.npy")
        normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        allowed = np.flatnonzero((np.arange(1200) % 5 == 0) & (np.arange(1200) % 2 == 0) & (np.arange(1200) % 3 == 0))
        for query, table in zip(
            queries,
            searcher.search_vectors(queries, 5, {"patient_id": {"P0"}, "mutation": {"NPM1"}, "is_blast": {"true"}}),
        ):
            truth = allowed[np.argsort(-(normed[allowed] @ (query / np.linalg.norm(query))))[:5]]
            assert set(table["row"]) == set(truth)

    def test_ranks_and_similarities_are_ordered(self, searcher: Searcher) -> None:
        table = searcher.search_vectors(random_vectors(1, 16, seed=5), 8)[0]
        assert table["rank"].tolist() == list(range(1, 9))
        assert table["similarity"].is_monotonic_decreasing
        np.testing.assert_allclose(table["distance"], 1 - table["similarity"])

    def test_k_larger_than_the_index(self, searcher: Searcher) -> None:
        with pytest.raises(
            MarrowLensError, match="k=1201 is larger than the index allows: only 1200 cells are in the index"
        ):
            searcher.search_vectors(random_vectors(1, 16), 1201)

    def test_k_larger_than_the_filtered_cells(self, searcher: Searcher) -> None:
        with pytest.raises(MarrowLensError, match="only 40 cells match the filter"):
            searcher.search_vectors(
                random_vectors(1, 16), 41, {"patient_id": {"P0"}, "mutation": {"NPM1"}, "is_blast": {"true"}}
            )

    def test_k_must_be_positive(self, searcher: Searcher) -> None:
        with pytest.raises(MarrowLensError, match="at least 1"):
            searcher.search_vectors(random_vectors(1, 16), 0)

    def test_query_by_cell_leaves_the_cell_out(self, searcher: Searcher) -> None:
        table = searcher.search_cells([17], 5)[0]
        assert 17 not in set(table["row"]) and len(table) == 5
        direct = searcher.search_vectors(searcher.index.vector(17)[None], 6)[0]
        assert direct["row"].iloc[0] == 17  # the cell itself would have been first
        assert table["row"].tolist() == direct["row"].iloc[1:].tolist()

    def test_query_by_cell_counts_itself_out_of_k(self, searcher: Searcher) -> None:
        with pytest.raises(MarrowLensError, match="only 1199 cells are in the index besides the query cell"):
            searcher.search_cells([0], 1200)


class TestCellIds:
    IDS = ["aaaaaa1", "aaaaaa2", "bbbbbbbbbb", "cccccccc"] + [f"d{i:06d}" for i in range(26)]

    @pytest.fixture(scope="class")
    def searcher(self, tmp_path_factory: pytest.TempPathFactory) -> Searcher:
        base = tmp_path_factory.mktemp("ids")
        cells = random_cells(30)
        cells["cell_id"] = pd.array(self.IDS, dtype="string")
        make_store(base / "emb", dim=8, cells=cells)
        build_index(base / "emb", base / "idx")
        return searcher_for(base / "idx")

    def test_full_id_and_unique_prefix(self, searcher: Searcher) -> None:
        assert searcher.row_of("d000012") == 16
        assert searcher.row_of("bbbbbb") == 2
        assert searcher.exact_row("bbbbbb") is None and searcher.exact_row("cccccccc") == 3

    def test_ambiguous_prefix(self, searcher: Searcher) -> None:
        with pytest.raises(MarrowLensError, match="matches 2 indexed cells"):
            searcher.row_of("aaaaaa")

    @pytest.mark.parametrize("text", ["nope", "bbbbb", "d999999", "../etc/passwd"])
    def test_unknown(self, searcher: Searcher, text: str) -> None:
        with pytest.raises(UnknownCellError, match="no indexed cell has id"):
            searcher.row_of(text)


class TestVoteAndFormat:
    table = pd.DataFrame(
        {
            "rank": [1, 2, 3],
            "row": [0, 1, 2],
            "cell_id": ["a" * 40, "b" * 40, "c" * 40],
            "patient_id": ["P1", None, "P2"],
            "cell_type": ["myeloblast", "myeloblast", None],
            "is_blast": pd.array([True, True, False], dtype="boolean"),
            "mutation": ["NPM1", "control", "NPM1"],
            "path": ["a.png", "b.png", "c.png"],
            "similarity": [0.9, 0.8, 0.7],
            "distance": [0.1, 0.2, 0.3],
        }
    )

    def test_vote_counts_labels_most_common_first(self) -> None:
        assert vote(self.table) == {
            "cell_type": [("myeloblast", 2)],
            "is_blast": [("blast", 2), ("non-blast", 1)],
            "mutation": [("NPM1", 2), ("control", 1)],
        }

    def test_text_table_and_vote_line(self) -> None:
        text = format_table(self.table)
        assert text.splitlines()[0].split() == [
            "rank",
            "cell",
            "patient",
            "cell_type",
            "blast",
            "mutation",
            "similarity",
            "path",
        ]
        assert "aaaaaaaaaaaa " in text and "0.9000" in text and " - " in text
        assert format_vote(self.table) == (
            "k-NN vote: cell_type: myeloblast 2/3; is_blast: blast 2/3, non-blast 1/3; mutation: NPM1 2/3, control 1/3"
        )


class TestBatchingEmbedder:
    def test_concurrent_calls_get_their_own_vectors_equal_to_embed_images(self, tmp_path: Path) -> None:
        from marrowlens.cohort.images import load_rgb

        model, info = load_backbone("test_resnet", image_size=32)
        images = [load_rgb(write_cell(tmp_path / f"{i}.png", seed=i, size=24 + i)) for i in range(12)]
        expected = embed_images(model, info, images)
        batcher = BatchingEmbedder(model, eval_transform(info.preprocessing), max_batch=5)
        results: dict[int, np.ndarray] = {}

        def work(i: int) -> None:
            results[i] = batcher.embed([images[i]])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batcher.close()
        for i in range(12):
            np.testing.assert_allclose(results[i][0], expected[i], rtol=1e-4, atol=1e-5)

    def test_a_failing_pass_fails_its_requests_only(self, tmp_path: Path) -> None:
        from PIL import Image

        model, info = load_backbone("test_resnet", image_size=32)
        batcher = BatchingEmbedder(model, eval_transform(info.preprocessing))
        original = batcher.model
        batcher.model = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            batcher.embed([Image.new("RGB", (32, 32))])
        batcher.model = original
        assert batcher.embed([Image.new("RGB", (32, 32))]).shape == (1, info.num_features)
        batcher.close()
