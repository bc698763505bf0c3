"""The kinds of origin file, apart from the inventory's other types: the copy helpers
import it and nothing else of the inventory (``dataclasses`` and the types' classes were
about a third of a helper's start-up)."""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    FILE = 0
    SYMLINK = 1


__all__ = ["Kind"]
