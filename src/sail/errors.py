"""Errors the CLI reports as one clear line (no traceback): bad input, not a bug."""


class SailError(Exception):
    """A user-facing failure; the message names the file, column, row or key at fault."""
