"""Package attributes imported on first use (PEP 562).

Importing a package then costs only what its caller uses: ``import opticam`` or the
command line never load torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports its attributes on first use.

    An attribute in ``names`` is imported from its module on first access and cached in
    the package; any other name is looked up as a submodule, then refused with
    AttributeError.

    Args:
        package: the package's ``__name__`` (named in the AttributeError).
        names: attribute name -> the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            # A submodule is an attribute of its package once imported, as without this.
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
