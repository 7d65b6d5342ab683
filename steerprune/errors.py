"""The one error type a user sees as a one-line message (CLI exit 2), never as a traceback."""
__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: a wrong path, spec, checkpoint or option. The message says what was wrong."""
