"""The unit of work and what comes before it: plan, check, then one shard at a time.

Plain Python (no Prefect): the flows call it once per shard, and so can a notebook, a
test or another orchestrator.

- :mod:`~opticam.pipeline.devices`: ``RunConfig.device`` -> this machine's devices.
- :mod:`~opticam.pipeline.plan`: shard plan, model cache, :func:`preflight` (every check
  of the input, before any work).
- :mod:`~opticam.pipeline.targets`: per batch, the explained images and their classes.
- :mod:`~opticam.pipeline.scoring`: per batch and method, maps -> metrics -> rows.
- :mod:`~opticam.pipeline.autobatch`: the batch size (``"auto"``: measured on a GPU) and
  the out-of-memory backoff (a batch that does not fit is split in halves).
- :mod:`~opticam.pipeline.shard`: :func:`process_shard`, which runs the two steps above
  over a shard and writes its files, and :func:`calibrate_shard`.
- :mod:`~opticam.pipeline.prior`: the class prior of a job (``start: prior``): the
  calibration walk, the prior file, what each shard takes from them.
"""

from opticam.pipeline.autobatch import (
    CPU_BATCH_SIZE,
    BatchOutOfMemoryError,
    clear_batch_sizes,
)
from opticam.pipeline.devices import local_devices, resolve_device
from opticam.pipeline.plan import (
    check_methods,
    clear_model_cache,
    explainers,
    get_loaded_model,
    pending_shards,
    plan_shards,
    preflight,
    run_url_of,
)
from opticam.pipeline.scoring import method_rows
from opticam.pipeline.shard import (
    READ_ATTEMPTS,
    READ_RETRY_DELAYS,
    ShardNotATarError,
    ShardUnavailableError,
    calibrate_shard,
    done_status,
    process_shard,
    write_outputs,
)
from opticam.pipeline.targets import BatchTargets, choose_targets, label_problem
from opticam.store import ShardStatus

__all__ = [
    "CPU_BATCH_SIZE",
    "READ_ATTEMPTS",
    "READ_RETRY_DELAYS",
    "BatchOutOfMemoryError",
    "BatchTargets",
    "ShardNotATarError",
    "ShardStatus",
    "ShardUnavailableError",
    "calibrate_shard",
    "check_methods",
    "choose_targets",
    "clear_batch_sizes",
    "clear_model_cache",
    "done_status",
    "explainers",
    "get_loaded_model",
    "label_problem",
    "local_devices",
    "method_rows",
    "pending_shards",
    "plan_shards",
    "preflight",
    "process_shard",
    "resolve_device",
    "run_url_of",
    "write_outputs",
]
