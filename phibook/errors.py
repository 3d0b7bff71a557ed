"""The one exception type that the CLI turns into a clean message and exit code."""


class PhibookError(Exception):
    """Bad input or state that the user can fix; the message says what and where."""
