"""What a user sees when a command line is wrong: one line, `error: ...`, status 2 (the README's promise)."""

from __future__ import annotations

import re

import pytest

from marrowlens.cli import main


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["marrowlens", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("cohort", "index", "somewhere"),
            r"^error: Missing option '--out'\. \(see `marrowlens cohort index --help`\)$",
        ),
        (("probe", "fitt"), r"^error: No such command 'fitt'\. Did you mean 'fit'\?"),
        (("search", "--index", "idx", "-k", "many"), r"^error: Invalid value for '-k'"),
        (("embed", "--nonsense"), r"^error: No such option: --nonsense"),
    ],
)
def test_usage_errors_are_one_line(monkeypatch, capsys, args: tuple[str, ...], message: str) -> None:
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err.strip()), err


def test_help_still_prints_and_succeeds(monkeypatch, capsys) -> None:
    code, out, err = _run(monkeypatch, capsys, "cohort", "index", "--help")
    assert code == 0 and "--out" in out and err == ""


def test_a_marrowlens_error_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = _run(monkeypatch, capsys, "cohort", "check", str(tmp_path / "none"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
