"""The deployments executor's decisions, against a scripted stand-in for the Prefect API:
resubmission of Crashed/Failed runs with the next idempotency key, the attempt limit,
held leases, the in-flight bound, and what travels in the parameters. The real server
and workers are exercised by ``test_cluster.py``; these cases are the ones a live
cluster cannot be steered into on demand."""

from __future__ import annotations

import itertools
import json
import logging
import types
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running, Scheduled

import opticam_flows.cluster as cluster
from opticam import store as real_store
from opticam.config import RunConfig
from opticam.errors import ConfigError
from opticam.store import ShardStatus

# A script gives, for (shard file name, submission number), the states a run goes
# through, one per poll; the last one stays. ``"rows"`` in a step writes the shard's rows.
Script = Callable[[str, int], list[Any]]


class FakePrefect:
    """run_deployment + read_flow_runs + the store's done check, in memory."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.runs: dict[UUID, dict[str, Any]] = {}
        self.by_key: dict[str, UUID] = {}
        self.done: set[str] = set()
        self.submitted: list[tuple[str, str, dict[str, Any], list[str]]] = []
        self.most_active = 0
        self.set_states: list[tuple[str, Any]] = []  # (run name, state) the parent set
        self.polls = 0
        self.forget_at: int | None = None  # the poll at which the server loses its database
        self.forgotten = False

    def add(self, key: str, name: str, steps: list[Any], shard: str | None = None) -> UUID:
        run_id = uuid4()
        shard = shard or name.split(" ")[0]
        self.runs[run_id] = {"name": name, "steps": list(steps), "shard": shard}
        self.by_key[key] = run_id
        return run_id

    def run_deployment(self, name: str, **kwargs: Any) -> FlowRun:
        if self.forgotten:
            raise ObjectNotFound(http_exc=Exception(name))
        key = kwargs["idempotency_key"]
        self.submitted.append((key, kwargs["flow_run_name"], kwargs["parameters"], kwargs["tags"]))
        if key not in self.by_key:  # a reused key returns the existing run
            shard = kwargs["parameters"]["shard_url"].rsplit("/", 1)[-1]
            submission = int(key.rsplit(":", 1)[1])
            self.add(key, kwargs["flow_run_name"], self.script(shard, submission), shard)
        return self._flow_run(self.by_key[key])

    def _flow_run(self, run_id: UUID) -> FlowRun:
        run = self.runs[run_id]
        step = run["steps"][0]
        state = step[0] if isinstance(step, tuple) else step
        return FlowRun(id=run_id, name=run["name"], flow_id=uuid4(), state=state)

    def read_flow_run(self, flow_run_id: Any) -> FlowRun:
        """The parent's own run: gone once the server forgot everything."""
        if self.forgotten:
            raise ObjectNotFound(http_exc=Exception(str(flow_run_id)))
        return FlowRun(id=flow_run_id, name="explain-x", flow_id=uuid4(), state=Running())

    def read_flow_runs(self, flow_run_filter: Any, limit: int) -> list[FlowRun]:
        self.polls += 1
        if self.polls == self.forget_at:
            self.runs.clear()
            self.forgotten = True
        ids = [i for i in flow_run_filter.id.any_ if i in self.runs]
        active = 0
        out = []
        for run_id in ids:
            run = self.runs[run_id]
            if len(run["steps"]) > 1:
                run["steps"].pop(0)
            step = run["steps"][0]
            if isinstance(step, tuple) and step[1] == "rows":
                self.done.add(run["shard"])
            flow_run = self._flow_run(run_id)
            active += not flow_run.state.is_final()  # type: ignore[union-attr]
            out.append(flow_run)
        self.most_active = max(self.most_active, active)
        return out

    def set_flow_run_state(self, flow_run_id: UUID, state: Any, force: bool = False) -> Any:
        """Like the server: a run that is Running or ended refuses to be Cancelled."""
        run = self.runs[flow_run_id]
        self.set_states.append((run["name"], state))
        step = run["steps"][0]
        current = step[0] if isinstance(step, tuple) else step
        if current.is_running() or current.is_final():
            return types.SimpleNamespace(status=SetStateStatus.REJECT)
        run["steps"] = [state]
        return types.SimpleNamespace(status=SetStateStatus.ACCEPT)


class FakeTally:
    def __init__(self) -> None:
        self.finished_: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}
        self.not_run: list[str] = []
        self.lost: str | None = None
        self.storage_failed: str | None = None

    def storage_failure(self, shard_url: str, message: str) -> None:
        self.storage_failed = self.storage_failed or message
        self.failed[shard_url] = message

    def server_lost(self, what: str) -> None:
        self.lost = self.lost or what

    def unfinished(self, shard_url: str) -> None:
        self.not_run.append(shard_url)

    def finished(self, result: dict[str, Any]) -> None:
        self.finished_.append(result)

    def failure(self, shard_url: str, message: str) -> None:
        self.failed[shard_url] = message


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[[Script], FakePrefect]:
    def install(script: Script) -> FakePrefect:
        server = FakePrefect(script)
        monkeypatch.setattr(cluster, "run_deployment", server.run_deployment)
        client = types.SimpleNamespace(
            # Looked up at each call, so that a test may replace it.
            read_flow_runs=lambda *args, **kwargs: server.read_flow_runs(*args, **kwargs),
            set_flow_run_state=server.set_flow_run_state,
            read_flow_run=server.read_flow_run,
        )
        monkeypatch.setattr(cluster, "get_client", lambda sync_client: _Context(client))
        monkeypatch.setattr(cluster, "get_run_logger", lambda: logging.getLogger("test"))
        monkeypatch.setattr(cluster, "POLL_SECONDS", 0.0)
        monkeypatch.setattr(cluster, "HELD_RETRY_SECONDS", 0.0)

        def is_done(run: str, url: str, options: Any = None) -> bool:
            return url.rsplit("/", 1)[-1] in server.done

        def read_status(run: str, url: str, options: Any = None) -> ShardStatus:
            name = url.rsplit("/", 1)[-1]
            return ShardStatus(shard=url, name=name, n_images=3, n_samples=3, worker="w-cpu0")

        store = types.SimpleNamespace(
            is_done=is_done, read_status=read_status, shard_name=lambda u: u.rsplit("/", 1)[-1],
            ShardStatus=ShardStatus, shard_file=real_store.shard_file,
        )  # fmt: skip
        monkeypatch.setattr(cluster, "store", store)
        return server

    return install


class _Context:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _config(**changes: Any) -> RunConfig:
    fields: dict[str, Any] = {
        "data": "s3://bucket/data/s-{0..3}.tar",
        "output": "s3://bucket/runs",
        "model": {"source": "demo"},
        "executor": "deployments",
        "pool": "gpu",
        "storage_options": {"key": "AKIA-SECRET-KEY", "secret": "very-secret"},
    }
    fields.update(changes)
    return RunConfig(**fields)


def _run(config: RunConfig, shards: list[str], limit: int = 8, parent: bool = False) -> FakeTally:
    tally = FakeTally()
    pool = cluster._Pool(config, tally, limit)  # type: ignore[arg-type]
    if parent:  # as inside a flow run, which the server may forget
        pool.parent_id = str(uuid4())
    pool.run_all([{"url": f"s3://bucket/data/{s}", "max_images": None} for s in shards])
    return tally


DONE = (Completed(), "rows")


def test_a_crashed_run_is_submitted_again_under_the_next_key(fake: Any) -> None:
    server = fake(
        lambda shard, n: (
            [Pending(), Running(), Crashed(message="no heartbeat")] if n == 0 else [Running(), DONE]
        )
    )
    config = _config()
    tally = _run(config, ["s-0.tar"])
    keys = [k for k, *_ in server.submitted]
    assert keys == [f"{config.run_id}:s-0.tar:0", f"{config.run_id}:s-0.tar:1"]
    assert [name for _, name, *_ in server.submitted] == ["s-0.tar", "s-0.tar #2"]
    assert tally.failed == {} and len(tally.finished_) == 1
    assert tally.finished_[0]["skipped"] is False and tally.finished_[0]["worker"] == "w-cpu0"


def test_a_shard_that_keeps_failing_fails_after_its_attempts(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), Failed(message="ShardNotATarError: no tar")])
    tally = _run(_config(shard_attempts=3), ["s-0.tar", "s-1.tar"])
    assert len(server.submitted) == 6
    assert set(tally.failed) == {"s3://bucket/data/s-0.tar", "s3://bucket/data/s-1.tar"}
    message = tally.failed["s3://bucket/data/s-0.tar"]
    assert (
        "3 runs crashed, failed or did not start" in message
        and "ShardNotATarError: no tar" in message
    )


def test_a_cancelled_run_is_not_retried(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), Cancelled(message="by a person")])
    tally = _run(_config(), ["s-0.tar"])
    assert len(server.submitted) == 1 and "cancelled" in tally.failed["s3://bucket/data/s-0.tar"]


def test_rows_are_the_truth_whatever_the_state(fake: Any) -> None:
    # The run wrote its rows and then lost its heartbeat: done, not submitted again.
    server = fake(lambda shard, n: [Running(), (Crashed(), "rows")])
    tally = _run(_config(), ["s-0.tar"])
    assert len(server.submitted) == 1 and len(tally.finished_) == 1 and not tally.failed


def test_a_held_shard_is_submitted_again_without_using_an_attempt(fake: Any) -> None:
    # Completed without rows: another worker held the lease. Three such rounds, then done.
    server = fake(lambda shard, n: [Running(), Completed()] if n < 3 else [Running(), DONE])
    tally = _run(_config(shard_attempts=1), ["s-0.tar"])
    assert [k.rsplit(":", 1)[1] for k, *_ in server.submitted] == ["0", "1", "2", "3"]
    assert not tally.failed and len(tally.finished_) == 1


def test_a_lease_held_for_ever_ends_as_a_failure(
    fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "MAX_HELD_ROUNDS", 2)
    server = fake(lambda shard, n: [Completed()])
    tally = _run(_config(), ["s-0.tar"])
    assert (
        len(server.submitted) == 3
        and "lease stayed held" in tally.failed["s3://bucket/data/s-0.tar"]
    )


def test_done_shards_are_not_submitted(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), DONE])
    server.done.add("s-1.tar")  # finished by another run since the plan
    tally = _run(_config(), ["s-0.tar", "s-1.tar"])
    assert [name for _, name, *_ in server.submitted] == ["s-0.tar"]
    assert sorted(r["skipped"] for r in tally.finished_) == [False, True]


def test_a_restarted_parent_finds_its_predecessors_runs(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), DONE])
    config = _config()
    # The previous parent's first run of s-0 crashed; its key is taken.
    server.add(f"{config.run_id}:s-0.tar:0", "s-0.tar", [Crashed()])
    tally = _run(config, ["s-0.tar"])
    assert [k.rsplit(":", 1)[1] for k, *_ in server.submitted] == ["0", "1"]
    assert len(server.runs) == 2 and len(tally.finished_) == 1


def test_no_more_runs_in_flight_than_the_limit(fake: Any) -> None:
    steps = itertools.count()
    server = fake(lambda shard, n: [Pending()] * (next(steps) % 3 + 1) + [Running(), DONE])
    tally = _run(_config(), [f"s-{i}.tar" for i in range(7)], limit=2)
    assert len(tally.finished_) == 7 and server.most_active == 2


def test_nothing_secret_travels_and_the_run_id_is_kept(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), DONE])
    config = _config()
    _run(config, ["s-0.tar"])
    ((key, name, parameters, tags),) = server.submitted
    text = json.dumps(parameters)
    assert "AKIA-SECRET-KEY" not in text and "very-secret" not in text
    assert RunConfig.model_validate(parameters["config"]).run_id == config.run_id
    assert parameters["shard_url"] == "s3://bucket/data/s-0.tar"
    assert tags == ["opticam", f"opticam-run:{config.run_id}"]


def test_local_paths_reach_workers_absolute(fake: Any, tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    config = _config(data="data/s-0.tar", output="runs")
    child = cluster.child_config(config)
    assert child["data"] == str(tmp_path / "data/s-0.tar")
    assert child["output"] == str(tmp_path / "runs")
    assert RunConfig.model_validate(child).run_id == config.run_id


@pytest.mark.parametrize(
    "changes",
    [
        {"data": "https://ann:pw@host/s-{0..3}.tar"},
        {"output": "https://host/runs?X-Amz-Signature=abc"},
    ],
)
def test_urls_with_credentials_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="carries credentials") as caught:
        cluster.check_config(_config(**changes))
    assert "pw" not in str(caught.value) and "abc" not in str(caught.value)


def test_the_in_flight_limit_follows_the_pool() -> None:
    def client(pool_limit: int | None, missing: bool = False) -> Any:
        def read_deployment_by_name(name: str) -> Any:
            if missing:
                raise ObjectNotFound(http_exc=Exception(name))
            return types.SimpleNamespace(work_pool_name="gpu")

        return types.SimpleNamespace(
            read_deployment_by_name=read_deployment_by_name,
            read_work_pool=lambda name: types.SimpleNamespace(concurrency_limit=pool_limit),
        )

    assert cluster.in_flight_limit(_config(), client(3)) == 6
    assert cluster.in_flight_limit(_config(), client(None)) == cluster.DEFAULT_IN_FLIGHT
    assert cluster.in_flight_limit(_config(max_in_flight=5), client(3)) == 5
    with pytest.raises(ConfigError, match="opticam deploy --pool gpu"):
        cluster.in_flight_limit(_config(), client(3, missing=True))


def test_shard_run_names_are_printable(fake: Any) -> None:
    # A newline, a right-to-left override and a terminal escape from the file name are
    # escaped; accented letters and other scripts are kept.
    server = fake(lambda shard, n: [Running(), Failed()] if n == 0 else [Running(), DONE])
    tally = _run(_config(), ["a\nb\u202egpj.\x1b[2Jdonnées-東京.tar"])
    names = [name for _, name, *_ in server.submitted]
    assert names == [
        "a\\nb\\u202egpj.\\x1b[2Jdonnées-東京.tar",
        "a\\nb\\u202egpj.\\x1b[2Jdonnées-東京.tar #2",
    ]
    assert all(name.isprintable() for name in names)
    assert len(tally.finished_) == 1


class FakeClock:
    """``time`` for the pool: each sleep, even of 0 s, moves one second on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1.0)
        if self.now > 1000 + 3600:
            raise AssertionError("the parent waited an hour for a run that never starts")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake_clock = FakeClock()
    monkeypatch.setattr(cluster, "time", fake_clock)
    return fake_clock


def test_a_run_that_never_starts_is_cancelled_and_submitted_again(
    fake: Any, clock: FakeClock
) -> None:
    # The first run is picked up (Pending) and its machine dies before it runs.
    server = fake(lambda shard, n: [Scheduled(), Pending()] if n == 0 else [Running(), DONE])
    config = _config(start_timeout=30)
    tally = _run(config, ["s-0.tar"])
    keys = [k for k, *_ in server.submitted]
    assert keys == [f"{config.run_id}:s-0.tar:0", f"{config.run_id}:s-0.tar:1"]
    ((name, state),) = server.set_states
    assert name == "s-0.tar" and state.type == StateType.CANCELLED
    assert "not Running after 3" in str(state.message) and "submitted again" in str(state.message)
    assert not tally.failed and len(tally.finished_) == 1
    # Cancelled once the bound had passed, counted from when it was first seen Pending.
    assert 30 < clock.now - 1000 < 40


def test_runs_that_never_start_use_up_the_shard_attempts(fake: Any, clock: FakeClock) -> None:
    # One crash and one run that never starts: two attempts, the shard fails.
    server = fake(
        lambda shard, n: [Running(), Crashed(message="no heartbeat")] if n == 0 else [Pending()]
    )
    tally = _run(_config(start_timeout=10, shard_attempts=2), ["s-0.tar"])
    assert len(server.submitted) == 2 and len(server.set_states) == 1
    message = tally.failed["s3://bucket/data/s-0.tar"]
    assert message.startswith("2 runs crashed, failed or did not start; the last: ")
    assert "not Running after 1" in message and "start_timeout 10 s" in message


def test_a_run_waiting_for_a_free_worker_is_left_alone(fake: Any, clock: FakeClock) -> None:
    # Scheduled for far longer than the bound (the pool is busy), then Pending for less.
    steps = [Scheduled()] * 100 + [Pending()] * 8 + [Running(), DONE]
    server = fake(lambda shard, n: list(steps))
    tally = _run(_config(start_timeout=10), ["s-0.tar"])
    assert len(server.submitted) == 1 and server.set_states == []
    assert len(tally.finished_) == 1


def test_a_run_that_starts_as_it_is_cancelled_is_kept(
    fake: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake(lambda shard, n: [Pending()] * 20 + [Running(), DONE])

    def started_meanwhile(flow_run_id: UUID, state: Any, force: bool = False) -> Any:
        server.runs[flow_run_id]["steps"] = [Running(), DONE]
        return server.set_flow_run_state(flow_run_id, state, force)

    client = types.SimpleNamespace(
        read_flow_runs=server.read_flow_runs, set_flow_run_state=started_meanwhile
    )
    monkeypatch.setattr(cluster, "get_client", lambda sync_client: _Context(client))
    tally = _run(_config(start_timeout=5), ["s-0.tar"])
    # The server refused the cancellation: no second run, and the first one's rows count.
    assert len(server.submitted) == 1 and len(server.set_states) == 1
    assert len(tally.finished_) == 1 and not tally.failed


def test_the_start_timeout_is_not_part_of_the_run_id() -> None:
    assert _config(start_timeout=5).run_id == _config().run_id
    with pytest.raises(ValueError, match="start_timeout"):
        _config(start_timeout=0)


def test_a_server_that_forgot_the_run_ends_it_from_storage(
    fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # s-0 is done at the 2nd poll, and s-3 submitted in its place; the server loses its
    # database at the 3rd. s-1 is still computing then (its lease is live) and writes
    # its rows later; s-2 and s-3 wait Scheduled: neither can run now.
    def script(shard: str, n: int) -> list[Any]:
        if shard == "s-0.tar":
            return [Running(), DONE]
        return [Running()] if shard == "s-1.tar" else [Scheduled()]

    server = fake(script)
    server.forget_at = 3
    asked: list[str] = []

    def current_lease(run: str, url: str, options: Any = None) -> Any:
        name = url.rsplit("/", 1)[-1]
        asked.append(name)
        if name != "s-1.tar":
            return None
        if asked.count(name) == 3:  # its process finishes the shard
            server.done.add(name)
        return types.SimpleNamespace(expired=lambda: False)

    monkeypatch.setattr(cluster, "current_lease", current_lease)
    tally = _run(_config(), ["s-0.tar", "s-1.tar", "s-2.tar", "s-3.tar"], limit=3, parent=True)
    assert tally.lost == "its flow run and its shard runs are gone"
    assert [r["name"] for r in tally.finished_] == ["s-0.tar", "s-1.tar"]
    assert tally.finished_[1]["skipped"] is False  # computed by its worker
    assert sorted(tally.not_run) == ["s3://bucket/data/s-2.tar", "s3://bucket/data/s-3.tar"]
    assert tally.failed == {}  # no error row: the next run computes them
    assert len(server.submitted) == 4


def test_a_server_that_forgot_the_run_is_seen_when_submitting(fake: Any) -> None:
    server = fake(lambda shard, n: [Running(), DONE])
    server.forgotten = True
    tally = _run(_config(), ["s-0.tar"], parent=True)
    assert tally.lost == "deployment 'explain-shard/gpu' is gone"
    assert tally.not_run == ["s3://bucket/data/s-0.tar"] and not tally.failed


def test_a_shard_run_deleted_from_the_server_uses_an_attempt(fake: Any) -> None:
    server = fake(lambda shard, n: [Running()] if n == 0 else [Running(), DONE])
    first = {"deleted": False}
    real_read = server.read_flow_runs

    def read_flow_runs(flow_run_filter: Any, limit: int) -> list[FlowRun]:
        if server.polls == 1 and not first["deleted"]:  # a person deletes the first run
            first["deleted"] = True
            server.runs.pop(next(iter(server.runs)))
        return real_read(flow_run_filter, limit)

    server.read_flow_runs = read_flow_runs  # type: ignore[method-assign]
    tally = _run(_config(), ["s-0.tar"], parent=True)
    assert tally.lost is None and len(server.submitted) == 2 and len(tally.finished_) == 1


def test_the_webhook_hears_of_a_parent_that_does_not_start() -> None:
    from datetime import timedelta

    from prefect.automations import Posture

    from opticam.config import DEFAULT_START_TIMEOUT
    from opticam_flows.deploy import NOTIFY_START_AUTOMATION, notify_start_automation

    block = uuid4()
    automation = notify_start_automation(block, 45)
    trigger = automation.trigger
    assert automation.name == NOTIFY_START_AUTOMATION
    assert trigger.posture == Posture.Proactive  # type: ignore[union-attr]
    # Picked up by a worker, or overdue without one, and then not Running in time.
    assert trigger.after == {"prefect.flow-run.Pending", "prefect.flow-run.Late"}  # type: ignore[union-attr]
    assert {"prefect.flow-run.Running", "prefect.flow-run.Cancelled"} <= trigger.expect  # type: ignore[union-attr]
    assert trigger.within == timedelta(seconds=45)  # type: ignore[union-attr]
    assert trigger.match_related.root == {  # type: ignore[union-attr]
        "prefect.resource.role": "flow",
        "prefect.resource.name": "explain-dataset",
    }
    (action,) = automation.actions
    assert action.block_document_id == block  # type: ignore[union-attr]
    assert "not started within 45 s" in action.payload  # type: ignore[union-attr]
    # The same bound as a shard run's start by default.
    default = notify_start_automation(block).trigger
    assert default.within == timedelta(seconds=DEFAULT_START_TIMEOUT)  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="start_timeout must be between 30 seconds"):
        notify_start_automation(block, 5)


def test_output_storage_that_failed_for_good_starts_no_further_shard(fake: Any) -> None:
    from opticam.errors import StorageFailedError

    line = str(StorageFailedError("s3://bucket/runs/x/errors/s-0.parquet", "no space left"))
    server = fake(
        lambda shard, n: (
            [Running(), Failed(message=f"Flow run failed: {line}")]
            if shard == "s-0.tar"
            else [Running(), Running(), DONE]
        )
    )
    tally = _run(_config(shard_attempts=3), ["s-0.tar", "s-1.tar", "s-2.tar", "s-3.tar"], limit=2)
    # s-0 is not submitted again, s-1 (in flight) ends, s-2 and s-3 never start.
    assert [name for _, name, *_ in server.submitted] == ["s-0.tar", "s-1.tar"]
    assert tally.storage_failed == line and list(tally.failed) == ["s3://bucket/data/s-0.tar"]
    assert [r["shard"] for r in tally.finished_] == ["s3://bucket/data/s-1.tar"]
