"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


class FlywheelError(Exception):
    """A problem with input, data or environment that the user can fix; the message says how."""


class DataError(FlywheelError):
    """A dataset is unknown, missing or corrupt."""
