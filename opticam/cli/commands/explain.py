"""``opticam explain IMAGE... --out DIR``: overlay PNGs for a few images, without Prefect."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from opticam.cli.flags import add_config_flags, add_storage_flags, group_values, storage_options_of
from opticam.config import ModelSpec

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``opticam explain`` to the subcommands ``sub``."""
    parser = sub.add_parser("explain", help="overlay PNGs for a few images (no Prefect)")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--method", default="opticam", help="method(s), comma-separated")
    parser.add_argument("--target-class", type=int, help="class to explain (default: predicted)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", required=True, help="output folder")
    add_config_flags(parser, ("model", "opticam"))
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write overlay PNGs of saliency maps for a few images; print what was written.

    The work is :func:`opticam.overlays.write_overlays`.
    """
    from opticam.overlays import write_overlays

    written = write_overlays(
        args.images,
        args.out,
        model=ModelSpec(**group_values(args, "model")),
        methods=args.method.split(","),
        opticam_options=group_values(args, "opticam"),
        target_class=args.target_class,
        device=args.device,
        storage_options=storage_options_of(args),
    )
    for item in written:
        sys.stdout.write(f"{item.path}  class {item.target}  p={item.probability:.3f}\n")
    return 0
