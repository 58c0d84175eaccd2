"""The ``opticam`` parser and entry point: the commands, one-line errors, exit statuses.

Exit status: 0 when the command did what it was asked; for ``opticam run``, 1 when a
shard failed or is truncated and 3 when the output storage failed for good
(:mod:`opticam.cli.commands.run`); 2 for bad input (unknown method, no shard matching the
pattern, a bad option, an output that cannot be written), in one line on stderr; 130 / 143
when interrupted by SIGINT / SIGTERM. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from opticam.cli.commands import COMMANDS
from opticam.errors import MAX_MESSAGE_CHARS, UserError, shorten

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``opticam`` argument parser: one subcommand per module of :data:`COMMANDS`."""
    from opticam import __version__

    parser = _Parser(prog="opticam", description="Dataset-scale Opti-CAM saliency maps.")
    parser.add_argument("--version", action="version", version=f"opticam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


#: Problems of one invalid configuration named in its message (the rest are counted).
_MAX_PROBLEMS = 5


def _one_line(exc: BaseException) -> str:
    """One line for a user's error, whatever it quotes.

    At most :data:`opticam.errors.MAX_MESSAGE_CHARS` characters; values are also
    shortened where they are quoted.
    """
    if isinstance(exc, ValidationError):
        parts = []
        problems = exc.errors()
        for err in problems[:_MAX_PROBLEMS]:
            loc = shorten(".".join(str(p) for p in err.get("loc", ())))
            msg = shorten(str(err.get("msg", "")).removeprefix("Value error, "), 400)
            parts.append(f"{loc}: {msg}" if loc else msg)
        if len(problems) > _MAX_PROBLEMS:
            parts.append(f"and {len(problems) - _MAX_PROBLEMS} more problems")
        text = "invalid configuration: " + "; ".join(parts)
    else:
        text = str(exc) or type(exc).__name__
    return shorten(" ".join(text.split()), MAX_MESSAGE_CHARS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opticam``; returns the exit status.

    A :class:`~opticam.errors.UserError` or a config value pydantic refuses is printed as
    one line with exit status 2. SIGINT and SIGTERM end with one line and status 130 or
    143 (``opticam run`` does not wait for the shard in progress: see
    :func:`opticam.cli.lifeline.supervised`). Any other exception propagates with its
    traceback.
    """
    import signal

    from opticam.cli.lifeline import Terminated, interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (KeyboardInterrupt, Terminated) as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        sys.stderr.write(interrupted(f"opticam {args.command}", signum) + "\n")
        return 128 + signum  # the shell's convention
    except (UserError, ValidationError) as exc:
        sys.stderr.write(f"opticam {args.command}: error: {_one_line(exc)}\n")
        return 2
