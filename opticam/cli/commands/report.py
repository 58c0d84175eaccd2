"""``opticam report RUN_URL``: re-aggregate a finished or partial run, rebuild its report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opticam.cli.common import shown_path
from opticam.cli.flags import add_storage_flags, storage_options_of
from opticam.errors import CLIError, short_repr

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam report`` to the subcommands ``sub``."""
    parser = sub.add_parser("report", help="re-aggregate a run and rebuild its report")
    parser.add_argument("run_url", metavar="RUN_URL", help="<output>/<run_id>")
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam report RUN_URL``: rebuild the report of a run."""
    from opticam import store
    from opticam.report import build_report, format_table

    run = args.run_url.rstrip("/")
    options = storage_options_of(args) or None
    if store.read_run_json(run, options) is None and not store.list_done_rows(run, options):
        raise CLIError(f"no opticam run at {short_repr(run)} (no run.json, no rows files)")
    report = build_report(run, storage_options=options)
    sys.stdout.write(format_table(report.summary) + "\n")
    sys.stdout.write(f"report: {shown_path(report.index_url)}\n")
    return 0
