"""One error type for everything a user can get wrong.

A LoftError carries a one-line message that says what is wrong and how to fix it. The CLI prints it
as `loft: error: ...` and exits non-zero, never with a traceback.
"""


class LoftError(Exception):
    """A user-facing problem: bad input, a missing file, an impossible budget."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
