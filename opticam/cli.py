"""The ``opticam`` command (also ``python -m opticam``).

Commands:

- ``opticam run``: explain a dataset with the Prefect flow ``explain-dataset`` (ephemeral
  Prefect without a server; the server at ``PREFECT_API_URL`` when one is configured).
  Without ``--data`` it runs the bundled demo end to end: 4 shards x 50 synthetic images
  generated once into ``$OPTICAM_CACHE/demo-v1`` (default ``~/.cache/opticam``), the demo
  classifier, Opti-CAM and four baselines, output in ``./opticam-runs``.
- ``opticam report RUN_URL``: re-aggregate a finished or partial run.
- ``opticam explain IMAGE... --out DIR``: overlay PNGs for a few images (no Prefect).
- ``opticam pack SOURCE URL --per-shard N``: ImageFolder tree / CSV list -> shards.
- ``opticam demo-data URL``: write synthetic demo shards.

Bad input (unknown method, no shard matching the pattern, a bad option) ends with one line
on stderr and exit status 2; a run with failed shards exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DEMO_METHODS",
    "demo_cache_dir",
    "ensure_demo_data",
    "main",
    "parse_storage_options",
]

DEMO_METHODS = "opticam,gradcam,gradcampp,scorecam,fakecam"
DEMO_SHARDS = 4
DEMO_PER_SHARD = 50
# The bundled classifier was trained on seeds 1000 and 1001: the demo explains held-out data.
DEMO_SEED = 0
DEMO_STEPS = 32
DEMO_VERSION = "demo-v1"
_COMPLETE_MARKER = ".complete"


class CLIError(Exception):
    """A user error reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# --------------------------------------------------------------------------- helpers


def _value(text: str) -> Any:
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
            raise CLIError(f"storage option {pair!r} is not KEY=VALUE")
        node = options
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CLIError(f"storage option {key!r} conflicts with an earlier value")
            node = child
        node[parts[-1]] = raw if parts[-1] == "endpoint_url" else _value(raw)
    return options


def demo_cache_dir() -> Path:
    """``$OPTICAM_CACHE/demo-v1`` (default cache ``~/.cache/opticam``)."""
    root = os.environ.get("OPTICAM_CACHE") or os.path.join(Path.home(), ".cache", "opticam")
    return Path(root).expanduser() / DEMO_VERSION


def ensure_demo_data(
    folder: Path | None = None,
    shards: int = DEMO_SHARDS,
    per_shard: int = DEMO_PER_SHARD,
    seed: int = DEMO_SEED,
) -> str:
    """Generate the demo shards once (atomically: a temp folder renamed when complete).

    Returns:
        A glob pattern matching the shards.
    """
    from opticam.demo import make_shards

    folder = folder or demo_cache_dir()
    if not (folder / _COMPLETE_MARKER).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make_shards(str(tmp), shards, per_shard, seed)
        (tmp / _COMPLETE_MARKER).write_text(
            json.dumps({"shards": shards, "per_shard": per_shard, "seed": seed})
        )
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished first; its copy is identical (deterministic data).
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / "demo-*.tar")


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "invalid configuration: " + "; ".join(parts)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return " ".join(text.split())


# --------------------------------------------------------------------------- progress


class _Progress:
    """Listener for flow progress events: a live bar on a TTY, plain lines otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lock = threading.Lock()
        self.total = 0
        self.pending = 0
        self.done = 0
        self.images = 0
        self.per_shard: dict[str, int] = {}
        self.limits: list[int | None] = []
        self.sizes: list[int] = []
        self.start = time.monotonic()
        self.last_draw = 0.0

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        with self.lock:
            getattr(self, f"_on_{event}", lambda d: None)(data)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _on_plan(self, d: dict[str, Any]) -> None:
        self.total, self.pending = d["total"], d["pending"]
        self.limits = list(d.get("max_images") or [])
        self.start = time.monotonic()
        self._write(
            f"run {d['run_id']}: {d['total']} shards, {d['skipped']} already done, "
            f"{d['pending']} to process on {', '.join(d['devices'])}\n"
            f"output: {d['run_url']}\n"
        )

    def _on_images(self, d: dict[str, Any]) -> None:
        self.images += int(d["n"])
        self.per_shard[d["shard"]] = self.per_shard.get(d["shard"], 0) + int(d["n"])
        self._draw()

    def _on_shard_done(self, d: dict[str, Any]) -> None:
        self.done += 1
        self.per_shard.pop(d["shard"], None)
        self.sizes.append(int(d["n_samples"]))
        if self.tty:
            self._draw(force=True)
        else:
            state = "" if d["complete"] else " (incomplete shard)"
            self._write(
                f"[{self.done}/{self.pending}] {d['name']}: {d['n_images']} images, "
                f"{d['n_errors']} errors, {d['seconds']:.1f}s{state}\n"
            )

    def _on_shard_failed(self, d: dict[str, Any]) -> None:
        self.done += 1
        self.per_shard.pop(d["shard"], None)
        if self.tty:
            self._write("\n")
        self._write(f"shard {d['shard']} failed: {d['message']}\n")

    def _on_report(self, d: dict[str, Any]) -> None:
        if self.tty and self.pending:
            self._draw(force=True)
            self._write("\n")

    def _draw(self, force: bool = False) -> None:
        if not self.tty or not self.pending:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        # Shard sizes are unknown until read: estimate from the per-shard limit or the
        # shards finished so far, so the bar moves within a shard too.
        known = [v for v in self.limits if v]
        estimate = sum(self.sizes) / len(self.sizes) if self.sizes else (known[0] if known else 0)
        partial = sum(min(n / estimate, 0.99) for n in self.per_shard.values()) if estimate else 0.0
        fraction = min((self.done + partial) / self.pending, 1.0)
        width = 30
        filled = int(round(fraction * width))
        rate = self.images / max(now - self.start, 1e-6)
        self._write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.pending} shards "
            f"{self.images} images {rate:.1f} img/s {now - self.start:.0f}s "
        )


# --------------------------------------------------------------------------- commands


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    return parse_storage_options(args.storage_option or [], args.s3_endpoint)


def _build_config(args: argparse.Namespace) -> Any:
    from opticam.config import MethodSpec, MetricsOptions, ModelSpec, RunConfig

    demo = args.data is None
    data: str | list[str] = ensure_demo_data() if demo else list(args.data)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    names = args.methods or (DEMO_METHODS if demo else None)
    methods: list[MethodSpec] | None = None
    if names is not None:
        methods = []
        for name in (n.strip() for n in names.split(",") if n.strip()):
            options = (
                {"iterations": args.iterations}
                if (name.lower() == "opticam" and args.iterations is not None)
                else {}
            )
            methods.append(MethodSpec(name=name, options=options))
    elif args.iterations is not None:
        methods = [
            MethodSpec(name="opticam", options={"iterations": args.iterations}),
            MethodSpec(name="gradcam"),
            MethodSpec(name="fakecam"),
        ]
    steps = args.steps if args.steps is not None else (DEMO_STEPS if demo else None)
    metric_fields: dict[str, Any] = {"insertion_deletion": not args.no_insertion_deletion}
    if steps is not None:
        metric_fields["steps"] = steps
    metrics = MetricsOptions(**metric_fields)
    model = ModelSpec(
        source=args.model,
        checkpoint=args.checkpoint,
        target_layer=args.target_layer,
    )
    fields: dict[str, Any] = {
        "data": data,
        "output": args.output,
        "model": model,
        "target": args.target,
        "batch_size": args.batch_size,
        "device": args.device,
        "metrics": metrics,
        "maps": args.maps,
        "max_images": args.max_images,
        "executor": args.executor,
        "storage_options": _storage(args),
    }
    if methods is not None:
        fields["methods"] = methods
    return RunConfig(**fields)


def _quiet_prefect(verbose: bool) -> None:
    # Must happen before prefect is imported: its settings are read at import.
    level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", level)
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", level)
    # The ephemeral server's telemetry logs an ERROR on every run without a network.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        import logging
        import warnings

        warnings.filterwarnings("ignore", module="prefect")
        logging.getLogger("prefect").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    """``opticam run``: plan, explain, score and report a dataset (see module doc)."""
    start = time.monotonic()
    config = _build_config(args)
    from opticam.pipeline import preflight

    # Bad input fails here, in one line, before Prefect starts (and logs tracebacks).
    preflight(config)
    _quiet_prefect(args.verbose)
    from flows.explain import explain_dataset, progress_listener

    progress = _Progress()
    with progress_listener(progress):
        result = explain_dataset(config)
    elapsed = time.monotonic() - start
    from opticam.report import format_table

    out = sys.stdout
    out.write("\n" + format_table(result["summary"], with_ci=False) + "\n")
    out.write(
        f"run {result['run_id']}: {result['shards_processed']} shards processed, "
        f"{result['shards_skipped']} skipped, {result['shards_failed']} failed; "
        f"{result['images']} images, {result['errors']} error rows; {elapsed:.1f}s\n"
    )
    out.write(f"report: {_local_path(result['report_url'])}\n")
    if result["shards_failed"]:
        for url, message in result["failed"].items():
            sys.stderr.write(f"failed shard {url}: {message}\n")
        return 1
    return 0


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def cmd_report(args: argparse.Namespace) -> int:
    """``opticam report RUN_URL``: rebuild the report of a run."""
    from opticam import store
    from opticam.report import build_report

    run = args.run_url.rstrip("/")
    options = _storage(args) or None
    if store.read_run_json(run, options) is None and not store.list_done_shards(run, options):
        raise CLIError(f"no opticam run at {run!r} (no run.json, no shards)")
    report = build_report(run, storage_options=options)
    from opticam.report import format_table

    sys.stdout.write(format_table(report.summary) + "\n")
    sys.stdout.write(f"report: {_local_path(report.index_url)}\n")
    return 0


def _jet(values: Any) -> Any:
    """Jet-like colormap: values (H, W) in [0, 1] -> (H, W, 3) in [0, 1]."""
    import numpy as np

    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue peaks
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def overlay(image: Any, saliency_map: Any, alpha: float = 0.5) -> Any:
    """Blend a jet-coloured map on an image.

    Args:
        image: (3, H, W) tensor or (H, W, 3) array in [0, 1].
        saliency_map: (H, W) in [0, 1].
        alpha: weight of the colour map.

    Returns:
        A PIL RGB image.
    """
    import numpy as np
    from PIL import Image

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] == 3:
        img = img.transpose(1, 2, 0)
    blended = (1 - alpha) * img + alpha * _jet(np.asarray(saliency_map, dtype=np.float32))
    return Image.fromarray(np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8))


def cmd_explain(args: argparse.Namespace) -> int:
    """``opticam explain IMAGE...``: overlay PNGs of saliency maps for a few images."""
    import fsspec
    import torch

    from opticam.data import Preprocess, decode_image
    from opticam.methods import get_explainer
    from opticam.models import ModelSpec, load_model
    from opticam.pipeline import resolve_device

    device = resolve_device(args.device)[0]
    storage = _storage(args)
    spec = ModelSpec(source=args.model, checkpoint=args.checkpoint, target_layer=args.target_layer)
    pictures, stems = [], []
    for url in args.images:  # read first: a typo should not wait for a model to load
        try:
            with fsspec.open(url, "rb", **storage) as f:
                pictures.append(decode_image(f.read()))
        except FileNotFoundError:
            raise CLIError(f"image {url!r} not found") from None
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot read image {url!r}: {err}") from err
        stems.append(Path(url.rstrip("/").rsplit("/", 1)[-1]).stem)
    loaded = load_model(spec, device, storage_options=storage)
    preprocess = Preprocess(loaded.input_size, loaded.resize_size)
    tensors = [preprocess(picture, [])[0] for picture in pictures]
    images = torch.stack(tensors).to(device)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(images).float(), dim=1)
    if args.target_class is not None:
        if not 0 <= args.target_class < loaded.num_classes:
            raise CLIError(
                f"--target-class {args.target_class} out of range (0..{loaded.num_classes - 1})"
            )
        targets = torch.full((len(tensors),), args.target_class, dtype=torch.long, device=device)
    else:
        targets = probs.argmax(dim=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in (m.strip() for m in args.method.split(",") if m.strip()):
        options = {"iterations": args.iterations} if method == "opticam" and args.iterations else {}
        explainer = get_explainer(method, loaded, **options)
        maps = explainer(images, targets).maps[:, 0].detach().cpu().numpy()
        for i, stem in enumerate(stems):
            path = out / f"{stem}-{method}.png"
            overlay(images[i].cpu().numpy(), maps[i]).save(path)
            c = int(targets[i])
            sys.stdout.write(f"{path}  class {c}  p={float(probs[i, c]):.3f}\n")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """``opticam pack SOURCE URL --per-shard N``: ImageFolder / CSV -> shards."""
    from opticam.data import pack

    urls = pack(
        args.source,
        args.url,
        args.per_shard,
        storage_options=_storage(args) or None,
        shuffle_seed=args.shuffle_seed,
    )
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
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for data and output (repeatable; dotted keys nest, values "
        "parsed as JSON when possible), e.g. anon=true, client_kwargs.region_name=eu-west-1",
    )
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (MinIO, ...)")


def build_parser() -> argparse.ArgumentParser:
    """The ``opticam`` argument parser."""
    parser = _Parser(prog="opticam", description="Dataset-scale Opti-CAM saliency maps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="explain a dataset (no --data: the bundled demo)",
        description="Explain, score and report a dataset with the explain-dataset flow. "
        "Without --data, runs the bundled demo end to end.",
    )
    run.add_argument("--data", nargs="+", metavar="URL", help="shard URL(s) or pattern(s)")
    run.add_argument("--output", default="./opticam-runs", help="output folder URL")
    run.add_argument(
        "--model", default="demo", help="demo | torchvision:NAME[:WEIGHTS] | factory:mod:fn"
    )
    run.add_argument("--checkpoint", help="state_dict URL for the model")
    run.add_argument("--target-layer", help="dotted module name of the CAM layer")
    run.add_argument("--methods", help=f"comma-separated methods (demo: {DEMO_METHODS})")
    run.add_argument("--target", choices=["label", "predicted"], default="label")
    run.add_argument("--batch-size", type=_positive, default=32)
    run.add_argument("--iterations", type=_positive, help="Opti-CAM iterations (default 100)")
    run.add_argument("--max-images", type=_positive, help="images in total, spread over shards")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--executor", default="local", choices=["local", "deployments"])
    run.add_argument(
        "--steps", type=_positive, help=f"insertion/deletion steps (demo {DEMO_STEPS})"
    )
    run.add_argument("--no-insertion-deletion", action="store_true", help="skip insertion/deletion")
    run.add_argument("--maps", choices=["lowres", "full_png"], default="lowres", help="map storage")
    run.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    _add_storage(run)
    run.set_defaults(func=cmd_run)

    report = sub.add_parser("report", help="re-aggregate a run and rebuild its report")
    report.add_argument("run_url", metavar="RUN_URL", help="<output>/<run_id>")
    _add_storage(report)
    report.set_defaults(func=cmd_report)

    explain = sub.add_parser("explain", help="overlay PNGs for a few images (no Prefect)")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument("--model", default="demo")
    explain.add_argument("--checkpoint")
    explain.add_argument("--target-layer")
    explain.add_argument("--method", default="opticam", help="method(s), comma-separated")
    explain.add_argument("--target-class", type=int, help="class to explain (default: predicted)")
    explain.add_argument("--iterations", type=_positive)
    explain.add_argument("--device", default="auto")
    explain.add_argument("--out", required=True, help="output folder")
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
    return parser


# Exceptions that mean "the input was wrong": one line, exit status 2.
def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CLIError, ValueError, FileNotFoundError, KeyError]
    with contextlib.suppress(ImportError):
        from opticam.models import CheckpointError, WeightsUnavailableError

        errors += [CheckpointError, WeightsUnavailableError]
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opticam``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("opticam: interrupted\n")
        return 130
    except _user_errors() as exc:
        sys.stderr.write(f"opticam {args.command}: error: {_one_line(exc)}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
