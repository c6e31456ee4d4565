"""The one exception type a user is meant to read.

Anything raised as :class:`MarrowLensError` is bad input or a refused operation: the CLI prints its
message on one line and exits non-zero, without a traceback. Everything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class MarrowLensError(Exception):
    """Bad input or a refused operation, explained in one line."""


def listing(values: Iterable[object], limit: int = 5) -> str:
    """The first few values and how many more: a one-line error stays one readable line."""
    shown = list(values)
    head = ", ".join(map(str, shown[:limit]))
    return f"{head} and {len(shown) - limit} more" if len(shown) > limit else head


class Interrupted(MarrowLensError):
    """Ctrl-C during a long step (pretraining, embedding); the message says how to continue."""


def in_main_process(exc: MarrowLensError) -> MarrowLensError:
    """The error a DataLoader worker raised, as one line again.

    torch re-raises a worker's exception in the main process as the same type, but with the worker's
    whole traceback as its message; the last line of that traceback is the original message.
    """
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return exc
    return type(exc)(text.rstrip().splitlines()[-1].partition(": ")[2])
