"""What the parent flow tells the world as shards finish, whichever executor runs them.

- :func:`progress_listener` lets an in-process caller (the CLI) follow a run: it receives
  ``(event, data)`` with events ``"plan"``, ``"shard_start"``, ``"images"``,
  ``"shard_done"``, ``"shard_skipped"`` (held by another run, or done by one since the
  plan), ``"shard_failed"``, ``"server_lost"`` (the Prefect server forgot the run),
  ``"report"`` and ``"summary"`` (the run's summary dict, last).
- :class:`Tally` counts the outcome of every shard, keeps the ``opticam-progress``
  artifact up to date, logs, and records a failed shard in its errors file.
- When the Prefect server no longer knows the run (it came back without its database),
  :meth:`Tally.server_lost` warns once; the run goes on from storage, and nothing more
  is sent about it to the server (:func:`server_forgot` tells such an error).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from opticam import store
from opticam.config import RunConfig
from opticam.names import STAGE_SHARD
from opticam.pipeline import run_url_of
from opticam.redact import redact_text, redact_url

__all__ = [
    "ARTIFACT_PROGRESS",
    "Listener",
    "Tally",
    "emit",
    "progress_listener",
    "record_failure",
    "server_forgot",
]

ARTIFACT_PROGRESS = "opticam-progress"

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def progress_listener(fn: Listener) -> Iterator[None]:
    """Call ``fn(event, data)`` on progress events of flows run in this process."""
    with _listeners_lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(fn)


def emit(event: str, **data: Any) -> None:
    """Send one progress event to every listener of this process."""
    with _listeners_lock:
        targets = list(_listeners)
    for fn in targets:
        # A display problem must never fail a shard.
        with contextlib.suppress(Exception):
            fn(event, data)


def server_forgot(exc: BaseException) -> bool:
    """Whether a Prefect API error says that the server does not know the object (404)."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    if isinstance(exc, ObjectNotFound):
        return True
    return isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code == 404


class _ForgottenRunFilter(logging.Filter):
    """Drops the flow engine's traceback for a state it can no longer set on the server.

    The run has already said why, in its one warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep ``record`` unless its exception says the server forgot the run."""
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not server_forgot(exc)


_FORGOTTEN_FILTER = _ForgottenRunFilter()


def quiet_forgotten_run(on: bool) -> None:
    """Add (or remove) the filter of the engine's tracebacks for a forgotten run."""
    engine_logger = logging.getLogger("prefect.flow_runs")
    if on:
        engine_logger.addFilter(_FORGOTTEN_FILTER)
    else:
        engine_logger.removeFilter(_FORGOTTEN_FILTER)


def record_failure(config: RunConfig, shard_url: str, message: str) -> None:
    """Add a ``"shard"`` error row to the errors file of a shard that failed for good.

    The rows that the failed attempt wrote there (e.g. why the shard is not a tar) are
    kept.
    """
    import pyarrow.parquet as pq

    public = redact_url(shard_url)
    run = run_url_of(config)
    options = config.output_options()
    earlier: list[dict[str, Any]] = []
    fs, path = store.layout.filesystem(store.errors_url(run, shard_url), options)
    with contextlib.suppress(Exception), fs.open(path, "rb") as f:
        earlier = [r for r in pq.read_table(f).to_pylist() if r["stage"] != STAGE_SHARD]
    record = {"shard": public, "key": None, "stage": STAGE_SHARD, "message": message}
    status = store.ShardStatus(
        shard=public, name=store.shard_name(shard_url), complete=False, n_errors=len(earlier) + 1
    )
    # Best effort: the storage that failed the shard may fail this write too.
    with contextlib.suppress(Exception):
        store.write_errors(run, config.run_id, [*earlier, record], status, options)


class Tally:
    """The outcome of every shard of one run, as the executor reports them.

    Args:
        config: the job.
        planned: shards in the plan.
        skipped: shards already done when the run started.
    """

    def __init__(self, config: RunConfig, planned: int, skipped: int) -> None:
        self.config = config
        self.planned = planned
        self.skipped = skipped
        self.results: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}
        #: The one line of a storage failure that ended the run, or None.
        self.storage_failed: str | None = None
        self.held: dict[str, str] = {}
        self.not_run: list[str] = []
        #: Why the server no longer knows this run; None while it does.
        self.lost: str | None = None
        self._logger = get_run_logger()
        self._progress_id: Any = create_progress_artifact(
            progress=self._percent(),
            key=ARTIFACT_PROGRESS,
            description=f"Shards of run {config.run_id} done (of {planned})",
        )

    def _percent(self) -> float:
        finished = self.skipped + len(self.results) + len(self.failed) + len(self.held)
        return 100.0 * (finished + len(self.not_run)) / max(self.planned, 1)

    def _advance(self) -> None:
        if self.lost is not None:
            return
        try:
            update_progress_artifact(self._progress_id, self._percent())
        except Exception as exc:
            if not server_forgot(exc):
                raise
            self.server_lost("its progress artifact is gone")

    def server_lost(self, what: str) -> None:
        """The Prefect server no longer knows this run: warn once, send nothing more."""
        if self.lost is not None:
            return
        from prefect.settings import PREFECT_API_URL

        self.lost = (
            f"the Prefect server at {redact_url(str(PREFECT_API_URL.value() or '?'))} no longer knows "
            f"this run ({what}): it restarted without its database? The run goes on from "
            f"its storage ({redact_url(run_url_of(self.config))}); Prefect will not show its "
            "progress, artifacts or final state"
        )
        self._logger.warning("%s", self.lost)
        quiet_forgotten_run(True)
        emit("server_lost", message=self.lost)

    def finished(self, result: dict[str, Any]) -> None:
        """Count a shard that ended without failing.

        Args:
            result: the shard's :meth:`opticam.store.ShardStatus.to_dict`: computed,
                done by another run meanwhile (``skipped``), or held by another worker
                (``held_by``).
        """
        if result["held_by"]:
            # Another run or worker holds this shard's lease: it computes it.
            self.held[result["shard"]] = result["held_by"]
            self._logger.info("shard %s: held by %s, skipped", result["shard"], result["held_by"])
            emit("shard_skipped", **result)
        elif result["skipped"]:
            self.skipped += 1
            emit("shard_skipped", **result)
        else:
            self.results.append(result)
            emit("shard_done", **result)
        self._advance()

    def storage_failure(self, shard_url: str, message: str) -> None:
        """The output storage failed for good while this shard was written.

        The run ends (no further shard starts) and says so once.
        """
        if self.storage_failed is None:
            self.storage_failed = redact_text(message)
            self._logger.error("%s; stopping the run", self.storage_failed)
        self.failed[redact_url(shard_url)] = redact_text(message)
        self._advance()

    def failure(self, shard_url: str, message: str) -> None:
        """A shard that failed for good: logged, recorded as an error row, counted."""
        public = redact_url(shard_url)
        self.failed[public] = redact_text(message)
        self._logger.error("shard %s failed: %s", public, self.failed[public])
        record_failure(self.config, shard_url, self.failed[public])
        emit("shard_failed", shard=public, message=self.failed[public])
        self._advance()

    def unfinished(self, shard_url: str) -> None:
        """A shard that the run could not compute after the server forgot it.

        No error row is written: the next run of the job computes it.
        """
        self.not_run.append(redact_url(shard_url))
        self._advance()
