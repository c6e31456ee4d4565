import os
import stat
from pathlib import Path

import pytest

from marrowlens.artifacts import (
    atomic_path,
    clean_stale_temporaries,
    commit_files,
    prepare_out_dir,
    read_meta,
    require_same_fingerprint,
    write_meta,
    write_text_atomic,
)
from marrowlens.contracts import CohortMeta
from marrowlens.errors import MarrowLensError
from tests.test_contracts import EXAMPLES


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_fingerprint_mismatch_names_both_sides() -> None:
    with pytest.raises(MarrowLensError, match="idx/ has 111111111111 but emb/ has 222222222222"):
        require_same_fingerprint("model", "sha256:" + "1" * 64, "idx/", "sha256:" + "2" * 64, "emb/")


def test_prepare_out_dir_refuses_finished_artifacts(tmp_path: Path) -> None:
    write_meta(tmp_path, EXAMPLES["probe"])
    with pytest.raises(MarrowLensError, match="--overwrite"):
        prepare_out_dir(tmp_path, overwrite=False)
    assert prepare_out_dir(tmp_path, overwrite=True) == tmp_path


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")  # made like any other file
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)


def test_stale_temporaries_of_a_killed_run_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / ".index.faiss.k2j_x9ab.tmp"
    checkpoint = tmp_path / "last.ckpt.partial"
    for path in (stale, checkpoint, tmp_path / ".notes.tmp", tmp_path / "keep.tmp", tmp_path / "vectors.partial.npy"):
        path.write_text("x")
        os.utime(path, (0, 0))  # written long before this process started
    fresh = tmp_path / ".cells.parquet.abcd1234.tmp"  # another live writer's, modified just now
    fresh.write_text("x")
    with atomic_path(tmp_path / "meta.json") as mine:  # ours, still being written
        os.utime(mine, (0, 0))
        assert clean_stale_temporaries(tmp_path, ("*.ckpt.partial",)) == [stale, checkpoint]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cells.parquet.abcd1234.tmp",
        ".notes.tmp",
        "keep.tmp",
        "meta.json",
        "vectors.partial.npy",
    ]


def test_prepare_out_dir_cleans_stale_temporaries(tmp_path: Path) -> None:
    stale = tmp_path / ".cells.parquet.k2j_x9ab.tmp"
    stale.write_text("x")
    os.utime(stale, (0, 0))
    prepare_out_dir(tmp_path, overwrite=False)
    assert not stale.exists()


def test_meta_json_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(MarrowLensError, match="meta.json is not a MarrowLens meta.json: it holds a JSON list"):
        read_meta(tmp_path, CohortMeta)


def test_commit_files_swaps_all_or_nothing(tmp_path: Path) -> None:
    for name in ("a.txt", "meta.json"):
        (tmp_path / name).write_text("old")
    with pytest.raises(RuntimeError), commit_files(tmp_path, ["a.txt", "meta.json"]) as paths:
        paths["a.txt"].write_text("new")
        raise RuntimeError("validation failed")
    assert [(tmp_path / n).read_text() for n in ("a.txt", "meta.json")] == ["old", "old"]
    with commit_files(tmp_path, ["meta.json", "a.txt"]) as paths:
        for path in paths.values():
            path.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "meta.json"]
    assert [(tmp_path / n).read_text() for n in ("a.txt", "meta.json")] == ["new", "new"]


def test_commit_files_renames_meta_json_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meta.json").write_text("old")
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst).name) or real(src, dst))
    with commit_files(tmp_path, ["meta.json", "a.txt", "b.txt"]) as paths:
        for path in paths.values():
            path.write_text("new")
        assert (tmp_path / "meta.json").exists()
    assert renamed[-1] == "meta.json" and sorted(renamed) == ["a.txt", "b.txt", "meta.json"]
