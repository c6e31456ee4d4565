"""meta.json records the command that really ran: the CLI's own, or the Python function called; never sys.argv."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marrowlens.artifacts import read_meta, write_meta
from marrowlens.cli import main
from marrowlens.cohort.manifest import index_cohort, load_cohort
from marrowlens.contracts import ModelRef, ProbeMeta, StoreRef
from marrowlens.embeddings import write_embeddings
from marrowlens.provenance import PYTHON, command_line, current_command, python_api, recording
from tests.conftest import Cli, model_meta


def test_cli_records_its_own_command_line(cli: Cli, mutation_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "my cohort"  # a space: the command is quoted so it can be run again
    code, output = cli("cohort", "index", mutation_tree, "--out", out, "--workers", "1")
    assert code == 0, output
    command = load_cohort(out).meta.command
    assert command == command_line("cohort", "index", mutation_tree, "--out", out, "--workers", 1)
    assert f"'{out}'" in command
    assert current_command() == PYTHON  # nothing leaks out of the command


def test_main_records_the_command_it_parsed(
    mutation_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cohort"
    monkeypatch.setattr(
        sys, "argv", ["/usr/local/bin/marrowlens", "cohort", "index", str(mutation_tree), "--out", str(out)]
    )
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 0
    assert load_cohort(out).meta.command == command_line("cohort", "index", mutation_tree, "--out", out)


def test_cohort_check_fix_records_its_command_not_the_one_that_indexed(
    cli: Cli, mutation_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cohort"
    assert cli("cohort", "index", mutation_tree, "--out", out)[0] == 0
    next(mutation_tree.rglob("*.png")).write_bytes(b"not an image")
    assert cli("cohort", "check", out, "--fix", "--workers", "1")[0] == 0
    meta = load_cohort(out).meta
    assert meta.command == command_line("cohort", "check", out, "--fix", "--workers", 1) and meta.n_quarantined == 1


def test_python_api_records_the_function_called(mutation_tree: Path, tmp_path: Path) -> None:
    cohort = index_cohort([mutation_tree], tmp_path / "cohort")
    assert cohort.meta.command == "python: marrowlens.cohort.manifest.index_cohort"
    cells = pd.DataFrame({"cell_id": ["a", "b"], "patient_id": ["p", "q"]})
    store = write_embeddings(tmp_path / "emb", np.eye(2, dtype=np.float32), cells, {"model": model_meta(dim=2)})
    assert store.meta.command == "python: marrowlens.embeddings.write_embeddings"


def test_a_bare_write_records_python_and_a_command_wins_over_the_api(tmp_path: Path) -> None:
    meta = ProbeMeta(
        task="blast", fingerprint="f", embeddings=StoreRef(folder="e", fingerprint="g"), model=ModelRef(fingerprint="h")
    )
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path, ProbeMeta).command == PYTHON

    @python_api
    def made() -> str:
        return current_command()

    assert made() == f"python: {__name__}.{made.__qualname__}"
    with recording("marrowlens probe fit blast --out x"):
        assert made() == "marrowlens probe fit blast --out x"
    assert current_command() == PYTHON
