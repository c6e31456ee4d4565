from pathlib import Path

import pytest

from marrowlens.artifacts import atomic_path, prepare_out_dir, read_meta, require_same_fingerprint, write_meta
from marrowlens.errors import MarrowLensError


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_meta_round_trip_and_kind_check(tmp_path: Path) -> None:
    write_meta(tmp_path, "index", count=3)
    assert read_meta(tmp_path, "index")["count"] == 3
    with pytest.raises(MarrowLensError, match="holds a 'index' artifact, expected 'embeddings'"):
        read_meta(tmp_path, "embeddings")


def test_fingerprint_mismatch_names_both_sides() -> None:
    with pytest.raises(MarrowLensError, match="idx/ has 111111111111 but emb/ has 222222222222"):
        require_same_fingerprint("model", "sha256:" + "1" * 64, "idx/", "sha256:" + "2" * 64, "emb/")


def test_prepare_out_dir_refuses_finished_artifacts(tmp_path: Path) -> None:
    write_meta(tmp_path, "probe")
    with pytest.raises(MarrowLensError, match="--overwrite"):
        prepare_out_dir(tmp_path, overwrite=False)
    assert prepare_out_dir(tmp_path, overwrite=True) == tmp_path
