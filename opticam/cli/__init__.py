"""The ``opticam`` command (also ``python -m opticam``) and what only a command needs.

The plain library (``import opticam``) never imports this package. Here live the
parser and entry point (:mod:`opticam.cli.main`), one module per command
(:mod:`opticam.cli.commands`), the flags made from the config (:mod:`opticam.cli.flags`),
the lifeline that stops what a run started (:mod:`opticam.cli.lifeline`), the GPU worker
processes of ``opticam worker`` (:mod:`opticam.cli.workers`) and the progress display
(:mod:`opticam.cli.progress`).

Commands:

- ``opticam run``: explain a dataset with the Prefect flow ``explain-dataset`` (ephemeral
  Prefect without a server; the server at ``PREFECT_API_URL`` when one is configured).
  Without ``--data`` it runs the bundled demo end to end (:mod:`opticam.demo.cache`).
  ``--config job.yaml`` reads a job file; flags override it.
- ``opticam config --example``: a commented job file; ``opticam config [flags]``: the job
  the same flags would run, as YAML, with its run id.
- ``opticam report RUN_URL``: re-aggregate a finished or partial run.
- ``opticam explain IMAGE... --out DIR``: overlay PNGs for a few images (no Prefect).
- ``opticam pack SOURCE URL --per-shard N``: ImageFolder tree / CSV list -> shards.
- ``opticam demo-data URL``: write synthetic demo shards.

How flags are made from the config: :mod:`opticam.cli.flags`. Exit statuses:
:mod:`opticam.cli.main`.

Parsing loads neither torch nor Prefect: help, ``--version`` and refused input answer in a
fraction of a second (``benchmarks/cli_startup.py``).
"""

from opticam.cli.commands.run import EXIT_STORAGE_FAILED
from opticam.cli.flags import FLAGS, Flag, config_from_args, parse_storage_options
from opticam.cli.main import build_parser, main

__all__ = [
    "EXIT_STORAGE_FAILED",
    "FLAGS",
    "Flag",
    "build_parser",
    "config_from_args",
    "main",
    "parse_storage_options",
]
