"""The exception types a user sees.

A ``UserError`` names the problem and the fix in one line; the CLI prints it
without a traceback and exits with status 2. A ``QualityError`` is the same for
a build whose converted graphs ran but missed their accuracy bound (or produced
NaN/Inf): exit status 3, so scripts can tell "fix your flags" from "this
precision is not good enough for this model". Anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user (files, flags, images). Message is one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class QualityError(UserError):
    """Converted graphs that miss their bound against the fp32 reference. Message is one line."""

    exit_code = 3


class InputTypeError(UserError, TypeError):
    """An argument of the wrong type or dtype (a Python API caller's ``except TypeError`` sees it too)."""


class InputValueError(UserError, ValueError):
    """An argument of the right type with a wrong shape, size or value range (also a ``ValueError``)."""
