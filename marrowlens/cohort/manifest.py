"""The cohort manifest: ``cells.parquet`` (one validated row per cell), ``quarantine.csv``, ``meta.json``.

``index_cohort`` turns folders of images in the layouts of DESIGN.md (``mutation/patient/cell``,
``cell_type/cell``, the DeepAPL ``labels.csv``, any CSV with a ``path`` column) into a cohort.
Every image is decoded once; what cannot be decoded goes to ``quarantine.csv`` with its reason, so
a broken file never stops a run and never silently vanishes. Label problems (unknown names, a class
left without cells, an empty folder) are one-line errors raised before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from marrowlens.artifacts import META_FILE, artifact_kind, commit_files, meta_text, read_meta, read_parquet
from marrowlens.cohort.images import IMAGE_SUFFIXES, ImageDecodeError, inspect_image
from marrowlens.cohort.labels import MutationVocabulary, cell_type_name, is_blast_type, parse_bool
from marrowlens.cohort.schema import CELL_COLUMNS, CELL_DTYPES, COUNTED_COLUMNS, LABEL_COLUMNS, extra_columns
from marrowlens.config import LAYOUTS
from marrowlens.contracts import CohortMeta, CohortSource
from marrowlens.errors import MarrowLensError, listing
from marrowlens.provenance import python_api

CELLS_FILE = "cells.parquet"
QUARANTINE_FILE = "quarantine.csv"
DEEPAPL_MUTATIONS = {"APL": "PML_RARA", "AML": "other_AML"}
# CSV column names we recognise without being told, in order of preference.
_CSV_SYNONYMS = {
    "patient_id": ("patient_id", "patient", "patient id", "Patient_ID"),
    "cell_type": ("cell_type", "label", "class", "cell_class"),
    "is_blast": ("is_blast",),
    "mutation": ("mutation",),
    "domain": ("domain", "source", "scanner"),
    "split": ("split",),
}


@dataclass
class IndexOptions:
    """How to read a source: its layout and the user's label maps."""

    layout: str = "auto"
    map_mutation: dict[str, str] = field(default_factory=dict)
    map_cell_type: dict[str, str] = field(default_factory=dict)
    blast_classes: list[str] | None = None
    columns: dict[str, str] = field(default_factory=dict)
    domain: str | None = None
    workers: int = 8
    skip: tuple[Path, ...] = ()  # resolved folders never read as images (the cohort's own --out)


@dataclass
class Cohort:
    """A loaded cohort: where its images are, its cells, and what made it."""

    folder: Path
    root: Path
    cells: pd.DataFrame
    meta: CohortMeta

    def image_path(self, relative: str) -> Path:
        return self.root / relative


@dataclass
class _Candidate:
    path: Path
    labels: dict[str, Any]
    where: str = ""  # how the source named it, for messages (a CSV row, a relative path)
    extra: dict[str, Any] = field(default_factory=dict)  # the source table's other columns, as they are


def cell_id_of(relative_path: str) -> str:
    """Stable id of a cell: sha1 of its path relative to the cohort root (POSIX separators)."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()


def patient_groups(cells: pd.DataFrame) -> pd.Series:
    """Grouping key for patient-level splits; a cell without a patient is its own group."""
    return cells["patient_id"].fillna("cell:" + cells["cell_id"]).astype(str)


# ---------------------------------------------------------------- layout readers


def _resolve(path: Path) -> Path:
    """``path`` with symlinks and ``.``/``..`` resolved: the one name of a file, however it was spelled."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise MarrowLensError(f"{path} cannot be resolved (a symlink loop?): {exc}") from exc


def _is_artifact(folder: Path) -> bool:
    """Whether ``folder`` holds a MarrowLens output (its meta.json names a version): not images to index."""
    return artifact_kind(folder) is not None


def _readable_dir(folder: Path, skip: tuple[Path, ...]) -> bool:
    """A folder to read images from: not hidden, not our own output."""
    return not folder.name.startswith(".") and not _is_artifact(folder) and _resolve(folder) not in skip


def _image_files(root: Path, skip: tuple[Path, ...] = ()) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images below ``root`` and the non-image files found among them (for the quarantine)."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if _readable_dir(Path(dirpath) / d, skip))
        here = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            elif here != root:
                others.append((path, f"not an image file type ({path.suffix or 'no suffix'})"))
    return images, others


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` with unreadable, empty or malformed files as one-line errors naming the file."""
    try:
        frame: pd.DataFrame = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise MarrowLensError(f"{path} is empty: expected a header line with a 'path' column") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MarrowLensError(f"cannot read {path}: {exc}") from exc
    return frame


def detect_layout(root: Path, skip: tuple[Path, ...] = ()) -> str:
    """Tell the layout of ``root`` from its files; ask for ``--layout`` when it is ambiguous."""
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise MarrowLensError(f"{root} is a file but not a CSV")
    labels = root / "labels.csv"
    if labels.is_file():
        header = set(_read_csv(labels, nrows=0).columns)
        return "deepapl" if {"path", "label", "patient", "diagnosis"} <= header else "csv"
    images, _ = _image_files(root, skip)
    if not images:
        raise MarrowLensError(f"no images found under {root}")
    depths = Counter(len(p.relative_to(root).parts) for p in images)
    depth, count = depths.most_common(1)[0]
    if depth in (2, 3) and count >= 0.9 * len(images):  # a few strays go to the quarantine
        return "mutation_patient" if depth == 3 else "cell_type"
    raise MarrowLensError(
        f"cannot tell the layout of {root}: images at depths {sorted(depths)}; pass --layout ({', '.join(LAYOUTS[1:])})"
    )


def _read_folder_layout(
    root: Path, layout: str, options: IndexOptions
) -> tuple[list[_Candidate], list[tuple[Path, str]], dict[str, str]]:
    images, others = _image_files(root, options.skip)
    if not images:
        raise MarrowLensError(f"no images found under {root}")
    depth = 3 if layout == "mutation_patient" else 2
    shape = "ROOT/<mutation>/<patient>/<image>" if depth == 3 else "ROOT/<cell_type>/<image>"
    others += [(p, f"outside the {shape} layout") for p in images if len(p.relative_to(root).parts) != depth]
    images = [p for p in images if len(p.relative_to(root).parts) == depth]
    classes = {p.name: "" for p in sorted(root.iterdir()) if p.is_dir() and _readable_dir(p, options.skip)}
    candidates = []
    if layout == "mutation_patient":
        vocab = MutationVocabulary(options.map_mutation)
        names = vocab.map_all(classes, where=f"the class folders of {root}")
        owner: dict[str, str] = {}
        for path in images:
            mutation_dir, patient, _ = path.relative_to(root).parts
            if owner.setdefault(patient, mutation_dir) != mutation_dir:
                raise MarrowLensError(f"patient {patient!r} appears under both {owner[patient]!r} and {mutation_dir!r}")
            candidates.append(
                _Candidate(path, {"patient_id": patient, "mutation": names[mutation_dir]}, str(path.relative_to(root)))
            )
        return candidates, others, {k: names[k] for k in classes}
    for path in images:
        raw = path.relative_to(root).parts[0]
        cell_type = options.map_cell_type.get(raw, cell_type_name(raw))
        labels = {"cell_type": cell_type, "is_blast": is_blast_type(cell_type, options.blast_classes)}
        candidates.append(_Candidate(path, labels, str(path.relative_to(root))))
    return candidates, others, {k: options.map_cell_type.get(k, cell_type_name(k)) for k in classes}


def _csv_columns(header: list[str], options: IndexOptions, defaults: dict[str, str]) -> dict[str, str]:
    chosen = dict(defaults)
    for canonical, names in _CSV_SYNONYMS.items():
        if canonical not in chosen:
            found = next((n for n in names if n in header), None)
            if found:
                chosen[canonical] = found
    for canonical, column in options.columns.items():
        if canonical not in LABEL_COLUMNS:
            raise MarrowLensError(f"--column {canonical}=...: unknown field; known: {', '.join(LABEL_COLUMNS)}")
        chosen[canonical] = column
    missing = [c for c in chosen.values() if c not in header]
    if missing:
        raise MarrowLensError(f"CSV has no column(s) {', '.join(missing)}; it has {listing(header, 10)}")
    return chosen


def _read_csv_layout(
    source: Path, layout: str, options: IndexOptions
) -> tuple[list[_Candidate], list[tuple[Path, str]], dict[str, str]]:
    csv_path = source / "labels.csv" if source.is_dir() else source
    base = csv_path.parent
    table = _read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    if "path" not in table.columns:
        raise MarrowLensError(f"{csv_path} has no 'path' column")
    if table.empty:
        raise MarrowLensError(f"{csv_path} lists no cells")
    duplicated = table["path"][table["path"].duplicated()]
    if not duplicated.empty:
        raise MarrowLensError(f"{csv_path} lists {duplicated.iloc[0]!r} more than once")
    defaults = {"cell_type": "label", "patient_id": "patient", "mutation": "diagnosis"} if layout == "deepapl" else {}
    columns = _csv_columns(list(table.columns), options, defaults)
    mutation_map = dict(DEEPAPL_MUTATIONS) if layout == "deepapl" else {}
    mutation_map.update(options.map_mutation)
    mapped: dict[str, str] = {}
    if "mutation" in columns:
        values = table[columns["mutation"]].dropna()
        mapped = MutationVocabulary(mutation_map).map_all(values, where=str(csv_path))
    extras = [c for c in extra_columns(table.columns) if c not in columns.values()]
    candidates = []
    for line, record in enumerate(table.to_dict("records"), start=2):
        extra = {name: None if pd.isna(record[name]) else record[name] for name in extras}
        labels: dict[str, Any] = {}
        for canonical, column in columns.items():
            value = record.get(column)
            labels[canonical] = None if pd.isna(value) else value
        if labels.get("cell_type") is not None:
            labels["cell_type"] = options.map_cell_type.get(labels["cell_type"], cell_type_name(labels["cell_type"]))
        if labels.get("mutation") is not None:
            labels["mutation"] = mapped[labels["mutation"]]
        if "is_blast" in columns:
            labels["is_blast"] = parse_bool(labels["is_blast"])
        elif labels.get("cell_type") is not None:
            labels["is_blast"] = is_blast_type(labels["cell_type"], options.blast_classes)
        path = Path(record["path"])
        where = f"{csv_path.name} line {line} ({record['path']})"
        candidates.append(_Candidate(path if path.is_absolute() else base / path, labels, where, extra))
    return candidates, [], {}


def _refuse_images_folder_of_labelled_source(source: Path) -> None:
    """ROOT/images of a ``labels.csv`` source would read its patient folders as labels: say what to index."""
    labels = source.parent / "labels.csv"
    if source.is_dir() and not (source / "labels.csv").is_file() and labels.is_file():
        try:
            paths = _read_csv(labels, usecols=["path"], nrows=100)["path"].astype(str)
        except (MarrowLensError, ValueError):  # unreadable, or no path column: not our business here
            return
        if paths.str.startswith(f"{source.name}/").any():
            raise MarrowLensError(
                f"{source} is the image folder of {source.parent}, whose labels.csv holds the labels: "
                f"index {source.parent} instead"
            )


def read_source(
    source: Path, options: IndexOptions
) -> tuple[str, list[_Candidate], list[tuple[Path, str]], dict[str, str]]:
    """Read one source folder or CSV into candidate cells (not yet decoded)."""
    if not source.exists():
        raise MarrowLensError(f"{source} does not exist")
    if options.layout not in LAYOUTS:
        raise MarrowLensError(f"unknown layout {options.layout!r}; known: {', '.join(LAYOUTS)}")
    _refuse_images_folder_of_labelled_source(source)
    layout = detect_layout(source, options.skip) if options.layout == "auto" else options.layout
    reader = _read_csv_layout if layout in ("csv", "deepapl") else _read_folder_layout
    candidates, others, classes = reader(source, layout, options)
    domain = options.domain or (source.name if source.is_dir() else source.parent.name)
    for candidate in candidates:
        if not candidate.labels.get("domain"):
            candidate.labels["domain"] = domain
    return layout, candidates, others, classes


# ---------------------------------------------------------------- indexing


def _check(path: Path) -> tuple[int, int] | str:
    try:
        info = inspect_image(path)
    except ImageDecodeError as exc:
        return str(exc)
    return info.width, info.height


def _decode_all(paths: list[Path], workers: int, desc: str) -> list[tuple[int, int] | str]:
    """Decode every image once (threads: Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(_check, paths, chunksize=16), total=len(paths), desc=desc, unit="img", disable=None))


def _common_root(sources: list[Path]) -> Path:
    folders = [s if s.is_dir() else s.parent for s in sources]
    return Path(os.path.commonpath([str(f) for f in folders]))


@python_api
def index_cohort(
    sources: list[Path], out: Path, options: IndexOptions | None = None, synthetic: dict[str, Any] | None = None
) -> Cohort:
    """Index image sources into a cohort folder; returns the loaded cohort.

    ``synthetic`` records the settings of the generator that drew the images, if one did.
    """
    if not sources:
        raise MarrowLensError("give at least one image folder or CSV")
    out = Path(out)
    options = options or IndexOptions()
    options = replace(options, skip=(*options.skip, _resolve(out)))  # --out may lie inside a source
    sources = [_resolve(Path(s)) for s in sources]
    read = [read_source(s, options) for s in sources]
    root = _common_root(sources)
    rows, quarantine = [], []
    class_folders: dict[str, str] = {}
    for source, (layout, candidates, others, classes) in zip(sources, read):
        prefix = f"{source.name}/" if len(sources) > 1 else ""
        for candidate in candidates:
            if candidate.labels.get("patient_id") is not None:
                candidate.labels["patient_id"] = prefix + str(candidate.labels["patient_id"])
            rows.append(candidate)
        quarantine += others
        class_folders.update({str(source / name): label for name, label in classes.items()})
    outside = [c.path for c in rows if not _is_within(c.path, root)]
    if outside:
        raise MarrowLensError(f"{outside[0]} lies outside the cohort root {root}")
    _refuse_duplicates(rows)
    results = _decode_all([c.path for c in rows], options.workers, desc="checking images")
    good = []
    for candidate, result in zip(rows, results):
        if isinstance(result, str):
            quarantine.append((candidate.path, result))
        else:
            good.append((candidate, result))
    if not good:
        example = f", e.g. {quarantine[0][0]}: {quarantine[0][1]}" if quarantine else ""
        raise MarrowLensError(
            f"no readable images in {', '.join(map(str, sources))} ({len(quarantine)} unreadable{example})"
        )
    cells = _cells_frame(good, root)
    _refuse_empty_classes(cells, class_folders)
    out.mkdir(parents=True, exist_ok=True)
    layouts = [layout for layout, *_ in read]
    meta = CohortMeta(
        root=str(root),
        root_relative=os.path.relpath(root, out.resolve()),
        sources=[CohortSource(path=str(s), layout=layout) for s, layout in zip(sources, layouts)],
        n_cells=len(cells),
        n_quarantined=len(quarantine),
        n_patients=int(cells["patient_id"].nunique()),
        mutation_map=options.map_mutation,
        counts=label_counts(cells),
        fingerprint=cohort_fingerprint(cells),
        synthetic=synthetic,
    )
    _commit(out, cells, _quarantine_frame(root, quarantine), meta)
    return Cohort(folder=out, root=root, cells=cells, meta=meta)


def _commit(out: Path, cells: pd.DataFrame, quarantine: pd.DataFrame, meta: CohortMeta) -> None:
    """Replace the cohort's three files together: a reader sees the old cohort or the new one, never a mix."""
    with commit_files(out, [CELLS_FILE, QUARANTINE_FILE, META_FILE]) as paths:
        cells.to_parquet(paths[CELLS_FILE], index=False)
        quarantine.to_csv(paths[QUARANTINE_FILE], index=False)
        paths[META_FILE].write_text(meta_text(meta))


def _refuse_duplicates(rows: list[_Candidate]) -> None:
    """One image is one cell: refuse two rows that name the same file (a symlink, ``./`` or ``..`` spellings)."""
    seen: dict[Path, _Candidate] = {}
    for candidate in rows:
        resolved = _resolve(candidate.path)
        first = seen.setdefault(resolved, candidate)
        if first is not candidate:
            raise MarrowLensError(
                f"{first.where} and {candidate.where} are the same image file ({resolved}); list each cell once"
            )


def _is_within(path: Path, root: Path) -> bool:
    try:
        _resolve(path).relative_to(root)
    except ValueError:
        return False
    return True


def _cells_frame(good: list[tuple[_Candidate, tuple[int, int]]], root: Path) -> pd.DataFrame:
    records = []
    for candidate, (width, height) in good:
        relative = _resolve(candidate.path).relative_to(root).as_posix()
        record = {name: candidate.labels.get(name) for name in LABEL_COLUMNS}
        record.update(cell_id=cell_id_of(relative), path=relative, width=width, height=height)
        records.append(record)
    cells = pd.DataFrame.from_records(records, columns=CELL_COLUMNS).astype(CELL_DTYPES)
    extras = list(dict.fromkeys(name for candidate, _ in good for name in candidate.extra))
    for name in extras:
        cells[name] = _extra_values(pd.Series([candidate.extra.get(name) for candidate, _ in good], dtype=object))
    return cells


def _extra_values(values: pd.Series) -> pd.Series:
    """An extra column as numbers when every given value is one, else as strings."""
    try:
        return pd.to_numeric(values)
    except (TypeError, ValueError):
        return values.astype("string")


def _refuse_empty_classes(cells: pd.DataFrame, class_folders: dict[str, str]) -> None:
    present = set(cells["mutation"].dropna()) | set(cells["cell_type"].dropna())
    for folder, label in class_folders.items():
        if label not in present:
            raise MarrowLensError(f"class {label!r} has no readable cells (folder {folder})")


def _quarantine_frame(root: Path, quarantine: list[tuple[Path, str]]) -> pd.DataFrame:
    rows = [
        {"path": _resolve(p).relative_to(root).as_posix() if _is_within(p, root) else str(p), "reason": reason}
        for p, reason in quarantine
    ]
    return pd.DataFrame(rows, columns=["path", "reason"])


def _read_quarantine(folder: Path) -> pd.DataFrame:
    """The cohort's quarantine list; a missing or empty file is an empty list (nothing was quarantined)."""
    try:
        return pd.read_csv(folder / QUARANTINE_FILE, dtype=str)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["path", "reason"])


def label_counts(cells: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = {}
    for name in COUNTED_COLUMNS:
        values = cells[name].dropna()
        if not values.empty:
            counts[name] = {str(k): int(v) for k, v in values.value_counts().sort_index().items()}
    return counts


def cohort_fingerprint(cells: pd.DataFrame) -> str:
    """sha256 of the cells' ids and labels, in order: names a cohort in later steps' meta.json."""
    digest = hashlib.sha256()
    frame = cells[["cell_id", *LABEL_COLUMNS]].astype("string").fillna("")
    for row in frame.itertuples(index=False):
        digest.update("\t".join(row).encode("utf-8") + b"\n")
    return digest.hexdigest()


def load_cohort(folder: str | Path) -> Cohort:
    """Load a cohort folder; refuse a folder that is not one or whose table is malformed."""
    folder = Path(folder)
    meta = read_meta(folder, CohortMeta)
    table = folder / CELLS_FILE
    if not table.is_file():
        raise MarrowLensError(f"{folder} has no {CELLS_FILE}")
    cells = read_parquet(table)
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise MarrowLensError(f"{table} lacks column(s) {', '.join(missing)}")
    return Cohort(folder=folder, root=image_root(folder, meta), cells=cells, meta=meta)


def image_root(folder: Path, meta: CohortMeta | None = None) -> Path:
    """The folder the cells' paths are relative to: beside the cohort as indexed, else where it was indexed."""
    meta = meta or read_meta(folder, CohortMeta)
    root = (folder / meta.root_relative).resolve()
    if not root.is_dir():
        root = Path(meta.root)
    if not root.is_dir():
        raise MarrowLensError(
            f"the images of {folder} are gone: neither {folder / meta.root_relative} nor {meta.root} exists"
        )
    return root


@python_api
def check_cohort(folder: str | Path, workers: int = 8, fix: bool = False) -> tuple[Cohort, list[tuple[str, str]]]:
    """Re-validate a cohort: schema, unique ids, every image still decodes.

    Returns the problems found; with ``fix`` the broken cells move to the quarantine list.
    """
    cohort = load_cohort(folder)
    cells = cohort.cells
    if cells["cell_id"].duplicated().any():
        raise MarrowLensError(f"{folder}: duplicate cell ids in {CELLS_FILE}")
    results = _decode_all([cohort.image_path(p) for p in cells["path"]], workers, desc="re-checking images")
    problems = [(path, r) for path, r in zip(cells["path"], results) if isinstance(r, str)]
    if fix and problems:
        broken = {p for p, _ in problems}
        frame = pd.concat(
            [_read_quarantine(Path(folder)), pd.DataFrame(problems, columns=["path", "reason"])], ignore_index=True
        )
        kept = cells[~cells["path"].isin(broken)].reset_index(drop=True)
        meta = cohort.meta.renewed(
            n_cells=len(kept), n_quarantined=len(frame), counts=label_counts(kept), fingerprint=cohort_fingerprint(kept)
        )
        _commit(Path(folder), kept, frame, meta)
        cohort = load_cohort(folder)
    return cohort, problems
