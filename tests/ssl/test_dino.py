"""DINO's wiring as a unit (after lightly's ``tests/loss/test_dino_loss.py``): what the teacher sees,
the momentum and teacher-temperature schedules, the frozen last layer, the exported network."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from marrowlens.config import PretrainConfig, load_config
from marrowlens.ssl.dino import DINO
from tests.ssl.conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps run without a Trainer

HEADS = [
    "dino.hidden_dim=32",
    "dino.bottleneck_dim=16",
    "dino.out_dim=64",
    "dino.local_crop_size=16",
    "dino.n_local_views=2",
]


def _dino(*extra: str) -> DINO:
    torch.manual_seed(0)
    config = load_config(
        PretrainConfig, None, [*TINY, *HEADS, "model.method=dino", "model.backbone=test_resnet", *extra]
    )
    return DINO.from_config(config, lr=0.1)


def _batch(cells: int = 4) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(1)
    views = [torch.randn(cells, 3, 32, 32) for _ in range(2)] + [torch.randn(cells, 3, 16, 16) for _ in range(2)]
    return views, torch.arange(cells)


def test_teacher_sees_only_the_global_views() -> None:
    module = _dino()
    seen: dict[str, list[tuple[int, ...]]] = {"teacher": [], "student": []}
    module.teacher_backbone.register_forward_hook(lambda m, args, out: seen["teacher"].append(tuple(args[0].shape)))
    module.student_backbone.register_forward_hook(lambda m, args, out: seen["student"].append(tuple(args[0].shape)))
    module.training_step(_batch(), 0)
    assert seen["teacher"] == [(8, 3, 32, 32)]
    assert seen["student"] == [(8, 3, 32, 32), (8, 3, 16, 16)]


def test_momentum_goes_from_start_to_end_over_the_run() -> None:
    module = _dino("dino.momentum_start=0.9", "dino.momentum_end=1.0")
    momenta = []
    for step in range(10):
        module.trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=10)
        momenta.append(module.momentum())
    assert momenta[0] == pytest.approx(0.9) and momenta[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(momenta))


def test_teacher_moves_towards_the_student_before_each_batch() -> None:
    module = _dino("dino.momentum_start=0.5")
    with torch.no_grad():
        for p in module.student_head.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in module.teacher_head.parameters()]
    module.trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10)
    module.on_train_batch_start(None, 0)
    for old, new, student in zip(before, module.teacher_head.parameters(), module.student_head.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * student)


@pytest.mark.parametrize("epoch, frozen", [(0, True), (1, True), (2, False)])
def test_last_layer_gets_no_gradient_while_frozen(epoch: int, frozen: bool) -> None:
    module = _dino("dino.freeze_last_layer_epochs=2")
    module.training_step(_batch(), 0).backward()
    module.trainer = SimpleNamespace(current_epoch=epoch)
    module.on_after_backward()
    grads = [p.grad for p in module.student_head.last_layer.parameters() if p.requires_grad]  # the norm is fixed
    assert grads
    assert all(g is None for g in grads) if frozen else all(g is not None for g in grads)
    assert all(p.grad is not None for p in module.student_head.layers.parameters())


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    module = _dino("dino.warmup_teacher_temp=0.02", "dino.teacher_temp=0.06", "dino.warmup_teacher_temp_epochs=4")
    temps = []
    for epoch in (0, 2, 4, 7):
        module.trainer = SimpleNamespace(current_epoch=epoch)
        temps.append(module.teacher_temperature())
    assert temps == pytest.approx([0.02, 0.04, 0.06, 0.06])
    assert _dino("dino.teacher_temp=0.07").teacher_temperature() == 0.07  # no warm-up


@pytest.mark.parametrize("export", ["teacher", "student"])
def test_exports_the_configured_network(export: str) -> None:
    module = _dino(f"dino.export={export}")
    assert module.embedding_backbone is getattr(module, f"{export}_backbone")
