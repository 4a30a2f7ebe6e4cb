"""The one exception type a user sees.

A ``UserError`` names the problem and the fix in one line; the CLI prints it
without a traceback and exits with status 2. Anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user (files, flags, images). Message is one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
