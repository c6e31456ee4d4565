"""The README is the product's first page: its commands and paths must exist as written."""

from __future__ import annotations

import re
import shlex

import typer

from marrowlens.cli import app
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def _code_lines() -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.DOTALL)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(("marrowlens ", "srun marrowlens"))]


def test_readme_says_how_to_get_the_command_on_path() -> None:
    assert "source .venv/bin/activate" in README and ".venv/bin/marrowlens" in README


def test_every_readme_command_exists() -> None:
    root = typer.main.get_command(app)
    lines = _code_lines()
    assert len(lines) > 10
    for line in lines:
        words = shlex.split(line.split("#")[0].replace("srun ", ""))[1:]
        command = root
        while hasattr(command, "get_command") and words and not words[0].startswith("-"):
            sub = command.get_command(None, words.pop(0))  # type: ignore[arg-type]
            assert sub is not None, f"README command does not exist: {line}"
            command = sub
        options = {name for param in command.params for name in getattr(param, "opts", [])}
        for word in words:
            flag = word.split("=")[0]
            if flag.startswith("--") and flag.isascii() and "|" not in flag:
                assert flag in options, f"README uses {flag}, which `{command.name}` does not take: {line}"


def test_every_config_the_readme_names_is_shipped() -> None:
    for path in set(re.findall(r"configs/[\w/]+\.yaml", README)):
        assert (REPO_ROOT / path).is_file(), path
