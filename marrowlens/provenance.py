"""Which command made an artifact: the one the user ran, not whatever process happens to host it.

The CLI records the command line it parses, ``marrowlens run`` the stage command each stage stands
for, and a call from Python (a notebook, a test) the function called. ``sys.argv`` is never read
here: under ``marrowlens run``, pytest or a notebook it names the host process, not the work done.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

PYTHON = "python"  # what a meta.json records when no command or API function said what ran
_COMMAND: ContextVar[str | None] = ContextVar("marrowlens_command", default=None)


def current_command() -> str:
    """The command being run, for ``meta.json``."""
    return _COMMAND.get() or PYTHON


@contextlib.contextmanager
def recording(command: str) -> Iterator[None]:
    """Within the block, artifacts record ``command`` as what made them."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def command_line(*words: object) -> str:
    """``marrowlens WORDS``, quoted as a shell would need it to run again."""
    return shlex.join(["marrowlens", *map(str, words)])


def python_api(func: Callable[P, R]) -> Callable[P, R]:
    """Mark a library entry point: called from Python, it records ``python: module.function``.

    Called by a command (the CLI, a stage of ``marrowlens run``) it records that command instead.
    """
    name = f"{PYTHON}: {func.__module__}.{func.__qualname__}"

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if _COMMAND.get() is not None:
            return func(*args, **kwargs)
        with recording(name):
            return func(*args, **kwargs)

    return wrapper
