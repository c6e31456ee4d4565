"""The HEADS registry: config's list of heads, save/load of every head, old probe folders, and a head added by a
test alone."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from marrowlens.config import HEAD_NAMES, ProbeConfig
from marrowlens.embeddings import Embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.probes import heads as heads_module
from marrowlens.probes.folder import PROBE_FILE, load_probe, save_probe
from marrowlens.probes.heads import Head, as_rows, make_head
from marrowlens.probes.tasks import Probe, fit_head
from tests.probes.helpers import synthetic_store

# probe.json as the release before the registry wrote it (keys, and the head's name under "head").
OLD_PROBE_KEYS = {
    "task",
    "classes",
    "head",
    "head_params",
    "fitted",
    "loss",
    "fingerprint",
    "embeddings",
    "model_fingerprint",
    "train",
    "blast_filter",
}


@pytest.fixture(scope="module")
def emb(tmp_path_factory: pytest.TempPathFactory) -> Embeddings:
    return synthetic_store(tmp_path_factory.mktemp("probes") / "emb", patients_per_class=3, cells_per_patient=10)


def _fit(emb: Embeddings, head: str):
    # solver torch: the "linear" entry is the torch head (scikit-learn's is registered as "logistic")
    linear = {"solver": "torch", "max_epochs": 5, "patience": 2, "weight_decays": [1e-4]}
    config = ProbeConfig(head=head, linear=linear)
    labels = np.where(emb.cells["is_blast"].to_numpy(dtype=bool), "blast", "non_blast")
    rows = np.arange(len(labels))
    return fit_head(config, emb.vectors, rows, labels, emb.cells["patient_id"].to_numpy(), ["blast", "non_blast"])


def test_the_registry_is_configs_list() -> None:
    assert tuple(heads_module.HEADS) == HEAD_NAMES
    for name in HEAD_NAMES:
        assert ProbeConfig(head=name).head == name
        assert heads_module.HEADS[name].name == name  # what probe.json records is the table's name


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_every_head_round_trips(emb: Embeddings, tmp_path: Path, head: str) -> None:
    probe = _fit(emb, head)
    info = save_probe(tmp_path / "p", probe, emb)
    assert info["head"] == head and set(info) >= OLD_PROBE_KEYS
    loaded, _ = load_probe(tmp_path / "p", emb)
    assert type(loaded.head) is type(probe.head)
    np.testing.assert_allclose(loaded.proba(emb.vectors), probe.proba(emb.vectors), atol=1e-6)
    np.testing.assert_array_equal(loaded.train_rows, probe.train_rows if head == "knn" else np.zeros(0))


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_a_folder_in_the_older_format_loads(emb: Embeddings, tmp_path: Path, head: str) -> None:
    probe = _fit(emb, head)
    save_probe(tmp_path / "p", probe, emb)
    path = tmp_path / "p" / PROBE_FILE
    info = json.loads(path.read_text())
    path.write_text(json.dumps({key: info[key] for key in OLD_PROBE_KEYS}))  # nothing the registry added
    loaded, _ = load_probe(tmp_path / "p", emb)
    np.testing.assert_allclose(loaded.proba(emb.vectors), probe.proba(emb.vectors), atol=1e-6)


def test_an_unknown_head_is_a_one_line_error(emb: Embeddings, tmp_path: Path) -> None:
    save_probe(tmp_path / "p", _fit(emb, "knn"), emb)
    path = tmp_path / "p" / PROBE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "head": "mil"}))
    with pytest.raises(MarrowLensError, match=r"head 'mil'.*known: linear, knn, logistic\)$"):
        load_probe(tmp_path / "p", emb)


class CentroidHead(Head):
    """A head no module knows of: the nearest class mean, saved as the means."""

    name = "centroid"

    @classmethod
    def config_params(cls, config: ProbeConfig) -> dict[str, Any]:
        return {}

    def fit(self, X: Any, y: Sequence[Any], groups: Any = None) -> CentroidHead:
        self.classes_ = np.unique(np.asarray(y, dtype=str))
        x = as_rows(X)
        self.means_ = np.stack([x[np.asarray(y) == c].mean(0) for c in self.classes_])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        scores = -((as_rows(X)[:, None] - self.means_[None]) ** 2).sum(-1)
        scores = np.exp(scores - scores.max(1, keepdims=True))
        return scores / scores.sum(1, keepdims=True)

    def fitted_state(self) -> dict[str, Any]:
        return {"classes": len(self.classes_)}

    def saved_tensors(
        self, train_rows: np.ndarray, train_labels: np.ndarray, classes: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        return {"means": torch.from_numpy(self.means_)}

    @classmethod
    def from_saved(
        cls,
        params: dict[str, Any],
        classes: Sequence[str],
        tensors: dict[str, torch.Tensor],
        training_vectors: Callable[[], np.ndarray] | None = None,
    ) -> CentroidHead:
        head = cls()
        head.classes_, head.means_ = np.asarray(classes, dtype=object), tensors["means"].numpy()
        return head


def test_a_registered_head_needs_no_other_change(
    emb: Embeddings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(heads_module.HEADS, "centroid", CentroidHead)
    labels = np.where(emb.cells["is_blast"].to_numpy(dtype=bool), "blast", "non_blast")
    head = make_head("centroid", {}).fit(emb.vectors, labels)
    probe = Probe(
        config=ProbeConfig(),
        head=head,
        classes=["blast", "non_blast"],
        train_rows=np.arange(len(labels)),
        train_labels=labels,
    )
    info = save_probe(tmp_path / "p", probe, emb)
    assert info["head"] == "centroid" and info["loss"] is None and info["fitted"] == {"classes": 2}
    loaded, _ = load_probe(tmp_path / "p", emb)
    assert isinstance(loaded.head, CentroidHead) and len(loaded.train_rows) == 0
    np.testing.assert_allclose(loaded.proba(emb.vectors), probe.proba(emb.vectors))
