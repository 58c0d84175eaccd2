"""Errors that mean "the input was wrong", as opposed to a bug.

Every such class lives here (the modules that raise them import them from here), with
the helpers that keep their messages short (:func:`short_repr`, :func:`shorten`).

The command line prints a :class:`UserError` as one line and exits with status 2; any
other exception keeps its traceback, because it is a bug to report. Each class also
derives from the built-in exception it refines (``ValueError``, ``RuntimeError``), so
code that caught those before still does.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "MAX_MESSAGE_CHARS",
    "CLIError",
    "CheckpointError",
    "MissingPackageError",
    "NoShardsError",
    "RunCollisionError",
    "ShardPatternError",
    "WeightsUnavailableError",
    "MAX_QUOTED_CHARS",
    "STORAGE_FAILED_PREFIX",
    "ConfigError",
    "OutputError",
    "StorageFailedError",
    "UserError",
    "shorten",
    "short_repr",
]

#: How every :class:`StorageFailedError` message starts (a shard run's Failed state
#: carries it to the parent, which then starts no further shard).
STORAGE_FAILED_PREFIX = "the output storage failed for good"
#: Most characters of a user's value quoted in a message (:func:`short_repr`).
MAX_QUOTED_CHARS = 200
#: Most characters of any :class:`UserError` message: a backstop for values quoted
#: by code that did not shorten them (a YAML alias bomb expands to megabytes).
MAX_MESSAGE_CHARS = 2000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = MAX_QUOTED_CHARS
_REPR.maxother = MAX_QUOTED_CHARS
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxdict = 4


def shorten(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` cut to about ``limit`` characters: its start and end, and how much was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 20)
    head, tail = text[: keep * 3 // 4], text[-(keep // 4) :]
    return f"{head}...[{len(text) - len(head) - len(tail)} characters cut]...{tail}"


def short_repr(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` bounded for a message.

    Long strings, deep or long containers and big numbers are cut (:mod:`reprlib`), and
    the whole is at most about ``limit`` characters. A shared structure is never
    expanded more than once per element shown.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 160:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


class UserError(Exception):
    """Bad input from the person running opticam: a value, a URL, a file, an option.

    Its message is at most :data:`MAX_MESSAGE_CHARS` characters, whatever it quotes.
    """

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (shorten(args[0], MAX_MESSAGE_CHARS), *args[1:])
        super().__init__(*args)


class ConfigError(UserError, ValueError):
    """A job that cannot run as described: a bad model, method option, layer or device."""


class OutputError(UserError, OSError):
    """An output that cannot be written: a file in the way, no permission, no bucket.

    Also an S3 endpoint that does not answer, or no credentials to write with.
    """


class StorageFailedError(OutputError):
    """The output storage refused a write for a reason that will not go away by waiting.

    For example no space left, a quota, permission denied, a read-only file system, a
    bucket or folder that no longer exists. Never retried: the run ends with one line
    naming the storage and the cause (exit status 3 for ``opticam run``).

    Args:
        url: the output URL whose write failed (credentials removed).
        cause: the cause in a few words (``"no space left on device"``).
        detail: the storage's own message, added in brackets when it says more than
            ``cause``.

    Attributes:
        url: the output URL whose write failed (credentials removed).
        cause: the cause in a few words (``"no space left on device"``).
    """

    def __init__(self, url: str, cause: str, detail: str = "") -> None:
        self.url = url
        self.cause = cause
        extra = f" ({shorten(detail)})" if detail and detail != cause else ""
        super().__init__(f"{STORAGE_FAILED_PREFIX}: {cause}, writing {url}{extra}")


# --------------------------------------------------------------------------- by area


class CLIError(UserError):
    """A user error reported as one line with exit status 2."""


class ShardPatternError(UserError, ValueError):
    """A shard pattern that cannot be used.

    Unbalanced braces, too many names, a refused ``pipe:`` URL, an empty pattern. A
    :class:`~opticam.errors.UserError` and a ``ValueError``.
    """


class NoShardsError(UserError, ValueError):
    """A shard pattern (or an element of a list of patterns) matched no existing shard.

    A :class:`~opticam.errors.UserError` (the command line prints it as one line) and,
    as before, a ``ValueError``.
    """


class RunCollisionError(UserError, ValueError):
    """A run folder already holds a run.json for a different job (same run id)."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be obtained (typically: no network, nothing cached)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be read or does not fit the architecture."""


class MissingPackageError(UserError, ImportError):
    """A model source needs a package that is not installed (the message says which extra)."""
