"""The method registry, and BYOL/VICReg wiring (the methods as units, without a Trainer)."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from marrowlens.config import METHOD_NAMES, PretrainConfig, load_config
from marrowlens.ssl.base import SSLModule
from marrowlens.ssl.byol import BYOL
from marrowlens.ssl.methods import METHODS
from marrowlens.ssl.simclr import SimCLR
from marrowlens.ssl.vicreg import VICReg
from tests.ssl.conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps run without a Trainer

SMALL_HEADS = [
    "simclr.hidden_dim=32",
    "simclr.out_dim=16",
    "dino.hidden_dim=32",
    "dino.bottleneck_dim=16",
    "dino.out_dim=64",
    "dino.n_local_views=2",
    "dino.local_crop_size=16",
    "byol.hidden_dim=32",
    "byol.out_dim=16",
    "vicreg.hidden_dim=32",
    "vicreg.out_dim=32",
]


def _config(method: str, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig, None, [*TINY, *SMALL_HEADS, "model.backbone=test_resnet", f"model.method={method}", *extra]
    )


def _module(method: str, *extra: str) -> SSLModule:
    torch.manual_seed(0)
    return METHODS[method].from_config(_config(method, *extra), lr=0.1)


def test_registry_holds_exactly_the_configurable_methods() -> None:
    assert tuple(METHODS) == METHOD_NAMES


def test_cli_help_names_every_method() -> None:
    from marrowlens.cli import pretrain

    help_text = inspect.signature(pretrain).parameters["method"].default.help
    assert all(name in help_text for name in METHOD_NAMES)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_training_step_consumes_the_views_the_method_builds(method: str) -> None:
    module, config = _module(method), _config(method)
    views = type(module).build_views(config, (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    cells = [views(Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))) for _ in range(4)]
    batch = [torch.stack([cell[i] for cell in cells]) for i in range(len(cells[0]))]
    loss = module.training_step((batch, torch.arange(4)), 0)
    assert torch.isfinite(loss)
    if method == "dino":  # the teacher takes the two global views, the student all of them
        assert len(batch) == 2 + config.dino.n_local_views
    else:
        assert len(batch) == 2


class TestBYOL:
    def test_target_is_an_ema_of_the_online_network(self) -> None:
        module = _module("byol", "byol.momentum_start=0.5", "byol.momentum_end=1.0")
        assert isinstance(module, BYOL)
        online, target = module.backbone, module.target_backbone
        assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))
        assert not any(p.requires_grad for p in target.parameters())
        with torch.no_grad():
            for p in online.parameters():
                p.add_(1.0)
        before = [p.detach().clone() for p in target.parameters()]
        module.trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10)
        module.on_train_batch_start(None, 0)  # momentum 0.5 at step 0
        for old, new, current in zip(before, target.parameters(), online.parameters()):
            assert torch.allclose(new, 0.5 * old + 0.5 * current)
        assert not torch.equal(next(target.parameters()), next(online.parameters()))
        moved = [p.detach().clone() for p in target.parameters()]
        module.trainer = SimpleNamespace(global_step=9, estimated_stepping_batches=10)
        module.on_train_batch_start(None, 0)  # momentum 1.0 at the last step: the target stays
        assert all(torch.equal(a, b) for a, b in zip(moved, target.parameters()))

    def test_exports_the_online_backbone(self) -> None:
        module = _module("byol")
        assert module.embedding_backbone is module.backbone


def test_vicreg_loss_is_finite_and_falls_on_a_repeated_batch() -> None:
    module = _module("vicreg")
    assert isinstance(module, VICReg)
    optimizer = torch.optim.AdamW([p for m in module.trainable() for p in m.parameters()], lr=1e-3)
    torch.manual_seed(1)
    batch = ([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], torch.arange(8))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["byol", "vicreg"])
def test_pretrains_from_the_cli_and_embeds(cli, labelled_cohort: Path, tmp_path: Path, method: str) -> None:
    from tests.ssl.test_train import CONFIG, _sets

    run = tmp_path / "run"
    code, output = cli(
        "pretrain",
        "--config",
        CONFIG,
        "--cohort",
        labelled_cohort,
        "--out",
        run,
        "--method",
        method,
        "--backbone",
        "test_resnet",
        "--max-epochs",
        "2",
        *_sets(),
    )
    assert code == 0, output
    assert f"{method} with test_resnet" in output and (run / "backbone.safetensors").is_file()
    code, output = cli(
        "embed", "--model", run, "--cohort", labelled_cohort, "--out", tmp_path / "emb", "--num-workers", "0"
    )
    assert code == 0, output
    assert (tmp_path / "emb").is_dir() and any((tmp_path / "emb").iterdir())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_constructor_defaults_are_the_config_defaults(method: str) -> None:
    """A method built from plain arguments trains as one built from the default config."""
    cls = METHODS[method]
    from_config = cls.method_args(PretrainConfig())
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items() if name in from_config}
    assert defaults == from_config


class _TwoViews(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        return [torch.randn(3, 32, 32), torch.randn(3, 32, 32)], index


def test_a_method_builds_from_plain_arguments_and_its_checkpoint_rebuilds_it(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    torch.manual_seed(0)
    module = SimCLR(timm_name="test_resnet", image_size=32, lr=0.05, hidden_dim=32, out_dim=16, optimizer="adamw")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(_TwoViews(), batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)  # as Lightning resumes
    assert saved["hyper_parameters"] == {
        **dict(module.hparams),
        "timm_name": "test_resnet",
        "image_size": 32,
        "lr": 0.05,
        "hidden_dim": 32,
        "out_dim": 16,
        "temperature": 0.1,
        "optimizer": "adamw",
    }
    rebuilt = SimCLR.load_from_checkpoint(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert rebuilt.lr == 0.05 and dict(rebuilt.hparams) == dict(module.hparams)
    state, again = module.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
