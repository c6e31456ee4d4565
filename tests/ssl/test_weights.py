"""Local pretrained weights in their published formats: DinoBloom ``.pth``, safetensors files, hub folders,
torchvision state dicts. Every checkpoint is built here from a tiny model (nothing is downloaded)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from safetensors.torch import save_file
from timm.models import vision_transformer

from marrowlens.config import PretrainConfig, RunConfig, load_config
from marrowlens.embeddings import load_embeddings
from marrowlens.errors import MarrowLensError
from marrowlens.ssl.backbones import create_backbone, load_backbone
from marrowlens.ssl.methods import METHODS
from tests.conftest import REPO_ROOT
from tests.ssl.conftest import TINY

TINY_DINOV2 = "marrowlens_test_patch14_dinov2"
TINY_DINOV2_G = "marrowlens_test_patch14_dinov2_swiglu"  # DinoBloom-G's layout: SwiGLU MLPs


def _register(name: str, **layout: Any) -> None:
    """A ViT with DINOv2's layout (patch 14, LayerScale, 224 px like DinoBloom) at a width and depth that run
    anywhere, registered as timm's own ViTs are, so it is built as one."""
    args: dict[str, Any] = {"patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 2, "init_values": 1e-5}
    args |= {"img_size": 224, **layout}

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> vision_transformer.VisionTransformer:
        return vision_transformer._create_vision_transformer("vit_small_patch14_dinov2", pretrained, **(args | kwargs))

    if not timm.models.is_model(name):
        entrypoint.__name__, entrypoint.__module__ = name, vision_transformer.__name__
        timm.models.register_model(entrypoint)


_register(TINY_DINOV2)
_register(TINY_DINOV2_G, mlp_ratio=4, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)


def _vectors(model: torch.nn.Module, size: int, seed: int = 0) -> torch.Tensor:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.eval()(images)


@pytest.fixture(scope="module")
def dinobloom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A DinoBloom checkpoint as published: ``teacher`` -> ``backbone.*`` (DINOv2 names, ``mask_token``,
    257 position embeddings for 224 px at patch 14) beside the DINO and iBOT heads."""
    torch.manual_seed(3)
    source = timm.create_model(TINY_DINOV2, num_classes=0).eval()
    teacher = {f"backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    teacher["backbone.mask_token"] = torch.zeros(1, 48)
    for head in ("dino_head", "ibot_head"):
        teacher[f"{head}.mlp.0.weight"] = torch.randn(64, 48)
        teacher[f"{head}.mlp.0.bias"] = torch.randn(64)
        teacher[f"{head}.last_layer.weight_g"] = torch.ones(128, 1)
    path = tmp_path_factory.mktemp("dinobloom") / "DinoBloom-S.pth"
    torch.save({"teacher": teacher}, path)
    assert source.pos_embed.shape[1] == 257
    return path, source


class TestDinoBloom:
    def test_same_size_gives_the_source_vectors(self, dinobloom: tuple[Path, torch.nn.Module]) -> None:
        path, source = dinobloom
        model = create_backbone(TINY_DINOV2, 224, path)
        torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)

    def test_position_embeddings_are_interpolated_to_the_configured_size(
        self, dinobloom: tuple[Path, torch.nn.Module]
    ) -> None:
        path, source = dinobloom
        model = create_backbone(TINY_DINOV2, 56, path)
        assert model.pos_embed.shape == (1, 1 + 4 * 4, 48)
        torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's, as it was
        torch.testing.assert_close(model.blocks[1].ls2.gamma, source.blocks[1].ls2.gamma)
        assert _vectors(model, 56).shape == (3, 48)

    def test_block_chunks_and_student_only_checkpoints(
        self, dinobloom: tuple[Path, torch.nn.Module], tmp_path: Path
    ) -> None:
        """DINOv2 trained with block chunks names blocks ``blocks.<chunk>.<block>``; some files keep only a student."""
        path, source = dinobloom
        teacher = torch.load(path, weights_only=True)["teacher"]
        chunked = {
            k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in teacher.items()
        }
        torch.save({"student": chunked, "iteration": 10}, tmp_path / "chunked.pth")
        model = create_backbone(TINY_DINOV2, 224, tmp_path / "chunked.pth")
        torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)

    def test_hub_and_training_layouts(self, dinobloom: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
        """The same weights as the Hugging Face hub's flat ``pytorch_model_s.bin`` (DINOv2 names, ``mask_token``
        kept), and as a DINO Lightning checkpoint (``teacher_backbone.*`` beside the student and the heads)."""
        path, source = dinobloom
        teacher = torch.load(path, weights_only=True)["teacher"]
        flat = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
        torch.save(flat, tmp_path / "pytorch_model_s.bin")
        lightning = {f"teacher_backbone.{k}": v for k, v in flat.items() if k != "mask_token"}
        lightning |= {f"student_backbone.{k}": torch.zeros_like(v) for k, v in flat.items() if k != "mask_token"}
        lightning["teacher_head.layers.0.weight"] = torch.randn(4, 4)
        torch.save({"state_dict": lightning, "epoch": 1}, tmp_path / "last.ckpt")
        for file in ("pytorch_model_s.bin", "last.ckpt"):
            model = create_backbone(TINY_DINOV2, 224, tmp_path / file)
            torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)

    def test_swiglu_names_of_dinov2_giant(self, tmp_path: Path) -> None:
        """DINOv2-G (so DinoBloom-G) names its SwiGLU layers ``mlp.w12``/``mlp.w3``; timm packs them as fc1/fc2."""
        torch.manual_seed(5)
        source = timm.create_model(TINY_DINOV2_G, num_classes=0).eval()
        teacher = {
            f"backbone.{k}".replace(".fc1.", ".w12.").replace(".fc2.", ".w3."): v
            for k, v in source.state_dict().items()
        }
        teacher["backbone.mask_token"] = torch.zeros(1, 48)
        assert "backbone.blocks.0.mlp.w12.weight" in teacher
        torch.save({"teacher": teacher}, tmp_path / "DinoBloom-G.pth")
        model = create_backbone(TINY_DINOV2_G, 224, tmp_path / "DinoBloom-G.pth")
        torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)

    def test_another_model_is_refused_in_one_line_naming_keys(self, dinobloom: tuple[Path, torch.nn.Module]) -> None:
        path, _ = dinobloom
        with pytest.raises(MarrowLensError) as caught:
            create_backbone("test_vit", 32, path)
        message = str(caught.value)
        assert "\n" not in message and f"weights {path} do not fit test_vit" in message
        assert "unexpected (blocks.0.ls1.gamma" in message and "of another shape (cls_token (1, 1, 48) vs" in message

    def test_record_names_the_file_and_its_hash(self, dinobloom: tuple[Path, torch.nn.Module]) -> None:
        path, _ = dinobloom
        _, info = load_backbone(TINY_DINOV2, weights=path, image_size=56)
        assert info.source == str(path.resolve()) and info.fingerprint.startswith("sha256:")
        assert info.image_size == 56


def _transformers_names(state: dict[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """timm's ViT tensors named as ``transformers`` saves a ``Dinov2Model`` (``layout="dinov2"``) or a
    ``ViTModel`` (``"vit"``): q, k and v apart, ``encoder.layer.N``, ``layernorm``."""
    block_names = {
        "dinov2": {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
        "vit": {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense"},
    }[layout] | {"mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out", "attn.proj": "attention.output.dense"}
    if layout == "vit":
        block_names["mlp.fc2"] = "output.dense"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        block = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if key in ("cls_token", "pos_embed"):
            out[{"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings"}[key]] = tensor
        elif key.startswith("patch_embed.proj."):
            out[key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")] = tensor
        elif key.startswith("norm."):
            out[key.replace("norm.", "layernorm.")] = tensor
        elif block and block[2] == "attn.qkv":
            for name, part in zip(("query", "key", "value"), tensor.chunk(3), strict=True):
                out[f"encoder.layer.{block[1]}.attention.attention.{name}.{block[3]}"] = part
        elif block and block[2] in ("ls1", "ls2"):
            out[f"encoder.layer.{block[1]}.layer_scale{block[2][-1]}.lambda1"] = tensor
        else:
            assert block, key
            out[f"encoder.layer.{block[1]}.{block_names[block[2]]}.{block[3]}"] = tensor
    if layout == "dinov2":
        out["embeddings.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return {f"{prefix}{k}": v.contiguous() for k, v in out.items()}


def _transformers_folder(folder: Path, state: dict[str, torch.Tensor], architecture: str) -> Path:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "dinov2"}))
    return folder


class TestTransformersFolders:
    """Folders saved by Hugging Face ``transformers`` (``facebook/dinov2-small``, ``google/vit-base``)."""

    def test_dinov2_model_gives_the_source_vectors(
        self, dinobloom: tuple[Path, torch.nn.Module], tmp_path: Path
    ) -> None:
        _, source = dinobloom
        folder = _transformers_folder(
            tmp_path / "dinov2", _transformers_names(source.state_dict(), "dinov2"), "Dinov2Model"
        )
        model = create_backbone(TINY_DINOV2, 224, folder)
        torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)
        assert create_backbone(TINY_DINOV2, 56, folder).pos_embed.shape == (1, 17, 48)

    def test_swiglu_dinov2_giant(self, tmp_path: Path) -> None:
        torch.manual_seed(6)
        source = timm.create_model(TINY_DINOV2_G, num_classes=0).eval()
        timm_state = {k.replace(".fc1.", ".w12.").replace(".fc2.", ".w3."): v for k, v in source.state_dict().items()}
        state = _transformers_names(timm_state, "dinov2")
        assert "encoder.layer.0.mlp.weights_in.weight" in state
        model = create_backbone(TINY_DINOV2_G, 224, _transformers_folder(tmp_path / "g", state, "Dinov2Model"))
        torch.testing.assert_close(_vectors(model, 224), _vectors(source, 224), rtol=0, atol=0)

    def test_a_vit_classifier_drops_its_pooler_and_head(self, tmp_path: Path) -> None:
        torch.manual_seed(8)
        source = timm.create_model("test_vit", num_classes=0).eval()
        state = _transformers_names(source.state_dict(), "vit", prefix="vit.")
        state |= {"vit.pooler.dense.weight": torch.randn(64, 64), "classifier.weight": torch.randn(3, 64)}
        model = create_backbone(
            "test_vit", 160, _transformers_folder(tmp_path / "vit", state, "ViTForImageClassification")
        )
        torch.testing.assert_close(_vectors(model, 160), _vectors(source, 160), rtol=0, atol=0)

    def test_a_missing_value_projection_is_named_in_one_line(
        self, dinobloom: tuple[Path, torch.nn.Module], tmp_path: Path
    ) -> None:
        _, source = dinobloom
        state = _transformers_names(source.state_dict(), "dinov2")
        del state["encoder.layer.1.attention.attention.value.weight"]
        folder = _transformers_folder(tmp_path / "broken", state, "Dinov2Model")
        with pytest.raises(MarrowLensError) as caught:
            create_backbone(TINY_DINOV2, 224, folder)
        message = str(caught.value)
        assert "\n" not in message and "1 missing (blocks.1.attn.qkv.weight)" in message
        assert "2 unexpected (blocks.1.attn." in message and "blocks.1.attn.query.weight" in message
        assert "its config.json is for Dinov2Model" in message


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(7)
    return timm.create_model("test_resnet", num_classes=0).eval()


def _safetensors_file(model: torch.nn.Module, folder: Path) -> Path:
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _hub_folder(model: torch.nn.Module, folder: Path) -> Path:
    """As ``huggingface-cli download timm/NAME`` leaves it (a classifier included, which the backbone drops)."""
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state |= {"fc.weight": torch.randn(5, model.num_features), "fc.bias": torch.zeros(5)}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 5}))
    return folder


def _sharded_folder(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir()
    names = list(model.state_dict())
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    halves["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    for file, keys in halves.items():
        save_file({k: model.state_dict()[k].contiguous() for k in keys}, str(folder / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _lightning_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    """A DDP-wrapped training checkpoint: ``state_dict`` -> ``module.backbone.*`` beside a projection head."""
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    state["module.projection_head.layers.0.weight"] = torch.randn(4, 4)
    torch.save({"epoch": 3, "state_dict": state}, folder / "last.ckpt")
    return folder / "last.ckpt"


FORMATS: dict[str, Callable[[torch.nn.Module, Path], Path]] = {
    "safetensors": _safetensors_file,
    "hub_folder": lambda m, d: _hub_folder(m, d / "hub"),
    "sharded_hub_folder": lambda m, d: _sharded_folder(m, d / "sharded"),
    "lightning": _lightning_checkpoint,
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_format_gives_the_source_vectors(kind: str, resnet: torch.nn.Module, tmp_path: Path) -> None:
    path = FORMATS[kind](resnet, tmp_path)
    model, info = load_backbone("test_resnet", weights=path, image_size=32)
    torch.testing.assert_close(_vectors(model, 32), _vectors(resnet, 32), rtol=0, atol=0)
    assert info.fingerprint.startswith("sha256:") and Path(info.source).is_file()
    again, same = load_backbone("test_resnet", weights=Path(info.source), image_size=32)  # as search reloads it
    assert same.fingerprint == info.fingerprint
    torch.testing.assert_close(_vectors(again, 32), _vectors(resnet, 32), rtol=0, atol=0)


def test_torchvision_resnet_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(11)
    source = torchvision.models.resnet18(weights=None).eval()
    torch.save(source.state_dict(), tmp_path / "resnet18-torchvision.pth")
    model = create_backbone("resnet18", 32, tmp_path / "resnet18-torchvision.pth")
    source.fc = torch.nn.Identity()
    torch.testing.assert_close(_vectors(model, 32), _vectors(source, 32))
    with pytest.raises(MarrowLensError, match=r"do not fit resnet34: \d+ tensors, \d+ missing \(layer1\.2\.") as caught:
        create_backbone("resnet34", 32, tmp_path / "resnet18-torchvision.pth")
    assert "\n" not in str(caught.value)


def test_a_hub_folder_for_another_model_says_which(resnet: torch.nn.Module, tmp_path: Path) -> None:
    folder = _hub_folder(resnet, tmp_path / "hub")
    with pytest.raises(MarrowLensError, match="its config.json is for test_resnet") as caught:
        create_backbone("test_vit", 32, folder)
    assert "\n" not in str(caught.value) and "missing (cls_token" in str(caught.value)


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.pth", bytes(range(256)) * 4),
        ("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
        ("empty.bin", b""),
    ],
)
def test_a_corrupt_file_is_named_in_one_line(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MarrowLensError, match=f"cannot read weights {tmp_path / name}") as caught:
        create_backbone("test_resnet", 32, tmp_path / name)
    assert "\n" not in str(caught.value)


def test_files_that_hold_no_state_dict_or_nothing(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(MarrowLensError, match="holds a list, not a state dict"):
        create_backbone("test_resnet", 32, tmp_path / "list.pth")
    torch.save({"config": {"lr": 0.1}}, tmp_path / "notensors.pth")
    with pytest.raises(MarrowLensError, match=r"hold no tensors .* \(keys: config\)"):
        create_backbone("test_resnet", 32, tmp_path / "notensors.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarrowLensError, match="holds none of model.safetensors"):
        create_backbone("test_resnet", 32, tmp_path / "empty")


def test_embed_cli_with_dinobloom_weights(
    cli, labelled_cohort: Path, dinobloom: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """``marrowlens embed --model NAME --weights FILE``: a frozen pretrained backbone, no pretraining."""
    path, _ = dinobloom
    args = ("embed", "--model", TINY_DINOV2, "--weights", path, "--image-size", "28", "--cohort", labelled_cohort)
    code, output = cli(*args, "--out", tmp_path / "emb", "--num-workers", "0")
    assert code == 0, output
    store = load_embeddings(tmp_path / "emb")
    assert store.vectors.shape == (32, 48)
    assert store.meta.model.source == str(path.resolve()) and store.meta.model.image_size == 28
    _, info = load_backbone(TINY_DINOV2, weights=path, image_size=28)
    assert store.model_fingerprint == info.fingerprint


def test_run_config_weights_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"pretrain": {"override": {"model": {"weights": "w/DinoBloom-S.pth"}}}})
    resolved = config.resolve_paths(tmp_path)
    assert resolved.pretrain.override["model"]["weights"] == str(tmp_path / "w/DinoBloom-S.pth")
    absolute = RunConfig.model_validate({"pretrain": {"override": {"model": {"weights": "/data/w.pth"}}}})
    assert absolute.resolve_paths(tmp_path).pretrain.override["model"]["weights"] == "/data/w.pth"


@pytest.mark.parametrize("method", ["simclr", "dino", "byol", "vicreg"])
def test_pretraining_starts_from_the_weights(method: str, dinobloom: tuple[Path, torch.nn.Module]) -> None:
    """``model.weights`` (``pretrain --weights``): every method's backbone starts as the checkpoint, at the
    configured input size (DINO's teacher too, as a copy of its student)."""
    path, source = dinobloom
    values = {"model": {"method": method, "backbone": TINY_DINOV2, "image_size": 56, "weights": path}}
    config = load_config(PretrainConfig, REPO_ROOT / "configs/pretrain/tiny_cpu.yaml", values=values)
    module = METHODS[method].from_config(config, lr=0.1)
    backbone = module.embedding_backbone
    assert backbone.pos_embed.shape == (1, 17, 48)
    torch.testing.assert_close(backbone.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_pretrain_cli_from_a_hub_folder(cli, labelled_cohort: Path, resnet: torch.nn.Module, tmp_path: Path) -> None:
    folder = _hub_folder(resnet, tmp_path / "hub")
    sets = [arg for item in (*TINY, "data.val_cells=0") for arg in ("--set", item)]
    config = REPO_ROOT / "configs/pretrain/tiny_cpu.yaml"
    args = ("pretrain", "--config", config, "--backbone", "test_resnet", "--weights", folder, "--max-epochs", "1")
    code, output = cli(*args, *sets, "--cohort", labelled_cohort, "--out", tmp_path / "run")
    assert code == 0, output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["weights"] == str(folder)
    code, output = cli(
        *args[:-4], "--weights", tmp_path / "nowhere", *sets, "--cohort", labelled_cohort, "--out", tmp_path / "x"
    )
    assert code == 2 and f"weights file {tmp_path / 'nowhere'} does not exist" in output


def test_run_redoes_pretraining_when_the_weights_file_changes(resnet: torch.nn.Module, tmp_path: Path) -> None:
    from marrowlens.pipeline import _weights_key

    path = _safetensors_file(resnet, tmp_path)
    config = load_config(PretrainConfig, None, values={"model": {"backbone": "test_resnet", "weights": path}})
    before = _weights_key(config)
    save_file({k: v.contiguous() + 1 for k, v in resnet.state_dict().items()}, str(path))
    assert before != _weights_key(config) and before[0].startswith("sha256:")
    assert _weights_key(load_config(PretrainConfig, None)) == []  # studies without weights keep their keys


def test_weights_beside_a_run_folder_are_refused(resnet: torch.nn.Module, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(MarrowLensError, match="--weights is for a bare timm name"):
        load_backbone(tmp_path / "run", weights=_safetensors_file(resnet, tmp_path))


def test_an_exported_timm_folder_embeds_as_its_run(cli, labelled_cohort: Path, tmp_path: Path) -> None:
    """``marrowlens export timm RUN DIR`` then ``embed --model NAME --weights DIR``: the run's own vectors."""
    sets = [arg for item in (*TINY, "data.val_cells=0") for arg in ("--set", item)]
    config = REPO_ROOT / "configs/pretrain/tiny_cpu.yaml"
    args = ("pretrain", "--config", config, "--backbone", "test_resnet", "--max-epochs", "1", *sets)
    code, output = cli(*args, "--cohort", labelled_cohort, "--out", tmp_path / "run")
    assert code == 0, output
    assert cli("export", "timm", tmp_path / "run", tmp_path / "timm")[0] == 0
    embed = ("embed", "--cohort", labelled_cohort, "--num-workers", "0")
    assert cli(*embed, "--model", tmp_path / "run", "--out", tmp_path / "by_run")[0] == 0
    code, output = cli(
        *embed, "--model", "test_resnet", "--weights", tmp_path / "timm", "--image-size", "32", "--out", tmp_path / "e"
    )
    assert code == 0, output
    by_run, by_folder = load_embeddings(tmp_path / "by_run"), load_embeddings(tmp_path / "e")
    assert by_folder.meta.model.source == str((tmp_path / "timm" / "model.safetensors").resolve())
    np.testing.assert_allclose(by_folder.vectors, by_run.vectors, rtol=1e-5, atol=1e-6)
