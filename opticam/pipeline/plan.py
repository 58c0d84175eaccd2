"""Before any shard runs: the plan of shards, the model cache, and every check of the input.

:func:`preflight` is where bad input is found: a pattern that matches no shard, a device
this machine lacks, a model or method option that does not load, a run folder that holds
another job. Each becomes a :class:`opticam.errors.UserError` with one message, before any
work or orchestration starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from opticam import store
from opticam.config import MethodSpec, RunConfig
from opticam.errors import ConfigError, UserError
from opticam.pipeline.devices import resolve_device
from opticam.redact import redact_url

__all__ = [
    "check_methods",
    "clear_model_cache",
    "duplicates_note",
    "explainers",
    "get_loaded_model",
    "PendingShards",
    "ShardPlan",
    "pending_shards",
    "plan_shards",
    "preflight",
    "run_url_of",
]

logger = logging.getLogger("opticam.pipeline")

_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def get_loaded_model(config: RunConfig, device: str) -> Any:
    """The config's model on ``device``, loaded once per process (thread-safe).

    Returns:
        :class:`opticam.models.LoadedModel`.
    """
    from opticam.models import load_model

    key = (config.model.model_dump_json(), device)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_model(config.model, device, storage_options=config.data_options())
            _MODELS[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once nothing else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def explainers(
    config: RunConfig,
    loaded: Any,
    *,
    methods: Sequence[MethodSpec] | None = None,
    prior: Any = None,
) -> dict[str, Any]:
    """Method name -> explainer bound to ``loaded``, for every method of the config.

    Args:
        config: the job.
        loaded: the :class:`opticam.models.LoadedModel`.
        methods: these methods instead of the config's (the calibration's, say).
        prior: the :class:`~opticam.methods.prior.ClassPrior` of an Opti-CAM method that
            starts from one (see :mod:`opticam.pipeline.prior`).
    """
    from opticam.methods import get_explainer

    chosen = config.methods if methods is None else methods
    return {
        m.name: get_explainer(
            m.name, loaded, **m.options, **({"prior": prior} if m.name == "opticam" else {})
        )
        for m in chosen
    }


def check_methods(config: RunConfig, device: str | None = None) -> None:
    """Fail early on a bad model or method option, before any shard is read.

    Loads (and caches) the model on ``device`` and builds every explainer.

    Raises:
        ConfigError: unknown option or bad value, unknown target layer, bad model spec,
            a checkpoint that is missing or does not fit.
    """
    from opticam.pipeline import prior

    try:
        device = device or resolve_device(config.device)[0]
        loaded = get_loaded_model(config, device)
        if prior.prior_settings(config) is None:
            explainers(config, loaded)
        else:
            # The prior is built by the run; its calibration runs the paper's setting.
            explainers(config, loaded, methods=prior.calibration_methods(config))
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as err:
        # Raised while building from the user's spec: the spec is what was wrong.
        raise ConfigError(str(err)) from err


def run_url_of(config: RunConfig) -> str:
    """The run folder URL of a config: ``<output>/<run_id>``."""
    return store.run_url(config.output, config.run_id)


class ShardPlan(list[dict[str, Any]]):
    """The planned shards (one dict each, see :func:`plan_shards`), in order.

    Attributes:
        duplicates: entries of the data spec that named a shard already listed (the
            same object spelled another way: :func:`opticam.data.shard_identity`).
    """

    duplicates: int = 0


def duplicates_note(duplicates: int) -> str:
    """The plan line's note on data-spec entries that named a shard already listed."""
    if not duplicates:
        return ""
    entries = "entry" if duplicates == 1 else "entries"
    return f" ({duplicates} more {entries} named a shard already listed, planned once)"


def plan_shards(config: RunConfig) -> ShardPlan:
    """Expand the data spec and split ``max_images`` over the shards.

    With ``max_images = N`` over ``S`` shards, shard ``i`` (in expansion order) may read
    ``N // S + (1 if i < N % S else 0)`` images, so the run reads ``N`` images when every
    shard holds enough, spread over the dataset instead of the first shards only; shards
    with a zero share are left out of the plan.

    Each object is planned once, however many entries name it
    (:func:`opticam.data.expand_shard_list`); :attr:`ShardPlan.duplicates` counts the
    others.

    Returns:
        One dict per shard: ``url``, ``name`` (:func:`opticam.store.shard_name`),
        ``max_images`` (None without a limit).

    Raises:
        opticam.data.NoShardsError: the data spec matches no shard.
    """
    from opticam.data.urls import expand_shard_list

    listed = expand_shard_list(config.data, storage_options=config.data_options())
    urls = listed.urls
    plan = ShardPlan()
    plan.duplicates = listed.duplicates
    n, s = config.max_images, len(urls)
    for i, url in enumerate(urls):
        limit = None if n is None else n // s + (1 if i < n % s else 0)
        if limit == 0:
            continue
        plan.append({"url": url, "name": store.shard_name(url), "max_images": limit})
    return plan


class PendingShards(list[dict[str, Any]]):
    """The planned shards still to compute (dicts of :func:`plan_shards`), in order.

    Attributes:
        damaged: ``{shard name: (why its rows file could not count as done, the URL it
            was moved to)}`` for rows files that :func:`pending_shards` set aside.
    """

    damaged: dict[str, tuple[str, str]]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.damaged = {}


def pending_shards(config: RunConfig, plan: Sequence[dict[str, Any]]) -> PendingShards:
    """The planned shards without a sound rows file; damaged rows files are set aside.

    A rows file counts as done only when it passes :func:`opticam.store.check_done_rows`
    (its size as recorded, a footer that parses and names this shard, the row count its
    status says). A planned shard's damaged file is moved to ``<run>/damaged/``
    (:func:`opticam.store.set_aside`), logged, and the shard is computed again.

    Raises:
        OSError: a damaged file could not be moved aside (the output storage failing).
    """
    run = run_url_of(config)
    options = config.output_options()
    checked = store.check_done_rows(run, options)
    planned = {p["name"] for p in plan}
    pending = PendingShards()
    for name, why in sorted(checked.damaged.items()):
        if name in planned:
            moved = store.set_aside(run, name, options)
            logger.warning(
                "rows file of shard %s is damaged (%s): moved to %s; computing the shard again",
                name,
                why,
                redact_url(moved),
            )
            pending.damaged[name] = (why, moved)
    done = set(checked.done)
    pending.extend(p for p in plan if p["name"] not in done)
    return pending


def preflight(config: RunConfig) -> tuple[ShardPlan, list[str]]:
    """Every check that can fail on bad input, before any work or orchestration starts.

    Cheap checks first: expands the data spec (:func:`plan_shards`), resolves the devices,
    proves the output can be written (:func:`opticam.store.check_output`: one probe object
    written and deleted, the output folder created if missing), then loads the model and
    builds the explainers (:func:`check_methods`), checks that the run folder holds
    no other job, and that its class prior file, if the job has one already, can be read
    and fits the model. Cheap to repeat: the model stays cached.

    Returns:
        ``(plan, devices)``.

    Raises:
        opticam.errors.UserError: what was wrong, in one message (no shard matches,
            unknown device, an output that cannot be written, bad model or option, a run
            folder holding another job).
    """
    plan = plan_shards(config)
    devices = resolve_device(config.device)
    store.check_output(config.output, config.output_options())
    check_methods(config, devices[0])
    store.check_run_json(run_url_of(config), config, config.output_options())
    _check_prior_file(config, devices[0])
    return plan, devices


def _check_prior_file(config: RunConfig, device: str) -> None:
    """Refuse a run whose class prior file exists but cannot be read or does not fit.

    Raises:
        opticam.methods.prior.PriorError: one line naming the file and what is wrong.
    """
    from opticam.pipeline import prior

    if prior.prior_settings(config) is None:
        return
    loaded = get_loaded_model(config, device)
    prior.read_checked_prior(config, loaded, prior.layer_channels(loaded))
