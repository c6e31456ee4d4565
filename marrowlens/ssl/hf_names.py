"""Hugging Face ``transformers`` ViT and DINOv2 tensor names, renamed to the DINOv2/timm names timm loads.

A folder saved by ``transformers`` (``facebook/dinov2-small``, a DinoBloom model converted to ``Dinov2Model``,
``google/vit-base-patch16-224``) names a block's tensors ``encoder.layer.N.attention.attention.query`` and so
on, and splits the attention's q/k/v. timm reads the original DINOv2 names (``blocks.N.attn.qkv``,
``ls1.gamma``, ``mask_token``), resamples the position embeddings and packs SwiGLU layers itself, so this only
renames and concatenates. Hand-written: the conversion scripts in ``transformers`` go the other way, and
``transformers`` is not a dependency for reading a state dict.
"""

from __future__ import annotations

import re

import torch

QUERY = re.compile(r"^(?P<prefix>.*?)encoder\.layer\.\d+\.attention\.attention\.query\.weight$")
# The model's own parts; a task model's pooler and classifier beside them are dropped.
PARTS = ("embeddings.", "encoder.", "layernorm.")
RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.(?:norm1|layernorm_before)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.(?:norm2|layernorm_after)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc\d)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),  # SwiGLU (DINOv2-G)
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),  # ViTModel's MLP
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def transformers_prefix(state: dict[str, torch.Tensor]) -> str | None:
    """The prefix before ``encoder.layer`` (``dinov2.``, ``vit.`` or none) when ``state`` is in transformers' names."""
    for key in state:
        found = QUERY.match(key)
        if found:
            return found["prefix"]
    return None


def from_transformers(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to DINOv2/timm names; q, k and v joined into one ``qkv`` per block."""
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    split: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in own.items():
        if not key.startswith(PARTS):
            continue
        qkv = QKV.match(key)
        if qkv:
            split.setdefault((qkv[1], qkv[3]), {})[qkv[2]] = tensor
            continue
        renamed = key
        for pattern, replacement in RENAMES:
            renamed, count = re.subn(pattern, replacement, renamed)
            if count:
                break
        out[renamed] = tensor
    for (block, kind), parts in split.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # named apart, so the misfit message names the qkv missing and the parts found
            out |= {f"blocks.{block}.attn.{part}.{kind}": t for part, t in parts.items()}
    if "mask_token" in out and out["mask_token"].dim() == 3:  # transformers keeps (1, 1, D); DINOv2 (1, D)
        out["mask_token"] = out["mask_token"].flatten(0, 1)
    return out
