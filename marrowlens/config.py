"""Configs as pydantic models: defaults <- YAML file <- ``--set a.b=c`` overrides (DINOv2's order).

Unknown keys are errors, so a typo in a YAML file or an override fails loudly instead of being
ignored. The resolved config is saved beside every run so it can be reproduced exactly.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeGuard, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from marrowlens.artifacts import write_text_atomic
from marrowlens.errors import MarrowLensError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- the lists of choices, once
# (configs validate against them, the CLI's help texts and checks come from them)

# The extension registries: a name (what configs and flags say) -> where its class lives, as
# "module:Class". A new SSL method, probe head or index kind is its own module plus one line in its
# table here; ``marrowlens.registry.load_registered`` imports the classes when they are first used
# (``ssl.methods.METHODS``, ``probes.heads.HEADS``, ``retrieval.kinds.INDEX_KINDS``), so loading a
# config or printing ``--help`` imports neither torch nor FAISS.
METHOD_CLASSES = {
    "simclr": "marrowlens.ssl.simclr:SimCLR",
    "dino": "marrowlens.ssl.dino:DINO",
    "byol": "marrowlens.ssl.byol:BYOL",
    "vicreg": "marrowlens.ssl.vicreg:VICReg",
}
METHOD_NAMES = tuple(METHOD_CLASSES)
Precision = Literal["32", "16-mixed", "bf16-mixed"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]
ACCELERATORS: tuple[str, ...] = get_args(Accelerator)
Strategy = Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
StainNormalization = Literal["none", "reinhard"]
STAIN_NORMALIZATIONS: tuple[str, ...] = get_args(StainNormalization)
# How ``cohort index`` reads a source (``auto`` tells them apart by their files).
Layout = Literal["auto", "mutation_patient", "cell_type", "deepapl", "csv"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
ProbeTask = Literal["blast", "mutation", "cell_type"]
PROBE_TASKS: tuple[str, ...] = get_args(ProbeTask)
ProbeLoss = Literal["ce", "gce", "sce", "focal"]
PROBE_LOSSES: tuple[str, ...] = get_args(ProbeLoss)
ClassWeight = Literal["none", "balanced"]
CLASS_WEIGHTS: tuple[str, ...] = get_args(ClassWeight)
# How ``probe noise-sweep`` corrupts training labels: per cell, or whole patients relabelled.
NoiseKind = Literal["symmetric", "bag"]
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)
Metric = Literal["cosine", "l2"]
METRICS: tuple[str, ...] = get_args(Metric)
Optimizer = Literal["lars", "sgd", "adamw"]
DinoExport = Literal["teacher", "student"]


def is_precision(value: str) -> TypeGuard[Precision]:
    """A precision ``embed`` offers (its option is plain text; this narrows it for Lightning)."""
    return value in PRECISIONS


class ModelConfig(_Strict):
    method: Literal[METHOD_NAMES] = "simclr"  # type: ignore[valid-type]
    backbone: str = "resnet18"
    weights: Path | None = Field(
        None, description="local weights to start from: a .safetensors/.pth/.bin file or a hub folder (no downloads)"
    )
    image_size: int = Field(224, ge=16)


class SimCLRConfig(_Strict):
    temperature: float = Field(0.1, gt=0)
    hidden_dim: int = Field(512, ge=8)
    out_dim: int = Field(128, ge=8)


class DINOConfig(_Strict):
    hidden_dim: int = Field(2048, ge=8)
    bottleneck_dim: int = Field(256, ge=8)
    out_dim: int = Field(4096, ge=8)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(0, ge=0)
    momentum_start: float = Field(0.996, ge=0, le=1)
    momentum_end: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_epochs: int = Field(1, ge=0)
    n_local_views: int = Field(6, ge=0)
    local_crop_size: int = Field(96, ge=8)
    local_crop_scale: tuple[float, float] = (0.2, 0.5)
    export: DinoExport = "teacher"


class BYOLConfig(_Strict):
    """Defaults of lightly's ``benchmarks/imagenet/resnet50/byol.py``: heads 4096 -> 256, momentum 0.99 -> 1."""

    hidden_dim: int = Field(4096, ge=8)
    out_dim: int = Field(256, ge=8)
    momentum_start: float = Field(0.99, ge=0, le=1)
    momentum_end: float = Field(1.0, ge=0, le=1)


class VICRegConfig(_Strict):
    """Defaults of lightly's ``benchmarks/imagenet/resnet50/vicreg.py`` and ``VICRegLoss``: 8192-wide
    3-layer head; invariance (lambda) 25, variance (mu) 25, covariance (nu) 1."""

    hidden_dim: int = Field(8192, ge=8)
    out_dim: int = Field(8192, ge=8)
    lambda_param: float = Field(25.0, ge=0)
    mu_param: float = Field(25.0, ge=0)
    nu_param: float = Field(1.0, ge=0)


class ViewsConfig(_Strict):
    """Augmentations for stained single cells: any rotation or flip, colour and stain jitter.

    ``min_scale`` >= 1/3 (with the aspect ratios in [3/4, 4/3]) makes every crop side longer than
    half the image, so every crop holds the image centre, where the cell is: no view loses the cell.
    """

    min_scale: float = Field(0.4, ge=1 / 3, le=1)
    hflip_prob: float = Field(0.5, ge=0, le=1)
    vflip_prob: float = Field(0.5, ge=0, le=1)
    rotate90_prob: float = Field(0.5, ge=0, le=1)
    color_jitter_prob: float = Field(0.8, ge=0, le=1)
    color_jitter_strength: float = Field(0.5, ge=0)
    hue: float = Field(0.05, ge=0, le=0.5)
    grayscale_prob: float = Field(0.1, ge=0, le=1)
    blur_prob: float = Field(0.3, ge=0, le=1)
    stain_jitter_prob: float = Field(0.5, ge=0, le=1, description="HED optical-density jitter")
    stain_jitter_sigma: float = Field(0.05, ge=0, description="std of the per-stain scale and shift")
    solarization_prob: float = Field(0.0, ge=0, le=1)


class OptimConfig(_Strict):
    optimizer: Optimizer = "lars"
    base_lr: float = Field(0.3, gt=0, description="learning rate for a global batch of 256")
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)


class DataConfig(_Strict):
    batch_size: int = Field(256, ge=2, description="per device")
    num_workers: int = Field(4, ge=0)
    val_cells: int = Field(512, ge=0, description="labelled cells for the online k-NN check (0: off)")
    knn_k: int = Field(20, ge=1)
    knn_t: float = Field(0.07, gt=0)
    crop: Literal["full", "cell", "centred"] = Field(
        "full",
        description="cell: a square fitted around the white cell before resizing; centred: a fixed-side square "
        "centred on it, keeping its size (views, embed, search)",
    )


class TrainerConfig(_Strict):
    max_epochs: int = Field(100, ge=1)
    accelerator: Accelerator = "auto"
    devices: int | Literal["auto"] = "auto"
    nodes: int = Field(1, ge=1)
    strategy: Strategy = "auto"
    precision: Literal[Precision, "32-true"] = "32"
    accumulate_grad_batches: int = Field(1, ge=1)
    limit_train_batches: int | float | None = None
    seed: int = 0
    log_every_n_steps: int = Field(10, ge=1)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # `--precision 32` parses as a number

    @field_validator("devices")
    @classmethod
    def _some_devices(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a number of devices >= 1 or 'auto'")
        return value

    @field_validator("limit_train_batches")
    @classmethod
    def _some_batches(cls, value: float | None) -> int | float | None:
        """0 batches would end "successfully" with an untrained backbone; Lightning tracebacks on negatives."""
        if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("must be a number of batches >= 1 or a fraction of the epoch in (0, 1]")
        return value


class PretrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    dino: DINOConfig = DINOConfig()
    byol: BYOLConfig = BYOLConfig()
    vicreg: VICRegConfig = VICRegConfig()
    views: ViewsConfig = ViewsConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _local_crops_smaller(self) -> PretrainConfig:
        if self.model.method == "dino" and self.dino.local_crop_size > self.model.image_size:
            raise ValueError("dino.local_crop_size must not exceed model.image_size")
        return self

    @field_validator("dino")
    @classmethod
    def _scale_order(cls, value: DINOConfig) -> DINOConfig:
        low, high = value.local_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError("dino.local_crop_scale must be 0 < low <= high <= 1")
        return value


ConfigT = TypeVar("ConfigT", bound=BaseModel)

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_probe_config(task: str) -> Path:
    """The YAML a probe runs with when the user names none: what the README shows is what runs."""
    return SHIPPED_CONFIGS / "probes" / f"{task}.yaml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c), the value read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MarrowLensError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc  # a marked error says what was wrong, others only say
        raise MarrowLensError(f"override {text!r}: value is not valid YAML ({problem})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise MarrowLensError(f"override {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MarrowLensError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MarrowLensError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise MarrowLensError(f"config file {path} must hold a mapping at the top level")
    return data


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": None}`` -> ``{"a": {"b": 1}}``: named options, None meaning not given."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is not None:
            *sections, name = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
    return nested


def merge_values(model: type[BaseModel], data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge typed ``values`` into config ``data``: a section merges key by key, keeping its
    other keys; anything else (a value, a list, a free mapping such as a label map) is replaced."""
    for key, value in values.items():
        field = model.model_fields.get(key)
        section = _section(field.annotation) if field else None
        if section is not None and isinstance(value, Mapping) and isinstance(data.get(key), dict):
            merge_values(section, data[key], value)
        else:
            data[key] = copy.deepcopy(value)
    return data


def override_texts(model: type[BaseModel] | None, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Typed ``values`` as the ``key.sub=value`` strings that :func:`apply_overrides` reads back into the same
    config as :func:`merge_values`: sections become dotted keys, anything else (a free mapping too) one value."""
    texts: list[str] = []
    for key, value in values.items():
        field = model.model_fields.get(key) if model is not None else None
        section = _section(field.annotation) if field else None
        if section is not None and isinstance(value, Mapping):
            texts += override_texts(section, value, f"{prefix}{key}.")
        else:
            texts.append(f"{prefix}{key}={_yaml_text(value)}")
    return texts


def _yaml_text(value: Any) -> str:
    """A string as is when YAML reads it back unchanged (``resnet18``), else JSON (``"32"``, ``{"a": "b"}``)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def load_config(
    model: type[ConfigT],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Defaults <- YAML file <- typed ``values`` (a nested mapping) <- ``key=value`` overrides, validated.

    Errors name the offending key, and blame the override or value that set it.
    """
    data = read_yaml(path) if path is not None else {}
    overrides, values = list(overrides or []), dict(values or {})
    check_value_keys(model, values)
    check_override_keys(model, overrides)
    merge_values(model, data, values)
    apply_overrides(data, overrides)
    return validate_config(model, data, source=str(path) if path else "defaults", overrides=overrides, values=values)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds, or None for a plain value (or a free mapping)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _did_you_mean(key: str, known: Any, prefix: list[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {'.'.join([*prefix, close[0]])}?" if close else f"; known here: {', '.join(known)}"


def unknown_key(model: type[BaseModel], keys: list[str]) -> str | None:
    """``unknown key a.b; did you mean a.c?`` when the key path names no field, else None."""
    section: type[BaseModel] | None = model
    for depth, key in enumerate(keys):
        if section is None:
            return None
        if key not in section.model_fields:
            where = ".".join(keys[: depth + 1])
            return f"unknown key {where}{_did_you_mean(key, section.model_fields, keys[:depth])}"
        section = _section(section.model_fields[key].annotation)
    return None


def check_override_keys(model: type[BaseModel], overrides: list[str]) -> None:
    """A mistyped ``--set`` key is the command line's fault, not the YAML file's: say so, and guess."""
    for text in overrides:
        problem = unknown_key(model, parse_override(text)[0])
        if problem:
            raise MarrowLensError(f"override {text!r}: {problem}")


def leaves(values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    """The leaves of a nested mapping with their key paths: ``{"a": {"b": 1}}`` -> ``[(["a", "b"], 1)]``."""
    found: list[tuple[list[str], Any]] = []
    for key, value in values.items():
        path = (*prefix, str(key))
        found += leaves(value, path) if isinstance(value, Mapping) and value else [(list(path), value)]
    return found


def _as_override(keys: list[str], value: Any) -> str:
    """How a typed value reads in errors: as the ``key=value`` override that would set it."""
    return f"{'.'.join(keys)}={value}"


def value_key_problem(model: type[BaseModel], values: Mapping[str, Any]) -> str | None:
    """``override 'a.b=1': unknown key a.b; did you mean a.c?`` for the first unknown key, else None."""
    for keys, value in leaves(values):
        problem = unknown_key(model, keys)
        if problem:
            return f"override {_as_override(keys, value)!r}: {problem}"
    return None


def check_value_keys(model: type[BaseModel], values: Mapping[str, Any]) -> None:
    problem = value_key_problem(model, values)
    if problem:
        raise MarrowLensError(problem)


def _unknown_key_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    section: type[BaseModel] | None = model
    for key in loc[:-1]:
        section = _section(section.model_fields[key].annotation) if section and key in section.model_fields else None
    return _did_you_mean(str(loc[-1]), section.model_fields, [str(k) for k in loc[:-1]]) if section else ""


def _overlaps(where: str, key: str) -> bool:
    return where == key or where.startswith(f"{key}.") or key.startswith(f"{where}.")


def validate_config(
    model: type[ConfigT],
    data: dict[str, Any],
    source: str,
    overrides: list[str] | None = None,
    values: Mapping[str, Any] | None = None,
) -> ConfigT:
    """Validate; the error names the key and blames the override (or value) that set it, else ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        given = [(".".join(keys), _as_override(keys, value)) for keys, value in leaves(values or {})]
        typed = [(".".join(parse_override(text)[0]), text) for text in overrides or []]
        # in the order they were applied: the last one set the key
        culprit = [text for key, text in [*given, *typed] if _overlaps(where, key)]
        source = f"override {culprit[-1]!r}" if culprit else source
        hint = _unknown_key_hint(model, first["loc"]) if first["type"] == "extra_forbidden" else ""
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise MarrowLensError(f"config {source}: {where}: {first['msg']}{hint}{more}") from exc


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Save the resolved config beside a run (YAML, atomic)."""
    write_text_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------- probes (frozen-embedding heads)


class ProbeLossConfig(_Strict):
    """Training loss of a probe head; GCE/SCE resist label noise, focal helps rare classes."""

    name: ProbeLoss = "ce"
    gce_q: float = Field(0.7, gt=0, le=1, description="GCE exponent: 0 -> CE, 1 -> MAE")
    sce_alpha: float = Field(0.1, ge=0, description="SCE weight of the cross-entropy term")
    sce_beta: float = Field(1.0, ge=0, description="SCE weight of the reverse cross-entropy term")
    focal_gamma: float = Field(2.0, ge=0)


class LinearHeadConfig(_Strict):
    """The linear head on standardised features: with ``solver: sklearn`` (the shipped configs) scikit-learn's
    lbfgs logistic regression (C by grouped balanced accuracy) for plain CE, else a torch head (all weight
    decays at once, early stopping each)."""

    # The shipped probe configs choose sklearn (measured: bench/RESULTS.md "Two solvers for the linear probe");
    # the model's default stays torch so that a config saved before this key existed (an older probe's
    # config.yaml) re-evaluates with the head it was trained with.
    solver: Literal["sklearn", "torch"] = Field(
        "torch",
        description="sklearn: lbfgs LogisticRegression for loss ce without hidden layer or balanced sampling "
        "(torch for the rest); torch: always the torch head",
    )
    # Inverse L2 strengths of the sklearn solver, chosen on patient-grouped inner folds by balanced accuracy.
    c_values: list[float] = Field(
        [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0], min_length=1, description="C values tried (sklearn)"
    )
    inner_folds: int = Field(3, ge=2, description="patient-grouped folds choosing C (sklearn)")
    hidden_dim: int = Field(0, ge=0, description="0: linear; >0: one hidden ReLU layer of this width")
    # The held-out loss picks the top (0.1) on real cells; a grid up to 3 moved the pick inside but cost
    # APL patient AUC (0.856 vs 0.875) and white-cell macro-F1 (0.462 vs 0.489), blasts unchanged:
    # bench/RESULTS.md "The linear head's L2 grid".
    weight_decays: list[float] = Field([0.0, 1e-4, 1e-3, 1e-2, 1e-1], min_length=1, description="L2 strengths tried")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    batch_size: int = Field(1024, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(8, ge=1, description="epochs without a better validation loss before stopping")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="patients held out for early stopping")
    refit: bool = Field(True, description="after selection, retrain on all cells for the chosen epochs")
    early_stopping: bool = Field(True, description="off: max_epochs on all cells, middle weight decay of the grid")

    @field_validator("weight_decays")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(w < 0 for w in value):
            raise ValueError("weight decays must be >= 0")
        return value

    @field_validator("c_values")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError("C values must be > 0")
        return value


class KNNHeadConfig(_Strict):
    """DINO-style weighted k-NN: votes exp(cosine / T) from the k nearest training cells."""

    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)


class ImbalanceConfig(_Strict):
    # balanced: +3.7 points of blast balanced accuracy on an independent real cohort (0.861 vs 0.824)
    class_weight: ClassWeight = "balanced"
    sampling: ClassWeight = Field("none", description="balanced: mini-batches drawn with equal class odds")


class BlastLabelConfig(_Strict):
    """Where blast / non-blast labels come from: ``is_blast``, or cell types mapped here."""

    source: Literal["is_blast", "cell_type"] = "is_blast"
    blast_types: list[str] = Field(default_factory=list, description="cell types that are blasts (source=cell_type)")
    non_blast_types: list[str] | None = Field(None, description="cell types that are not; None: every other type")

    @model_validator(mode="after")
    def _types_given(self) -> BlastLabelConfig:
        if self.source == "cell_type" and not self.blast_types:
            raise ValueError("blast.blast_types must list the blast cell types when blast.source is cell_type")
        return self


# The patient heads of the mutation task (``probe fit mutation --aggregate``): the PATIENT_HEADS registry's table.
PATIENT_HEAD_CLASSES = {
    "mean": "marrowlens.probes.pooling:MeanPooling",
    "vote": "marrowlens.probes.pooling:VotePooling",
    "abmil": "marrowlens.probes.abmil:AttentionMIL",
    "composition": "marrowlens.probes.composition:Composition",
}
PATIENT_HEAD_NAMES = tuple(PATIENT_HEAD_CLASSES)


class MutationTaskConfig(_Strict):
    control: str | None = Field("control", description="the mutation value of control patients (absent is fine)")
    control_cells: Literal["non_blast", "kept", "all"] = Field(
        "non_blast", description="which cells of control patients train the control class"
    )
    blast_threshold: float = Field(0.5, ge=0, le=1, description="cells with P(blast) >= this are kept")
    aggregate: Literal[PATIENT_HEAD_NAMES] = Field(  # type: ignore[valid-type]
        "mean", description="the patient head: mean | vote of the kept cells' calls, abmil, or composition"
    )


class CellTypeTaskConfig(_Strict):
    mapping: dict[str, str] = Field(default_factory=dict, description="raw cell type -> class; unmapped types dropped")
    min_cells: int = Field(2, ge=1, description="classes with fewer labelled cells are dropped")


class AbmilConfig(_Strict):
    """Gated-attention MIL over a patient's cells (Ilse et al. 2018), trained on patient labels only."""

    cells: Literal["kept", "all"] = Field(
        "all", description="kept: the filter's cells only; all: every cell, its P(blast) an extra input"
    )
    hidden_dim: int = Field(64, ge=1, description="width of the per-cell projection before attention")
    attention_dim: int = Field(32, ge=1, description="width of the gated attention network (fixed, not tuned)")
    dropout: float = Field(0.25, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-3, ge=0)
    max_epochs: int = Field(200, ge=1, description="epochs at most; early stopping picks fewer")
    patience: int = Field(20, ge=1, description="epochs without a better held-out loss before stopping")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="training patients held out for early stopping")
    fallback_epochs: int = Field(50, ge=1, description="epochs when too few patients to hold any out")
    seeds: int = Field(5, ge=1, description="models averaged, each with its own split and initialisation")
    batch_patients: int = Field(16, ge=1, description="patients per optimisation step")
    max_cells: int = Field(512, ge=1, description="cells per patient per training step (a random draw) at most")


class CompositionConfig(_Strict):
    """Each patient as its fractions of predicted cell types plus its blast fraction, into a logistic regression."""

    c_values: list[float] = Field(
        [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], min_length=1, description="inverse L2 strengths tried"
    )
    inner_folds: int = Field(
        3, ge=2, description="patient-grouped folds: out-of-fold cell types of training patients, and C"
    )


class ProbeEvalConfig(_Strict):
    cv: int = Field(5, ge=0, description="patient-grouped folds; 0 skips cross-validation")
    group_by: str | None = Field(
        None,
        description="cells.parquet column whose values CV holds out whole (a source, site or scan date): one fold "
        "per value when there are at most cv of them, else cv folds of values; None: patient-grouped folds",
    )
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of patients for the 95% intervals")
    ece_bins: int = Field(15, ge=2)
    sheets: int = Field(
        50, ge=0, description="contact sheets of correctly called patients (mutation task; misclassified: all)"
    )
    sheet_cells: int = Field(12, ge=1, description="cells on a patient's contact sheet, top contributions first")


# The probe heads offered (``probe fit --head``, probe configs): the HEADS registry's table.
HEAD_CLASSES = {
    "linear": "marrowlens.probes.heads:LinearProbe",
    "knn": "marrowlens.probes.heads:KNNProbe",
    "logistic": "marrowlens.probes.heads:LogisticProbe",
}
HEAD_NAMES = tuple(HEAD_CLASSES)


class ProbeConfig(_Strict):
    task: ProbeTask = "blast"
    head: Literal[HEAD_NAMES] = "linear"  # type: ignore[valid-type]
    linear: LinearHeadConfig = LinearHeadConfig()
    knn: KNNHeadConfig = KNNHeadConfig()
    loss: ProbeLossConfig = ProbeLossConfig()
    imbalance: ImbalanceConfig = ImbalanceConfig()
    blast: BlastLabelConfig = BlastLabelConfig()
    mutation: MutationTaskConfig = MutationTaskConfig()
    cell_type: CellTypeTaskConfig = CellTypeTaskConfig()
    abmil: AbmilConfig = AbmilConfig()
    composition: CompositionConfig = CompositionConfig()
    eval: ProbeEvalConfig = ProbeEvalConfig()
    seed: int = 0


# ---------------------------------------------------------------- study runs (marrowlens run)


OVERRIDE_HELP = "settings as a nested mapping merged over the YAML section by section, e.g. {trainer: {max_epochs: 2}}"


def _known_keys(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """A stage's ``override`` mapping names keys of its config (checked when the run config loads)."""
    problem = value_key_problem(model, values)
    if problem:
        raise ValueError(problem)
    return values


class PretrainStageConfig(_Strict):
    config: Path | None = Field(None, description="pretrain YAML, relative to the run config's folder")
    override: dict[str, Any] = Field(default_factory=dict, description=f"pretrain {OVERRIDE_HELP}")
    set: list[str] = Field(default_factory=list, description="pretrain overrides key.sub=value (after override)")

    @field_validator("override")
    @classmethod
    def _pretrain_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _known_keys(PretrainConfig, value)


class EmbedStageConfig(_Strict):
    batch_size: int = Field(256, ge=1)
    num_workers: int | None = Field(None, ge=0)
    precision: Precision = "32"
    stain_normalize: StainNormalization = "none"


class ProbeStageConfig(_Strict):
    task: ProbeTask
    config: Path | None = Field(None, description="probe YAML, relative to the run config's folder")
    override: dict[str, Any] = Field(default_factory=dict, description=f"probe {OVERRIDE_HELP}")
    set: list[str] = Field(default_factory=list, description="probe overrides key.sub=value (after override)")
    blast_probe: str | None = Field(
        None, description="an earlier probe of this run that filters blasts (mutation task)"
    )

    @field_validator("override")
    @classmethod
    def _probe_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _known_keys(ProbeConfig, value)


# The index kinds offered (run configs, ``index build --kind``): the INDEX_KINDS registry's table.
INDEX_KIND_CLASSES = {
    "flat": "marrowlens.retrieval.kinds:Flat",
    "ivf": "marrowlens.retrieval.kinds:IVF",
    "hnsw": "marrowlens.retrieval.kinds:HNSW",
    "ivfpq": "marrowlens.retrieval.kinds:IVFPQ",
}
INDEX_KIND_NAMES = tuple(INDEX_KIND_CLASSES)


class IndexStageConfig(_Strict):
    enabled: bool = True
    kind: Literal[("auto", *INDEX_KIND_NAMES)] = "auto"  # type: ignore[valid-type]
    metric: Metric = "cosine"
    override: dict[str, Any] = Field(
        default_factory=dict, description="FAISS parameters of the chosen kind, e.g. {nprobe: 32}"
    )
    set: list[str] = Field(default_factory=list, description="FAISS parameters key=value (after override)")


class RunConfig(_Strict):
    """A whole study: pretrain -> embed -> probes (in order) -> index -> report."""

    pretrain: PretrainStageConfig = PretrainStageConfig()
    embed: EmbedStageConfig = EmbedStageConfig()
    probes: dict[str, ProbeStageConfig] = Field(default_factory=dict)
    index: IndexStageConfig = IndexStageConfig()
    test_cohort: Path | None = Field(
        None, description="another cohort to test every probe on, as is (relative to the run config's folder)"
    )
    baselines: bool = Field(
        True,
        description="also fit every probe on a random-init backbone of the same architecture and on raw pixels, "
        "and set their figures beside the study's (`marrowlens run --no-baselines` turns them off)",
    )

    @model_validator(mode="after")
    def _filters_come_first(self) -> RunConfig:
        names = list(self.probes)
        for position, (name, probe) in enumerate(self.probes.items()):
            if probe.blast_probe is None:
                if probe.task == "mutation":
                    raise ValueError(f"probes.{name}: a mutation probe needs blast_probe (an earlier blast probe)")
                continue
            if probe.task != "mutation":
                raise ValueError(f"probes.{name}: blast_probe applies to mutation probes only")
            if probe.blast_probe not in names[:position] or self.probes[probe.blast_probe].task != "blast":
                raise ValueError(f"probes.{name}: blast_probe {probe.blast_probe!r} must name an earlier blast probe")
        return self

    def resolve_paths(self, base: Path) -> RunConfig:
        """Make the stage config, starting weights and test cohort paths absolute, relative to the config's folder."""

        def fix(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else (base / path).resolve()

        copy = self.model_copy(deep=True)
        copy.pretrain.config = fix(copy.pretrain.config)
        model = copy.pretrain.override.get("model")
        if isinstance(model, dict) and model.get("weights") is not None:  # pretrained weights: a file or hub folder
            model["weights"] = str(fix(Path(model["weights"])))
        for probe in copy.probes.values():
            probe.config = fix(probe.config)
        copy.test_cohort = fix(copy.test_cohort)
        return copy
