"""Griffe extension for the manual: Sphinx roles in docstrings become links.

opticam's docstrings name other objects with Sphinx roles (``:func:`process_shard```,
``:class:`~opticam.store.ShardStatus```), which mkdocstrings would show as written. This
extension, loaded by ``mkdocs.yml``, rewrites each role, when griffe loads the package,
into an *optional* autorefs cross-reference: a link where the object has a page in the
manual, plain code where it does not (no warning, so ``--strict`` stays about real dead
links). A name is looked up the way Sphinx does: as a full path, else in the scope of
the documented object, then of its parents.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|mod|data|attr|meth|exc|obj|const):`(?P<tilde>~?)(?P<name>[\w.]+)(?:\(\))?`"
)


def _resolve(name: str, obj: griffe.Object) -> str:
    """The full path ``name`` means in ``obj``'s docstring (``name`` if not found)."""
    first = name.split(".", 1)[0]
    scope: griffe.Object | None = obj
    while scope is not None:
        if scope.name == first and scope.parent is None:
            return name
        if first in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return name


def _rewrite(text: str, obj: griffe.Object) -> str:
    """``text`` with every Sphinx role replaced by an optional cross-reference."""

    def link(match: re.Match[str]) -> str:
        name = match["name"]
        shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
        target = html.escape(_resolve(name, obj), quote=True)
        return (
            f'<autoref identifier="{target}" optional><code>{html.escape(shown)}</code></autoref>'
        )

    return _ROLE.sub(link, text)


def _walk(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj.docstring.value, obj)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Called by griffe once a package is loaded."""
        _walk(pkg)
