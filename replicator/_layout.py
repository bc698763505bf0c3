"""Where an origin file goes inside a replica: a template such as ``{host}/{path}``."""

from __future__ import annotations

__all__ = ["FIELDS", "Layout"]

import os
import string
from dataclasses import dataclass

FIELDS = frozenset({"host", "path", "origin", "relpath", "name"})
# Without one of these every file of an origin would render to the same replica path.
_FILE_FIELDS = frozenset({"path", "relpath", "name"})


@dataclass(frozen=True, slots=True)
class Layout:
    template: str
    fields: frozenset[str]

    @classmethod
    def parse(cls, template: str) -> Layout:
        """Raise ValueError naming the unknown field or the syntax problem."""
        fields: set[str] = set()
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"bad layout template {template!r}: {exc}") from None
        for _literal, field, spec, conversion in parsed:
            if field is None:
                continue
            if field == "" or field.isdigit():
                raise ValueError(f"layout {template!r}: positional fields are not allowed")
            if spec or conversion:
                raise ValueError(
                    f"layout {template!r}: conversions and format specs are not allowed"
                    f" in {{{field}}}"
                )
            if field not in FIELDS:
                raise ValueError(
                    f"layout {template!r}: unknown field {{{field}}};"
                    f" known fields: {', '.join(sorted(FIELDS))}"
                )
            fields.add(field)
        if not fields & _FILE_FIELDS:
            raise ValueError(f"layout {template!r} must contain {{path}}, {{relpath}} or {{name}}")
        return cls(template, frozenset(fields))

    def render(self, *, host: str, origin: str, root: bytes, path: bytes) -> bytes:
        """The replica-relative path of origin file ``path`` below origin folder ``root``.

        Raise ValueError when the result could escape the replica root.
        """
        root = root.rstrip(b"/")
        if not path.startswith(root + b"/"):
            raise ValueError(f"{path!r} is not inside origin root {root or b'/'!r}")
        # Only the fields the template uses: this runs once per file copied.
        values: dict[str, str] = {}
        for field in self.fields:
            if field == "relpath":
                values[field] = os.fsdecode(path[len(root) + 1 :])
            elif field == "path":
                values[field] = os.fsdecode(path.lstrip(b"/"))
            elif field == "name":
                values[field] = os.fsdecode(path.rsplit(b"/", 1)[-1])
            else:
                values[field] = host if field == "host" else origin
        rendered = os.fsencode(self.template.format(**values))
        if b"\0" in rendered:
            raise ValueError(f"layout rendered a NUL byte: {rendered!r}")
        if not rendered or rendered.startswith(b"/") or rendered.endswith(b"/"):
            raise ValueError(f"layout rendered {rendered!r}, not a relative file path")
        # Doubled slashes from empty values inside the template are harmless; collapse them.
        if b"//" in rendered or b"/." in rendered or rendered.startswith(b"."):
            components = [c for c in rendered.split(b"/") if c]
            if any(c in (b".", b"..") for c in components):
                raise ValueError(f"layout rendered {rendered!r} with a '.' or '..' component")
            return b"/".join(components)
        return rendered
