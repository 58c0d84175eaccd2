"""Report the functions and classes of opticam/ and flows/ that have grown too long.

The house rule: no function or method over about 80 lines and no class over about 250,
unless the code says why. ruff has no rule for this, so this script parses each file
with :mod:`ast` and measures every ``def`` and ``class`` (nested ones and methods too)
from its ``def``/``class`` line to its last line; decorators are not counted.

An exception is a comment ``# size: <reason>`` on the ``def``/``class`` line or on the
line after it. Each offender is printed as ``path:line: name is N lines (limit L)``;
the exit status is 1 when there is any.

Usage: ``python .ci/sizes.py [PATH ...]`` (default ``opticam flows``), from anywhere.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("opticam", "flows")
FUNCTION_LIMIT = 80
CLASS_LIMIT = 250

#: Files (or folders, ending in "/") left out, relative to the repository root.
EXCLUDED: set[str] = set()

_EXCEPTION = re.compile(r"#\s*size:\s*\S")


@dataclass(frozen=True)
class Offender:
    """A function or class over its limit, without an exception comment."""

    path: str
    line: int
    name: str
    lines: int
    limit: int

    def __str__(self) -> str:
        """The line printed for it."""
        return f"{self.path}:{self.line}: {self.name} is {self.lines} lines (limit {self.limit})"


def _exception_lines(source: str) -> set[int]:
    """The numbers of the lines that carry a ``# size:`` comment."""
    found = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and _EXCEPTION.match(token.string):
            found.add(token.start[0])
    return found


def check_source(source: str, path: str) -> list[Offender]:
    """The offenders in one file's text; ``path`` is only used to name them."""
    excepted = _exception_lines(source)
    offenders: list[Offender] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                limit = CLASS_LIMIT if isinstance(child, ast.ClassDef) else FUNCTION_LIMIT
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                granted = child.lineno in excepted or child.lineno + 1 in excepted
                if lines > limit and not granted:
                    offenders.append(Offender(path, child.lineno, name, lines, limit))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename=path), "")
    return offenders


def _relative(path: Path) -> str | None:
    """``path`` relative to the repository root, or None outside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return None


def _excluded(path: Path) -> bool:
    """Whether ``path`` is one of the files left out (see ``EXCLUDED``)."""
    relative = _relative(path)
    if relative is None:
        return False
    return any(
        relative.startswith(entry) if entry.endswith("/") else relative == entry
        for entry in EXCLUDED
    )


def python_files(paths: list[str]) -> list[Path]:
    """The ``.py`` files named or found under ``paths``, minus the excluded ones."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return [f for f in files if not _excluded(f)]


def check(paths: list[str]) -> list[Offender]:
    """The offenders in every Python file under ``paths``."""
    offenders: list[Offender] = []
    for path in python_files(paths):
        shown = _relative(path) or str(path)
        offenders.extend(check_source(path.read_text(encoding="utf-8"), shown))
    return offenders


def main(argv: list[str]) -> int:
    """Print the offenders under the paths in ``argv`` (default opticam/ and flows/)."""
    paths = argv[1:] or [str(ROOT / p) for p in DEFAULT_PATHS]
    offenders = check(paths)
    for offender in offenders:
        print(offender)
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
