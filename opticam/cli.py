"""The ``opticam`` command (also ``python -m opticam``): argument parsing and nothing else.

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

The flags of ``run`` (and the model and Opti-CAM flags of ``explain``) are made from the
fields of :class:`~opticam.config.RunConfig`, :class:`~opticam.config.ModelSpec`,
:class:`~opticam.config.MetricsOptions`, :class:`~opticam.config.OptiCAMOptions` and
:class:`~opticam.config.CAMOptions`: name, type, choices, default and help come from the
field, so the command line and the config cannot drift apart. A field's flag is its name
(``batch_size`` -> ``--batch-size``, booleans get ``--no-...``); where two groups share a
field name, the later group's flag carries its prefix (``--cam-batch-size``).

Exit status: 0 when every shard was read in full; 1 when a shard failed (a rerun retries
it) or is truncated in storage (its rows hold what could be read); 2 for bad input (unknown
method, no shard matching the pattern, a bad option, an output that cannot be written), in
one line on stderr; 3 when the output storage failed for good in the middle of a run (no
space, a quota, permission denied, a read-only file system, a missing bucket: one line, the
run's summary, and nothing already written lost); 130 / 143 when interrupted by SIGINT /
SIGTERM. Anything else is a bug and keeps its traceback.

Parsing loads neither torch nor Prefect: help, ``--version`` and refused input answer in a
fraction of a second (``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from opticam.config import (
    DEFAULT_START_TIMEOUT,
    CAMOptions,
    MetricsOptions,
    ModelSpec,
    OptiCAMOptions,
    RunConfig,
    method_options_model,
)
from opticam.demo.cache import DEMO_METHODS, DEMO_STEPS
from opticam.errors import MAX_MESSAGE_CHARS, CLIError, UserError, short_repr, shorten

__all__ = [
    "EXIT_STORAGE_FAILED",
    "CLIError",
    "Flag",
    "build_parser",
    "config_from_args",
    "main",
    "parse_storage_options",
]

#: Exit status of ``opticam run`` when the output storage failed for good mid-run (no
#: space, a quota, permission denied, a read-only file system, a missing bucket).
EXIT_STORAGE_FAILED = 3


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# --------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class Flag:
    """One command-line flag made from one config field.

    Attributes:
        group: ``run`` (RunConfig), ``model``, ``metrics``, ``opticam`` (Opti-CAM's
            options) or ``cam`` (the options of the pytorch-grad-cam baselines).
        field: the field's name in its model.
        option: the flag, e.g. ``--batch-size``.
        dest: the argparse destination (unique over all groups).
    """

    group: str
    field: str
    option: str
    dest: str


# Groups in order: a later group's field whose flag is taken gets the group's prefix.
_GROUPS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("run", RunConfig),
    ("model", ModelSpec),
    ("metrics", MetricsOptions),
    ("opticam", OptiCAMOptions),
    ("cam", CAMOptions),
)
# Fields whose flag is not their name: the model's source is what people call "the model".
_RENAMED = {("model", "source"): "--model"}
# Flags of earlier versions still accepted.
_ALIASES = {("run", "map_format"): ("--maps",)}
# Fields that are groups themselves, or secret (storage options have their own flags).
_NOT_FLAGS = {("run", "model"), ("run", "metrics")}


def _flags() -> list[Flag]:
    flags: list[Flag] = []
    taken = {"--config", "--verbose", "--storage-option", "--s3-endpoint", "--help"}
    for group, model in _GROUPS:
        for name, field in model.model_fields.items():
            if (group, name) in _NOT_FLAGS or field.exclude:
                continue
            option = _RENAMED.get((group, name), "--" + name.replace("_", "-"))
            if option in taken:
                option = f"--{group}-{name.replace('_', '-')}"
            taken.add(option)
            flags.append(Flag(group, name, option, f"{group}__{name}"))
    return flags


#: Every flag made from a config field, in help order.
FLAGS: tuple[Flag, ...] = tuple(_flags())


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _choices(field: FieldInfo, annotation: Any) -> list[Any] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    extra = field.json_schema_extra
    enum = extra.get("enum") if isinstance(extra, dict) else None
    # An optional field's enum lists None too; a flag's value is never None.
    return [v for v in enum if v is not None] if isinstance(enum, list) else None


# What a default means where the field's own default does not say it.
_DEFAULT_TEXT = {("run", "data"): "the bundled demo"}


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list) and default and isinstance(default[0], BaseModel):
        default = ",".join(getattr(d, "name", str(d)) for d in default)
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return str(default)


def _add_flag(parser: argparse._ActionsContainer, flag: Flag, model: type[BaseModel]) -> None:
    field = model.model_fields[flag.field]
    annotation = _unwrap_optional(field.annotation)
    options = [flag.option, *_ALIASES.get((flag.group, flag.field), ())]
    default = _DEFAULT_TEXT.get((flag.group, flag.field)) or _default_text(field)
    described = default == "none" and "default" in (field.description or "")
    kwargs: dict[str, Any] = {
        "dest": flag.dest,
        "default": argparse.SUPPRESS,
        # A description that says its default itself is not repeated.
        "help": field.description if described else f"{field.description} (default: {default})",
        "metavar": flag.field.upper(),
    }
    if annotation is bool:
        parser.add_argument(*options, action=argparse.BooleanOptionalAction, **kwargs)
        return
    choices = _choices(field, annotation)
    if choices is not None:
        kwargs.update(choices=choices, metavar="{" + ",".join(map(str, choices)) + "}")
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        kwargs.update(nargs=len(typing.get_args(annotation)), type=item, metavar=("R", "G", "B"))
    elif flag.field == "data":
        kwargs.update(nargs="+", metavar="URL")
    elif annotation in (int, float):
        kwargs["type"] = annotation
    parser.add_argument(*options, **kwargs)


def _add_config_flags(parser: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    titles = {
        "run": "the job (RunConfig)",
        "model": "the model (ModelSpec)",
        "metrics": "metrics (MetricsOptions)",
        "opticam": "Opti-CAM options (for method opticam)",
        "cam": "baseline options (for the pytorch-grad-cam methods)",
    }
    models = dict(_GROUPS)
    for group in groups:
        section = parser.add_argument_group(titles[group])
        for flag in FLAGS:
            if flag.group == group:
                _add_flag(section, flag, models[group])


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for data and output (repeatable; dotted keys nest, values "
        "parsed as JSON when possible), e.g. anon=true, client_kwargs.region_name=eu-west-1",
    )
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (MinIO, ...)")


def _json_or_text(text: str) -> Any:
    """``KEY=VALUE`` values: JSON when it parses (numbers, booleans, null, objects)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_options(pairs: Sequence[str], s3_endpoint: str | None = None) -> dict[str, Any]:
    """``["key=value", "client_kwargs.region_name=eu-west-1"]`` -> nested fsspec options.

    Dotted keys nest (``a.b=c`` -> ``{"a": {"b": "c"}}``); values are JSON when they parse
    (``anon=true`` -> ``True``), strings otherwise. ``s3_endpoint`` sets
    ``client_kwargs.endpoint_url``.

    Raises:
        CLIError: a pair without ``=`` or with an empty key.
    """
    options: dict[str, Any] = {}
    items = list(pairs)
    if s3_endpoint:
        items.append(f"client_kwargs.endpoint_url={s3_endpoint}")
    for pair in items:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"storage option {short_repr(pair)} is not KEY=VALUE")
        node = options
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CLIError(f"storage option {short_repr(key)} conflicts with an earlier value")
            node = child
        node[parts[-1]] = raw if parts[-1] == "endpoint_url" else _json_or_text(raw)
    return options


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    return parse_storage_options(args.storage_option or [], args.s3_endpoint)


# --------------------------------------------------------------------------- args -> config


def _group_values(args: argparse.Namespace, group: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.group == group and hasattr(args, flag.dest):
            value = getattr(args, flag.dest)
            out[flag.field] = list(value) if isinstance(value, tuple) else value
    return out


def _method_entries(value: Any) -> list[dict[str, Any]]:
    """Methods as written in a job file or on the command line -> ``{name, options}`` dicts."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    entries = []
    for item in value or []:
        if isinstance(item, str):
            entries.append({"name": item.strip().lower(), "options": {}})
        elif isinstance(item, dict):
            entries.append(
                {
                    "name": str(item.get("name", "")).strip().lower(),
                    "options": dict(item.get("options") or {}),
                }
            )
        else:
            raise CLIError(f"a method must be a name or {{name, options}}, got {short_repr(item)}")
    return entries


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The job described by ``--config`` (if any) with the given flags over it.

    Without ``data`` in either, the bundled demo: its data (generated once), its methods
    and its insertion/deletion steps, unless flags or the file say otherwise.

    Raises:
        UserError: an unreadable job file, Opti-CAM flags without the opticam method.
        pydantic.ValidationError: a value the config refuses.
    """
    from opticam.jobfile import read_job_file

    fields: dict[str, Any] = read_job_file(args.config) if args.config else {}
    run_flags = _group_values(args, "run")
    fields.update({k: v for k, v in run_flags.items() if k != "methods"})
    if isinstance(fields.get("data"), list) and len(fields["data"]) == 1:
        fields["data"] = fields["data"][0]
    demo = "data" not in fields
    if demo:
        from opticam.demo.cache import ensure_demo_data

        fields["data"] = ensure_demo_data()

    for group in ("model", "metrics"):
        given = _group_values(args, group)
        if given:
            base = fields.get(group) or {}
            if not isinstance(base, dict):
                raise CLIError(
                    f"{short_repr(group)} in the job file must be a mapping, got {short_repr(base)}"
                )
            fields[group] = {**base, **given}
    if demo:
        fields.setdefault("metrics", {}).setdefault("steps", DEMO_STEPS)

    if "methods" in run_flags:
        # Methods named again keep the options the job file gave them.
        previous = {m["name"]: m for m in _method_entries(fields.get("methods"))}
        methods = [previous.get(m["name"], m) for m in _method_entries(run_flags["methods"])]
    elif "methods" in fields:
        methods = _method_entries(fields["methods"])
    else:
        default = (
            DEMO_METHODS
            if demo
            else RunConfig.model_fields["methods"].get_default(call_default_factory=True)
        )
        methods = _method_entries(
            default if isinstance(default, str) else [m.name for m in default]
        )
    _apply_method_flags(args, methods)
    fields["methods"] = methods
    fields["storage_options"] = _storage(args)
    return RunConfig(**fields)


def _apply_method_flags(args: argparse.Namespace, methods: list[dict[str, Any]]) -> None:
    """Put the Opti-CAM and baseline flags into the options of the methods they apply to."""
    from opticam.names import METHODS

    for group, applies in (
        ("opticam", lambda name: name == "opticam"),
        ("cam", lambda name: name != "opticam" and method_options_model(name) is CAMOptions),
    ):
        given = _group_values(args, group)
        if not given:
            continue
        targets = [m for m in methods if m["name"] in METHODS and applies(m["name"])]
        if not targets:
            flags = ", ".join(f.option for f in FLAGS if f.group == group and f.field in given)
            names = ", ".join(m["name"] for m in methods)
            raise CLIError(f"{flags} set options of a method that is not run (methods: {names})")
        for method in targets:
            method["options"] = {**method["options"], **given}


# --------------------------------------------------------------------------- commands


def _quiet_prefect(verbose: bool) -> None:
    # Must happen before prefect is imported: its settings are read at import. Records at
    # INFO are always made, so that the flow and shard runs' logs reach the Prefect API
    # (the UI's Logs tab); without --verbose only the console handler drops them.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    server_level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", server_level)
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", server_level)
    # The ephemeral server's telemetry logs an ERROR on every run without a network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        import warnings

        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        warnings.filterwarnings("ignore", module="prefect")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def cmd_run(args: argparse.Namespace) -> int:
    """``opticam run``: plan, explain, score and report a dataset (see module doc)."""
    start = time.monotonic()
    config = config_from_args(args)
    from opticam.pipeline import preflight

    # Bad input fails here, in one line, before Prefect starts (and logs tracebacks).
    preflight(config)
    _quiet_prefect(args.verbose)
    if config.executor == "deployments":
        from opticam_flows.cluster import check_deployment

        check_deployment(config)
        if config.storage_options:
            sys.stderr.write(
                "note: --storage-option/--s3-endpoint apply to this command only; shard runs "
                "read storage with their worker's environment (AWS_* variables, a role)\n"
            )
    from opticam.lifeline import supervised
    from opticam.progress import RunProgress
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
            out.write(f"report: {_local_path(result['report_url'])}\n")
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


def cmd_config(args: argparse.Namespace) -> int:
    """``opticam config``: the example job file, or the job that the flags describe."""
    if args.example:
        from opticam.jobfile import example_yaml

        sys.stdout.write(example_yaml())
        return 0
    import yaml

    config = config_from_args(args)
    sys.stdout.write(f"# run id: {config.run_id}\n")
    sys.stdout.write(yaml.safe_dump(config.public_dict(), sort_keys=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``opticam report RUN_URL``: rebuild the report of a run."""
    from opticam import store
    from opticam.report import build_report, format_table

    run = args.run_url.rstrip("/")
    options = _storage(args) or None
    if store.read_run_json(run, options) is None and not store.list_done_rows(run, options):
        raise CLIError(f"no opticam run at {short_repr(run)} (no run.json, no rows files)")
    report = build_report(run, storage_options=options)
    sys.stdout.write(format_table(report.summary) + "\n")
    sys.stdout.write(f"report: {_local_path(report.index_url)}\n")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``opticam explain IMAGE...``: overlay PNGs of saliency maps for a few images
    (:func:`opticam.overlays.write_overlays`)."""
    from opticam.overlays import write_overlays

    written = write_overlays(
        args.images,
        args.out,
        model=ModelSpec(**_group_values(args, "model")),
        methods=args.method.split(","),
        opticam_options=_group_values(args, "opticam"),
        target_class=args.target_class,
        device=args.device,
        storage_options=_storage(args),
    )
    for item in written:
        sys.stdout.write(f"{item.path}  class {item.target}  p={item.probability:.3f}\n")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """``opticam pack SOURCE URL --per-shard N``: ImageFolder / CSV -> shards."""
    from opticam.data import pack

    try:
        urls = pack(
            args.source,
            args.url,
            args.per_shard,
            storage_options=_storage(args) or None,
            shuffle_seed=args.shuffle_seed,
        )
    except (ValueError, FileNotFoundError) as err:
        # pack checks the source tree or CSV and says what in it is wrong.
        raise CLIError(str(err)) from err
    for url in urls:
        sys.stdout.write(url + "\n")
    sys.stderr.write(f"{len(urls)} shards written\n")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """``opticam demo-data URL``: write synthetic demo shards."""
    from opticam.demo import make_shards

    urls = make_shards(
        args.url, args.shards, args.per_shard, args.seed, storage_options=_storage(args) or None
    )
    for url in urls:
        sys.stdout.write(url + "\n")
    return 0


# --------------------------------------------------------------------------- parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {short_repr(text)}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {short_repr(text)}")
    return value


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="job file (YAML or JSON, the fields of RunConfig; see 'opticam config "
        "--example'); flags override it",
    )
    _add_config_flags(p, ("run", "model", "metrics", "opticam", "cam"))
    _add_storage(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``opticam`` argument parser."""
    from opticam import __version__
    from opticam.demo.cache import DEMO_PER_SHARD, DEMO_SEED, DEMO_SHARDS

    parser = _Parser(prog="opticam", description="Dataset-scale Opti-CAM saliency maps.")
    parser.add_argument("--version", action="version", version=f"opticam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="explain a dataset (no --data: the bundled demo)",
        description="Explain, score and report a dataset with the explain-dataset flow. "
        f"Without --data, runs the bundled demo end to end (methods {DEMO_METHODS}, "
        f"{DEMO_STEPS} insertion/deletion steps).",
    )
    _add_job_arguments(run)
    run.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser(
        "config",
        help="print an example job file, or the job that flags describe",
        description="With --example, a commented job file with every field. Otherwise the "
        "job that the same flags would give 'opticam run', as YAML, with its run id.",
    )
    config.add_argument("--example", action="store_true", help="print a commented job file")
    _add_job_arguments(config)
    config.set_defaults(func=cmd_config)

    report = sub.add_parser("report", help="re-aggregate a run and rebuild its report")
    report.add_argument("run_url", metavar="RUN_URL", help="<output>/<run_id>")
    _add_storage(report)
    report.set_defaults(func=cmd_report)

    explain = sub.add_parser("explain", help="overlay PNGs for a few images (no Prefect)")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument("--method", default="opticam", help="method(s), comma-separated")
    explain.add_argument("--target-class", type=int, help="class to explain (default: predicted)")
    explain.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    explain.add_argument("--out", required=True, help="output folder")
    _add_config_flags(explain, ("model", "opticam"))
    _add_storage(explain)
    explain.set_defaults(func=cmd_explain)

    pack = sub.add_parser("pack", help="pack an ImageFolder tree or CSV list into shards")
    pack.add_argument("source", metavar="SOURCE")
    pack.add_argument("url", metavar="URL", help="folder or pattern with %%d")
    pack.add_argument("--per-shard", type=_positive, required=True)
    pack.add_argument("--shuffle-seed", type=int)
    _add_storage(pack)
    pack.set_defaults(func=cmd_pack)

    demo = sub.add_parser("demo-data", help="write synthetic demo shards")
    demo.add_argument("url", metavar="URL", help="folder URL")
    demo.add_argument("--shards", type=_positive, default=DEMO_SHARDS)
    demo.add_argument("--per-shard", type=_positive, default=DEMO_PER_SHARD)
    demo.add_argument("--seed", type=int, default=DEMO_SEED)
    _add_storage(demo)
    demo.set_defaults(func=cmd_demo_data)

    deploy = sub.add_parser(
        "deploy",
        help="create the work pools, deployments and automations of a cluster",
        description="Create (or update) the shard work pool, a control pool for parent runs, "
        "the deployments explain-shard/POOL and explain-dataset/POOL and the automation that "
        "marks runs without heartbeats Crashed (and, with --notify, the one that posts to a "
        "webhook when a job ends), on the server at PREFECT_API_URL.",
    )
    deploy.add_argument("--pool", required=True, type=_pool_name, help="shard work pool")
    deploy.add_argument(
        "--type", default="process", dest="pool_type", help="pool type when created (process)"
    )
    deploy.add_argument(
        "--limit", type=_positive, help="the pool's concurrency limit (runs at once)"
    )
    deploy.add_argument(
        "--base-job-template",
        metavar="FILE",
        help="JSON base job template (deployments/templates/)",
    )
    deploy.add_argument(
        "--control-pool",
        type=_pool_name,
        help="process pool for parent runs (default: POOL-control)",
    )
    deploy.add_argument(
        "--crash-after",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="seconds without a heartbeat before a run is marked Crashed (default: 90)",
    )
    deploy.add_argument(
        "--notify",
        metavar="URL",
        help="webhook to POST to when a run of explain-dataset completes or fails "
        "(stored in the Prefect block 'opticam-notify'; e.g. a Slack incoming webhook), "
        "or does not start within --start-timeout",
    )
    deploy.add_argument(
        "--start-timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT,
        metavar="SECONDS",
        help="with --notify: seconds a run of explain-dataset may stay Pending or Late "
        f"before the webhook hears that it does not start (default: {DEFAULT_START_TIMEOUT:.0f})",
    )
    deploy.set_defaults(func=cmd_deploy)

    worker = sub.add_parser(
        "worker",
        help="start one Prefect process worker per visible GPU (or --slots CPU workers)",
        description="Start 'prefect worker start --pool POOL --limit 1' once per visible GPU, "
        "each with its own CUDA_VISIBLE_DEVICES, or SLOTS CPU workers; Ctrl-C stops them all "
        "and the flow runs they started.",
    )
    worker.add_argument("--pool", required=True, type=_pool_name, help="work pool")
    worker.add_argument("--slots", type=_positive, help="CPU workers instead of one per GPU")
    worker.add_argument("--name", help="worker name prefix (default: the host name)")
    worker.set_defaults(func=cmd_worker)
    return parser


def _pool_name(value: str) -> str:
    from opticam.config import check_pool_name

    try:
        check_pool_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def cmd_deploy(args: argparse.Namespace) -> int:
    """``opticam deploy``: pools, deployments and the crash automation (idempotent)."""
    _quiet_prefect(verbose=False)
    from opticam_flows.cluster import require_server
    from opticam_flows.deploy import deploy

    require_server("opticam deploy")

    for line in deploy(
        args.pool,
        pool_type=args.pool_type,
        limit=args.limit,
        base_job_template=args.base_job_template,
        control_pool=args.control_pool,
        crash_after=args.crash_after,
        notify=args.notify,
        start_timeout=args.start_timeout,
    ):
        print(line)
    print(
        f"start workers with: opticam worker --pool {args.pool}   "
        f"(and one for parent runs: prefect worker start --pool "
        f"{args.control_pool or args.pool + '-control'})"
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """``opticam worker``: one Prefect worker per GPU, or ``--slots`` CPU workers."""
    from opticam.workers import plan_workers, run_workers

    return run_workers(plan_workers(args.pool, slots=args.slots, name=args.name))


#: Problems of one invalid configuration named in its message (the rest are counted).
_MAX_PROBLEMS = 5


def _one_line(exc: BaseException) -> str:
    """One line for a user's error, at most :data:`opticam.errors.MAX_MESSAGE_CHARS`
    characters whatever it quotes (values are also shortened where they are quoted)."""
    if isinstance(exc, ValidationError):
        parts = []
        problems = exc.errors()
        for err in problems[:_MAX_PROBLEMS]:
            loc = shorten(".".join(str(p) for p in err.get("loc", ())))
            msg = shorten(str(err.get("msg", "")).removeprefix("Value error, "), 400)
            parts.append(f"{loc}: {msg}" if loc else msg)
        if len(problems) > _MAX_PROBLEMS:
            parts.append(f"and {len(problems) - _MAX_PROBLEMS} more problems")
        text = "invalid configuration: " + "; ".join(parts)
    else:
        text = str(exc) or type(exc).__name__
    return shorten(" ".join(text.split()), MAX_MESSAGE_CHARS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opticam``; returns the exit status.

    A :class:`~opticam.errors.UserError` or a config value pydantic refuses is printed as
    one line with exit status 2. SIGINT and SIGTERM end with one line and status 130 or
    143 (``opticam run`` does not wait for the shard in progress: see
    :func:`opticam.lifeline.supervised`). Any other exception propagates with its
    traceback.
    """
    import signal

    from opticam.lifeline import Terminated, interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (KeyboardInterrupt, Terminated) as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        sys.stderr.write(interrupted(f"opticam {args.command}", signum) + "\n")
        return 128 + signum  # the shell's convention
    except (UserError, ValidationError) as exc:
        sys.stderr.write(f"opticam {args.command}: error: {_one_line(exc)}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
