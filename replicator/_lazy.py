"""A package's public names, imported on first use (PEP 562).

The command line starts the processes a run will need (copy helpers) before the engine's
modules are imported, so that they start on the idle core while this one imports: importing
a package must not import everything it exports.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing's, without importing typing (see ``_early``)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def lazy_exports(
    namespace: dict[str, Any], modules: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose ``namespace`` (its globals)
    exports ``modules``' names: ``{".module": ("Name", ...)}``, relative to the package."""
    package = namespace["__name__"]
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            # Also how ``from package import submodule`` finds a submodule not yet imported.
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__


class LazyModule:
    """A module imported on its first attribute look-up: where a module is needed only on
    some paths (asyncssh, where the OpenSSH client carries the stream)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)
