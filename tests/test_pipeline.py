"""`marrowlens run` on synthetic stand-ins of the DeepAPL and AML_Hehr layouts (made here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from marrowlens.artifacts import read_meta
from marrowlens.cohort.manifest import IndexOptions, index_cohort
from marrowlens.cohort.synthetic import make_synthetic_cohort
from marrowlens.config import IndexStageConfig, PretrainStageConfig, RunConfig
from marrowlens.contracts import EmbeddingsMeta, IndexMeta, ProbeMeta, ProbeTestMeta, RunMeta, StudyMeta
from marrowlens.errors import Interrupted, MarrowLensError
from marrowlens.pipeline import load_run_config, run_study
from marrowlens.provenance import command_line
from tests.conftest import REPO_ROOT, InterruptAtEpoch

TINY_PRETRAIN = [
    "model.backbone=test_resnet",
    "model.image_size=32",
    "trainer.max_epochs=1",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.val_cells=64",
]
TINY_PROBE = ["eval.cv=2", "eval.bootstrap=20", "linear.max_epochs=5", "linear.weight_decays=[0.001]"]
DEEPAPL_NAMES = {
    "myeloblast": "Blast, no lineage spec",
    "neutrophil": "Segmented neutrophils",
    "lymphocyte": "Lymphocyte",
    "monocyte": "Monocyte",
    "eosinophil": "Eosinophils",
}


def _shipped(name: str, tmp_path: Path, baselines: bool = False) -> Path:
    """The shipped study config with its paths kept and tiny settings added to every stage; the baselines (on by
    default, as the shipped configs leave them) only where a test asks for them, to keep the others short."""
    data = yaml.safe_load((REPO_ROOT / "configs" / "run" / f"{name}.yaml").read_text())
    assert data.get("baselines", True) is True
    data["baselines"] = baselines
    data["pretrain"]["config"] = str(REPO_ROOT / "configs" / "run" / data["pretrain"]["config"])
    data["pretrain"]["set"] = [*data["pretrain"].get("set", []), *TINY_PRETRAIN]
    data["embed"]["num_workers"] = 0
    for probe in data["probes"].values():
        probe["config"] = str(REPO_ROOT / "configs" / "run" / probe["config"])
        probe["set"] = [*probe.get("set", []), *TINY_PROBE]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def deepapl_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepAPL's layout: labels.csv with path, label (cell class), patient, diagnosis (APL/AML)."""
    return _deepapl_cohort(tmp_path_factory.mktemp("deepapl"))


def _deepapl_cohort(root: Path, patients: int = 12, seed: int = 3) -> Path:
    synthetic = make_synthetic_cohort(
        root / "synthetic", patients=patients, cells_per_patient=14, image_size=32, seed=seed
    )
    cells = synthetic.cells
    labels = pd.DataFrame(
        {
            "path": "synthetic/" + cells["path"],
            "label": cells["cell_type"].map(DEEPAPL_NAMES),
            "patient": cells["patient_id"],
            "diagnosis": cells["mutation"].map(lambda m: "APL" if m == "PML_RARA" else "AML"),
        }
    )
    labels.to_csv(root / "labels.csv", index=False)
    index_cohort([root], root / "cohort")
    return root / "cohort"


def _assert_stage_commands(cohort: Path, out: Path) -> None:
    """Each stage records the command it stands for; the study, called from Python here, the function."""
    assert read_meta(out, StudyMeta).command == "python: marrowlens.pipeline.run_study"
    pretrain = read_meta(out / "run", RunMeta).command
    assert pretrain.startswith(command_line("pretrain", "--cohort", cohort, "--out", out / "run", "--config"))
    assert " --set model.backbone=test_resnet " in pretrain and pretrain.endswith(" --overwrite")
    embed = read_meta(out / "emb", EmbeddingsMeta).command
    assert embed.startswith(command_line("embed", "--model", out / "run", "--cohort", cohort, "--out", out / "emb"))
    blast = read_meta(out / "probes" / "blast", ProbeMeta).command
    assert blast.startswith(
        command_line("probe", "fit", "blast", "--embeddings", out / "emb", "--out", out / "probes" / "blast")
    )
    index = read_meta(out / "idx", IndexMeta).command
    assert index.startswith(command_line("index", "build", "--embeddings", out / "emb", "--out", out / "idx"))


def _assert_study_page(out: Path, markdown: str, baselines: bool) -> None:
    """report.html: self-contained (every image a non-empty embedded PNG), training curves, and per probe its
    headline beside chance and the majority class, and beside the two baselines when they ran."""
    from tests.probes.test_html import parse

    page = parse(out / "report.html")
    text = " ".join(page.text)
    assert {"study", "config", "training"} <= set(page.sections)
    assert (out / "training_curves.png").stat().st_size > 0 and "![training curves](training_curves.png)" in markdown
    probes = [name for name in page.sections if name.startswith("probe-")]
    assert probes and all((out / "probes" / name[6:] / "report.html").is_file() for name in probes)
    assert "chance (1/" in text and "majority class (" in text and "SSL backbone (test_resnet)" in text
    for label in ("random-init backbone (test_resnet)", "raw pixels (24 x 24 RGB)"):
        assert (label in text) is baselines and (label in markdown) is baselines
    assert ("Baselines turned off" in markdown) is not baselines


class TestDeepAPLStudy:
    def test_whole_study_then_skips_then_redoes_what_changed(self, deepapl_like: Path, tmp_path: Path) -> None:
        config_path = _shipped("deepapl", tmp_path, baselines=True)
        out = tmp_path / "results"
        messages: list[str] = []
        report = run_study(deepapl_like, load_run_config(config_path, [], []), out, say=messages.append)
        assert report == out / "report.md"
        text = report.read_text()
        for name in ("blast", "leukemic", "apl", "wbc"):
            assert (out / "probes" / name / "report.json").is_file()
            assert f"probe `{name}`" in text
        apl = json.loads((out / "probes" / "apl" / "report.json").read_text())
        assert apl["classes"] == ["PML_RARA", "other_AML"]
        assert (out / "idx" / "index.faiss").is_file() and "marrowlens serve --index" in text
        assert json.loads((out / "meta.json").read_text())["kind"] == "study"
        _assert_stage_commands(deepapl_like, out)
        _assert_study_page(out, text, baselines=True)
        random_init = read_meta(out / "baselines" / "random_init" / "emb", EmbeddingsMeta)
        assert random_init.model.fingerprint.startswith("random:test_resnet")
        assert random_init.command == command_line(
            "embed", "--model", "test_resnet", "--image-size", 32, "--cohort", deepapl_like, "--out",
            out / "baselines" / "random_init" / "emb", "--batch-size", 256, "--precision", "32", "--num-workers", 0,
            "--stain-normalize", "none", "--overwrite",
        )  # fmt: skip
        pixels = read_meta(out / "baselines" / "raw_pixels" / "emb", EmbeddingsMeta)
        assert pixels.dim == 24 * 24 * 3 and pixels.cohort is not None

        messages.clear()
        run_study(deepapl_like, load_run_config(config_path, [], []), out, say=messages.append)
        assert all("skipped" in m for m in messages if m.startswith("[")), messages
        assert "[random-init backbone: probe apl] up to date, skipped" in messages

        messages.clear()
        run_study(
            deepapl_like,
            load_run_config(config_path, ["probes.wbc.set=[eval.cv=3, eval.bootstrap=20, linear.max_epochs=5]"], []),
            out,
            say=messages.append,
        )
        ran = [m for m in messages if m.endswith("running")]
        baselines = ["[random-init backbone: probe wbc] running", "[raw pixels: probe wbc] running"]
        assert ran == ["[probe wbc] running", *baselines]

    def test_cli_and_refusals(self, cli, deepapl_like: Path, tmp_path: Path) -> None:
        config_path = _shipped("deepapl", tmp_path)
        bad = yaml.safe_load(config_path.read_text())
        bad["probes"]["apl"]["blast_probe"] = "wbc"
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
        code, output = cli("run", "--cohort", deepapl_like, "--config", tmp_path / "bad.yaml", "--out", tmp_path / "r")
        assert code == 2 and "must name an earlier blast probe" in output
        code, output = cli(
            "run", "--cohort", deepapl_like, "--config", config_path, "--out", tmp_path / "r", "--set", "embed.nope=1"
        )
        assert code == 2 and "embed.nope" in output
        args = ("run", "--cohort", deepapl_like, "--config", config_path, "--out", tmp_path / "r")
        code, output = cli(*args, "--test-cohort", deepapl_like)
        assert code == 2 and "is the study's own cohort" in output

    def test_no_baselines_flag(self, cli, deepapl_like: Path, tmp_path: Path, monkeypatch) -> None:
        """Baselines are on by default (config and CLI); `--no-baselines` turns them off."""
        import marrowlens.pipeline

        seen: list[RunConfig] = []
        monkeypatch.setattr(marrowlens.pipeline, "run_study", lambda cohort, config, out, say: seen.append(config))
        config_path = _shipped("deepapl", tmp_path, baselines=True)
        args = ("run", "--cohort", deepapl_like, "--config", config_path, "--out", tmp_path / "r")
        assert cli(*args)[0] == 0 and cli(*args, "--no-baselines")[0] == 0
        assert [config.baselines for config in seen] == [True, False] and RunConfig().baselines


def test_a_test_cohort_is_tested_as_is_beside_internal_cv(deepapl_like: Path, tmp_path: Path) -> None:
    """`test_cohort:` (relative to the config): embedded by the study's backbone, every probe tested on it."""
    _deepapl_cohort(tmp_path / "jhu2", patients=9, seed=8)
    data = yaml.safe_load(_shipped("deepapl", tmp_path).read_text())
    data["probes"] = {name: data["probes"][name] for name in ("leukemic", "apl")}
    data.update(index={"enabled": False}, test_cohort="jhu2/cohort")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "results"
    config = load_run_config(tmp_path / "study.yaml", [], [])
    text = run_study(deepapl_like, config, out, say=lambda _: None).read_text()
    assert "## Internal CV and external test" in text
    _assert_study_page(out, text, baselines=False)
    assert "Internal CV and external test" in (out / "report.html").read_text()
    for name in ("leukemic", "apl"):
        report = json.loads((out / "test" / "probes" / name / "report.json").read_text())
        assert report["evaluation"]["kind"] == "external-test" and report["probe"]["folder"] == str(
            out / "probes" / name
        )
        assert f"### Probe `{name}`" in text
    assert (
        "| metric | internal CV (" in text and "| patient ROC-AUC | " in text and " patients) | external test (" in text
    )
    backbones = {read_meta(out / emb, EmbeddingsMeta).model.fingerprint for emb in ("emb", "test/emb")}
    assert len(backbones) == 1
    test_meta = read_meta(out / "test" / "probes" / "apl", ProbeTestMeta)
    assert test_meta.command.startswith(command_line("probe", "test", out / "probes" / "apl", "--embeddings"))
    messages: list[str] = []
    run_study(deepapl_like, config, out, say=messages.append)
    assert "[embed test cohort] up to date, skipped" in messages and "[test apl] up to date, skipped" in messages
    assert all("skipped" in m for m in messages if m.startswith("[")), messages
    own = load_run_config(tmp_path / "study.yaml", [f"test_cohort={deepapl_like}"], [])
    with pytest.raises(MarrowLensError, match="is the study's own cohort"):
        run_study(deepapl_like, own, out, say=lambda _: None)


def test_a_probe_the_test_cohort_cannot_test_is_reported_and_the_others_go_on(tmp_path: Path, monkeypatch) -> None:
    from marrowlens.pipeline import Study, _external_test
    from marrowlens.probes import commands

    def refuse(*args, **kwargs):
        raise MarrowLensError("/test/emb has no cell_type labels")

    monkeypatch.setattr(commands, "external_test", refuse)
    study = Study(tmp_path, say=lambda _: None)
    lines = _external_test("wbc", "0123", tmp_path / "test" / "emb", tmp_path, study)
    assert lines[0] == "- probe `wbc`: not tested on this cohort (/test/emb has no cell_type labels)"
    assert "test wbc" not in study.stages


def test_interrupted_pretraining_resumes_inside_a_study(deepapl_like: Path, tmp_path: Path, monkeypatch) -> None:
    from marrowlens.ssl import train

    config = load_run_config(_shipped("deepapl", tmp_path), [], ["trainer.max_epochs=2"])
    calls: list[bool] = []
    real = train.pretrain

    def first_dies(*args, resume: bool = False, **kwargs):
        calls.append(resume)
        if len(calls) == 1:
            real(*args, resume=resume, **kwargs)
            (tmp_path / "results" / "run" / "backbone.json").unlink()  # as if killed before the export
            raise KeyboardInterrupt
        return real(*args, resume=resume, **kwargs)

    monkeypatch.setattr(train, "pretrain", first_dies)
    with pytest.raises(KeyboardInterrupt):
        run_study(deepapl_like, config, tmp_path / "results", say=lambda _: None)
    run_study(deepapl_like, config, tmp_path / "results", say=lambda _: None)
    assert calls == [False, True]


def test_hehr_layout_with_blast_labels_from_a_second_source(tmp_path: Path) -> None:
    """AML_Hehr (mutation/patient/cell, no cell classes) + an LMU-style folder of coded cell classes."""
    synthetic = make_synthetic_cohort(tmp_path / "synthetic", patients=10, cells_per_patient=12, image_size=32, seed=4)
    hehr, lmu = tmp_path / "data" / "AML_Hehr", tmp_path / "data" / "LMU"
    for row in synthetic.cells.itertuples():
        target = hehr / row.mutation / row.patient_id / Path(row.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic.image_path(row.path), target)
        code = {"myeloblast": "MYO", "lymphocyte": "LYT", "neutrophil": "NGS", "monocyte": "MON", "eosinophil": "EOS"}[
            row.cell_type
        ]
        (lmu / code).mkdir(parents=True, exist_ok=True)
        shutil.copy(synthetic.image_path(row.path), lmu / code / f"{row.patient_id}_{Path(row.path).name}")
    cohort = index_cohort([hehr, lmu], tmp_path / "cohort", IndexOptions())
    layouts = [source.layout for source in cohort.meta.sources]
    assert layouts == ["mutation_patient", "cell_type"]
    assert cohort.cells.loc[cohort.cells["domain"] == "AML_Hehr", "is_blast"].isna().all()
    report = run_study(
        tmp_path / "cohort",
        load_run_config(_shipped("aml_hehr", tmp_path), [], []),
        tmp_path / "results",
        say=lambda _: None,
    )
    mutation = json.loads((tmp_path / "results" / "probes" / "mutation" / "report.json").read_text())
    assert set(mutation["classes"]) == {"PML_RARA", "NPM1", "CBFB_MYH11", "RUNX1_RUNX1T1", "control"}
    assert "probe `mutation`" in report.read_text()


@pytest.mark.parametrize(
    "epoch, hint",
    [(0, "no epoch had finished.*again to start pretraining over"), (1, "again to continue from .*last.ckpt")],
)
def test_an_interrupted_study_says_that_the_same_command_continues_it(
    deepapl_like: Path, tmp_path: Path, monkeypatch, epoch: int, hint: str
) -> None:
    from marrowlens.ssl import train

    config = RunConfig(
        pretrain=PretrainStageConfig(set=[*TINY_PRETRAIN, "trainer.max_epochs=2", "data.val_cells=0"]),
        index=IndexStageConfig(enabled=False),
    )
    build = train.build_trainer

    def interrupted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.insert(0, InterruptAtEpoch(epoch))
        return trainer

    monkeypatch.setattr(train, "build_trainer", interrupted)
    with pytest.raises(Interrupted, match=hint) as caught:
        run_study(deepapl_like, config, tmp_path / "results", say=lambda _: None)
    assert "--resume" not in str(caught.value)
    monkeypatch.setattr(train, "build_trainer", build)
    run_study(deepapl_like, config, tmp_path / "results", say=lambda _: None)
    assert json.loads((tmp_path / "results" / "run" / "meta.json").read_text())["epochs"] == 2
