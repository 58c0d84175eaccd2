"""``opticam pack SOURCE URL --per-shard N``: an ImageFolder tree or a CSV list into shards."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opticam.cli.flags import add_storage_flags, positive_int, storage_options_of
from opticam.errors import CLIError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam pack`` to the subcommands ``sub``."""
    parser = sub.add_parser("pack", help="pack an ImageFolder tree or CSV list into shards")
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("url", metavar="URL", help="folder or pattern with %%d")
    parser.add_argument("--per-shard", type=positive_int, required=True)
    parser.add_argument("--shuffle-seed", type=int)
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam pack SOURCE URL --per-shard N``: ImageFolder / CSV -> shards."""
    from opticam.data import pack

    try:
        urls = pack(
            args.source,
            args.url,
            args.per_shard,
            storage_options=storage_options_of(args) or None,
            shuffle_seed=args.shuffle_seed,
        )
    except (ValueError, FileNotFoundError) as err:
        # pack checks the source tree or CSV and says what in it is wrong.
        raise CLIError(str(err)) from err
    for url in urls:
        sys.stdout.write(url + "\n")
    sys.stderr.write(f"{len(urls)} shards written\n")
    return 0
