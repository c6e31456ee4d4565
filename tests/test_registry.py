"""config.py's registry tables: a name and where its class lives is all a new method, head or kind needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from marrowlens.errors import MarrowLensError
from marrowlens.registry import load_registered
from tests.conftest import REPO_ROOT


class Extra:
    """Stands in for a new module's class: registered by its table line alone."""


def test_a_table_line_is_enough_to_register_a_class() -> None:
    loaded = load_registered({"extra": "tests.test_registry:Extra", "json": "json:JSONDecoder"})
    assert list(loaded) == ["extra", "json"] and loaded["extra"] is Extra


@pytest.mark.parametrize("where", ["tests.no_such_module:Extra", "tests.test_registry:NoSuchClass"])
def test_an_entry_that_does_not_import_is_one_line_naming_it(where: str) -> None:
    with pytest.raises(MarrowLensError, match=r"registry entry 'extra' -> .* does not import") as caught:
        load_registered({"extra": where})
    assert "\n" not in str(caught.value)


def test_loading_a_config_and_the_cli_import_no_registered_class() -> None:
    """The tables are strings: ``--help`` and config validation stay free of torch and FAISS."""
    code = "import sys, marrowlens.cli, marrowlens.config; print(sorted({'torch', 'faiss'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert done.stdout.strip() == "[]"
