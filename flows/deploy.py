"""``opticam deploy``: the work pools, deployments and automation a cluster needs.

:func:`deploy` is idempotent; running it again updates what it created:

- the shard pool (``--pool``; type ``process`` by default, or any type with a base job
  template from ``deployments/templates/``) and a control pool for the parent flows
  (``<pool>-control``, type ``process``): a parent waits for its shards for hours, and on
  the shard pool it would hold a GPU worker's only slot;
- the deployments ``explain-shard/<pool>`` (on the shard pool) and
  ``explain-dataset/<pool>`` (on the control pool), whose entrypoints are module paths,
  so they run wherever the project is installed;
- the automation :data:`CRASH_AUTOMATION`: a run of either flow that sent a heartbeat and
  then neither another one nor a final state within ``crash_after`` seconds is marked
  Crashed. A self-hosted server has no such rule, and without it a run whose machine died
  stays Running for ever; with it the parent sees the crash and submits the shard again.
  Flow-run processes send heartbeats when ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set,
  which ``opticam worker`` does (30 s);
- with ``notify`` (``opticam deploy --notify URL``): a Webhook block
  :data:`NOTIFY_BLOCK` holding the URL (a secret: chat webhook URLs carry tokens) and the
  automation :data:`NOTIFY_AUTOMATION`, which POSTs a JSON message (:data:`NOTIFY_PAYLOAD`)
  to it when a run of ``explain-dataset`` ends Completed, Failed or Crashed. Its ``text``
  field is what Slack and Mattermost incoming webhooks show. A second automation,
  :data:`NOTIFY_START_AUTOMATION`, posts :data:`NOTIFY_START_PAYLOAD` to the same block
  when a run of ``explain-dataset`` that a worker picked up (Pending), or that is past its
  start time and still waits for one (Late), has not turned Running within
  ``start_timeout`` seconds (the bound shard runs get,
  :data:`opticam.config.DEFAULT_START_TIMEOUT`): a parent that never starts ends in no
  state, so the first automation would never hear of it.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from uuid import UUID

from prefect.automations import (
    Automation,
    CallWebhook,
    ChangeFlowRunState,
    EventTrigger,
    Posture,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr

from opticam.config import DEFAULT_START_TIMEOUT
from opticam.errors import ConfigError, short_repr

from .cluster import dataset_deployment, shard_deployment
from .explain import explain_dataset, explain_shard

__all__ = [
    "CRASH_AUTOMATION",
    "DEFAULT_CRASH_AFTER",
    "NOTIFY_AUTOMATION",
    "NOTIFY_BLOCK",
    "NOTIFY_PAYLOAD",
    "NOTIFY_START_AUTOMATION",
    "NOTIFY_START_PAYLOAD",
    "check_notify_url",
    "crash_automation",
    "deploy",
    "notify_automation",
    "notify_start_automation",
]

#: Name of the crash-detection automation.
CRASH_AUTOMATION = "opticam: runs without heartbeats are Crashed"
#: Seconds without a heartbeat before a run is marked Crashed (three heartbeats of 30 s).
DEFAULT_CRASH_AFTER = 90.0
# Flows whose runs the automation watches.
_WATCHED_FLOWS = ["explain-dataset", "explain-shard"]

#: Name of the automation that posts to a webhook when a job ends.
NOTIFY_AUTOMATION = "opticam: post to a webhook when explain-dataset ends"
#: Name of the Webhook block that holds the notification URL.
NOTIFY_BLOCK = "opticam-notify"
# The states that end a job: the parent ends Failed when a shard failed.
_NOTIFY_STATES = ["Completed", "Failed", "Crashed"]
#: The body posted (a Jinja template the server renders): ``text`` for chat tools, then
#: the run's name (``explain-<run id>``), id, final state, its message and a UI link.
NOTIFY_PAYLOAD = (
    "{"
    '"text": {{ ("opticam: " ~ flow_run.name ~ " " ~ flow_run.state.name'
    ' ~ (": " ~ flow_run.state.message if flow_run.state.message else "")) | tojson }}, '
    '"flow_run": {{ flow_run.name | tojson }}, '
    '"flow_run_id": "{{ flow_run.id }}", '
    '"state": {{ flow_run.state.name | tojson }}, '
    '"message": {{ (flow_run.state.message or "") | tojson }}, '
    '"url": {{ ((flow_run | ui_url) or "") | tojson }}'
    "}"
)


#: Name of the automation that posts to the webhook when a job does not start.
NOTIFY_START_AUTOMATION = "opticam: post to a webhook when explain-dataset does not start"
# What starts the wait for Running: a worker picked the run up, or it is overdue.
_START_WAITS = ["Pending", "Late"]
# What ends it: the run started, or ended without starting (cancelled, say).
_STARTED = ["Running", "Completed", "Failed", "Cancelled", "Crashed"]
#: The body posted when a parent run does not start (same fields as NOTIFY_PAYLOAD).
NOTIFY_START_PAYLOAD = (
    "{"
    '"text": {{ ("opticam: " ~ flow_run.name ~ " has not started within __BOUND__ s (still "'
    ' ~ flow_run.state.name ~ "): no worker runs it; start one on its pool or cancel it")'
    " | tojson }}, "
    '"flow_run": {{ flow_run.name | tojson }}, '
    '"flow_run_id": "{{ flow_run.id }}", '
    '"state": {{ flow_run.state.name | tojson }}, '
    '"message": "not started within __BOUND__ s", '
    '"url": {{ ((flow_run | ui_url) or "") | tojson }}'
    "}"
)


def crash_automation(crash_after: float = DEFAULT_CRASH_AFTER) -> Automation:
    """The automation that marks silent runs of opticam's flows Crashed (not yet saved)."""
    if crash_after < 30:
        raise ConfigError(
            f"crash_after must be at least 30 seconds (the shortest heartbeat period), "
            f"got {crash_after}"
        )
    final = ["Completed", "Failed", "Cancelled", "Crashed"]
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": _WATCHED_FLOWS},
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in final)},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=crash_after),
    )
    return Automation(
        name=CRASH_AUTOMATION,
        description="Marks runs of explain-shard and explain-dataset Crashed when they stop "
        "sending heartbeats (their worker or machine is gone), so the parent resubmits them.",
        trigger=trigger,
        actions=[
            ChangeFlowRunState(
                name=None,
                force=False,  # a run that ended meanwhile keeps its final state
                state=StateType.CRASHED,
                message=f"no heartbeat for {crash_after:.0f} s: its worker or machine is gone",
            )
        ],
    )


def check_notify_url(url: str) -> str:
    """The webhook URL, checked: ``http://`` or ``https://`` with a host.

    Raises:
        ConfigError: anything else (the message never repeats the URL, which may hold a
            token; it names the scheme and host it found).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--notify needs an http:// or https:// URL with a host, got scheme "
            f"{short_repr(parts.scheme)} and host {short_repr(parts.hostname)}"
        )
    return url


def notify_automation(block_document_id: UUID) -> Automation:
    """The automation that posts :data:`NOTIFY_PAYLOAD` to a Webhook block (not yet saved)."""
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": "explain-dataset"},
        expect={f"prefect.flow-run.{s}" for s in _NOTIFY_STATES},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
    )
    return Automation(
        name=NOTIFY_AUTOMATION,
        description="Posts to the opticam-notify webhook when a run of explain-dataset ends "
        f"({', '.join(_NOTIFY_STATES)}).",
        trigger=trigger,
        actions=[CallWebhook(block_document_id=block_document_id, payload=NOTIFY_PAYLOAD)],
    )


def notify_start_automation(
    block_document_id: UUID, start_timeout: float = DEFAULT_START_TIMEOUT
) -> Automation:
    """The automation that warns when a run of ``explain-dataset`` does not start.

    It posts :data:`NOTIFY_START_PAYLOAD` to a Webhook block when such a run stays
    Pending or Late for ``start_timeout`` seconds. The automation is not saved here.
    """
    if not 30 <= start_timeout <= 86_400:
        raise ConfigError(
            f"start_timeout must be between 30 seconds and a day, got {short_repr(start_timeout)}"
        )
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": "explain-dataset"},
        after={f"prefect.flow-run.{s}" for s in _START_WAITS},
        expect={f"prefect.flow-run.{s}" for s in _STARTED},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=start_timeout),
    )
    bound = f"{start_timeout:.0f}"
    return Automation(
        name=NOTIFY_START_AUTOMATION,
        description="Posts to the opticam-notify webhook when a run of explain-dataset "
        f"stays Pending or Late for {bound} s without running.",
        trigger=trigger,
        actions=[
            CallWebhook(
                block_document_id=block_document_id,
                payload=NOTIFY_START_PAYLOAD.replace("__BOUND__", bound),
            )
        ],
    )


def _ensure_notify(url: str, start_timeout: float = DEFAULT_START_TIMEOUT) -> list[str]:
    """Save the URL in the Webhook block and create or update both automations."""
    from prefect.blocks.webhook import Webhook
    from prefect.types import SecretDict

    headers = SecretDict({"Content-Type": "application/json"})
    block = Webhook(method="POST", url=SecretStr(url), headers=headers)
    block_id = cast(UUID, block.save(NOTIFY_BLOCK, overwrite=True))
    where = urlsplit(url).hostname
    done = [f"saved webhook block {short_repr(NOTIFY_BLOCK)} (host {where})"]
    done.append(_save_automation(notify_automation(block_id)))
    started = notify_start_automation(block_id, start_timeout)
    return [*done, f"{_save_automation(started)} ({start_timeout:.0f} s)"]


def _save_automation(wanted: Automation) -> str:
    """Create the automation, or update the one of the same name (one copy kept)."""
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(wanted.name)
        if existing:
            client.update_automation(existing[0].id, wanted)
            for extra in existing[1:]:
                client.delete_automation(extra.id)
            return f"updated automation {short_repr(wanted.name)}"
    wanted.create()
    return f"created automation {short_repr(wanted.name)}"


def _template(pool_type: str, path: str | None) -> dict[str, Any]:
    if path is not None:
        try:
            template = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"base job template {short_repr(path)} is not a readable JSON file: {err}"
            ) from None
        if not isinstance(template, dict) or not {"job_configuration", "variables"} <= set(
            template
        ):
            raise ConfigError(
                f"base job template {short_repr(path)} needs 'job_configuration' and 'variables'"
            )
        return template
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    raise ConfigError(
        f"a {short_repr(pool_type)} pool needs --base-job-template (see deployments/templates/)"
    )


def _ensure_pool(
    client: Any, name: str, pool_type: str, limit: int | None, template_path: str | None
) -> str:
    """Create the pool if missing, else set its limit; says what it did."""
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=pool_type,
                base_job_template=_template(pool_type, template_path),
                concurrency_limit=limit,
            )
        )
        return f"created work pool {short_repr(name)} ({pool_type}" + (
            f", at most {limit} runs at once)" if limit else ")"
        )
    if pool.type != pool_type:
        raise ConfigError(
            f"work pool {short_repr(name)} exists with type {short_repr(pool.type)}, not {short_repr(pool_type)}; "
            "choose another pool name or the same type"
        )
    update: dict[str, Any] = {}
    if limit is not None and pool.concurrency_limit != limit:
        update["concurrency_limit"] = limit
    if template_path is not None:
        update["base_job_template"] = _template(pool_type, template_path)
    if update:
        client.update_work_pool(name, WorkPoolUpdate(**update))
        return f"updated work pool {short_repr(name)} ({', '.join(sorted(update))})"
    return f"work pool {short_repr(name)} exists ({pool.type})"


def _apply(flow: Any, name: str, work_pool: str, description: str) -> None:
    """Create or update the deployment ``<flow name>/<name>`` on ``work_pool``."""
    deployment = cast(
        RunnerDeployment,
        flow.to_deployment(
            name=name,
            work_pool_name=work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
            tags=["opticam"],
            description=description,
        ),
    )
    # The spelling of deployments/prefect.yaml (module:function), so that either tool
    # updates what the other created.
    deployment.entrypoint = f"{flow.fn.__module__}:{flow.fn.__name__}"
    deployment.apply()


def deploy(
    pool: str,
    *,
    pool_type: str = "process",
    limit: int | None = None,
    base_job_template: str | None = None,
    control_pool: str | None = None,
    crash_after: float = DEFAULT_CRASH_AFTER,
    notify: str | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> list[str]:
    """Create or update the pools, both deployments and the automations.

    Args:
        pool: the work pool that runs shards (GPU workers).
        pool_type: its type when created (``process``, ``docker``, ``kubernetes``...).
        limit: the pool's concurrency limit (runs at once over all its workers).
        base_job_template: a JSON base job template file for the pool.
        control_pool: the process pool for parent runs; default ``<pool>-control``.
        crash_after: seconds without a heartbeat before a run is marked Crashed.
        notify: a webhook URL to post to when a run of explain-dataset ends or does not
            start; None leaves the notifications as they are (absent, or as set before).
        start_timeout: seconds a run of explain-dataset may stay Pending or Late before
            the webhook hears that it does not start (with ``notify``).

    Returns:
        One line per thing done, for the user.
    """
    control = control_pool or f"{pool}-control"
    if control == pool:
        raise ConfigError(
            f"the control pool must differ from the shard pool {short_repr(pool)}: a parent run "
            "would hold a shard worker's slot while it waits for its shards"
        )
    # Bad values fail before anything changes on the server.
    crash = crash_automation(crash_after)
    if notify is not None:
        check_notify_url(notify)
        notify_start_automation(UUID(int=0), start_timeout)  # a bad bound fails here
    done: list[str] = []
    with get_client(sync_client=True) as client:
        done.append(_ensure_pool(client, pool, pool_type, limit, base_job_template))
        done.append(_ensure_pool(client, control, "process", None, None))
    _apply(explain_shard, pool, pool, "One shard of an opticam run (submitted by explain-dataset).")
    done.append(f"deployed {shard_deployment(pool)} on {short_repr(pool)}")
    _apply(
        explain_dataset,
        pool,
        control,
        f"A whole opticam run; set executor 'deployments' and pool {short_repr(pool)} to spread its "
        "shards over the shard pool.",
    )
    done.append(f"deployed {dataset_deployment(pool)} on {short_repr(control)}")
    done.append(f"{_save_automation(crash)} ({crash_after:.0f} s)")
    if notify is not None:
        done += _ensure_notify(notify, start_timeout)
    return done
