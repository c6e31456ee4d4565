"""A trained backbone as a folder timm loads in one line (``model.safetensors`` + ``config.json``).

The folder is timm's Hugging Face hub layout: ``timm.create_model("local-dir:OUT", pretrained=True)``
builds the pooled-feature backbone (``num_classes=0``) with our weights, and
``timm.data.resolve_data_config(model=model)`` finds our input size, mean, std and interpolation.
``crop_pct=1.0`` and ``crop_mode="squash"`` make timm's eval transform resize the whole image to the
input size, as ours does; the one step timm has no equivalent for is padding a non-square image to a
square with its border's median colour first (``pad_to_square``). ``preprocessing.json`` names our full
recipe beside the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marrowlens import __version__
from marrowlens.artifacts import artifact_kind, atomic_path, clean_stale_temporaries, json_text
from marrowlens.contracts import BackboneRecord, Preprocessing
from marrowlens.errors import MarrowLensError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RECIPE = "preprocessing.json"
FILES = (WEIGHTS, RECIPE, CONFIG)  # config.json last: timm reads the folder through it

PAD_NOTE = (
    "pad_to_square: MarrowLens first pads a non-square image to a square with the median colour of its border "
    "pixels; timm's transform has no such step and squashes it instead (same result for square images)"
)


@dataclass
class TimmExport:
    folder: Path
    info: BackboneRecord
    differences: list[str]


def timm_data_config(record: Preprocessing) -> dict[str, Any]:
    """The ``pretrained_cfg`` fields timm's ``resolve_data_config`` / ``create_transform`` read."""
    return {
        "input_size": (3, record.image_size, record.image_size),
        "mean": tuple(record.mean),
        "std": tuple(record.std),
        "interpolation": record.interpolation,
        "crop_pct": 1.0,  # resize to the input size, crop nothing
        "crop_mode": "squash",  # both sides to the input size, as T.Resize((s, s)) does
    }


def model_args(info: BackboneRecord) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that rebuild this backbone (beyond its name)."""
    from marrowlens.ssl.backbones import is_vit

    args: dict[str, Any] = {"num_classes": 0}
    if is_vit(info.timm_name):  # built at our input size, with local crops of other sizes allowed
        args.update(img_size=info.preprocessing.image_size, dynamic_img_size=True)
    return args


def hub_config(model: Any, info: BackboneRecord) -> dict[str, Any]:
    """``config.json`` in timm's hub format (what ``timm.models.load_model_config_from_path`` parses)."""
    source = getattr(model, "pretrained_cfg", None) or {}
    pretrained_cfg: dict[str, Any] = {"custom_load": False, **timm_data_config(info.preprocessing)}
    pretrained_cfg.update(fixed_input_size=False, num_classes=0)
    for key in ("first_conv", "classifier"):
        if source.get(key):
            pretrained_cfg[key] = source[key]
    return {
        "architecture": info.timm_name,
        "num_classes": 0,
        "num_features": info.num_features,
        "model_args": model_args(info),
        "pretrained_cfg": pretrained_cfg,
    }


def transform_differences(record: Preprocessing) -> list[str]:
    """The steps of our eval transform that timm's own transform from ``config.json`` does not reproduce."""
    return [PAD_NOTE] if record.pad_to_square else []


def recipe(info: BackboneRecord, run: Path, differences: list[str]) -> dict[str, Any]:
    """``preprocessing.json``: what ``marrowlens embed`` does to an image before this backbone sees it."""
    record = info.preprocessing
    return {
        "marrowlens_version": __version__,
        "run": str(run.resolve()),
        "timm_name": info.timm_name,
        "fingerprint": info.fingerprint,
        "steps": [
            {"step": "convert", "mode": "RGB"},
            *(
                [{"step": "pad_to_square", "fill": "median colour of the border pixels", "position": "centre"}]
                if record.pad_to_square
                else []
            ),
            {
                "step": "resize",
                "size": [record.image_size, record.image_size],
                "interpolation": record.interpolation,
                "antialias": True,
            },
            {"step": "to_tensor", "scale": "0..1"},
            {"step": "normalize", "mean": list(record.mean), "std": list(record.std)},
        ],
        "timm_transform": {k: list(v) if isinstance(v, tuple) else v for k, v in timm_data_config(record).items()},
        "timm_transform_differences": differences,
        "note": "stores embedded with --stain-normalize reinhard also colour-normalise each cell (see their meta.json)",
    }


def _require_run(run: Path) -> None:
    if not run.is_dir():
        raise MarrowLensError(f"{run} is not a `marrowlens pretrain` run folder (no such folder)")
    if not (run / "backbone.json").is_file():
        kind = artifact_kind(run)
        what = f"its meta.json names kind {kind!r}" if kind not in (None, "run") else "backbone.json is missing"
        raise MarrowLensError(f"{run} is not a finished `marrowlens pretrain` run ({what})")


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MarrowLensError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MarrowLensError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)


def export_timm(run: str | Path, out: str | Path, overwrite: bool = False) -> TimmExport:
    """Write ``model.safetensors``, ``preprocessing.json`` and ``config.json`` (last) into ``out``, atomically."""
    from safetensors.torch import save_file

    from marrowlens.ssl.backbones import load_backbone

    run, out = Path(run), Path(out)
    _require_run(run)
    model, info = load_backbone(run)  # refuses weights that do not match their recorded fingerprint
    _prepare(out, overwrite)
    differences = transform_differences(info.preprocessing)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    (out / CONFIG).unlink(missing_ok=True)  # the folder is unfinished until config.json is back
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(out / name)) for name in reversed(FILES)}  # config renamed last
        save_file(state, str(tmp[WEIGHTS]), metadata={"format": "pt", "timm_name": info.timm_name})
        tmp[RECIPE].write_text(json_text(recipe(info, run, differences)))
        tmp[CONFIG].write_text(json_text(hub_config(model, info)))
    return TimmExport(folder=out, info=info, differences=differences)
