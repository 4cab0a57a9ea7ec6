"""Errors a user can act on. The CLI prints their message as one red line, without a traceback.

Two kinds, told apart by the exit code (documented in `flywheel --help` and docs/troubleshooting.md):
a FlywheelError is a usage or environment problem the user fixes (exit 2); a Rejected is the
pipeline saying no on purpose (a release that failed acceptance and rolled back, a gate that did
not register the run: exit 3), so a script can retry the first and stop on the second.
"""


class FlywheelError(Exception):
    """A problem with input, data or environment that the user can fix; the message says how."""


class DataError(FlywheelError):
    """A dataset is unknown, missing or corrupt."""


class Rejected(FlywheelError):
    """The pipeline refused a model on purpose: a release failed (and rolled back) or a gate rejected it."""
