"""Atomic writes, ``meta.json`` and fingerprints: what makes every output folder trustworthy.

Every artifact is written to a temporary file beside its destination and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one; the temporary a killed
run leaves behind is removed by the next command that writes into that folder. Every output folder
carries a ``meta.json`` saying what made it and from which inputs (by fingerprint), so later steps
can refuse inputs that do not belong together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydantic

from marrowlens import __version__
from marrowlens.contracts import KINDS, Meta
from marrowlens.errors import MarrowLensError

M = TypeVar("M", bound=Meta)

META_FILE = "meta.json"
_CHUNK = 1 << 22
# ``.NAME.XXXXXXXX.tmp``: what ``atomic_path`` (``mkstemp``: 8 random characters) leaves behind when killed.
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_STARTED = time.time()  # imported as a command starts: earlier temporaries are a previous run's
_OPEN_TEMPORARIES: set[Path] = set()


def _read_umask() -> int:
    """The process umask; reading it means setting it, so do it once, at import, before any thread writes."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``mkstemp`` creates the file 0600; it gets the mode any other new file would (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    _OPEN_TEMPORARIES.add(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        _OPEN_TEMPORARIES.discard(tmp_path)
        tmp_path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: str | Path, patterns: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries a killed run left in ``folder``; returns what was deleted.

    Only our own naming is touched: ``.NAME.XXXXXXXX.tmp`` from :func:`atomic_path`, plus any glob
    ``patterns`` the caller owns (e.g. ``*.ckpt.partial``). A file still open in this process, or
    modified since it started, may belong to a live writer (another rank, a concurrent command) and
    is kept: a killed run's files are older than the run that cleans up after it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = {p for p in folder.iterdir() if _TEMPORARY.fullmatch(p.name)}
    ours.update(p for pattern in patterns for p in folder.glob(pattern))
    removed = []
    for path in sorted(ours - _OPEN_TEMPORARIES):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < _STARTED:
                path.unlink()
                removed.append(path)
    return removed


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every artifact uses (paths and numpy scalars allowed)."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


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


def meta_text(meta: Meta) -> str:
    """``meta`` as the JSON of a ``meta.json``."""
    return json_text(meta.model_dump())


def write_meta(folder: str | Path, meta: M) -> M:
    """Write ``folder/meta.json`` recording what made the folder, and return it."""
    write_text_atomic(Path(folder) / META_FILE, meta_text(meta))
    return meta


@contextlib.contextmanager
def commit_files(folder: str | Path, names: list[str]) -> Iterator[dict[str, Path]]:
    """Yield temporary paths for ``names`` of ``folder``; on success swap them all in, ``meta.json`` last.

    The old ``meta.json`` (the "finished" marker) is removed before anything is replaced and the new
    one renamed in after everything else, so a reader sees the complete old set, the complete new
    set, or an unfinished folder it refuses, never a mix. If the block fails nothing is touched.
    """
    folder = Path(folder)
    ordered = sorted(names, key=lambda name: name != META_FILE)  # entered first = renamed last
    with contextlib.ExitStack() as stack:
        paths = {name: stack.enter_context(atomic_path(folder / name)) for name in ordered}
        yield paths
        (folder / META_FILE).unlink(missing_ok=True)


def read_meta(folder: str | Path, model: type[M]) -> M:
    """Read ``folder/meta.json`` as ``model``; refuse a folder that is not an artifact of that kind.

    A folder another release made that this one cannot read is a one-line error naming that release.
    """
    kind = model.kind_name()
    data = _read_meta_json(folder, f"a {kind} folder")
    found = data.get("kind")
    if found != kind and isinstance(found, str) and found in KINDS:
        raise MarrowLensError(f"{folder} holds a {found!r} artifact, expected {kind!r}")
    missing = [name for name in Meta.model_fields if name not in data]
    if found != kind or missing:
        reason = f"it names kind {found!r}" if found != kind else f"it lacks {', '.join(missing)}"
        raise _unreadable(folder, data, reason)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "its top level"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise _unreadable(folder, data, f"at {where}: {first['msg']}{more}") from None


def artifact_kind(folder: str | Path) -> str | None:
    """The kind of MarrowLens artifact ``folder`` holds (None: none, or not a MarrowLens ``meta.json``)."""
    try:
        data = json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "marrowlens_version" not in data:
        return None
    return str(data.get("kind"))


def _read_meta_json(folder: str | Path, what: str) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise MarrowLensError(f"{folder} is not {what}: {META_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MarrowLensError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise MarrowLensError(
            f"{path} is not a MarrowLens {META_FILE}: it holds a JSON {type(data).__name__}, not an object"
        )
    return data


def _unreadable(folder: str | Path, data: dict[str, Any], reason: str) -> MarrowLensError:
    """One line: which folder, which release made it, what does not fit, what to do."""
    version = data.get("marrowlens_version")
    made_by = f"MarrowLens {version}" if isinstance(version, str) else "no known MarrowLens version"
    reason = " ".join(reason.split())
    return MarrowLensError(
        f"{Path(folder) / META_FILE} was written by {made_by} and cannot be read by MarrowLens {__version__} "
        f"({reason}); re-create {folder} with this version"
    )


def require_same_fingerprint(what: str, expected: str, expected_from: str, got: str, got_from: str) -> None:
    """Refuse to combine artifacts made from different inputs, naming both sides."""
    if expected != got:
        raise MarrowLensError(f"{what} mismatch: {expected_from} has {short(expected)} but {got_from} has {short(got)}")


def prepare_out_dir(out: str | Path, overwrite: bool, marker: str = META_FILE) -> Path:
    """Make ``out``; refuse to write over a finished artifact unless asked to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MarrowLensError(f"{out} exists and is not a folder")
    if (out / marker).exists() and not overwrite:
        raise MarrowLensError(f"{out} already holds a result ({marker}); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    return out


def read_parquet(path: str | Path) -> Any:
    """Read a parquet table; a truncated or foreign file is a one-line error naming it."""
    import pandas as pd
    import pyarrow

    try:
        return pd.read_parquet(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise MarrowLensError(f"{path} is not a readable parquet table (truncated or damaged?): {exc}") from exc
