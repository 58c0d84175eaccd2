"""The trial of pydantic-settings' CLI support (``CliApp``) for ``opticam run``'s flags,
against the hand-written flag builder in :mod:`opticam.cli`, on the same arguments.

For each command line it prints what ``CliApp.run`` over ``RunConfig`` makes of it and
what ``opticam run`` (parsing only: ``opticam config``) makes of it. The outcome, and why
the hand-written builder stays, is in docs/development.md ("Why the flags are built by
hand").

    .venv/bin/python benchmarks/cli_pydantic_settings.py
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

CASES = [
    ["--data", "x.tar", "--batch-size", "8"],
    ["--data", "x.tar", "--batch-size", "zero"],
    ["--data", "x.tar", "--iterations", "5"],
    ["--data", "x.tar", "--model", "demo"],
    ["--data", "x.tar", "--storage-option", "key=v"],
    ["--data", "x.tar", "--s3-endpoint", "http://localhost:9000"],
    ["--data", "x.tar", "--no-save-curves"],
    ["--data", "a.tar", "b.tar"],
    ["--data", "x.tar", "--mean", "0.5", "0.5", "0.5"],
]


def _settings(args: list[str]) -> str:
    from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

    from opticam.config import RunConfig

    class RunFlags(RunConfig, BaseSettings):  # type: ignore[misc]
        model_config = SettingsConfigDict(
            cli_parse_args=False,
            cli_prog_name="opticam run",
            cli_kebab_case=True,
            cli_implicit_flags=True,
            cli_avoid_json=True,
            extra="forbid",
        )

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config = CliApp.run(RunFlags, cli_args=args)
    except SystemExit as exc:
        return f"exit {exc.code}: {' '.join(err.getvalue().split())[-160:]}"
    except Exception as exc:  # what a user would see
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__} ({str(exc).count(chr(10)) + 1} lines): {text[:160]}"
    return f"ok: batch_size={config.batch_size!r}"


def _ours(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "opticam", "config", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        return f"exit {done.returncode}: {' '.join(done.stderr.split())[:160]}"
    line = next((x for x in done.stdout.splitlines() if x.startswith("batch_size")), "")
    return f"ok: {line.strip()}"


def main() -> None:
    for args in CASES:
        print(" ".join(args))
        print(f"  pydantic-settings: {_settings(args)}")
        print(f"  opticam:           {_ours(args)}")


if __name__ == "__main__":
    main()
