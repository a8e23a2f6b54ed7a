"""Errors a user can cause (bad files, bad flags) vs. bugs.

A :class:`UserError` carries one sentence that names the file or flag and the problem; the CLI
prints it as one line on stderr and exits with ``exit_code``.  Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: shown as one line, no traceback."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class UsageError(UserError):
    """A problem with the command line (unknown flag, bad value): exit code 2."""

    exit_code = 2
