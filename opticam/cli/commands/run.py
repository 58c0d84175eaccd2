"""``opticam run``: explain, score and report a dataset with the flow ``explain-dataset``.

An ephemeral Prefect without a server, or the server at ``PREFECT_API_URL`` when one is
configured. Without ``--data`` it runs the bundled demo end to end
(:mod:`opticam.demo.cache`); ``--config job.yaml`` reads a job file, and flags override it.

Exit status: 0 when every shard was read in full; 1 when a shard failed (a rerun retries
it) or is truncated in storage (its rows hold what could be read); 3
(:data:`EXIT_STORAGE_FAILED`) when the output storage failed for good in the middle of a
run (no space, a quota, permission denied, a read-only file system, a missing bucket: one
line, the run's summary, and nothing already written lost).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from opticam.cli.common import quiet_prefect, shown_path
from opticam.cli.flags import add_job_flags, config_from_args
from opticam.demo.cache import DEMO_METHODS, DEMO_STEPS

__all__ = ["EXIT_STORAGE_FAILED", "add_parser", "run"]

#: Exit status of ``opticam run`` when the output storage failed for good mid-run (no
#: space, a quota, permission denied, a read-only file system, a missing bucket).
EXIT_STORAGE_FAILED = 3


def add_parser(sub: Any) -> None:
    """Add ``opticam run`` to the subcommands ``sub``."""
    parser = sub.add_parser(
        "run",
        help="explain a dataset (no --data: the bundled demo)",
        description="Explain, score and report a dataset with the explain-dataset flow. "
        f"Without --data, runs the bundled demo end to end (methods {DEMO_METHODS}, "
        f"{DEMO_STEPS} insertion/deletion steps).",
    )
    add_job_flags(parser)
    parser.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``opticam run``: plan, explain, score and report a dataset (see module doc)."""
    start = time.monotonic()
    config = config_from_args(args)
    from opticam.pipeline import preflight

    # Bad input fails here, in one line, before Prefect starts (and logs tracebacks).
    preflight(config)
    quiet_prefect(args.verbose)
    if config.executor == "deployments":
        from opticam_flows.cluster import check_deployment

        check_deployment(config)
        if config.storage_options:
            sys.stderr.write(
                "note: --storage-option/--s3-endpoint apply to this command only; shard runs "
                "read storage with their worker's environment (AWS_* variables, a role)\n"
            )
    from opticam.cli.lifeline import supervised
    from opticam.cli.progress import RunProgress
    from opticam.report import format_table
    from opticam_flows.explain import progress_listener, run_dataset

    progress = RunProgress()
    # SIGTERM or SIGINT stops Prefect's temporary server and anything else the run
    # started; a watchdog process does it when this process is killed outright.
    with supervised("opticam run", on_abandon=progress.close):
        try:
            with progress_listener(progress):
                # The run's summary, whether it ended Completed or Failed (or the Prefect
                # server forgot it on the way).
                result = run_dataset(config)
        finally:
            progress.close()
        elapsed = time.monotonic() - start
        out = sys.stdout
        out.write("\n" + format_table(result["summary"], with_ci=False) + "\n")
        held = f", {result['shards_held']} held by another run" if result["shards_held"] else ""
        incomplete = f", {len(result['incomplete'])} incomplete" if result["incomplete"] else ""
        out.write(
            f"run {result['run_id']}: {result['shards_processed']} shards processed, "
            f"{result['shards_skipped']} skipped{held}, {result['shards_failed']} failed"
            f"{incomplete}; {result['images']} images, {result['errors']} error rows; "
            f"{elapsed:.1f}s\n"
        )
        if result.get("executor") == "deployments":
            out.write(
                f"shard runs on pool {config.pool}: at most {result['most_in_flight']} in flight\n"
            )
        if result["report_url"]:
            out.write(f"report: {shown_path(result['report_url'])}\n")
        else:
            out.write("report: not written\n")
    failed_storage = result.get("storage_failed")
    if failed_storage:
        # One line, no traceback; what was written before stays (every write is atomic).
        sys.stderr.write(
            f"opticam run: error: {failed_storage}. Nothing already written is lost: "
            "fix the storage, then rerun the same command to finish the run\n"
        )
        return EXIT_STORAGE_FAILED
    for url in result["incomplete"]:
        sys.stderr.write(
            f"incomplete shard {url}: the tar is truncated in storage; its rows hold the "
            "samples before the cut\n"
        )
    for url, message in result["failed"].items():
        sys.stderr.write(f"failed shard {url}: {message}\n")
    if result["not_run"]:
        sys.stderr.write(
            f"{len(result['not_run'])} shards not run: the Prefect server forgot this run and "
            "its deployments; run 'opticam deploy' again, then rerun the same job\n"
        )
    # Exit 1 whenever images were lost: a failed shard (rerun to retry it) or a truncated one.
    return 1 if result["shards_failed"] or result["incomplete"] or result["not_run"] else 0
