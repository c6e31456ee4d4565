"""End-to-end pretraining on a tiny cohort: outputs, resume, refusals, DDP (slow)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from marrowlens.artifacts import sha256_file, short
from marrowlens.cohort.synthetic import make_synthetic_cohort
from marrowlens.config import PretrainConfig, dump_config, load_config
from marrowlens.errors import Interrupted, MarrowLensError
from marrowlens.ssl import train
from marrowlens.ssl.base import SSLModule
from tests.conftest import REPO_ROOT, InterruptAtEpoch, run_cli_subprocess
from tests.ssl.conftest import TINY

CONFIG = REPO_ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
BUILD_TRAINER = train.build_trainer


def _sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY, *extra) for arg in ("--set", item)]


def _max_difference(a: Path, b: Path) -> float:
    first, second = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


class TestPretrainCli:
    @pytest.mark.parametrize("method, backbone", [("simclr", "test_resnet"), ("dino", "test_vit")])
    def test_writes_a_loadable_backbone(
        self, cli, labelled_cohort: Path, tmp_path: Path, method: str, backbone: str
    ) -> None:
        out = tmp_path / "run"
        code, output = cli(
            "pretrain",
            "--config",
            CONFIG,
            "--cohort",
            labelled_cohort,
            "--out",
            out,
            "--method",
            method,
            "--backbone",
            backbone,
            "--max-epochs",
            "1",
            *_sets(),
        )
        assert code == 0, output
        assert "backbone.safetensors" in output and "learning rate" in output
        info = json.loads((out / "backbone.json").read_text())
        assert info["timm_name"] == backbone and info["image_size"] == 32
        assert info["fingerprint"] == "sha256:" + sha256_file(out / "backbone.safetensors")
        keys = load_file(str(out / "backbone.safetensors")).keys()
        assert not any(k.startswith(("backbone.", "student_", "teacher_")) for k in keys)
        assert (out / "checkpoints" / "last.ckpt").is_file()
        assert list((out / "checkpoints").glob("best-*.ckpt"))
        metrics = pd.read_csv(next((out / "logs").glob("version_*/metrics.csv")))
        assert "val_knn_acc" in metrics.columns and metrics["val_knn_acc"].notna().any()
        meta = json.loads((out / "meta.json").read_text())
        assert meta["kind"] == "run" and meta["method"] == method
        resolved = load_config(PretrainConfig, out / "config.yaml")
        assert resolved.model.backbone == backbone and resolved.trainer.max_epochs == 1

    def test_lr_scales_with_the_global_batch(self, cli, labelled_cohort: Path, tmp_path: Path) -> None:
        code, output = cli(
            "pretrain",
            "--config",
            CONFIG,
            "--cohort",
            labelled_cohort,
            "--out",
            tmp_path / "r",
            "--backbone",
            "test_resnet",
            "--max-epochs",
            "1",
            *_sets("optim.base_lr=0.4", "trainer.accumulate_grad_batches=2"),
        )
        assert code == 0, output
        assert "learning rate 0.025 for a global batch of 16" in output  # 0.4 * 8 * 2 / 256

    def test_loss_goes_down(self, labelled_cohort: Path, tmp_path: Path) -> None:
        config = load_config(
            PretrainConfig,
            CONFIG,
            [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=8", "optim.base_lr=1.0", "data.val_cells=0"],
        )
        train.pretrain(config, labelled_cohort, tmp_path / "r")
        losses = (
            pd.read_csv(next((tmp_path / "r" / "logs").glob("version_*/metrics.csv")))["train_loss_epoch"]
            .dropna()
            .to_numpy()
        )
        assert len(losses) == 8
        assert losses[-2:].mean() < losses[:2].mean() - 0.05

    def test_refusals(self, cli, labelled_cohort: Path, tmp_path: Path) -> None:
        base = (
            "pretrain",
            "--config",
            CONFIG,
            "--cohort",
            labelled_cohort,
            "--backbone",
            "test_resnet",
            "--max-epochs",
            "1",
            *_sets(),
        )
        code, output = cli(*base, "--out", tmp_path / "none", "--resume")
        assert code == 2 and "nothing to resume" in output
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        code, output = cli(*base, "--out", tmp_path / "busy")
        assert code == 2 and "--overwrite" in output
        assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
        code, output = cli(*base, "--out", tmp_path / "x", "--backbone", "no_such_net")
        assert code == 2 and "unknown timm model" in output
        code, output = cli(*base, "--out", tmp_path / "y", "--weights", tmp_path / "missing.pth")
        assert code == 2 and "does not exist" in output
        code, output = cli(*base, "--out", tmp_path / "z", "--set", "views.min_scale=0.1")
        assert code == 2 and "views.min_scale" in output


@pytest.mark.parametrize("method, backbone", [("simclr", "test_resnet"), ("dino", "test_vit")])
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(
    labelled_cohort: Path, tmp_path: Path, monkeypatch, method: str, backbone: str
) -> None:
    config = load_config(
        PretrainConfig,
        CONFIG,
        [*TINY, f"model.method={method}", f"model.backbone={backbone}", "trainer.max_epochs=3", "data.num_workers=1"],
    )
    train.pretrain(config, labelled_cohort, tmp_path / "whole")
    build = train.build_trainer

    def interrupted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(InterruptAtEpoch(2))
        return trainer

    monkeypatch.setattr(train, "build_trainer", interrupted)
    with pytest.raises(MarrowLensError, match="interrupted.*--resume"):
        train.pretrain(config, labelled_cohort, tmp_path / "cut")
    assert not (tmp_path / "cut" / "backbone.safetensors").exists()
    monkeypatch.setattr(train, "build_trainer", build)
    with pytest.raises(MarrowLensError, match="max_epochs|base_lr"):
        changed = config.model_copy(update={"optim": config.optim.model_copy(update={"base_lr": 9.0})})
        train.pretrain(changed, labelled_cohort, tmp_path / "cut", resume=True)
    result = train.pretrain(config, labelled_cohort, tmp_path / "cut", resume=True)
    assert json.loads((tmp_path / "cut" / "meta.json").read_text())["global_step"] == 12
    assert _max_difference(tmp_path / "whole", tmp_path / "cut") < 1e-5
    assert result.metrics["train_loss_epoch"] == pytest.approx(
        json.loads((tmp_path / "whole" / "meta.json").read_text())["metrics"]["train_loss_epoch"], abs=1e-5
    )


@pytest.mark.slow
def test_kill_and_resume_from_the_cli(labelled_cohort: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run (no clean-up at all), then --resume: same weights as a run never killed."""
    args = [
        "pretrain",
        "--config",
        CONFIG,
        "--cohort",
        labelled_cohort,
        "--backbone",
        "test_resnet",
        "--max-epochs",
        "6",
        *_sets("trainer.limit_train_batches=4", "data.val_cells=0"),
    ]
    assert run_cli_subprocess(*args, "--out", tmp_path / "whole").returncode == 0
    env = {"PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "marrowlens", *map(str, args), "--out", str(tmp_path / "cut")],
        env={**__import__("os").environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_cli_subprocess(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _max_difference(tmp_path / "whole", tmp_path / "cut") < 1e-5


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(labelled_cohort: Path, tmp_path: Path) -> None:
    """The multi-GPU path (DDP, gathered negatives) on two CPU processes with gloo."""
    result = run_cli_subprocess(
        "pretrain",
        "--config",
        CONFIG,
        "--cohort",
        labelled_cohort,
        "--out",
        tmp_path / "ddp",
        "--backbone",
        "test_resnet",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--max-epochs",
        "2",
        *_sets("data.batch_size=4"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 8
    assert meta["global_step"] == 2 * (32 // 8)
    assert torch.isfinite(torch.tensor(meta["metrics"]["train_loss_epoch"]))


@pytest.mark.parametrize("name", ["simclr_resnet18", "simclr_resnet50", "dino_vit_small", "tiny_cpu"])
def test_shipped_configs_run_on_cpu_with_small_settings(labelled_cohort: Path, tmp_path: Path, name: str) -> None:
    """The GPU configs' code path (bf16 mixed precision included) on CPU, with a tiny backbone."""
    tiny_backbone = "test_vit" if "vit" in name else "test_resnet"
    config = load_config(
        PretrainConfig,
        REPO_ROOT / "configs" / "pretrain" / f"{name}.yaml",
        [
            *TINY,
            f"model.backbone={tiny_backbone}",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "trainer.precision=bf16-mixed",
            "dino.out_dim=256",
            "dino.local_crop_size=16",
            "data.val_cells=0",
        ],
    )
    result = train.pretrain(config, labelled_cohort, tmp_path / name)
    assert torch.isfinite(torch.tensor(result.metrics["train_loss_epoch"]))
    assert (tmp_path / name / "backbone.safetensors").is_file()


def test_resume_may_change_only_resumable_settings_and_says_what_a_new_max_epochs_means(tmp_path: Path, capsys) -> None:
    saved = load_config(PretrainConfig, CONFIG, ["trainer.max_epochs=40"])
    dump_config(saved, tmp_path / train.CONFIG_FILE)
    with pytest.raises(MarrowLensError, match="optim.base_lr"):
        train.resolve_config(
            load_config(PretrainConfig, CONFIG, ["trainer.max_epochs=40", "optim.base_lr=0.5"]), tmp_path, resume=True
        )
    same = train.resolve_config(load_config(PretrainConfig, CONFIG, ["trainer.max_epochs=40"]), tmp_path, resume=True)
    assert same.trainer.max_epochs == 40 and "schedule" not in capsys.readouterr().out
    shorter = train.resolve_config(
        load_config(PretrainConfig, CONFIG, ["trainer.max_epochs=16"]), tmp_path, resume=True
    )
    assert shorter.trainer.max_epochs == 16
    assert "planned for 40 epochs" in capsys.readouterr().out


def _worsening_knn(self: SSLModule) -> None:
    """The online k-NN check, replaced by a score that only gets worse: epoch 0 stays the best."""
    self._check_features, self._check_labels, self._check_query = [], [], []
    self.log("val_knn_acc", 0.9 - 0.1 * self.current_epoch)


class _CheckpointSpy(pl.Callback):
    """Notes, when each epoch starts, which epochs ``last.ckpt`` and ``best-*.ckpt`` hold."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seen.append((trainer.current_epoch, *_checkpoint_epochs(self.folder)))


def _checkpoint_epochs(folder: Path) -> tuple[int | None, list[str]]:
    last = folder / "last.ckpt"
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"] if last.is_file() else None
    return epoch, sorted(p.name for p in folder.glob("best-*.ckpt"))


def _with_callbacks(monkeypatch, *callbacks: pl.Callback) -> None:
    def patched(*args, **kwargs):
        trainer = BUILD_TRAINER(*args, **kwargs)
        trainer.callbacks[:0] = callbacks  # before the checkpoint callbacks, as Lightning orders them anyway
        return trainer

    monkeypatch.setattr(train, "build_trainer", patched)


def test_last_checkpoint_is_the_latest_epoch_even_when_the_metric_gets_worse(
    labelled_cohort: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(SSLModule, "on_validation_epoch_end", _worsening_knn)
    config = load_config(PretrainConfig, CONFIG, [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=3"])
    spy = _CheckpointSpy(tmp_path / "r" / "checkpoints")
    _with_callbacks(monkeypatch, spy)
    train.pretrain(config, labelled_cohort, tmp_path / "r")
    assert spy.seen == [(0, None, []), (1, 0, ["best-epoch=0.ckpt"]), (2, 1, ["best-epoch=0.ckpt"])]
    assert _checkpoint_epochs(tmp_path / "r" / "checkpoints") == (2, ["best-epoch=0.ckpt"])
    assert not list((tmp_path / "r" / "checkpoints").glob("*.partial"))


def test_resume_after_a_non_improving_epoch_continues_from_it(
    labelled_cohort: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(SSLModule, "on_validation_epoch_end", _worsening_knn)
    config = load_config(PretrainConfig, CONFIG, [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=3"])
    _with_callbacks(monkeypatch, InterruptAtEpoch(2))  # epoch 1 finished without improving
    with pytest.raises(MarrowLensError, match="interrupted"):
        train.pretrain(config, labelled_cohort, tmp_path / "r")
    assert _checkpoint_epochs(tmp_path / "r" / "checkpoints") == (1, ["best-epoch=0.ckpt"])
    spy = _CheckpointSpy(tmp_path / "r" / "checkpoints")
    _with_callbacks(monkeypatch, spy)
    train.pretrain(config, labelled_cohort, tmp_path / "r", resume=True)
    assert [epoch for epoch, *_ in spy.seen] == [2]
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["global_step"] == 3 * 4 and meta["epochs"] == 3
    monkeypatch.setattr(train, "build_trainer", BUILD_TRAINER)
    train.pretrain(config, labelled_cohort, tmp_path / "whole")  # optimizer and LR schedule restored exactly
    assert _max_difference(tmp_path / "whole", tmp_path / "r") < 1e-5


@pytest.mark.parametrize(
    "epoch, hint",
    [(0, "no epoch had finished.*--overwrite to start over"), (1, "--resume to continue from .*last.ckpt")],
)
def test_an_interrupted_pretraining_says_what_continues_it(
    labelled_cohort: Path, tmp_path: Path, monkeypatch, epoch: int, hint: str
) -> None:
    config = load_config(
        PretrainConfig, CONFIG, [*TINY, "model.backbone=test_resnet", "trainer.max_epochs=2", "data.val_cells=0"]
    )
    _with_callbacks(monkeypatch, InterruptAtEpoch(epoch))
    with pytest.raises(Interrupted, match=hint):
        train.pretrain(config, labelled_cohort, tmp_path / "r")
    monkeypatch.setattr(train, "build_trainer", BUILD_TRAINER)
    resume = "--resume" in hint  # doing what the message says works
    assert train.pretrain(config, labelled_cohort, tmp_path / "r", resume=resume, overwrite=not resume) is not None


def test_resume_on_another_cohort_is_refused(cli, labelled_cohort: Path, tmp_path: Path) -> None:
    other = make_synthetic_cohort(tmp_path / "other", patients=4, cells_per_patient=8, image_size=32, seed=1)
    base = (
        "pretrain",
        "--config",
        CONFIG,
        "--backbone",
        "test_resnet",
        "--out",
        tmp_path / "r",
        *_sets("data.val_cells=0"),
    )
    code, output = cli(*base, "--cohort", labelled_cohort, "--max-epochs", "1")
    assert code == 0, output
    started = json.loads((tmp_path / "r" / train.COHORT_FILE).read_text())
    meta_before = (tmp_path / "r" / "meta.json").read_text()
    code, output = cli(*base, "--cohort", other.folder, "--max-epochs", "2", "--resume")
    assert code == 2 and "cohort mismatch" in output and "\n" not in output.strip()
    assert short(started["fingerprint"]) in output and short(other.meta.fingerprint) in output
    assert (tmp_path / "r" / "meta.json").read_text() == meta_before


@pytest.mark.parametrize(
    "setting, message",
    [
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
        ("trainer.limit_train_batches=-3", "trainer.limit_train_batches"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.limit_train_batches=0.1", "trains 0 steps: 32 cells on 1 device.* 4 full batches of 8 .*keeps 0"),
    ],
)
def test_settings_that_train_no_step_are_one_line_errors(
    cli, labelled_cohort: Path, tmp_path: Path, setting: str, message: str
) -> None:
    code, output = cli(
        "pretrain",
        "--config",
        CONFIG,
        "--cohort",
        labelled_cohort,
        "--out",
        tmp_path / "r",
        "--backbone",
        "test_resnet",
        "--max-epochs",
        "1",
        *_sets(setting),
    )
    assert code == 2 and re.search(message, output) and "\n" not in output.strip(), output
    assert not (tmp_path / "r" / "backbone.safetensors").exists()


def test_planned_steps_count_full_batches_after_the_limit_and_accumulation() -> None:
    config = load_config(PretrainConfig, CONFIG, ["trainer.accumulate_grad_batches=4"])
    train.require_steps(9, 1, 8, config)  # one full batch, one (partial-accumulation) step
    with pytest.raises(MarrowLensError, match="0 full batches of 8"):
        train.require_steps(15, 2, 8, config)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_deleted_image_is_named_in_one_line(
    cli, cohort_missing_a_cell: tuple[Path, Path], tmp_path: Path, workers: int
) -> None:
    folder, gone = cohort_missing_a_cell
    code, output = cli(
        "pretrain",
        "--config",
        CONFIG,
        "--cohort",
        folder,
        "--out",
        tmp_path / "r",
        "--backbone",
        "test_resnet",
        "--max-epochs",
        "1",
        *_sets(f"data.num_workers={workers}"),
    )
    assert code == 2 and "\n" not in output.strip(), output
    assert str(gone) in output and f"marrowlens cohort check {folder} --fix" in output


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("command", ["pretrain", "embed"])
def test_a_corrupt_weights_file_is_named_in_one_line(
    cli, labelled_cohort: Path, tmp_path: Path, command: str, suffix: str
) -> None:
    weights = tmp_path / f"garbage{suffix}"
    weights.write_bytes(bytes(range(256)) * 4)
    if command == "pretrain":
        args = ("pretrain", "--config", CONFIG, "--backbone", "test_resnet", "--max-epochs", "1", *_sets())
    else:
        args = ("embed", "--model", "test_resnet", "--image-size", "32", "--num-workers", "0")
    code, output = cli(*args, "--cohort", labelled_cohort, "--out", tmp_path / "out", "--weights", weights)
    assert code == 2 and f"cannot read weights {weights}" in output and "\n" not in output.strip(), output


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["pretrain", "embed"])
def test_ctrl_c_exits_130_through_main(
    labelled_cohort: Path, tmp_path: Path, monkeypatch, capsys, command: str
) -> None:
    from marrowlens import cli
    from marrowlens.ssl import embed
    from marrowlens.ssl.simclr import SimCLR

    if command == "pretrain":
        monkeypatch.setattr(SimCLR, "training_step", _ctrl_c)
        args = ["pretrain", "--config", CONFIG, "--backbone", "test_resnet", "--max-epochs", "1", *_sets()]
    else:
        monkeypatch.setattr(embed._Embedder, "predict_step", _ctrl_c)
        args = ["embed", "--model", "test_resnet", "--image-size", "32", "--num-workers", "0"]
    monkeypatch.setattr(
        sys, "argv", ["marrowlens", *map(str, args), "--cohort", str(labelled_cohort), "--out", str(tmp_path / "out")]
    )
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 130
    assert re.match(r"(training|embedding) interrupted; .*run the same command", capsys.readouterr().err)


def test_resume_cleans_what_a_killed_run_left_half_written(tmp_path: Path) -> None:
    """A kill mid-save left last.ckpt.partial and hidden .tmp files (up to a checkpoint's size) forever."""
    import os

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    keep = [out / train.CONFIG_FILE, out / train.LAST_CKPT, out / "checkpoints" / "best-epoch=0.ckpt"]
    stale = [
        out / "checkpoints" / "last.ckpt.partial",
        out / ".meta.json.k2j4h5g1.tmp",
        out / "checkpoints" / ".last.ckpt.abcd1234.tmp",
    ]
    for path in keep + stale:
        path.write_bytes(b"x")
        os.utime(path, (1_000_000_000, 1_000_000_000))  # written by a run long gone
    train.prepare_run_dir(out, resume=True, overwrite=False)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
