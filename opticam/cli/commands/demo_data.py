"""``opticam demo-data URL``: write the synthetic demo shards."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opticam.cli.flags import add_storage_flags, positive_int, storage_options_of

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam demo-data`` to the subcommands ``sub``."""
    from opticam.demo.cache import DEMO_PER_SHARD, DEMO_SEED, DEMO_SHARDS

    parser = sub.add_parser("demo-data", help="write synthetic demo shards")
    parser.add_argument("url", metavar="URL", help="folder URL")
    parser.add_argument("--shards", type=positive_int, default=DEMO_SHARDS)
    parser.add_argument("--per-shard", type=positive_int, default=DEMO_PER_SHARD)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam demo-data URL``: write synthetic demo shards."""
    from opticam.demo import make_shards

    urls = make_shards(
        args.url,
        args.shards,
        args.per_shard,
        args.seed,
        storage_options=storage_options_of(args) or None,
    )
    for url in urls:
        sys.stdout.write(url + "\n")
    return 0
