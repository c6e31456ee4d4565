"""Atomic writes, ``meta.json`` and fingerprints: what makes every output folder trustworthy.

Every artifact is written to a temporary file beside its destination and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one. Every output folder
carries a ``meta.json`` saying what made it and from which inputs (by fingerprint), so later steps
can refuse inputs that do not belong together.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from marrowlens import __version__
from marrowlens.errors import MarrowLensError

META_FILE = "meta.json"
_CHUNK = 1 << 22


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_parquet_atomic(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file (weights, vectors): constant memory whatever the size."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits: enough to tell artifacts apart in a message.

    Fingerprints that are not digests (``random:NAME:seedS`` for an untrained backbone) stay whole.
    """
    if fingerprint.startswith("random:"):
        return fingerprint
    return fingerprint.split(":")[-1][:12]


def write_meta(folder: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write ``folder/meta.json`` recording what made the folder, and return it."""
    meta = {
        "kind": kind,
        "marrowlens_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **fields,
    }
    write_json_atomic(Path(folder) / META_FILE, meta)
    return meta


def read_meta(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read ``folder/meta.json``; refuse a folder that is not an artifact of the expected kind."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        what = f"a {kind} folder" if kind else "a MarrowLens folder"
        raise MarrowLensError(f"{folder} is not {what}: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MarrowLensError(f"{path} is unreadable: {exc}") from exc
    if kind is not None and meta.get("kind") != kind:
        raise MarrowLensError(f"{folder} holds a {meta.get('kind')!r} artifact, expected {kind!r}")
    return meta


def require_same_fingerprint(what: str, expected: str, expected_from: str, got: str, got_from: str) -> None:
    """Refuse to combine artifacts made from different inputs, naming both sides."""
    if expected != got:
        raise MarrowLensError(
            f"{what} mismatch: {expected_from} has {short(expected)} but {got_from} has {short(got)}"
        )


def prepare_out_dir(out: str | Path, overwrite: bool, marker: str = META_FILE) -> Path:
    """Make ``out``; refuse to write over a finished artifact unless asked to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarrowLensError(f"{out} exists and is not a folder")
    if (out / marker).exists() and not overwrite:
        raise MarrowLensError(f"{out} already holds a result ({marker}); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out
