import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.artifacts import sha256_file
from marrowlens.contracts import EmbeddingsOrigin
from marrowlens.embeddings import EmbeddingWriter, load_embeddings, write_embeddings
from marrowlens.errors import MarrowLensError


def _cells(n: int) -> pd.DataFrame:
    return pd.DataFrame({"cell_id": [f"c{i}" for i in range(n)], "patient_id": ["p"] * n})


META = EmbeddingsOrigin.model_validate(
    {
        "model": {
            "timm_name": "test_resnet",
            "image_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "num_features": 4,
            "fingerprint": "sha256:abc",
            "source": "random init",
        }
    }
)


class TestEmbeddingWriter:
    def test_out_of_order_batches_land_on_their_rows(self, tmp_path: Path) -> None:
        vectors = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
        writer = EmbeddingWriter(tmp_path, 10, 4, key={"k": 1})
        for rows in ([7, 3, 9], [0, 1, 2], [4, 5, 6, 8]):
            writer.write(np.array(rows), vectors[rows])
        store = writer.finish(_cells(10), META)
        np.testing.assert_array_equal(np.asarray(store.vectors), vectors)
        assert store.fingerprint.startswith("sha256:") and store.meta.dim == 4
        assert isinstance(store.vectors, np.memmap)
        assert not (tmp_path / "vectors.partial.npy").exists()

    def test_resume_keeps_written_rows_and_lists_the_rest(self, tmp_path: Path) -> None:
        vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
        first = EmbeddingWriter(tmp_path, 6, 4, key={"k": 1})
        first.write(np.array([0, 1, 2]), vectors[:3])
        first.close()  # the process dies here
        second = EmbeddingWriter(tmp_path, 6, 4, key={"k": 1})
        assert second.pending().tolist() == [3, 4, 5]
        second.write(np.array([3, 4, 5]), vectors[3:])
        np.testing.assert_array_equal(second.finish(_cells(6), META).vectors, vectors)

    def test_resume_with_other_inputs_is_refused(self, tmp_path: Path) -> None:
        EmbeddingWriter(tmp_path, 6, 4, key={"model": "a"}).close()
        with pytest.raises(MarrowLensError, match="unfinished embedding of other inputs"):
            EmbeddingWriter(tmp_path, 6, 4, key={"model": "b"})

    def test_finish_refuses_missing_rows(self, tmp_path: Path) -> None:
        writer = EmbeddingWriter(tmp_path, 3, 2, key={})
        writer.write(np.array([0]), np.zeros((1, 2)))
        with pytest.raises(MarrowLensError, match="2 rows were never embedded"):
            writer.finish(_cells(3), META)


class TestLoad:
    def test_nan_rows_are_refused_by_name(self, tmp_path: Path) -> None:
        vectors = np.ones((5, 3), dtype=np.float32)
        vectors[3, 1] = np.nan
        writer = EmbeddingWriter(tmp_path, 5, 3, key={})
        with pytest.raises(MarrowLensError, match="row 3 holds NaN or inf"):
            writer.write(np.arange(5)[::-1], vectors[::-1])
        assert writer.pending().tolist() == [0, 1, 2, 3, 4]
        writer.write(np.arange(5), np.ones((5, 3)))
        writer.finish(_cells(5), META)
        on_disk = np.load(tmp_path / "vectors.npy", mmap_mode="r+")
        on_disk[3, 1] = np.inf  # damaged after it was written
        on_disk.flush()
        del on_disk
        with pytest.raises(MarrowLensError, match="row 3 .*c3.* NaN or inf"):
            load_embeddings(tmp_path)
        with pytest.raises(MarrowLensError, match="vectors.npy does not match the fingerprint"):
            load_embeddings(tmp_path, check_finite=False)

    def test_misaligned_store_is_refused(self, tmp_path: Path) -> None:
        write_embeddings(tmp_path, np.zeros((4, 2), dtype=np.float32), _cells(4), META)
        _cells(3).to_parquet(tmp_path / "cells.parquet")
        with pytest.raises(MarrowLensError, match="4 vectors but 3 cells"):
            load_embeddings(tmp_path)

    def test_not_a_store(self, tmp_path: Path) -> None:
        with pytest.raises(MarrowLensError, match="meta.json is missing"):
            load_embeddings(tmp_path)


class TestFingerprint:
    def test_reordered_cell_table_is_refused_by_name(self, tmp_path: Path) -> None:
        store = write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        store.cells.iloc[::-1].to_parquet(tmp_path / "cells.parquet", index=False)
        with pytest.raises(MarrowLensError, match="cells.parquet does not match the fingerprint"):
            load_embeddings(tmp_path)

    def test_replaced_vectors_of_the_same_shape_are_refused(self, tmp_path: Path) -> None:
        write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        np.save(tmp_path / "vectors.npy", np.eye(4, dtype=np.float32)[::-1])
        with pytest.raises(MarrowLensError, match="vectors.npy does not match the fingerprint"):
            load_embeddings(tmp_path)

    def test_fingerprint_names_vectors_and_cells(self, tmp_path: Path) -> None:
        vectors = np.eye(4, dtype=np.float32)
        first = write_embeddings(tmp_path / "a", vectors, _cells(4), META)
        relabelled = _cells(4).assign(patient_id=["q"] * 4)
        assert write_embeddings(tmp_path / "b", vectors, relabelled, META).fingerprint != first.fingerprint
        assert write_embeddings(tmp_path / "c", vectors, _cells(4), META).fingerprint == first.fingerprint

    def test_unchanged_store_is_not_hashed_again(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from marrowlens import embeddings

        write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        hashed = []
        monkeypatch.setattr(embeddings, "sha256_file", lambda path: hashed.append(path) or "sha256:x")
        load_embeddings(tmp_path)
        assert hashed == []
        (tmp_path / "cells.parquet").touch()  # stats changed: the record is stale, hash again
        with pytest.raises(MarrowLensError, match="does not match the fingerprint"):
            load_embeddings(tmp_path)
        assert hashed

    def test_a_stale_record_does_not_vouch_for_a_replaced_file(self, tmp_path: Path) -> None:
        write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        cells = tmp_path / "cells.parquet"
        before = cells.stat()
        _cells(4).iloc[::-1].to_parquet(cells, index=False)
        os.utime(cells, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime; ctime cannot be set back
        with pytest.raises(MarrowLensError, match="cells.parquet does not match"):
            load_embeddings(tmp_path)

    def test_store_from_before_cell_fingerprints_asks_to_re_embed(self, tmp_path: Path) -> None:
        write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        meta = json.loads((tmp_path / "meta.json").read_text())
        del meta["digests"]
        meta["fingerprint"] = "sha256:" + sha256_file(tmp_path / "vectors.npy")  # what older versions wrote
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(MarrowLensError, match="embed it again with --overwrite"):
            load_embeddings(tmp_path)

    def test_truncated_cell_table(self, tmp_path: Path) -> None:
        write_embeddings(tmp_path, np.eye(4, dtype=np.float32), _cells(4), META)
        cells = tmp_path / "cells.parquet"
        cells.write_bytes(cells.read_bytes()[:40])
        with pytest.raises(MarrowLensError, match="cells.parquet is not a readable parquet table"):
            load_embeddings(tmp_path)


def test_writer_cleans_what_a_killed_run_left(tmp_path: Path) -> None:
    stale = tmp_path / ".cells.parquet.k2j_x9ab.tmp"
    stale.write_bytes(b"half a table")
    os.utime(stale, (0, 0))
    EmbeddingWriter(tmp_path, 2, 2, key={}).close()
    assert not stale.exists() and (tmp_path / "vectors.partial.npy").exists()
