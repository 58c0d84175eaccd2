"""The flags made from the config's fields, and the job they describe.

The flags of ``opticam run`` and ``opticam config`` (and the model and Opti-CAM flags of
``opticam explain``) are made from the fields of :class:`~opticam.config.RunConfig`,
:class:`~opticam.config.ModelSpec`, :class:`~opticam.config.MetricsOptions`,
:class:`~opticam.config.OptiCAMOptions` and :class:`~opticam.config.CAMOptions`: name,
type, choices, default and help come from the field, so the command line and the config
cannot drift apart. A field's flag is its name (``batch_size`` -> ``--batch-size``,
booleans get ``--no-...``, and so do ``bool | Literal`` fields, whose flag also takes a word:
``--compile``, ``--compile auto``, ``--no-compile``); where two groups share a field name, the later group's flag
carries its prefix (``--cam-batch-size``). :func:`config_from_args` turns parsed flags
(over a job file) into a :class:`~opticam.config.RunConfig`.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from opticam.config import (
    CAMOptions,
    MetricsOptions,
    ModelSpec,
    OptiCAMOptions,
    RunConfig,
    method_options_model,
)
from opticam.demo.cache import DEMO_METHODS, DEMO_STEPS
from opticam.errors import CLIError, short_repr

__all__ = [
    "FLAGS",
    "Flag",
    "add_config_flags",
    "add_job_flags",
    "add_storage_flags",
    "config_from_args",
    "group_values",
    "parse_storage_options",
    "pool_name",
    "positive_int",
    "storage_options_of",
]


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


def _switch_choices(annotation: Any) -> list[str] | None:
    """The words of a ``bool | Literal[...]`` field (``compile``: auto), else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(annotation)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if bool not in args or not literals or len(args) != len(literals) + 1:
        return None
    return [str(word) for a in literals for word in typing.get_args(a)]


_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _switch_word(words: list[str]) -> Any:
    """An argparse type: true/yes/on/1, false/no/off/0 or one of ``words``."""

    def parse(text: str) -> bool | str:
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        if word in words:
            return word
        known = ", ".join([*words, "true", "false"])
        raise argparse.ArgumentTypeError(f"expected one of {known}, got {short_repr(text)}")

    return parse


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
    words = _switch_choices(annotation)
    if words is not None:
        # --flag alone is true, --flag WORD sets a word, --no-flag (not listed) false.
        kwargs.update(nargs="?", const=True, type=_switch_word(words))
        kwargs["metavar"] = "{" + ",".join([*words, "true", "false"]) + "}"
        kwargs["help"] += f"; {flag.option.replace('--', '--no-', 1)} is false"
        parser.add_argument(*options, **kwargs)
        negative = ["--no-" + o.removeprefix("--") for o in options]
        parser.add_argument(
            *negative,
            dest=flag.dest,
            action="store_const",
            const=False,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
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


def add_config_flags(parser: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    """Add the flags of the config ``groups`` (``run``, ``model``, ...) to ``parser``.

    Each group gets its own titled section of the help.
    """
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


def add_storage_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--storage-option KEY=VALUE`` (repeatable) and ``--s3-endpoint`` to ``p``."""
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


def storage_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The fsspec options the storage flags of ``args`` give (see :func:`parse_storage_options`)."""
    return parse_storage_options(args.storage_option or [], args.s3_endpoint)


def group_values(args: argparse.Namespace, group: str) -> dict[str, Any]:
    """``{field: value}`` of the flags of config group ``group`` given in ``args``."""
    out: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.group == group and hasattr(args, flag.dest):
            value = getattr(args, flag.dest)
            out[flag.field] = list(value) if isinstance(value, tuple) else value
    return out


def method_entries(value: Any) -> list[dict[str, Any]]:
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
    run_flags = group_values(args, "run")
    fields.update({k: v for k, v in run_flags.items() if k != "methods"})
    if isinstance(fields.get("data"), list) and len(fields["data"]) == 1:
        fields["data"] = fields["data"][0]
    demo = "data" not in fields
    if demo:
        from opticam.demo.cache import ensure_demo_data

        fields["data"] = ensure_demo_data()

    for group in ("model", "metrics"):
        given = group_values(args, group)
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
        previous = {m["name"]: m for m in method_entries(fields.get("methods"))}
        methods = [previous.get(m["name"], m) for m in method_entries(run_flags["methods"])]
    elif "methods" in fields:
        methods = method_entries(fields["methods"])
    else:
        default = (
            DEMO_METHODS
            if demo
            else RunConfig.model_fields["methods"].get_default(call_default_factory=True)
        )
        methods = method_entries(default if isinstance(default, str) else [m.name for m in default])
    apply_method_flags(args, methods)
    fields["methods"] = methods
    fields["storage_options"] = storage_options_of(args)
    return RunConfig(**fields)


def apply_method_flags(args: argparse.Namespace, methods: list[dict[str, Any]]) -> None:
    """Put the Opti-CAM and baseline flags into the options of the methods they apply to."""
    from opticam.names import METHODS

    for group, applies in (
        ("opticam", lambda name: name == "opticam"),
        ("cam", lambda name: name != "opticam" and method_options_model(name) is CAMOptions),
    ):
        given = group_values(args, group)
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


def positive_int(text: str) -> int:
    """An argparse type: ``text`` as an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {short_repr(text)}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {short_repr(text)}")
    return value


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and every flag of the job (all config groups, storage) to ``p``."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help="job file (YAML or JSON, the fields of RunConfig; see 'opticam config "
        "--example'); flags override it",
    )
    add_config_flags(p, ("run", "model", "metrics", "opticam", "cam"))
    add_storage_flags(p)


def pool_name(value: str) -> str:
    """An argparse type: a work pool name that Prefect and opticam accept."""
    from opticam.config import check_pool_name

    try:
        check_pool_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value
