"""timm backbones: creation by name (offline weights only), export and reload of trained ones.

A backbone leaves a run as ``backbone.safetensors`` (a clean timm state dict, no ``backbone.``
prefixes, no pickles) + ``backbone.json`` (timm name, input size, mean/std, feature width,
fingerprint). Everything that embeds images loads it through :func:`load_backbone`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from marrowlens.artifacts import atomic_path, sha256_file, write_json_atomic
from marrowlens.contracts import BackboneRecord, Preprocessing
from marrowlens.errors import MarrowLensError
from marrowlens.ssl.preprocessing import Crop, for_backbone
from marrowlens.ssl.weights import WeightsSource, load_weights, locate_weights

WEIGHTS_FILE = "backbone.safetensors"
INFO_FILE = "backbone.json"


def is_vit(name: str) -> bool:
    """Transformers need ``dynamic_img_size`` so DINO's smaller local crops fit."""
    try:
        module = timm.models.get_arch_name(name)
        entry = timm.models.model_entrypoint(module if timm.models.is_model(module) else name)
    except (RuntimeError, ValueError):
        return False
    return any(word in entry.__module__ for word in ("vision_transformer", "deit", "eva", "beit"))


def feature_width(model: nn.Module) -> int:
    """The width of a timm model's pooled features (``num_features``)."""
    width = model.num_features
    if not isinstance(width, int):
        raise MarrowLensError(f"{type(model).__name__} does not say how wide its features are")
    return width


def create_backbone(name: str, image_size: int, weights: Path | None = None) -> nn.Module:
    """A pooled-feature timm model (``num_classes=0``); weights only from a local file or hub folder.

    The weights must fit the model exactly (see :mod:`marrowlens.ssl.weights`): a silently random
    backbone is worse than an error naming the tensors that are missing or unexpected.
    """
    if not timm.models.is_model(name):
        raise MarrowLensError(f"unknown timm model {name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if is_vit(name):
        kwargs.update(img_size=image_size, dynamic_img_size=True)
    source = locate_weights(Path(weights)) if weights is not None else None
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
        raise MarrowLensError(f"cannot build {name}: {exc}") from exc
    if source is not None:
        load_weights(model, name, source.given)
    return model


def weights_fingerprint(source: WeightsSource) -> str:
    """``sha256:`` of the one file that holds the weights (of the shards' hashes for sharded folders)."""
    files = [f for f in source.files if not f.name.endswith(".index.json")]
    if len(files) == 1:
        return "sha256:" + sha256_file(files[0])
    return "sha256:" + hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def export_backbone(model: nn.Module, name: str, preprocessing: Preprocessing, folder: Path) -> BackboneRecord:
    """Write ``backbone.safetensors`` and ``backbone.json`` (with its preprocessing record) atomically."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"timm_name": name})
    info = BackboneRecord(
        timm_name=name,
        num_features=feature_width(model),
        fingerprint="sha256:" + sha256_file(folder / WEIGHTS_FILE),
        source=str(folder.resolve()),
        preprocessing=preprocessing,
    )
    write_json_atomic(folder / INFO_FILE, info.model_dump(mode="json"))
    return info


def load_backbone(
    model_ref: str | Path,
    weights: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    crop: Crop | None = None,
) -> tuple[nn.Module, BackboneRecord]:
    """Load a backbone in eval mode from a run folder, or build a timm model by name.

    A run folder must hold ``backbone.json`` and ``backbone.safetensors``, and the weights must
    still match the fingerprint recorded beside them. A bare timm name takes ``--weights`` from a
    local file or, without it, a random initialisation (seeded: the untrained baseline). ``crop`` sets a
    bare name's crop; a run folder's is the one it was trained with (asking for another is an error).
    """
    folder = Path(model_ref)
    if folder.is_dir():
        if weights is not None:
            raise MarrowLensError(f"--weights is for a bare timm name; {folder} is a run folder with its own weights")
        info_path = folder / INFO_FILE
        if not info_path.is_file():
            raise MarrowLensError(
                f"{folder} holds no trained backbone ({INFO_FILE} is missing; did pretraining finish?)"
            )
        info = _read_info(info_path)
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise MarrowLensError(f"{folder} lacks {WEIGHTS_FILE}")
        actual = "sha256:" + sha256_file(weights_path)
        if actual != info.fingerprint:
            raise MarrowLensError(
                f"{weights_path} does not match the fingerprint in {INFO_FILE} (modified or truncated)"
            )
        if crop is not None and crop != info.preprocessing.crop:
            raise MarrowLensError(
                f"{folder} was trained on {info.preprocessing.crop}-frame images; it embeds them the same way "
                f"(drop --crop {crop})"
            )
        model = create_backbone(info.timm_name, info.image_size)
        model.load_state_dict(load_file(str(weights_path)))
        return model.eval(), info
    name = str(model_ref)
    size = image_size or 224
    if weights is None:
        torch.manual_seed(seed)
    model = create_backbone(name, size, weights)
    source = locate_weights(Path(weights)) if weights is not None else None
    fingerprint = weights_fingerprint(source) if source else f"random:{name}:seed{seed}"
    record = for_backbone(name, size, crop or "full")
    info = BackboneRecord(
        timm_name=name,
        num_features=feature_width(model),
        fingerprint=fingerprint,
        source=str(source.path.resolve()) if source else "random init",
        preprocessing=record,
    )
    return model.eval(), info


def _read_info(path: Path) -> BackboneRecord:
    """``backbone.json``, or a one-line error naming the file (hand-edited, truncated, another tool's)."""
    try:
        return BackboneRecord.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "the file"
        raise MarrowLensError(f"{path} is not a backbone record ({where}: {problem['msg']})") from None
