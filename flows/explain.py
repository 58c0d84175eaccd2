"""Prefect flows: explain a whole dataset (parent) or one shard (child, for deployments).

The flows only orchestrate; every step is a call into :mod:`opticam`:

1. plan: expand the shard pattern (fails before any work when it matches nothing), check
   the model and method options, write ``run.json``;
2. skip the shards whose rows file exists (same job -> same run id -> resume);
3. run the others: with executor ``local`` on this machine's devices, at most one shard
   per device at a time (the CPU counts as one device), each as a task with retries for
   transient storage errors; with executor ``deployments`` as one ``explain-shard`` flow
   run per shard on a work pool (:mod:`opticam_flows.cluster`);
4. build the report and publish it as artifacts: ``opticam-summary`` (markdown),
   ``opticam-summary-table`` (table) and ``opticam-report`` (link), plus the
   ``opticam-progress`` progress artifact updated as shards finish.

Traps avoided (DESIGN.md): the task runner is bounded and the flow itself never has more
shards in flight than devices; tasks get URLs and configs, never tensors, with caching and
result persistence off; storage options (credentials) live in excluded config fields, so
they never reach the parameters Prefect stores.

The parent ends Failed when a shard failed (its result is still the run's summary) and
Completed otherwise. A Prefect server that restarts on its database in the middle of a
run is waited for (the client retries). One that comes back without it no longer knows
the run: the run warns once and goes on from storage, which holds every result. With
executor ``local`` it computes every shard and writes its report; with ``deployments``
it cannot submit more shard runs (their deployment is gone too), so it waits for the
runs still computing, writes the report of what is done, and lists the shards not run.
The final state cannot be set then, so :func:`run_dataset` returns the summary itself. Listeners (:func:`progress_listener`, :mod:`opticam_flows.events`) let an
in-process caller such as the CLI follow progress.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from opticam import store
from opticam.config import RunConfig
from opticam.data import ShardStreamError
from opticam.errors import StorageFailedError
from opticam.pipeline import (
    calibrate_shard,
    done_status,
    get_loaded_model,
    local_devices,
    pending_shards,
    preflight,
    process_shard,
    resolve_device,
    run_url_of,
)
from opticam.pipeline.plan import duplicates_note
from opticam.pipeline.prior import prior_settings
from opticam.redact import redact_url

if TYPE_CHECKING:
    from opticam.pipeline.plan import PendingShards, ShardPlan

from .events import (
    ARTIFACT_PROGRESS,
    Tally,
    emit,
    progress_listener,
    quiet_forgotten_run,
    server_forgot,
)
from .names import printable

__all__ = [
    "ARTIFACT_LINK",
    "ARTIFACT_PROGRESS",
    "ARTIFACT_SUMMARY",
    "ARTIFACT_TABLE",
    "explain_dataset",
    "explain_shard",
    "is_transient_error",
    "progress_listener",
    "run_dataset",
    "shard_task_name",
]

ARTIFACT_SUMMARY = "opticam-summary"
ARTIFACT_TABLE = "opticam-summary-table"
ARTIFACT_LINK = "opticam-report"

#: Key of a task result that says the output storage failed for good (its one line).
STORAGE_FAILED = "storage_failed"

# Retry delays for transient storage errors (seconds); three retries in all.
RETRY_DELAYS: list[float] = [2.0, 10.0, 30.0]

# --------------------------------------------------------------------------- retries


def is_transient_error(exc: BaseException) -> bool:
    """Whether an exception looks like a storage/network hiccup worth retrying.

    Retried: ``ConnectionError``, ``TimeoutError``, other ``OSError`` (s3fs and fsspec
    raise those for failed requests) and botocore / aiohttp / urllib3 errors. Not retried:
    missing files and permission errors, a storage that failed for good
    (:class:`opticam.errors.StorageFailedError`: no space, a quota, a read-only file
    system, a missing bucket), a shard whose stream kept failing
    (:class:`opticam.data.ShardStreamError`: :func:`opticam.pipeline.process_shard` has
    already read it again several times), and everything else (bad data, bad options,
    bugs).
    """
    if isinstance(exc, ShardStreamError | StorageFailedError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(
        exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError
    ):
        return False
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3")


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            value = state.result(raise_on_failure=False)
        except Exception as err:  # the state holds no readable result
            value = err
        exc = value if isinstance(value, BaseException) else None
    return exc is not None and is_transient_error(exc)


# --------------------------------------------------------------------------- tasks


# Both tasks retry transient storage errors only, and neither caches nor persists its
# result: inputs are URLs and configs, outputs live in the run folder.
_STORAGE_TASK: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": _retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


def shard_task_name(shard_url: str) -> str:
    """The shard task run's name: ``shard <file name>``, without credentials.

    The file name is made printable by :func:`opticam_flows.names.printable`.
    """
    # The file name is what a person looks for in the UI.
    return f"shard {printable(store.shard_file(shard_url))}"


def _shard_task_name() -> str:
    from prefect.runtime import task_run

    return shard_task_name(str(task_run.parameters.get("shard_url", "shard")))


@task(name="explain-shard", task_run_name=_shard_task_name, **_STORAGE_TASK)
def shard_task(
    config: RunConfig, shard_url: str, device: str, max_images: int | None = None
) -> dict[str, Any]:
    """Process one shard on ``device`` (:func:`opticam.pipeline.process_shard`).

    Logs one INFO line for the UI (the task run's and its flow run's Logs tab): what was
    done, where, and how fast.
    """
    public = redact_url(shard_url)
    emit("shard_start", shard=public, device=device, max_images=max_images)
    try:
        result = process_shard(
            config,
            shard_url,
            device,
            max_images=max_images,
            on_progress=lambda n: emit("images", shard=public, n=n),
            # Set by a Prefect worker for the flow-run processes it starts.
            worker=os.environ.get("PREFECT__WORKER_NAME", ""),
        )
    except StorageFailedError as exc:
        # Returned, not raised: nothing to retry, no traceback; the parent says it once.
        return {"shard": public, STORAGE_FAILED: str(exc)}
    status = result.to_dict()
    get_run_logger().info("%s", shard_log_line(status, public))
    return status


def shard_log_line(result: dict[str, Any], shard: str) -> str:
    """What a person watching a run needs of one finished shard, in one line.

    ``result`` is :meth:`opticam.store.ShardStatus.to_dict`; ``shard`` a public URL.
    """
    if result["held_by"]:
        return f"shard {shard}: its lease is held by {result['held_by']}; nothing computed"
    if result["skipped"]:
        return f"shard {shard}: done already; nothing computed"
    seconds = float(result["seconds"])
    rate = result["n_images"] / seconds if seconds > 0 else 0.0
    worker = f", worker {result['worker']}" if result.get("worker") else ""
    partial = "" if result["complete"] else "; incomplete: the shard could not be read to its end"
    if result.get("limit_reached"):
        partial += f"; stopped at max_images={result['max_images']}"
    return (
        f"shard {shard}: {result['n_images']} images, {result['n_rows']} rows, "
        f"{result['n_errors']} error rows in {seconds:.1f} s on {result['device']}{worker} "
        f"({rate:.2f} images/s){partial}"
    )


def _calibration_task_name() -> str:
    from prefect.runtime import task_run

    url = str(task_run.parameters.get("shard_url", "shard"))
    return f"calibrate {printable(store.shard_file(url))}"


@task(name="calibrate-shard", task_run_name=_calibration_task_name, **_STORAGE_TASK)
def calibration_task(
    config: RunConfig,
    shard_url: str,
    counts: list[int],
    device: str,
    max_images: int | None = None,
) -> int:
    """Calibrate one shard of a prior job (:func:`opticam.pipeline.calibrate_shard`).

    Returns the number of its images that joined the sample, also logged.
    """
    public = redact_url(shard_url)
    emit("calibration_start", shard=public, device=device)
    joined = calibrate_shard(
        config,
        shard_url,
        counts,
        device,
        max_images=max_images,
        on_progress=lambda n: emit("calibration_images", shard=public, n=n),
    )
    get_run_logger().info("shard %s: %d images joined the class prior's sample", public, joined)
    emit("calibration_done", shard=public, name=store.shard_name(shard_url), joined=joined)
    return joined


def _calibrate(config: RunConfig, plan: ShardPlan, devices: list[str]) -> str:
    """The class prior's walk and file, before any shard (:mod:`opticam.pipeline.prior`).

    Returns the log line that says what the prior is made of.
    """
    from opticam.pipeline import prior as run_prior

    loaded = get_loaded_model(config, resolve_device(config.device)[0])
    if config.executor == "deployments":
        from .cluster import calibrate_on_pool

        def calibrate(item: dict[str, Any], counts: list[int]) -> None:
            calibrate_on_pool(config, item, counts)

    else:

        def calibrate(item: dict[str, Any], counts: list[int]) -> None:
            calibration_task(config, item["url"], counts, devices[0], item["max_images"])

    prior, sha256 = run_prior.walk_calibration(config, plan, loaded, calibrate)
    seen = int((prior.counts > 0).sum())
    line = (
        f"class prior {sha256[:12]}: {int(prior.counts.sum())} calibration images of "
        f"{seen} of {prior.num_classes} classes, from {len(prior.sample)} shards"
    )
    emit("prior", sha256=sha256, images=int(prior.counts.sum()), classes=seen)
    return line


@task(name="build-report", **_STORAGE_TASK)
def report_task(config: RunConfig) -> dict[str, Any]:
    """Aggregate the run's rows and render the report (:func:`opticam.report.build_report`)."""
    from opticam.report import build_report

    try:
        report = build_report(
            run_url_of(config),
            storage_options=config.output_options(),
            data_storage_options=config.data_options(),
        )
    except StorageFailedError as exc:
        return {STORAGE_FAILED: str(exc)}
    return {
        "summary": list(report.summary),
        "summary_markdown": report.summary_markdown,
        "index_url": report.index_url,
        "files": list(report.files),
    }


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    with contextlib.suppress(Exception):
        if not isinstance(config, RunConfig):
            config = RunConfig.model_validate(config)
        return f"explain-{config.run_id}"
    return "explain-dataset"


# --------------------------------------------------------------------------- flows


def _bounded_runner() -> TaskRunner[Any]:
    # Never the unbounded default: at most one thread per local device.
    runner: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=max(1, len(local_devices())))
    return runner


def _run_local(
    config: RunConfig, pending: list[dict[str, Any]], devices: list[str], tally: Tally
) -> None:
    """Executor ``local``: the shards as tasks, one shard per device at a time."""
    queue = deque(pending)
    free = list(devices)
    running: dict[PrefectFuture[Any], tuple[str, dict[str, Any]]] = {}
    while (queue and tally.storage_failed is None) or running:
        # The device is handed back when its shard ends; no shard starts once the output
        # storage has failed for good.
        while free and queue and tally.storage_failed is None:
            item = queue.popleft()
            device = free.pop(0)
            future = shard_task.submit(config, item["url"], device, item["max_images"])
            running[future] = (device, item)
        finished = next(as_completed(list(running)))
        device, item = running.pop(finished)
        free.append(device)
        try:
            result = finished.result()
        except Exception as exc:
            tally.failure(item["url"], f"{type(exc).__name__}: {exc}")
        else:
            if STORAGE_FAILED in result:
                tally.storage_failure(item["url"], result[STORAGE_FAILED])
            else:
                tally.finished(result)


@flow(
    name="explain-dataset",
    flow_run_name=_flow_run_name,
    task_runner=_bounded_runner(),
    persist_result=False,
)
def explain_dataset(config: RunConfig) -> State[dict[str, Any]]:
    """Explain and score a whole dataset, resume-safe, then publish the report.

    Args:
        config: the job (its run id names the run folder ``<output>/<run_id>``; its
            executor says where shards run).

    Returns:
        A Completed state, or a Failed one when a shard failed, whose result is a dict:
        ``run_id``, ``run_url``, ``executor``, ``shards_total``, ``shards_processed``,
        ``shards_skipped``, ``shards_failed``, ``failed`` (shard URL -> message),
        ``shards_held``, ``held`` (shard URL -> the other worker holding its lease),
        ``images``, ``rows``, ``errors``, ``incomplete`` (shard URLs), ``report_url``,
        ``summary`` (the report's summary rows), ``most_in_flight`` (shards running at
        once), ``server_lost`` (the warning when the Prefect server forgot the run, else
        None), ``shards_not_run`` and ``not_run`` (shard URLs it could not submit then). Call with ``return_state=True`` and read ``state.result(raise_on_failure=
        False)`` to get the dict whatever the state.

    Raises:
        opticam.data.NoShardsError: the data spec matches no shard.
        opticam.errors.ConfigError: bad model or method options; no such deployment.
        ValueError: a run id collision.
    """
    started = time.monotonic()
    logger = get_run_logger()
    run = run_url_of(config)
    plan, devices = preflight(config)
    # The model preflight loaded (cached): what it applies goes into run.json.
    loaded_model = get_loaded_model(config, devices[0]).description()
    if config.executor == "deployments":
        from .cluster import check_config, shard_deployment

        check_config(config)
        devices = [f"work pool {config.pool} ({shard_deployment(config.pool or '')})"]
    try:
        store.write_run_json(run, config, plan, config.output_options(), loaded_model=loaded_model)
        pending = pending_shards(config, plan)
    except StorageFailedError as exc:
        logger.error("%s; stopping the run", exc)
        return Failed(message=str(exc), data=_ended_early(config, run, len(plan), str(exc)))
    skipped = len(plan) - len(pending)
    _announce_plan(config, run, plan, pending, devices)
    if prior_settings(config) is not None:
        logger.info("%s", _calibrate(config, plan, devices))
    tally = Tally(config, len(plan), skipped)
    if config.executor == "deployments":
        from .cluster import run_on_pool

        most_in_flight = run_on_pool(config, pending, tally) if pending else 0
    else:
        _run_local(config, pending, devices, tally)
        most_in_flight = min(len(devices), len(pending))
    report = _report(config, tally)
    summary = _summary(config, run, len(plan), tally, report, most_in_flight)
    _log_summary(config, summary, time.monotonic() - started, report["index_url"])
    # For run_dataset, when the server forgot this run and no final state can be set.
    emit("summary", **summary)
    return _final_state(len(plan), tally, summary)


def _announce_plan(
    config: RunConfig, run: str, plan: ShardPlan, pending: PendingShards, devices: list[str]
) -> None:
    """Log the plan (and each damaged rows file set aside) and emit the ``plan`` event."""
    logger = get_run_logger()
    skipped = len(plan) - len(pending)
    for name, (why, moved) in pending.damaged.items():
        logger.warning(
            "shard %s: its rows file is damaged (%s); moved to %s, computing the shard again",
            name,
            why,
            redact_url(moved),
        )
    logger.info(
        "run %s: %d shards planned, %d already done, %d to process on %s%s",
        redact_url(run),
        len(plan),
        skipped,
        len(pending),
        ", ".join(devices),
        duplicates_note(plan.duplicates),
    )
    emit(
        "plan",
        run_url=redact_url(run),
        run_id=config.run_id,
        total=len(plan),
        pending=len(pending),
        skipped=skipped,
        duplicates=plan.duplicates,
        damaged={name: [why, redact_url(moved)] for name, (why, moved) in pending.damaged.items()},
        devices=devices,
        max_images=[p["max_images"] for p in pending],
    )


def _report(config: RunConfig, tally: Tally) -> dict[str, Any]:
    """Build the report and publish its artifacts, unless the output storage failed.

    Returns :func:`report_task`'s dict, or an empty report when none was written (the
    storage failure is then recorded in ``tally``). Artifacts are not created once the
    server forgot the run, nor when it turns out to have forgotten it meanwhile.
    """
    report: dict[str, Any] = {"summary": [], "index_url": "", "summary_markdown": "", "files": []}
    if tally.storage_failed is not None:
        return report
    built = report_task(config)
    if STORAGE_FAILED in built:
        tally.storage_failed = built[STORAGE_FAILED]
        get_run_logger().error("%s; no report", tally.storage_failed)
        return report
    if tally.lost is None:
        try:
            _publish(config, built)
        except Exception as exc:
            if not server_forgot(exc):
                raise
            tally.server_lost("its artifacts cannot be created")
    emit("report", **built)
    return built


def _summary(
    config: RunConfig,
    run: str,
    planned: int,
    tally: Tally,
    report: dict[str, Any],
    most_in_flight: int,
) -> dict[str, Any]:
    """The run's result dict (see :func:`explain_dataset`) from its tally and report."""
    results = tally.results
    return {
        "run_id": config.run_id,
        "run_url": run,
        "executor": config.executor,
        "shards_total": planned,
        "shards_processed": len(results),
        "shards_skipped": tally.skipped,
        "shards_failed": len(tally.failed),
        "failed": tally.failed,
        "shards_held": len(tally.held),
        "held": tally.held,
        "images": sum(r["n_images"] for r in results),
        "rows": sum(r["n_rows"] for r in results),
        "errors": sum(r["n_errors"] for r in results),
        "incomplete": [r["shard"] for r in results if not r["complete"]],
        "report_url": report["index_url"],
        "summary": report["summary"],
        "most_in_flight": most_in_flight,
        STORAGE_FAILED: tally.storage_failed,
        "server_lost": tally.lost,
        "shards_not_run": len(tally.not_run),
        "not_run": tally.not_run,
    }


def _log_summary(config: RunConfig, summary: dict[str, Any], elapsed: float, index: str) -> None:
    """Log the run's one closing line: what was done, how fast, where the report is."""
    get_run_logger().info(
        "run %s: %d shards processed, %d skipped, %d failed; %d images, %d error rows in "
        "%.1f s (%.2f images/s); report %s",
        config.run_id,
        summary["shards_processed"],
        summary["shards_skipped"],
        summary["shards_failed"],
        summary["images"],
        summary["errors"],
        elapsed,
        summary["images"] / elapsed if elapsed > 0 else 0.0,
        redact_url(index) or "not written",
    )


def _final_state(planned: int, tally: Tally, summary: dict[str, Any]) -> State[dict[str, Any]]:
    """Failed when the storage failed or a shard failed or was not run, else Completed."""
    if tally.storage_failed is not None:
        return Failed(message=tally.storage_failed, data=summary)
    if tally.failed or tally.not_run:
        message = (
            f"{len(tally.failed) + len(tally.not_run)} of {planned} shards failed or were "
            "not run; rerun the same job to retry them"
            if tally.not_run
            else f"{len(tally.failed)} of {planned} shards failed; rerun the same job to retry them"
        )
        get_run_logger().error(message)
        return Failed(message=message, data=summary)
    return Completed(message=f"{planned} shards done", data=summary)


def _ended_early(config: RunConfig, run: str, planned: int, message: str) -> dict[str, Any]:
    """The run's result when the output storage failed before any shard started."""
    return {
        "run_id": config.run_id,
        "run_url": run,
        "executor": config.executor,
        "shards_total": planned,
        "shards_processed": 0,
        "shards_skipped": 0,
        "shards_failed": 0,
        "failed": {},
        "shards_held": 0,
        "held": {},
        "images": 0,
        "rows": 0,
        "errors": 0,
        "incomplete": [],
        "report_url": "",
        "summary": [],
        "most_in_flight": 0,
        "server_lost": None,
        "shards_not_run": 0,
        "not_run": [],
        STORAGE_FAILED: message,
    }


def run_dataset(config: RunConfig) -> dict[str, Any]:
    """Run :func:`explain_dataset` in this process and return its summary dict.

    The summary is returned whether the run ends Completed or Failed, and also when the
    Prefect server forgot the run in its middle (restarted without its database), in
    which case the run's final state cannot be set and ``summary["server_lost"]`` says
    so.

    Raises:
        Whatever :func:`explain_dataset` raises before it has a summary (bad input, a
        missing deployment, an API that stays unreachable).
    """
    summaries: list[dict[str, Any]] = []

    def keep(event: str, data: dict[str, Any]) -> None:
        if event == "summary":
            summaries.append(data)

    try:
        with progress_listener(keep):
            try:
                state = explain_dataset(config, return_state=True)
            except Exception as exc:
                if summaries and summaries[-1]["server_lost"] and server_forgot(exc):
                    return summaries[-1]
                raise
    finally:
        quiet_forgotten_run(False)
    outcome: Any = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    result: dict[str, Any] = outcome
    return result


def _publish(config: RunConfig, report: dict[str, Any]) -> None:
    from opticam.report import markdown_text

    title = f"Opti-CAM run `{config.run_id}`"
    create_markdown_artifact(
        markdown=(
            f"# {title}\n\n{report['summary_markdown']}\n\n"
            f"Report: {markdown_text(redact_url(report['index_url']))}\n"
        ),
        key=ARTIFACT_SUMMARY,
        description=f"Summary of run {config.run_id}",
    )
    if report["summary"]:
        create_table_artifact(
            table=report["summary"],
            key=ARTIFACT_TABLE,
            description=f"Per-method metrics of run {config.run_id}",
        )
    index = report["index_url"]
    create_link_artifact(
        # A bare local path is not a link a browser follows.
        link=index if "://" in index else f"file://{index}",
        link_text=f"Opti-CAM report {config.run_id}",
        key=ARTIFACT_LINK,
        description=f"Report of run {config.run_id}",
    )


@flow(name="explain-shard", persist_result=False)
def explain_shard(
    config: RunConfig,
    shard_url: str,
    max_images: int | None = None,
    device: str | None = None,
    stage: str = "explain",
    counts: list[int] | None = None,
) -> dict[str, Any]:
    """Explain one shard of a run (the unit a cluster deployment runs per worker).

    Skips the shard when its rows file exists. ``device`` None means the first device of
    ``config.device`` on the machine that runs this flow. ``stage="calibration"`` runs
    the class prior's calibration of the shard instead (:func:`calibration_task`), with
    ``counts`` the class counts of the sample before it; the prior itself is read from
    the run folder by the shard runs after it.

    Returns:
        :meth:`opticam.store.ShardStatus.to_dict` (``skipped=True`` if already done), or
        for a calibration ``{"shard": ..., "calibration": images that joined}``.
    """
    logger = get_run_logger()
    public = redact_url(shard_url)
    if stage == "calibration":
        chosen = device or resolve_device(config.device)[0]
        joined = calibration_task(config, shard_url, list(counts or []), chosen, max_images)
        return {"shard": public, "calibration": joined}
    if stage != "explain":
        raise ValueError(f"unknown stage {stage!r} (known: explain, calibration)")
    if store.is_done(run_url_of(config), shard_url, config.output_options()):
        logger.info("shard %s of run %s is done already", public, config.run_id)
        return done_status(config, shard_url).to_dict()
    chosen = device or resolve_device(config.device)[0]
    # The task logs the shard's line, in this flow run's Logs tab too.
    result: dict[str, Any] = shard_task(config, shard_url, chosen, max_images)
    if STORAGE_FAILED in result:
        # Failed with the one line: the parent starts no further shard (it would fail too).
        get_run_logger().error("%s", result[STORAGE_FAILED])
        return Failed(message=result[STORAGE_FAILED], data=result)  # type: ignore[return-value]
    return result
