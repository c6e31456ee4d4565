"""The probe folder: ``head.safetensors`` + ``probe.json`` + ``config.yaml`` + ``meta.json`` (no pickles).

- Each head (``heads.HEADS``) saves and rebuilds itself; ``probe.json`` records its registry name
  under ``head``, and loading dispatches on that name. Linear heads store their weights and the
  feature standardisation; k-NN heads their training rows and labels, their vectors re-read from the
  store the probe names (or from ``--embeddings`` when it *is* that store, by fingerprint); a store
  that moved or changed is an error naming it.
- A mutation probe carries a copy of the blast probe it filtered with, in ``blast_filter/``, so it
  applies the same filter wherever it goes, and its patient head: ``probe.json`` records the head's
  registry name, parameters and fit, ``patient_head.safetensors`` its weights when it has any. A
  mutation probe from before patient heads pools with ``mean``, as it did.

``probe.json`` records the task, classes, head parameters, loss, and the embedding and model
fingerprints; applying a probe to embeddings of another model is refused, naming both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.torch import load_file, save_file

from marrowlens.artifacts import (
    atomic_path,
    read_meta,
    require_same_fingerprint,
    sha256_file,
    write_json_atomic,
    write_meta,
)
from marrowlens.config import ProbeConfig, dump_config, validate_config
from marrowlens.contracts import ModelRef, ProbeMeta, StoreRef
from marrowlens.embeddings import Embeddings, load_embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.probes.heads import head_class
from marrowlens.probes.patients import PatientHead, patient_head_class
from marrowlens.probes.pooling import MeanPooling
from marrowlens.probes.tasks import Probe

PROBE_FILE = "probe.json"
HEAD_FILE = "head.safetensors"
PATIENT_HEAD_FILE = "patient_head.safetensors"
CONFIG_FILE = "config.yaml"
BLAST_DIR = "blast_filter"


def save_probe(folder: Path, probe: Probe, emb: Embeddings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the head, its description and its config (and the blast filter) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = probe.head.saved_tensors(probe.train_rows, probe.train_labels, probe.classes)
    with atomic_path(folder / HEAD_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    kind = type(probe.head)  # the fitted head's own class names itself, whatever the config says
    params = kind.config_params(probe.config)
    labels, counts = np.unique(probe.train_labels, return_counts=True)
    info = {
        "task": probe.config.task,
        "classes": list(probe.classes),
        "head": kind.name,
        "head_params": params,
        "fitted": probe.head.fitted_state(),
        "loss": probe.config.loss.name if kind.trains_with_loss else None,
        "fingerprint": "sha256:" + sha256_file(folder / HEAD_FILE),
        "embeddings": {"folder": str(Path(emb.folder).resolve()), "fingerprint": emb.fingerprint},
        "model_fingerprint": emb.model_fingerprint,
        "train": {"cells": len(probe.train_rows), "class_counts": {str(k): int(v) for k, v in zip(labels, counts)}},
        "blast_filter": None,
        "patient_head": _save_patient_head(folder, probe),
        **probe.notes,
        **(extra or {}),
    }
    if probe.blast is not None:
        blast_info = (
            save_probe(folder / BLAST_DIR, probe.blast, emb)
            if probe.blast.source is None
            else copy_probe(probe.blast.source, folder / BLAST_DIR)
        )
        info["blast_filter"] = {
            "folder": BLAST_DIR,
            "copied_from": str(probe.blast.source) if probe.blast.source else None,
            "fingerprint": blast_info["fingerprint"],
            "threshold": probe.config.mutation.blast_threshold,
        }
    dump_config(probe.config, folder / CONFIG_FILE)
    write_json_atomic(folder / PROBE_FILE, info)
    meta = ProbeMeta(
        task=info["task"],
        fingerprint=info["fingerprint"],
        embeddings=StoreRef.model_validate(info["embeddings"]),
        model=ModelRef(fingerprint=info["model_fingerprint"]),
    )
    write_meta(folder, meta)
    return info


def _save_patient_head(folder: Path, probe: Probe) -> dict[str, Any] | None:
    head = probe.patient_head
    if head is None:
        return None
    tensors = head.saved_tensors()
    (folder / PATIENT_HEAD_FILE).unlink(missing_ok=True)
    if tensors:
        with atomic_path(folder / PATIENT_HEAD_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {
        "name": head.name,
        "params": type(head).config_params(probe.config),
        "fitted": head.fitted_state(),
        "fingerprint": "sha256:" + sha256_file(folder / PATIENT_HEAD_FILE) if tensors else None,
    }


def _load_patient_head(folder: Path, info: dict[str, Any]) -> PatientHead | None:
    saved = info.get("patient_head")
    if saved is None:
        return MeanPooling() if info["task"] == "mutation" else None
    kind = patient_head_class(saved["name"], str(folder / PROBE_FILE))
    tensors = {}
    if saved.get("fingerprint"):
        path = folder / PATIENT_HEAD_FILE
        if not path.is_file() or "sha256:" + sha256_file(path) != saved["fingerprint"]:
            raise MarrowLensError(
                f"{path} is missing or does not match the fingerprint in {PROBE_FILE}: the probe was changed or damaged"
            )
        tensors = load_file(str(path))
    try:
        return kind.from_saved(saved["params"], saved["fitted"], tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MarrowLensError(
            f"{folder}: its {saved['name']} patient head does not load ({exc}); re-fit the probe"
        ) from None


def copy_probe(source: Path, target: Path) -> dict[str, Any]:
    """Copy a probe's own files (not its reports) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (HEAD_FILE, PATIENT_HEAD_FILE, CONFIG_FILE, PROBE_FILE, "meta.json"):
        if name == PATIENT_HEAD_FILE and not (Path(source) / name).is_file():
            continue
        with atomic_path(target / name) as tmp:
            tmp.write_bytes((Path(source) / name).read_bytes())
    nested = Path(source) / BLAST_DIR
    if nested.is_dir():
        copy_probe(nested, target / BLAST_DIR)
    return read_probe_info(target)


def read_probe_info(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    read_meta(folder, ProbeMeta)
    try:
        info: dict[str, Any] = json.loads((folder / PROBE_FILE).read_text())
        return info
    except (OSError, json.JSONDecodeError) as exc:
        raise MarrowLensError(f"{folder / PROBE_FILE} is unreadable: {exc}") from exc


def require_same_model(info: dict[str, Any], folder: Path, emb: Embeddings) -> None:
    """A probe only applies to embeddings made by the model it was trained on."""
    require_same_fingerprint(
        "model fingerprint",
        info["model_fingerprint"],
        f"probe {folder}",
        emb.model_fingerprint,
        f"embeddings {emb.folder}",
    )


def load_probe(folder: str | Path, emb: Embeddings) -> tuple[Probe, dict[str, Any]]:
    """Load a probe to apply to ``emb`` (same model required); k-NN re-reads its training vectors."""
    folder = Path(folder)
    info = read_probe_info(folder)
    require_same_model(info, folder, emb)
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise MarrowLensError(f"{folder} is incomplete: {HEAD_FILE} is missing")
    if "sha256:" + sha256_file(head_path) != info["fingerprint"]:
        raise MarrowLensError(
            f"{head_path} does not match the fingerprint in {PROBE_FILE}: the probe was changed or damaged"
        )
    try:
        config = validate_config(
            ProbeConfig, yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}, str(folder / CONFIG_FILE)
        )
    except OSError as exc:
        raise MarrowLensError(f"{folder / CONFIG_FILE} is unreadable: {exc}") from exc
    kind = head_class(info["head"], str(folder / PROBE_FILE))
    tensors = load_file(str(head_path))
    classes = list(info["classes"])
    rows, labels = kind.saved_training_set(classes, tensors)
    head = kind.from_saved(info["head_params"], classes, tensors, lambda: training_vectors(info, folder, emb))
    probe = Probe(config=config, head=head, classes=classes, train_rows=rows, train_labels=labels, source=folder)
    probe.patient_head = _load_patient_head(folder, info)
    if info.get("blast_filter"):
        probe.blast, _ = load_probe(folder / info["blast_filter"]["folder"], emb)
    return probe, info


def training_vectors(info: dict[str, Any], folder: Path, emb: Embeddings) -> np.ndarray:
    """The k-NN head's training store: ``emb`` when it is that store, else the recorded one."""
    expected = info["embeddings"]["fingerprint"]
    if emb.fingerprint == expected:
        return emb.vectors
    where = Path(info["embeddings"]["folder"])
    try:
        store = load_embeddings(where, check_finite=False)
    except MarrowLensError as exc:
        raise MarrowLensError(
            f"k-NN probe {folder} needs its training embeddings {where}, which cannot be read ({exc})"
        ) from None
    require_same_fingerprint(
        "embedding fingerprint", expected, f"k-NN probe {folder}", store.fingerprint, f"its training store {where}"
    )
    return store.vectors
