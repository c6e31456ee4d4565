"""What each ``meta.json`` holds: one pydantic model per artifact kind.

Every ``meta.json`` is written from and read into these models (``artifacts.write_meta`` /
``artifacts.read_meta``), so each field is spelt once, typed, and a folder that does not fit (another
version's, a hand-edited one) is refused as it is opened rather than half-way through a command.
The JSON keeps the layout earlier releases wrote, so the folders they made still load.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from marrowlens import __version__
from marrowlens.provenance import current_command


class Record(BaseModel):
    """A part of a ``meta.json``: immutable; fields a newer release added are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def stamp() -> dict[str, str]:
    """What made a folder, now: this release, this moment, the command being run."""
    return {"marrowlens_version": __version__, "created": _now(), "command": current_command()}


class Meta(Record):
    """What every kind records about how its folder was made."""

    kind: str
    marrowlens_version: str = Field(default_factory=lambda: __version__)
    created: str = Field(default_factory=_now)
    command: str = Field(default_factory=current_command)

    @classmethod
    def kind_name(cls) -> str:
        """The ``kind`` this model reads and writes."""
        return str(cls.model_fields["kind"].default)

    def renewed(self, **changes: Any) -> Self:
        """A copy with ``changes``, made now by the current command (a folder rewritten in place)."""
        return self.model_validate({**self.model_dump(), **changes, **stamp()})


# ---------------------------------------------------------------- parts shared between kinds


class Preprocessing(Record):
    """How a backbone sees a cell at eval time (after timm's ``PretrainedCfg``); saved with the backbone.

    Training's online check, ``embed``, search and the web page all build their input transform from it
    (``marrowlens.ssl.preprocessing.eval_transform``), so a query is fed to the backbone as the cells were.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    pad_to_square: bool = True
    # cell: a square fitted around the white cell first; centred: a fixed-side square centred on it (cohort.crop)
    crop: Literal["full", "cell", "centred"] = "full"


class CropCounts(Record):
    """Of the cells an ``embed`` session cut to their cell (``crop: cell|centred``): found, and centre crops instead."""

    found: int
    centre_crop: int


class StorePreprocessing(Preprocessing):
    """How a store's cells were turned into model inputs: the backbone's record plus the stain step."""

    stain: dict[str, Any] | None = None  # ``ReinhardTarget.to_dict()``; None: not stain-normalised
    cell_crop: CropCounts | None = None  # crop: cell|centred, the session that finished the store


class BackboneRecord(Record):
    """A backbone as ``backbone.json`` (and every ``meta.json`` naming one) records it: enough to rebuild
    it and feed it images exactly as in training."""

    timm_name: str
    num_features: int
    fingerprint: str
    source: str
    preprocessing: Preprocessing

    @model_validator(mode="before")
    @classmethod
    def _preprocessing_from_top_level(cls, data: Any) -> Any:
        """Folders written before the record existed kept the size, mean and std at the top level."""
        if isinstance(data, dict) and not data.get("preprocessing"):
            return {**data, "preprocessing": {k: data[k] for k in ("image_size", "mean", "std") if k in data}}
        return data

    @model_serializer(mode="wrap")
    def _top_level_too(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Size, mean and std stay at the top level as well, where earlier releases read them."""
        data: dict[str, Any] = handler(self)
        return {**data, "image_size": self.image_size, "mean": self.mean, "std": self.std}

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std


class CohortRef(Record):
    folder: str
    fingerprint: str


# ---------------------------------------------------------------- cohort


class CohortSource(Record):
    path: str
    layout: str


class CohortMeta(Meta):
    kind: Literal["cohort"] = "cohort"
    root: str
    root_relative: str
    sources: list[CohortSource]
    n_cells: int
    n_quarantined: int
    n_patients: int
    mutation_map: dict[str, str]
    counts: dict[str, dict[str, int]]
    fingerprint: str
    synthetic: dict[str, Any] | None = Field(None, exclude_if=lambda value: value is None)  # `cohort synth` settings


# ---------------------------------------------------------------- pretraining run


class CheckSubsetRecord(Record):
    label: str
    classes: list[str]


class RunMeta(Meta):
    kind: Literal["run"] = "run"
    method: str
    backbone: BackboneRecord
    cohort: CohortRef
    epochs: int
    global_step: int
    world_size: int
    global_batch: int
    lr: float
    metrics: dict[str, float]
    check_subset: CheckSubsetRecord | None = None


# ---------------------------------------------------------------- embedding store


class EmbeddingsOrigin(Record):
    """What the caller of the store writer says about the vectors: the model, cohort and preprocessing."""

    model: BackboneRecord
    cohort: CohortRef | None = None
    preprocessing: StorePreprocessing | None = None


class EmbeddingsMeta(Meta):
    kind: Literal["embeddings"] = "embeddings"
    n: int
    dim: int
    fingerprint: str
    digests: dict[str, str] | None = None  # None: embedded before the cell table was fingerprinted
    model: BackboneRecord
    cohort: CohortRef | None = None
    preprocessing: StorePreprocessing | None = None


# ---------------------------------------------------------------- probes


class StoreRef(Record):
    folder: str
    fingerprint: str


class ModelRef(Record):
    fingerprint: str


class ProbeMeta(Meta):
    kind: Literal["probe"] = "probe"
    task: str
    fingerprint: str
    embeddings: StoreRef
    model: ModelRef


class TestedProbe(Record):
    """The probe an external test applied, and the store it was fitted on."""

    folder: str
    fingerprint: str
    trained_on: StoreRef


class ProbeTestMeta(Meta):
    """A fitted probe applied as is to a cohort it never saw (``probe test``): nothing refitted."""

    kind: Literal["probe-test"] = "probe-test"
    task: str
    probe: TestedProbe
    embeddings: StoreRef
    model: ModelRef


class SweptStore(Record):
    fingerprint: str
    model_fingerprint: str


class NoiseSweepMeta(Meta):
    kind: Literal["noise-sweep"] = "noise-sweep"
    embeddings: SweptStore
    task: str


# ---------------------------------------------------------------- index


class SourceCohort(Record):
    """The cohort a source's cells came from; ``root`` holds their images (None: not found when added)."""

    folder: str | None = None
    fingerprint: str | None = None
    root: str | None = None


class IndexSource(Record):
    """One embedding store added to an index: its cells are rows ``first_row`` to ``first_row + count``."""

    embeddings: str
    fingerprint: str
    first_row: int
    count: int
    cohort: SourceCohort


class IndexFiles(Record):
    index: str
    cells: str


class IndexMeta(Meta):
    kind: Literal["index"] = "index"
    index_kind: str
    requested_kind: str
    factory: str
    metric: str
    params: dict[str, Any]
    count: int
    dim: int
    model: BackboneRecord
    preprocessing: StorePreprocessing | None = None
    sources: list[IndexSource]
    version: int = 0
    files: IndexFiles | None = None  # None: a folder from before versions, with the plain file names

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _no_preprocessing(cls, value: Any) -> Any:
        """Indexes of stores without a preprocessing record wrote ``{}``."""
        return value or None


def stain_record(meta: EmbeddingsMeta | IndexMeta) -> dict[str, Any] | None:
    """The stain normalisation target a store's (or its index's) cells were embedded with; None: none."""
    return meta.preprocessing.stain if meta.preprocessing else None


# ---------------------------------------------------------------- study (``marrowlens run``)


class StudyMeta(Meta):
    kind: Literal["study"] = "study"
    cohort: CohortRef
    stages: dict[str, str]


KINDS: dict[str, type[Meta]] = {
    model.kind_name(): model
    for model in (CohortMeta, RunMeta, EmbeddingsMeta, ProbeMeta, ProbeTestMeta, NoiseSweepMeta, IndexMeta, StudyMeta)
}
