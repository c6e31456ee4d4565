"""The one exception type a user is meant to read.

Anything raised as :class:`MarrowLensError` is bad input or a refused operation: the CLI prints its
message on one line and exits non-zero, without a traceback. Everything else is a bug.
"""


class MarrowLensError(Exception):
    """Bad input or a refused operation, explained in one line."""


class Interrupted(MarrowLensError):
    """Ctrl-C during a long step (pretraining, embedding); the message says how to continue."""
