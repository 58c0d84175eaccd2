"""The run in object storage: where files live, what tables hold, how maps are stored.

- :mod:`opticam.store.layout`: the run folder and its names (:func:`run_url`,
  :func:`shard_name`, :func:`rows_url`, :func:`errors_url`), atomic writes.
- :mod:`opticam.store.tables`: the Parquet schemas (:data:`SCHEMA`,
  :data:`ERRORS_SCHEMA`), :class:`ShardStatus`, writing and reading rows and errors.
- :mod:`opticam.store.runs`: ``run.json``.
- :mod:`opticam.store.maps`: the map codec (:func:`encode_map`, :func:`decode_map`,
  :func:`load_maps`).
- :mod:`opticam.store.leases`: per-shard leases, so concurrent runs split the shards.
- :mod:`opticam.store.probe`: :func:`check_output`, proving the output can be written
  before any compute.

Every name is also importable from :mod:`opticam.store` itself.
"""

from opticam.names import MAP_FORMATS
from opticam.store.checks import DoneCheck, check_done_rows, readable_files, set_aside
from opticam.store.layout import (
    atomic_write_bytes,
    calibration_url,
    errors_url,
    prior_url,
    report_url,
    rows_url,
    run_url,
    shard_file,
    shard_name,
)
from opticam.store.maps import (
    MAP_COLUMNS,
    decode_map,
    encode_full_png,
    encode_lowres,
    encode_map,
    load_maps,
)
from opticam.store.probe import check_output
from opticam.store.runs import (
    RunCollisionError,
    check_run_json,
    package_versions,
    read_run_json,
    write_run_json,
)
from opticam.store.tables import (
    ERRORS_SCHEMA,
    RENAMED_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    STATUS_KEY,
    ShardStatus,
    is_done,
    list_done_rows,
    read_errors,
    read_rows,
    read_status,
    read_statuses,
    rows_file_bytes,
    rows_to_table,
    write_errors,
    write_rows,
)

__all__ = [
    "DoneCheck",
    "check_done_rows",
    "readable_files",
    "rows_file_bytes",
    "set_aside",
    "ERRORS_SCHEMA",
    "MAP_COLUMNS",
    "MAP_FORMATS",
    "RENAMED_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATUS_KEY",
    "RunCollisionError",
    "ShardStatus",
    "atomic_write_bytes",
    "calibration_url",
    "prior_url",
    "check_output",
    "check_run_json",
    "decode_map",
    "encode_full_png",
    "encode_lowres",
    "encode_map",
    "errors_url",
    "is_done",
    "list_done_rows",
    "load_maps",
    "package_versions",
    "read_errors",
    "read_rows",
    "read_run_json",
    "read_statuses",
    "read_status",
    "report_url",
    "rows_to_table",
    "rows_url",
    "run_url",
    "shard_file",
    "shard_name",
    "write_errors",
    "write_run_json",
    "write_rows",
]
