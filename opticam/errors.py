"""Errors that mean "the input was wrong", as opposed to a bug.

The command line prints a :class:`UserError` as one line and exits with status 2; any
other exception keeps its traceback, because it is a bug to report. Each class also
derives from the built-in exception it refines (``ValueError``, ``RuntimeError``), so
code that caught those before still does.
"""

from __future__ import annotations

__all__ = ["ConfigError", "OutputError", "UserError"]


class UserError(Exception):
    """Bad input from the person running opticam: a value, a URL, a file, an option."""


class ConfigError(UserError, ValueError):
    """A job that cannot run as described: a bad model, method option, layer or device."""


class OutputError(UserError, OSError):
    """An output that cannot be written: a file in the way, no permission, no bucket.

    Also an S3 endpoint that does not answer, or no credentials to write with.
    """
