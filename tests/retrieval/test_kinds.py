"""The INDEX_KINDS registry: config's list of kinds, dispatch of every kind, and a kind added by a test alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from pydantic import Field

from marrowlens.config import INDEX_KIND_NAMES, IndexStageConfig
from marrowlens.errors import MarrowLensError
from marrowlens.retrieval.index import build_index, choose_kind, load_index
from marrowlens.retrieval.kinds import INDEX_KINDS, IndexKind, SampleDrawer, _Params
from tests.conftest import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store") / "emb"
    make_store(folder, n=600, dim=32, seed=0)
    return folder


class SQ8Params(_Params):
    train_size: int = Field(300, ge=1)


class SQ8(IndexKind):
    """A kind no module knows of: 8-bit scalar quantisation, trained on a sample."""

    name = "sq8"
    Params = SQ8Params
    auto_up_to = 100

    def factory(self, params: dict[str, Any]) -> str:
        return "SQ8"

    def prepare(self, index: faiss.Index, params: dict[str, Any], draw: SampleDrawer) -> None:
        index.train(draw(params["train_size"], 0))


def test_the_registry_is_configs_list() -> None:
    assert tuple(INDEX_KINDS) == INDEX_KIND_NAMES
    assert all(INDEX_KINDS[name].name == name for name in INDEX_KIND_NAMES)  # meta.json records the name
    for name in ("auto", *INDEX_KIND_NAMES):
        assert IndexStageConfig(kind=name).kind == name
    with pytest.raises(ValueError):
        IndexStageConfig(kind="sq8")


@pytest.mark.parametrize("kind", INDEX_KIND_NAMES)
def test_every_kind_builds_loads_and_searches(store: Path, tmp_path: Path, kind: str) -> None:
    built = build_index(store, tmp_path / "idx", kind=kind)
    loaded = load_index(tmp_path / "idx")
    assert loaded.kind == kind and loaded.params == built.params
    assert tuple(loaded.params) == INDEX_KINDS[kind].param_keys
    vectors = np.load(store / "vectors.npy")[:20]
    np.testing.assert_array_equal(loaded.search(vectors, 5)[1], built.search(vectors, 5)[1])
    assert loaded.exhaustive(10**6)


@pytest.mark.parametrize("kind", INDEX_KIND_NAMES)
def test_a_key_the_kind_does_not_take_names_those_it_does(store: Path, tmp_path: Path, kind: str) -> None:
    takes = ", ".join(INDEX_KINDS[kind].param_keys) or "none"
    with pytest.raises(MarrowLensError, match=rf"bogus do not apply to a {kind} index \(it takes: {takes}\)$"):
        build_index(store, tmp_path / "idx", kind=kind, overrides=["bogus=1"])


def test_an_ivfpq_folder_with_the_older_parameter_order_loads(store: Path, tmp_path: Path) -> None:
    build_index(store, tmp_path / "idx", kind="ivfpq")
    meta_path = tmp_path / "idx" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["params"] = {key: meta["params"][key] for key in ("nlist", "nprobe", "train_size", "pq_m", "pq_nbits", "seed")}
    meta_path.write_text(json.dumps(meta))
    loaded = load_index(tmp_path / "idx")
    assert loaded.search(np.load(store / "vectors.npy")[:3], 1)[1].shape == (3, 1)


def test_a_registered_kind_needs_no_other_change(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(INDEX_KINDS, "sq8", SQ8())
    built = build_index(store, tmp_path / "idx", kind="sq8", overrides=["train_size=200"])
    assert built.meta.factory == "IDMap2,SQ8" and built.params == {"train_size": 200}
    loaded = load_index(tmp_path / "idx")
    vectors = np.load(store / "vectors.npy")
    rows = np.arange(0, 600, 37)
    assert (loaded.search(vectors[rows], 1)[1][:, 0] == rows).all()
    assert choose_kind(100) == "sq8" and choose_kind(101) == "flat"  # its auto rule joins the others
    with pytest.raises(MarrowLensError, match=r"it takes: train_size\)"):
        build_index(store, tmp_path / "idx2", kind="sq8", overrides=["nprobe=2"])
