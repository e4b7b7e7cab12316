"""The one exception type that means "the user gave us something wrong".

Library code raises `UserError` with a single line naming the file, field or row and what was
expected; the CLI prints that line and exits with code 2 (no traceback unless `--debug`). Any
other exception is a bug in nested-reft and is shown with its traceback.
"""


class UserError(Exception):
    """Bad input: a one-line, actionable message. The CLI maps it to exit code 2."""

    exit_code = 2
