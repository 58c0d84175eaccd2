"""``opticam worker``: one Prefect process worker per visible GPU, or ``--slots`` CPU workers."""

from __future__ import annotations

import argparse
from typing import Any

from opticam.cli.flags import pool_name, positive_int

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam worker`` to the subcommands ``sub``."""
    parser = sub.add_parser(
        "worker",
        help="start one Prefect process worker per visible GPU (or --slots CPU workers)",
        description="Start 'prefect worker start --pool POOL --limit 1' once per visible GPU, "
        "each with its own CUDA_VISIBLE_DEVICES, or SLOTS CPU workers; Ctrl-C stops them all "
        "and the flow runs they started.",
    )
    parser.add_argument("--pool", required=True, type=pool_name, help="work pool")
    parser.add_argument("--slots", type=positive_int, help="CPU workers instead of one per GPU")
    parser.add_argument("--name", help="worker name prefix (default: the host name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam worker``: one Prefect worker per GPU, or ``--slots`` CPU workers."""
    from opticam.cli.workers import plan_workers, run_workers

    return run_workers(plan_workers(args.pool, slots=args.slots, name=args.name))
