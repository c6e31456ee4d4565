import copy
from pathlib import Path

import pytest
import yaml

from marrowlens.config import (
    PretrainConfig,
    ProbeConfig,
    RunConfig,
    apply_overrides,
    dump_config,
    load_config,
    merge_values,
    override_texts,
)
from marrowlens.errors import MarrowLensError
from marrowlens.pipeline import load_run_config, stage_pretrain_config


class TestLoadConfig:
    def test_defaults_then_file_then_overrides(self, tmp_path: Path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"model": {"backbone": "resnet50"}, "optim": {"base_lr": 0.5}}))
        config = load_config(
            PretrainConfig, path, ["optim.base_lr=0.1", "trainer.devices=2", "dino.local_crop_scale=[0.3, 0.5]"]
        )
        assert config.model.backbone == "resnet50"
        assert config.optim.base_lr == 0.1 and config.trainer.devices == 2
        assert config.dino.local_crop_scale == (0.3, 0.5)
        assert config.model.method == "simclr"
        assert load_config(PretrainConfig, None, ["trainer.precision=32"]).trainer.precision == "32"

    @pytest.mark.parametrize(
        "override, message",
        [
            (
                "optim.base_lrr=1",
                r"override 'optim.base_lrr=1': unknown key optim.base_lrr; did you mean optim.base_lr\?",
            ),
            ("trainer.max_epoch=3", "did you mean trainer.max_epochs"),
            ("modle.backbone=resnet18", "unknown key modle; did you mean model"),
            ("views.min_scale=0.1", "override 'views.min_scale=0.1': views.min_scale"),
            ("model.method=moco", "model.method"),
            ("nonsense", "not of the form"),
            ("dino.local_crop_scale=[0.5, 0.2]", "local_crop_scale"),
        ],
    )
    def test_bad_overrides_name_the_key(self, override: str, message: str) -> None:
        with pytest.raises(MarrowLensError, match=message):
            load_config(PretrainConfig, None, [override])

    def test_round_trip_of_resolved_config(self, tmp_path: Path) -> None:
        config = load_config(PretrainConfig, None, ["model.image_size=64"])
        dump_config(config, tmp_path / "resolved.yaml")
        assert load_config(PretrainConfig, tmp_path / "resolved.yaml") == config

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(MarrowLensError, match="does not exist"):
            load_config(PretrainConfig, tmp_path / "none.yaml")

    def test_a_typo_in_the_file_is_blamed_on_the_file_with_a_guess(self, tmp_path: Path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"trainer": {"max_epoch": 3}}))
        with pytest.raises(MarrowLensError, match=r"c.yaml: trainer.max_epoch: .*did you mean trainer.max_epochs\?"):
            load_config(PretrainConfig, path, ["optim.base_lr=0.1"])

    def test_a_bad_value_from_an_override_blames_the_override_not_the_file(self) -> None:
        shipped = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"
        with pytest.raises(MarrowLensError, match=r"^config override 'views.min_scale=0.1'"):
            load_config(PretrainConfig, shipped, ["views.min_scale=0.1"])


@pytest.mark.parametrize(
    "override",
    [
        "trainer.devices=0",
        "trainer.devices=-1",
        "trainer.limit_train_batches=0",
        "trainer.limit_train_batches=-3",
        "trainer.limit_train_batches=0.0",
        "trainer.limit_train_batches=1.5",
    ],
)
def test_trainer_settings_that_train_nothing_are_refused(override: str) -> None:
    with pytest.raises(MarrowLensError, match=override.split("=")[0]):
        load_config(PretrainConfig, None, [override])


@pytest.mark.parametrize(
    "override, value",
    [
        ("trainer.devices=auto", "auto"),
        ("trainer.devices=1", 1),
        ("trainer.limit_train_batches=3", 3),
        ("trainer.limit_train_batches=0.25", 0.25),
        ("trainer.limit_train_batches=1.0", 1.0),
    ],
)
def test_trainer_settings_that_train_something_are_kept(override: str, value: object) -> None:
    key = override.split("=")[0].split(".")[1]
    assert getattr(load_config(PretrainConfig, None, [override]).trainer, key) == value


class TestTypedValues:
    """Named CLI options and run-config ``override:`` mappings reach the config as typed values."""

    @pytest.mark.parametrize("devices, expected", [("auto", "auto"), ("2", 2)])
    def test_a_flag_reaches_the_config_typed(self, cli, monkeypatch, tmp_path: Path, devices: str, expected) -> None:
        from marrowlens.ssl import train

        seen: list[PretrainConfig] = []
        monkeypatch.setattr(train, "pretrain", lambda config, *args, **kwargs: seen.append(config))
        args = ["pretrain", "--cohort", tmp_path, "--out", tmp_path / "run", "--devices", devices]
        code, output = cli(*args, "--precision", "32", "--max-epochs", "3", "--set", "trainer.max_epochs=4")
        assert code == 0, output
        trainer = seen[0].trainer
        assert trainer.devices == expected and type(trainer.devices) is type(expected)
        assert trainer.precision == "32" and trainer.max_epochs == 4  # --set comes after the flags

    def test_a_bad_flag_value_is_blamed_on_that_setting(self) -> None:
        with pytest.raises(MarrowLensError, match=r"^config override 'trainer.nodes=0': trainer.nodes"):
            load_config(PretrainConfig, None, values={"trainer": {"nodes": 0}})

    def test_a_nested_override_merges_without_clobbering_sibling_keys(self, tmp_path: Path) -> None:
        (tmp_path / "pretrain.yaml").write_text(
            yaml.safe_dump({"trainer": {"max_epochs": 5, "seed": 7}, "model": {"backbone": "resnet50"}})
        )
        run = {
            "pretrain": {
                "config": "pretrain.yaml",
                "override": {"model": {"image_size": 64}, "trainer": {"max_epochs": 2}},
                "set": ["trainer.max_epochs=3"],
            }
        }
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
        config = stage_pretrain_config(load_run_config(tmp_path / "run.yaml", [], []).pretrain)
        assert config.model.image_size == 64 and config.model.backbone == "resnet50"
        assert config.trainer.seed == 7 and config.trainer.max_epochs == 3  # `set` strings come last
        assert isinstance(RunConfig.model_validate(run).pretrain.override["trainer"]["max_epochs"], int)

    def test_a_free_mapping_is_replaced_not_merged(self) -> None:
        data = {"cell_type": {"mapping": {"a": "x", "b": "y"}, "min_cells": 3}}
        merge_values(ProbeConfig, data, {"cell_type": {"mapping": {"c": "z"}}})
        assert data == {"cell_type": {"mapping": {"c": "z"}, "min_cells": 3}}

    def test_override_texts_read_back_as_the_merge(self) -> None:
        """A study records its stage overrides as ``--set`` words: read back, they give the merged config."""
        values = {"cell_type": {"mapping": {"c.d": "z"}, "min_cells": 4}, "head": "knn", "seed": 3}
        texts = override_texts(ProbeConfig, values)
        assert "cell_type.min_cells=4" in texts and "head=knn" in texts
        base = {"cell_type": {"mapping": {"a": "x"}, "min_cells": 3}}
        merged = merge_values(ProbeConfig, copy.deepcopy(base), values)
        assert apply_overrides(copy.deepcopy(base), texts) == merged
        assert override_texts(None, {"backbone": "32", "flag": "yes"}) == ['backbone="32"', 'flag="yes"']

    @pytest.mark.parametrize(
        "stage, override, message",
        [
            (
                "pretrain",
                {"trainer": {"max_epoch": 2}},
                r"unknown key trainer.max_epoch; did you mean trainer.max_epochs\?",
            ),
            ("probe", {"linear": {"weight_decay": [0.1]}}, r"did you mean linear.weight_decays\?"),
        ],
    )
    def test_an_unknown_nested_key_says_did_you_mean(self, tmp_path: Path, stage: str, override, message: str) -> None:
        run = (
            {"pretrain": {"override": override}}
            if stage == "pretrain"
            else {"probes": {"blast": {"task": "blast", "override": override}}}
        )
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
        with pytest.raises(MarrowLensError, match=message):
            load_run_config(tmp_path / "run.yaml", [], [])
        with pytest.raises(MarrowLensError, match=message):
            load_config(PretrainConfig if stage == "pretrain" else ProbeConfig, None, values=override)
