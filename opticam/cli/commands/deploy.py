"""``opticam deploy``: the work pools, deployments and automations of a cluster (idempotent)."""

from __future__ import annotations

import argparse
from typing import Any

from opticam.cli.common import quiet_prefect
from opticam.cli.flags import pool_name, positive_int
from opticam.config import DEFAULT_START_TIMEOUT

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam deploy`` to the subcommands ``sub``."""
    parser = sub.add_parser(
        "deploy",
        help="create the work pools, deployments and automations of a cluster",
        description="Create (or update) the shard work pool, a control pool for parent runs, "
        "the deployments explain-shard/POOL and explain-dataset/POOL and the automation that "
        "marks runs without heartbeats Crashed (and, with --notify, the one that posts to a "
        "webhook when a job ends), on the server at PREFECT_API_URL.",
    )
    parser.add_argument("--pool", required=True, type=pool_name, help="shard work pool")
    parser.add_argument(
        "--type", default="process", dest="pool_type", help="pool type when created (process)"
    )
    parser.add_argument(
        "--limit", type=positive_int, help="the pool's concurrency limit (runs at once)"
    )
    parser.add_argument(
        "--base-job-template",
        metavar="FILE",
        help="JSON base job template (deployments/templates/)",
    )
    parser.add_argument(
        "--control-pool",
        type=pool_name,
        help="process pool for parent runs (default: POOL-control)",
    )
    parser.add_argument(
        "--crash-after",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="seconds without a heartbeat before a run is marked Crashed (default: 90)",
    )
    parser.add_argument(
        "--notify",
        metavar="URL",
        help="webhook to POST to when a run of explain-dataset completes or fails "
        "(stored in the Prefect block 'opticam-notify'; e.g. a Slack incoming webhook), "
        "or does not start within --start-timeout",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        metavar="SECONDS",
        help="with --notify: seconds a run of explain-dataset may stay Pending or Late "
        f"before the webhook hears that it does not start (default: {DEFAULT_START_TIMEOUT:.0f})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam deploy``: pools, deployments and the crash automation (idempotent)."""
    quiet_prefect(verbose=False)
    from opticam_flows.cluster import require_server
    from opticam_flows.deploy import deploy

    require_server("opticam deploy")

    for line in deploy(
        args.pool,
        pool_type=args.pool_type,
        limit=args.limit,
        base_job_template=args.base_job_template,
        control_pool=args.control_pool,
        crash_after=args.crash_after,
        notify=args.notify,
        start_timeout=args.start_timeout,
    ):
        print(line)
    print(
        f"start workers with: opticam worker --pool {args.pool}   "
        f"(and one for parent runs: prefect worker start --pool "
        f"{args.control_pool or args.pool + '-control'})"
    )
    return 0
