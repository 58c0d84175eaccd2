"""``opticam config``: the example job file, or the job that flags describe."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opticam.cli.flags import add_job_flags, config_from_args

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam config`` to the subcommands ``sub``."""
    parser = sub.add_parser(
        "config",
        help="print an example job file, or the job that flags describe",
        description="With --example, a commented job file with every field. Otherwise the "
        "job that the same flags would give 'opticam run', as YAML, with its run id.",
    )
    parser.add_argument("--example", action="store_true", help="print a commented job file")
    add_job_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam config``: the example job file, or the job that the flags describe."""
    if args.example:
        from opticam.jobfile import example_yaml

        sys.stdout.write(example_yaml())
        return 0
    import yaml

    config = config_from_args(args)
    sys.stdout.write(f"# run id: {config.run_id}\n")
    sys.stdout.write(yaml.safe_dump(config.public_dict(), sort_keys=False))
    return 0
