"""Executor ``deployments``: one ``explain-shard`` flow run per shard on a work pool.

The parent flow (:func:`opticam_flows.explain.explain_dataset`) hands its pending shards to
:func:`run_on_pool`, which

1. submits one run of the deployment ``explain-shard/<pool>`` per shard with
   ``run_deployment(timeout=0)``, keeping at most ``max_in_flight`` runs submitted and
   not finished (thousands of runs submitted at once go Late and lock the database);
2. polls the states of its runs every :data:`POLL_SECONDS` (one request per 200 runs);
3. when a run ends: the shard is done if its rows file exists, whatever Prefect says;
   a run that Crashed (its machine died: the heartbeat automation of ``opticam deploy``
   marks it) or Failed is submitted again with the next attempt number, up to
   ``shard_attempts`` runs in all; a run that Completed without rows (the shard's lease
   was held by a worker of another run) is tried again after :data:`HELD_RETRY_SECONDS`;
4. watches the runs that a worker picked up: a run still Pending ``start_timeout``
   seconds after the parent first saw it Pending (its machine died while its flow-run
   process was starting, before the first heartbeat the automation watches) is
   cancelled and submitted again, which uses one of its ``shard_attempts``. A run that
   waits Scheduled for a free worker is left alone, however long it waits;
5. when the server no longer knows the parent (it came back without its database: the
   runs and the deployment are gone), stops submitting, waits for the shards whose lease
   is still live in the run folder (their processes keep computing), and counts the
   other pending shards as not run (:meth:`opticam_flows.events.Tally.unfinished`).

Each submission has the idempotency key ``<run id>:<shard name>:<submission>``: a
parent that is restarted finds the runs its predecessor submitted instead of adding new
ones (a reused key returns the existing run, even a Crashed one, which is why the key
counts submissions). Shard runs are named after the shard's file name and tagged
``opticam`` and ``opticam-run:<run id>``.

Nothing secret travels in the parameters: the config's storage options are excluded
from its dump and URLs with credentials in them are refused (:func:`check_config`).
Workers take storage credentials from their environment or an instance role.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from opticam import store
from opticam.config import RunConfig, normalize_url
from opticam.errors import STORAGE_FAILED_PREFIX, ConfigError, short_repr
from opticam.pipeline import run_url_of
from opticam.redact import redact_text, redact_url
from opticam.store.leases import current_lease

from .events import Tally, emit
from .names import printable

__all__ = [
    "DEFAULT_IN_FLIGHT",
    "HELD_RETRY_SECONDS",
    "MAX_HELD_ROUNDS",
    "POLL_SECONDS",
    "check_config",
    "check_deployment",
    "child_config",
    "dataset_deployment",
    "in_flight_limit",
    "require_server",
    "run_on_pool",
    "run_tags",
    "shard_deployment",
    "shard_run_name",
]

#: Seconds between two polls of the in-flight runs' states.
POLL_SECONDS = 2.0
#: Seconds before a shard whose lease another worker held is submitted again.
HELD_RETRY_SECONDS = 60.0
#: Times a shard is submitted again because its lease was held, before it counts as
#: failed (20 x 60 s is twice the lease expiry of :mod:`opticam.store.leases`).
MAX_HELD_ROUNDS = 20
#: In-flight runs when neither ``max_in_flight`` nor a pool concurrency limit is set.
DEFAULT_IN_FLIGHT = 32
# Flow runs read per request (the API's page size).
_READ_PAGE = 200
# Consecutive failed submissions (API unreachable) before the parent gives up.
_MAX_SUBMIT_ERRORS = 10


def shard_deployment(pool: str) -> str:
    """Name of the per-shard deployment on ``pool``: ``explain-shard/<pool>``."""
    return f"explain-shard/{pool}"


def dataset_deployment(pool: str) -> str:
    """Name of the parent deployment for jobs on ``pool``: ``explain-dataset/<pool>``."""
    return f"explain-dataset/{pool}"


def run_tags(config: RunConfig) -> list[str]:
    """Tags of every shard run of a job: ``opticam`` and ``opticam-run:<run id>``."""
    return ["opticam", f"opticam-run:{config.run_id}"]


def shard_run_name(shard_url: str, submission: int = 0) -> str:
    """The name of a shard's flow run: its file name, then ``#2``, ``#3``... if resubmitted.

    The file name is made printable by :func:`opticam_flows.names.printable`.
    """
    name = printable(store.shard_file(shard_url))
    return name if submission == 0 else f"{name} #{submission + 1}"


def check_config(config: RunConfig) -> None:
    """Refuse what the deployments executor cannot do without leaking a secret.

    Raises:
        ConfigError: no pool, or a data/output URL carrying credentials (they would be
            stored in the shard runs' parameters; workers must take them from their
            environment instead).
    """
    if config.pool is None:
        raise ConfigError("executor 'deployments' needs a pool (--pool NAME)")
    for url in [*config.data_urls(), config.output]:
        if redact_url(url) != url:
            raise ConfigError(
                f"URL {short_repr(redact_url(url))} carries credentials; with executor 'deployments' "
                "the URL travels to the workers in flow-run parameters, which the Prefect "
                "server stores: give the workers credentials through their environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a netrc file, an instance role)"
            )


def child_config(config: RunConfig) -> dict[str, Any]:
    """The config as shard runs receive it: JSON, local paths absolute, no storage options.

    The run id is unchanged (the job description normalizes URLs the same way), so every
    worker writes into the parent's run folder.
    """
    data = config.data
    normalized = normalize_url(data) if isinstance(data, str) else [normalize_url(u) for u in data]
    child = config.model_copy(update={"data": normalized, "output": normalize_url(config.output)})
    dumped = child.model_dump(mode="json")
    if RunConfig.model_validate(dumped).run_id != config.run_id:  # pragma: no cover
        raise AssertionError("the shard runs' config would name another run folder")
    return dumped


def require_server(what: str) -> str:
    """The API URL of the Prefect server, or ConfigError when there is none.

    Without ``PREFECT_API_URL`` Prefect starts a temporary server for each command: no
    worker could ever see what is deployed or submitted there.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            f"{what} needs a Prefect server that workers share: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after 'prefect server start')"
        )
    return str(url)


def check_deployment(config: RunConfig) -> None:
    """Fail early, in one line, when the job cannot be submitted.

    Runs :func:`check_config`, :func:`require_server` and :func:`in_flight_limit`.
    """
    check_config(config)
    require_server("executor 'deployments'")
    with get_client(sync_client=True) as client:
        in_flight_limit(config, client)


def in_flight_limit(config: RunConfig, client: Any) -> int:
    """``max_in_flight``, else twice the pool's concurrency limit, else 32.

    Raises:
        ConfigError: the deployment ``explain-shard/<pool>`` does not exist.
    """
    assert config.pool is not None
    name = shard_deployment(config.pool)
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(
            f"no deployment {short_repr(name)} on the Prefect server; create it with: "
            f"opticam deploy --pool {config.pool}"
        ) from None
    if config.max_in_flight is not None:
        return config.max_in_flight
    limit = None
    if deployment.work_pool_name:
        try:
            limit = client.read_work_pool(deployment.work_pool_name).concurrency_limit
        except ObjectNotFound:
            limit = None
    return 2 * limit if limit else DEFAULT_IN_FLIGHT


@dataclass
class _Shard:
    url: str
    max_images: int | None
    submissions: int = 0  # runs submitted so far (the idempotency key counts them)
    failures: int = 0  # runs that crashed, failed or did not start in time
    held_rounds: int = 0  # runs that completed while another worker held the lease
    ready_at: float = 0.0  # monotonic time before which it is not submitted
    started: bool = False
    pending_since: float | None = None  # when its current run was first seen Pending


def _terminal(flow_run: FlowRun) -> StateType | None:
    state = flow_run.state
    return state.type if state is not None and state.is_final() else None


def _message(flow_run: FlowRun) -> str:
    state = flow_run.state
    name = state.name if state is not None else "Unknown"
    text = (state.message or "").strip() if state is not None else ""
    return redact_text(
        f"flow run {short_repr(flow_run.name)} {name}: {text}" if text else f"{name}"
    )


class _Pool:  # size: one submit/poll loop; its methods share the waiting and running shards
    """The submit/poll loop of one parent run (see the module doc)."""

    def __init__(self, config: RunConfig, tally: Tally, limit: int) -> None:
        assert config.pool is not None
        self.config = config
        self.tally = tally
        self.limit = limit
        self.deployment = shard_deployment(config.pool)
        self.parameters = child_config(config)
        self.run = run_url_of(config)
        self.options = config.output_options()
        self.logger = get_run_logger()
        self.waiting: deque[_Shard] = deque()
        self.running: dict[UUID, _Shard] = {}
        self.most_in_flight = 0
        self._submit_errors = 0
        from prefect.runtime import flow_run as this_run

        # The parent's own flow run (None outside a flow run, as in unit tests).
        self.parent_id: str | None = this_run.id

    # -- submitting ------------------------------------------------------------------------

    def _submit(self, shard: _Shard) -> None:
        key = f"{self.config.run_id}:{store.shard_name(shard.url)}:{shard.submissions}"
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here
            self.deployment,
            parameters={
                "config": self.parameters,
                "shard_url": shard.url,
                "max_images": shard.max_images,
            },
            timeout=0,
            idempotency_key=key,
            tags=run_tags(self.config),
            flow_run_name=shard_run_name(shard.url, shard.submissions),
        )
        shard.submissions += 1
        shard.started = False
        shard.pending_since = None
        self.running[flow_run.id] = shard
        self.most_in_flight = max(self.most_in_flight, len(self.running))

    def _parent_gone(self, client: Any) -> bool:
        """Whether the server no longer knows the parent's own flow run."""
        if self.parent_id is None:
            return False
        try:
            client.read_flow_run(self.parent_id)
        except ObjectNotFound:
            return True
        return False

    def _fill(self, client: Any) -> None:
        """Submit ready shards until ``limit`` runs are in flight."""
        now = time.monotonic()
        later: list[_Shard] = []
        while self.waiting and len(self.running) < self.limit:
            shard = self.waiting.popleft()
            if shard.ready_at > now:
                later.append(shard)
                continue
            if store.is_done(self.run, shard.url, self.options):
                # Done by another run since the plan (or by a run of an earlier parent).
                self._finished_with_rows(shard)
                continue
            try:
                self._submit(shard)
            except ObjectNotFound:
                if self._parent_gone(client):
                    self.tally.server_lost(f"deployment {short_repr(self.deployment)} is gone")
                    later.append(shard)
                    break
                raise ConfigError(
                    f"deployment {short_repr(self.deployment)} disappeared from the Prefect server; "
                    f"create it again with: opticam deploy --pool {self.config.pool}"
                ) from None
            except Exception as exc:  # the API is unreachable or refusing: try later
                self._submit_errors += 1
                if self._submit_errors >= _MAX_SUBMIT_ERRORS:
                    raise
                self.logger.warning(
                    "submitting shard %s failed (%s); trying again in %.0f s",
                    redact_url(shard.url),
                    redact_text(f"{type(exc).__name__}: {exc}"),
                    POLL_SECONDS,
                )
                shard.ready_at = now + POLL_SECONDS
                later.append(shard)
                break
            else:
                self._submit_errors = 0
        self.waiting.extendleft(reversed(later))

    # -- outcomes --------------------------------------------------------------------------

    def _finished_with_rows(self, shard: _Shard, worker_ran_it: bool = False) -> None:
        status = store.read_status(self.run, shard.url, self.options)
        result = (status or store.ShardStatus(shard="", name="")).to_dict()
        result.update(shard=redact_url(shard.url), name=store.shard_name(shard.url))
        result["skipped"] = not worker_ran_it
        if worker_ran_it:
            emit("images", shard=result["shard"], n=int(result["n_samples"]))
        self.tally.finished(result)

    def _again(self, shard: _Shard, delay: float = 0.0) -> None:
        shard.ready_at = time.monotonic() + delay
        self.waiting.append(shard)

    def _ended(self, flow_run: FlowRun, shard: _Shard, state: StateType) -> None:
        public = redact_url(shard.url)
        if store.is_done(self.run, shard.url, self.options):
            # The rows file is the truth: a run marked Crashed after it wrote its rows
            # (a lost heartbeat) still did the shard.
            self._finished_with_rows(shard, worker_ran_it=state == StateType.COMPLETED)
            return
        if state == StateType.COMPLETED:
            shard.held_rounds += 1
            if shard.held_rounds > MAX_HELD_ROUNDS:
                self.tally.failure(
                    shard.url,
                    f"{shard.held_rounds} runs completed without rows: the shard's lease "
                    "stayed held by another worker",
                )
                return
            self.logger.info(
                "shard %s: another worker holds its lease; submitting it again in %.0f s",
                public,
                HELD_RETRY_SECONDS,
            )
            self._again(shard, HELD_RETRY_SECONDS)
            return
        message = _message(flow_run)
        if state == StateType.CANCELLED:
            self.tally.failure(shard.url, f"cancelled: {message}")
            return
        if STORAGE_FAILED_PREFIX in message:
            # Another run would fail the same way: no new shard starts (see run_all).
            self.tally.storage_failure(shard.url, message[message.index(STORAGE_FAILED_PREFIX) :])
            return
        self._attempt_failed(shard, message)

    def _attempt_failed(self, shard: _Shard, message: str) -> None:
        """One run of the shard crashed, failed or never started: again, or failed."""
        shard.failures += 1
        if shard.failures >= self.config.shard_attempts:
            self.tally.failure(
                shard.url,
                f"{shard.failures} runs crashed, failed or did not start; the last: {message}",
            )
            return
        self.logger.warning(
            "shard %s: %s; submitting it again (attempt %d of %d)",
            redact_url(shard.url),
            message,
            shard.failures + 1,
            self.config.shard_attempts,
        )
        self._again(shard)

    def _check_start(self, client: Any, flow_run: FlowRun, shard: _Shard) -> None:
        """Cancel and submit again a run Pending for longer than ``start_timeout``."""
        state = flow_run.state
        if state is None or state.type != StateType.PENDING:
            # Scheduled (waiting for a free worker) or Cancelling: not starting yet.
            shard.pending_since = None
            return
        now = time.monotonic()
        if shard.pending_since is None:
            shard.pending_since = now
            return
        waited = now - shard.pending_since
        if waited <= self.config.start_timeout:
            return
        reason = (
            f"picked up by a worker and not Running after {waited:.0f} s (start_timeout "
            f"{self.config.start_timeout:g} s): its worker or machine is probably gone"
        )
        result = client.set_flow_run_state(
            flow_run.id, Cancelled(message=f"opticam: {reason}; the shard is submitted again")
        )
        if result.status != SetStateStatus.ACCEPT:
            # It moved on meanwhile (started, or ended): the next poll sees where.
            return
        del self.running[flow_run.id]
        self._attempt_failed(shard, f"flow run {short_repr(flow_run.name)} {reason}")

    # -- polling ---------------------------------------------------------------------------

    def _poll(self, client: Any) -> None:
        ids = list(self.running)
        for start in range(0, len(ids), _READ_PAGE):
            page = ids[start : start + _READ_PAGE]
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
            )
            missing = set(page) - {r.id for r in runs}
            if missing and self._parent_gone(client):
                self.tally.server_lost("its flow run and its shard runs are gone")
                return
            for run_id in missing:  # deleted one by one, by a person or a retention rule
                gone = self.running.pop(run_id)
                self._attempt_failed(gone, f"flow run {run_id} is gone from the Prefect server")
            for flow_run in runs:
                shard = self.running.get(flow_run.id)
                if shard is None:
                    continue
                state = _terminal(flow_run)
                if state is None:
                    if flow_run.state is not None and flow_run.state.is_running():
                        if not shard.started:
                            shard.started = True
                            emit("shard_start", shard=redact_url(shard.url), device=self.deployment)
                    else:
                        self._check_start(client, flow_run, shard)
                    continue
                del self.running[flow_run.id]
                self._ended(flow_run, shard, state)

    def _sleep(self) -> None:
        if self.running:
            time.sleep(POLL_SECONDS)
            return
        # Nothing in flight: wait for the first shard that becomes ready.
        wake = min(s.ready_at for s in self.waiting)
        time.sleep(max(0.0, min(wake - time.monotonic(), HELD_RETRY_SECONDS)))

    def run_all(self, pending: list[dict[str, Any]]) -> None:
        # Absolute local paths: the workers' working folders are not ours.
        self.waiting.extend(_Shard(normalize_url(p["url"]), p["max_images"]) for p in pending)
        with get_client(sync_client=True) as client:
            while (self.waiting or self.running) and self.tally.lost is None:
                if self.tally.storage_failed is not None:
                    # The output storage failed for good: let the runs in flight end.
                    self.waiting.clear()
                self._fill(client)
                if self.tally.lost is not None or not (self.waiting or self.running):
                    break
                self._sleep()
                if self.running:
                    self._poll(client)
        if self.tally.lost is not None:
            self._drain()

    def _drain(self) -> None:
        """End a run that the server forgot, once the shards still computing are done.

        The shards still computing hold a live lease, so they are waited for; every
        other pending shard is counted as not run.
        """
        for shard in self.waiting:
            if store.is_done(self.run, shard.url, self.options):
                self._finished_with_rows(shard)
            else:
                self.tally.unfinished(shard.url)
        self.waiting.clear()
        computing = list(self.running.values())
        self.running.clear()
        while computing:
            still: list[_Shard] = []
            for shard in computing:
                if store.is_done(self.run, shard.url, self.options):
                    self._finished_with_rows(shard, worker_ran_it=True)
                    continue
                lease = current_lease(self.run, shard.url, self.options)
                if lease is not None and not lease.expired():
                    still.append(shard)
                else:
                    self.tally.unfinished(shard.url)
            computing = still
            if computing:
                time.sleep(POLL_SECONDS)


def run_on_pool(config: RunConfig, pending: list[dict[str, Any]], tally: Tally) -> int:
    """Run the pending shards as ``explain-shard/<pool>`` flow runs (see the module doc).

    Args:
        config: the job (``executor="deployments"``, ``pool`` set).
        pending: the planned shards not done yet (``url``, ``max_images``).
        tally: where each shard's outcome goes.

    Returns:
        The most shard runs that were in flight at once.

    Raises:
        ConfigError: the deployment does not exist, or a URL carries credentials.
    """
    check_config(config)
    require_server("executor 'deployments'")
    with get_client(sync_client=True) as client:
        limit = in_flight_limit(config, client)
    get_run_logger().info(
        "submitting %d shard runs to %s, at most %d in flight",
        len(pending),
        shard_deployment(config.pool or ""),
        limit,
    )
    pool = _Pool(config, tally, limit)
    pool.run_all(pending)
    return pool.most_in_flight


def calibrate_on_pool(config: RunConfig, item: dict[str, Any], counts: list[int]) -> None:
    """Run the calibration of one shard as an ``explain-shard/<pool>`` flow run, and wait.

    The class prior's walk (:mod:`opticam.pipeline.prior`) goes one shard after the
    other, so each calibration run is submitted alone and waited for (one run in flight).
    Only class counts travel in its parameters, never weights: the worker reads the
    earlier shards' results from storage. A run that ends without the shard's
    calibration file is submitted again, up to ``shard_attempts`` runs in all.

    Raises:
        RuntimeError: every attempt ended without the calibration file.
    """
    from opticam.pipeline.prior import read_calibration

    assert config.pool is not None
    run = run_url_of(config)
    url = normalize_url(item["url"])
    message = ""
    for attempt in range(config.shard_attempts):
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here
            shard_deployment(config.pool),
            parameters={
                "config": child_config(config),
                "shard_url": url,
                "max_images": item["max_images"],
                "stage": "calibration",
                "counts": counts,
            },
            idempotency_key=f"{config.run_id}:{store.shard_name(url)}:calibration:{attempt}",
            tags=run_tags(config),
            flow_run_name=f"calibrate {shard_run_name(url, attempt)}",
            poll_interval=POLL_SECONDS,
        )
        if read_calibration(run, url, config.output_options()) is not None:
            return
        message = _message(flow_run)
        get_run_logger().warning(
            "calibration of shard %s: %s (attempt %d of %d)",
            redact_url(url),
            message,
            attempt + 1,
            config.shard_attempts,
        )
    raise RuntimeError(
        f"the calibration of shard {short_repr(redact_url(url))} failed "
        f"{config.shard_attempts} times; the last: {message}"
    )
