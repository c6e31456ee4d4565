"""Local pretrained weights, in the formats they are published in, onto a named timm model.

One job: read a checkpoint file or folder into the state dict of a timm model built here, or say in one
line why it does not fit. Nothing is downloaded. Formats:

- a ``.safetensors`` file (timm, Hugging Face, our own ``backbone.safetensors``);
- a Hugging Face hub folder as ``huggingface-cli download`` leaves it: ``model.safetensors`` (or its
  sharded ``model.safetensors.index.json``) or ``pytorch_model.bin``, beside an optional ``config.json``;
  timm's names, or ``transformers``' ViT/DINOv2 names (``facebook/dinov2-small``; see ``ssl.hf_names``);
- a torch pickle (``.pth``/``.pt``/``.bin``/``.ckpt``), read with ``weights_only=True`` (no code runs):
  a bare state dict (torchvision's ResNets name their tensors as timm's do; DINOv2's hub files, and
  DinoBloom's ``pytorch_model_s.bin`` on the Hugging Face hub, with their ``mask_token``), or one nested
  under ``teacher``/``student``/``state_dict``/``model`` -- DINO/DINOv2/DinoBloom training checkpoints
  keep the backbone under ``teacher`` as ``backbone.*`` beside ``dino_head.*``/``ibot_head.*``.

Prefixes (``module.``, ``_orig_mod.``, ``teacher_backbone.``, ``backbone.``, ``encoder.``) are stripped,
heads the backbone has no place for are dropped, and the model's own timm checkpoint filter runs last
(for ViTs it maps DINOv2 names and resamples the position embeddings to the configured input size).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from marrowlens.errors import MarrowLensError
from marrowlens.ssl.hf_names import from_transformers, transformers_prefix

HUB_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Where checkpoints keep the model's tensors, in the order they are looked for (teacher first: DINO's eval copy).
NESTS = ("teacher", "state_dict", "model", "module", "model_state_dict", "student")
PREFIXES = ("module.", "_orig_mod.", "model.")
# What else sits beside these is a head or a second copy (DINO's student); the teacher wins.
BACKBONE_PREFIXES = ("teacher_backbone.", "teacher.", "backbone.", "encoder.")
HEADS = ("dino_head.", "ibot_head.", "head.", "projection_head.", "prediction_head.", "prototypes.")
SHOWN = 3  # keys named in a misfit message, of each kind


@dataclass(frozen=True)
class WeightsSource:
    """Where weights come from: the path given, and the file(s) that hold the tensors."""

    given: Path
    files: tuple[Path, ...]
    architecture: str | None = None  # a hub folder's config.json says which timm model it is for

    @property
    def path(self) -> Path:
        """The one file that stands for the weights (a shard index for sharded folders)."""
        return self.files[0]


def locate_weights(path: Path) -> WeightsSource:
    """The file(s) behind a weights path (a file, or a hub folder); a one-line error when there are none."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return WeightsSource(path, (path, *_shards(path)))
        return WeightsSource(path, (path,))
    if not path.is_dir():
        raise MarrowLensError(f"weights file {path} does not exist")
    architecture = _architecture(path / "config.json")
    for name in HUB_FILES:
        found = path / name
        if found.is_file():
            shards = _shards(found) if name.endswith(".index.json") else ()
            return WeightsSource(path, (found, *shards), architecture)
    raise MarrowLensError(f"weights folder {path} holds none of {', '.join(HUB_FILES)}")


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MarrowLensError(f"cannot read weights {index}: not a shard index ({exc})") from exc
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise MarrowLensError(f"weights {index} name shards that are not there: {', '.join(missing[:SHOWN])}")
    return tuple(index.parent / n for n in names)


def _architecture(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    found = data.get("architecture") or next(iter(data.get("architectures") or []), None)  # timm's, transformers'
    return found if isinstance(found, str) else None


def read_tensors(source: WeightsSource) -> dict[str, Any]:
    """Everything the file(s) hold, as read; a corrupt or foreign file is named in one line."""
    out: dict[str, Any] = {}
    for file in source.files:
        if file.name.endswith(".index.json"):
            continue
        try:
            out.update(_read_file(file))
        except MarrowLensError:
            raise
        except Exception as exc:  # SafetensorError, UnpicklingError, RuntimeError, EOFError, ...
            reason = next(iter(str(exc).strip().splitlines()), "")
            raise MarrowLensError(f"cannot read weights {file}: {type(exc).__name__}: {reason}") from exc
    return out


def _read_file(file: Path) -> Mapping[str, Any]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    loaded = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise MarrowLensError(f"cannot read weights {file}: it holds a {type(loaded).__name__}, not a state dict")
    return loaded


def backbone_state(raw: Mapping[str, Any], model: nn.Module, source: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``raw`` that are the backbone, named as ``model`` names them."""
    state = _unwrap(raw, source)
    prefix = transformers_prefix(state)
    if prefix is not None:
        state = from_transformers(state, prefix)
    expected = set(model.state_dict())
    state = _strip_prefixes(state, expected)
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state) and not any(
        re.match(r"blocks\.\d+\.\d+\.", k) for k in expected
    ):  # DINOv2 trained with block chunks: blocks.<chunk>.<block>.*
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    classifier = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith((*HEADS, *classifier))}
    timm_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(timm_filter):
        try:
            state = dict(timm_filter(state, model))
        except Exception as exc:
            reason = next(iter(str(exc).strip().splitlines()), "")
            raise MarrowLensError(f"cannot map weights {source} onto {type(model).__name__}: {reason}") from exc
    return state


def _unwrap(raw: Mapping[str, Any], source: Path) -> dict[str, torch.Tensor]:
    current: Mapping[str, Any] = raw
    while not any(isinstance(v, torch.Tensor) for v in current.values()):
        nested = next((current[k] for k in NESTS if isinstance(current.get(k), Mapping)), None)
        if nested is None:
            keys = ", ".join(map(str, list(current)[:5])) or "none"
            raise MarrowLensError(f"weights {source} hold no tensors where a state dict is expected (keys: {keys})")
        current = nested
    return {str(k): v for k, v in current.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrappers' prefixes the model's own names do not start with; keep only a backbone's keys."""
    changed = True
    while changed:
        changed = False
        for prefix in (*PREFIXES, *BACKBONE_PREFIXES):
            if any(k.startswith(prefix) for k in expected) or not any(k.startswith(prefix) for k in state):
                continue
            if prefix in BACKBONE_PREFIXES:
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            else:
                state = {k.removeprefix(prefix): v for k, v in state.items()}
            changed = True
    return state


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def load_weights(model: nn.Module, name: str, path: Path) -> WeightsSource:
    """Load local weights into ``model`` (a timm ``name``); every tensor must fit, or a one-line error says which."""
    source = locate_weights(path)
    state = backbone_state(read_tensors(source), model, source.path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(found)} {kind} ({', '.join(found[:SHOWN])}{', ...' if len(found) > SHOWN else ''})"
            for kind, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if found
        ]
        hint = f"; its config.json is for {source.architecture}" if source.architecture else ""
        raise MarrowLensError(f"weights {path} do not fit {name}: {len(own)} tensors, {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=False)
    return source
