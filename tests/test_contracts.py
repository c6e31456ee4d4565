"""The meta.json models: every kind round-trips, folders earlier releases wrote still load, others are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from marrowlens import __version__
from marrowlens.artifacts import read_meta, write_meta
from marrowlens.contracts import (
    KINDS,
    BackboneRecord,
    CheckSubsetRecord,
    CohortMeta,
    CohortRef,
    CohortSource,
    EmbeddingsMeta,
    IndexFiles,
    IndexMeta,
    IndexSource,
    Meta,
    ModelRef,
    NoiseSweepMeta,
    ProbeMeta,
    ProbeTestMeta,
    RunMeta,
    SourceCohort,
    StorePreprocessing,
    StoreRef,
    StudyMeta,
    SweptStore,
    TestedProbe,
)
from marrowlens.errors import MarrowLensError

FP = "sha256:" + "ab" * 32
BACKBONE = BackboneRecord(
    timm_name="resnet18",
    image_size=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    num_features=512,
    fingerprint=FP,
    source="/runs/simclr",
)
COHORT = CohortRef(folder="/data/cohort", fingerprint="cd" * 32)
PREPROCESSING = StorePreprocessing(
    pad_to_square=True,
    image_size=224,
    mean=BACKBONE.mean,
    std=BACKBONE.std,
    stain={"method": "reinhard", "mean": [70.0, 20.0, -10.0], "std": [15.0, 8.0, 6.0]},
)
EXAMPLES: dict[str, Meta] = {
    "cohort": CohortMeta(
        root="/data/aml",
        root_relative="../aml",
        sources=[CohortSource(path="/data/aml", layout="mutation_patient")],
        n_cells=12,
        n_quarantined=1,
        n_patients=4,
        mutation_map={"APL": "PML_RARA"},
        counts={"mutation": {"NPM1": 6, "control": 6}},
        fingerprint="cd" * 32,
        synthetic={"seed": 0, "patients": 4},
    ),
    "run": RunMeta(
        method="simclr",
        backbone=BACKBONE,
        cohort=COHORT,
        epochs=2,
        global_step=8,
        world_size=1,
        global_batch=16,
        lr=0.0375,
        metrics={"train_loss_epoch": 4.5},
        check_subset=CheckSubsetRecord(label="cell_type", classes=["blast", "lymphocyte"]),
    ),
    "embeddings": EmbeddingsMeta(
        n=12,
        dim=512,
        fingerprint=FP,
        digests={"vectors.npy": FP, "cells.parquet": FP},
        model=BACKBONE,
        cohort=COHORT,
        preprocessing=PREPROCESSING,
    ),
    "probe": ProbeMeta(
        task="blast", fingerprint=FP, embeddings=StoreRef(folder="/emb", fingerprint=FP), model=ModelRef(fingerprint=FP)
    ),
    "probe-test": ProbeTestMeta(
        task="mutation",
        probe=TestedProbe(folder="/probes/apl", fingerprint=FP, trained_on=StoreRef(folder="/emb", fingerprint=FP)),
        embeddings=StoreRef(folder="/test/emb", fingerprint="ef" * 32),
        model=ModelRef(fingerprint=FP),
    ),
    "noise-sweep": NoiseSweepMeta(embeddings=SweptStore(fingerprint=FP, model_fingerprint=FP), task="mutation"),
    "index": IndexMeta(
        index_kind="flat",
        requested_kind="auto",
        factory="IDMap2,Flat",
        metric="cosine",
        params={},
        count=12,
        dim=512,
        model=BACKBONE,
        preprocessing=PREPROCESSING,
        sources=[
            IndexSource(
                embeddings="/emb",
                fingerprint=FP,
                first_row=0,
                count=12,
                cohort=SourceCohort(folder="/data/cohort", fingerprint="cd" * 32, root="/data/aml"),
            )
        ],
        version=1,
        files=IndexFiles(index="index.1.faiss", cells="cells.1.parquet"),
    ),
    "study": StudyMeta(cohort=COHORT, stages={"pretrain": "0123456789abcdef"}),
}

_MADE = {"marrowlens_version": "0.1.0", "created": "2026-11-02T09:14:03+00:00", "command": "marrowlens x"}
_MODEL = {
    "timm_name": "resnet18",
    "image_size": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "num_features": 512,
    "fingerprint": FP,
    "source": "/runs/simclr",
}
_PREPROCESSING = {"pad_to_square": True, "image_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3, "stain": None}
# What the release before these models wrote (artifacts.meta_record and its callers), kind by kind.
OLD_FORMAT: dict[str, dict[str, Any]] = {
    "cohort": {
        "kind": "cohort",
        **_MADE,
        "root": "/data/aml",
        "root_relative": "../aml",
        "sources": [{"path": "/data/aml", "layout": "mutation_patient"}],
        "n_cells": 12,
        "n_quarantined": 0,
        "n_patients": 4,
        "mutation_map": {},
        "counts": {"mutation": {"NPM1": 6, "control": 6}, "is_blast": {"False": 4, "True": 8}},
        "fingerprint": "cd" * 32,
    },
    "run": {
        "kind": "run",
        **_MADE,
        "method": "dino",
        "backbone": _MODEL,
        "cohort": {"folder": "/data/cohort", "fingerprint": "cd" * 32},
        "epochs": 1,
        "global_step": 4,
        "world_size": 1,
        "global_batch": 16,
        "lr": 0.001,
        "metrics": {"train_loss_epoch": 3.2, "lr-AdamW": 0.001},
        "check_subset": None,
    },
    "embeddings": {
        "kind": "embeddings",
        **_MADE,
        "n": 12,
        "dim": 512,
        "fingerprint": FP,
        "digests": {"vectors.npy": FP, "cells.parquet": FP},
        "model": _MODEL,
        "cohort": {"folder": "/data/cohort", "fingerprint": "cd" * 32},
        "preprocessing": _PREPROCESSING,
    },
    "probe": {
        "kind": "probe",
        **_MADE,
        "task": "mutation",
        "fingerprint": FP,
        "embeddings": {"folder": "/emb", "fingerprint": FP},
        "model": {"fingerprint": FP},
    },
    "probe-test": {  # new with this kind: the layout it was introduced with
        "kind": "probe-test",
        **_MADE,
        "task": "blast",
        "probe": {"folder": "/probes/blast", "fingerprint": FP, "trained_on": {"folder": "/emb", "fingerprint": FP}},
        "embeddings": {"folder": "/test/emb", "fingerprint": FP},
        "model": {"fingerprint": FP},
    },
    "noise-sweep": {
        "kind": "noise-sweep",
        **_MADE,
        "embeddings": {"fingerprint": FP, "model_fingerprint": FP},
        "task": "blast",
    },
    "index": {  # of a store written without preprocessing, from before versioned files
        "kind": "index",
        **_MADE,
        "index_kind": "ivf",
        "requested_kind": "ivf",
        "factory": "IDMap2,IVF10,Flat",
        "metric": "l2",
        "params": {"nlist": 10, "nprobe": 4},
        "count": 12,
        "dim": 512,
        "model": _MODEL,
        "preprocessing": {},
        "sources": [
            {
                "embeddings": "/emb",
                "fingerprint": FP,
                "first_row": 0,
                "count": 12,
                "cohort": {"folder": None, "fingerprint": None, "root": None},
            }
        ],
    },
    "study": {
        "kind": "study",
        **_MADE,
        "cohort": {"folder": "/data/cohort", "fingerprint": "cd" * 32},
        "stages": {"pretrain": "0123456789abcdef", "pretrain (started)": "0123456789abcdef"},
    },
}


def _write_json(folder: Path, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(data))
    return folder


def test_every_kind_has_a_model_and_examples() -> None:
    assert set(KINDS) == set(EXAMPLES) == set(OLD_FORMAT)
    assert all(KINDS[kind].kind_name() == kind == meta.kind for kind, meta in EXAMPLES.items())


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(kind: str, tmp_path: Path) -> None:
    meta = EXAMPLES[kind]
    assert write_meta(tmp_path, meta) is meta
    assert read_meta(tmp_path, type(meta)) == meta
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert list(on_disk)[:4] == ["kind", "marrowlens_version", "created", "command"]
    assert on_disk["marrowlens_version"] == __version__


@pytest.mark.parametrize("kind", sorted(OLD_FORMAT))
def test_folders_of_the_release_before_load(kind: str, tmp_path: Path) -> None:
    meta = read_meta(_write_json(tmp_path, OLD_FORMAT[kind]), KINDS[kind])
    assert meta.kind == kind and meta.marrowlens_version == "0.1.0" and meta.command == "marrowlens x"


def test_old_formats_read_as_typed_fields(tmp_path: Path) -> None:
    index = read_meta(_write_json(tmp_path / "idx", OLD_FORMAT["index"]), IndexMeta)
    assert index.preprocessing is None and index.files is None and index.version == 0
    assert index.sources[0].cohort.root is None and index.model.mean == (0.485, 0.456, 0.406)
    cohort = read_meta(_write_json(tmp_path / "cohort", OLD_FORMAT["cohort"]), CohortMeta)
    assert cohort.synthetic is None and cohort.counts["is_blast"] == {"False": 4, "True": 8}
    assert "synthetic" not in json.loads(cohort.model_dump_json())  # not written for a cohort of real images


def test_fields_a_newer_release_added_are_ignored(tmp_path: Path) -> None:
    data = {**OLD_FORMAT["probe"], "marrowlens_version": "0.9.0", "calibration": {"method": "temperature"}}
    assert read_meta(_write_json(tmp_path, data), ProbeMeta).task == "mutation"


def test_another_kind_is_refused_by_name(tmp_path: Path) -> None:
    write_meta(tmp_path, EXAMPLES["index"])
    with pytest.raises(MarrowLensError, match="holds a 'index' artifact, expected 'embeddings'"):
        read_meta(tmp_path, EmbeddingsMeta)


def _one_line_error(folder: Path, model: type[Meta]) -> str:
    with pytest.raises(MarrowLensError) as caught:
        read_meta(folder, model)
    message = str(caught.value)
    assert "\n" not in message and str(folder / "meta.json") in message and "re-create" in message
    return message


def test_missing_field_names_the_release_that_wrote_it(tmp_path: Path) -> None:
    data = {key: value for key, value in OLD_FORMAT["embeddings"].items() if key != "dim"}
    message = _one_line_error(_write_json(tmp_path, {**data, "marrowlens_version": "0.0.3"}), EmbeddingsMeta)
    assert "written by MarrowLens 0.0.3" in message and f"read by MarrowLens {__version__}" in message
    assert "dim" in message


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    data = {**OLD_FORMAT["cohort"], "n_cells": "many", "sources": [{"path": 3}]}
    message = _one_line_error(_write_json(tmp_path, data), CohortMeta)
    assert "MarrowLens 0.1.0" in message and "at sources.0.path: " in message and "(and 2 more)" in message


@pytest.mark.parametrize("kind", ["hologram", ["probe"], None])
def test_unknown_kind_names_the_release(kind: object, tmp_path: Path) -> None:
    message = _one_line_error(_write_json(tmp_path, {**OLD_FORMAT["probe"], "kind": kind}), ProbeMeta)
    assert "MarrowLens 0.1.0" in message and f"it names kind {kind!r}" in message


def test_foreign_json_says_no_release_made_it(tmp_path: Path) -> None:
    message = _one_line_error(_write_json(tmp_path, {"kind": "cohort", "images": 12}), CohortMeta)
    assert "no known MarrowLens version" in message and "marrowlens_version" in message


def test_renewed_is_stamped_now_and_validated() -> None:
    old = CohortMeta.model_validate(OLD_FORMAT["cohort"])
    new = old.renewed(n_cells=11)
    assert (new.n_cells, new.marrowlens_version, new.root) == (11, __version__, old.root)
    assert new.created != old.created and new.command != old.command


def test_a_backbone_record_keeps_its_preprocessing_and_the_top_level_fields_older_readers_use() -> None:
    written = BACKBONE.model_dump(mode="json")
    assert written["preprocessing"]["image_size"] == written["image_size"] == 224
    assert written["mean"] == list(BACKBONE.preprocessing.mean)
    assert BackboneRecord.model_validate(written) == BACKBONE
    before_the_record = {k: v for k, v in written.items() if k not in ("preprocessing",)}
    assert BackboneRecord.model_validate(before_the_record).preprocessing == BACKBONE.preprocessing


def test_a_broken_backbone_json_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from marrowlens.ssl.backbones import INFO_FILE, load_backbone

    (tmp_path / INFO_FILE).write_text(json.dumps({"timm_name": "resnet18", "num_features": "many"}))
    with pytest.raises(MarrowLensError, match=r"backbone\.json is not a backbone record \(") as caught:
        load_backbone(tmp_path)
    assert "\n" not in str(caught.value)
