"""Where an origin file goes inside a replica: a template such as ``{host}/{path}``."""

from __future__ import annotations

__all__ = ["FIELDS", "Layout"]

import os
import string
from collections.abc import Callable
from dataclasses import dataclass

FIELDS = frozenset({"host", "path", "origin", "relpath", "name"})
# Without one of these every file of an origin would render to the same replica path.
_FILE_FIELDS = frozenset({"path", "relpath", "name"})


@dataclass(frozen=True, slots=True)
class Layout:
    template: str
    fields: frozenset[str]
    # The template as (literal, field) pairs; field None after the last literal.
    pieces: tuple[tuple[str, str | None], ...] = ()

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
        pieces = tuple((literal, field) for literal, field, _spec, _conv in parsed)
        return cls(template, frozenset(fields), pieces)

    def unique_per_file(self, origins: int) -> bool:
        """Whether no two files can get the same path: the replica serves one origin (one
        host) and the template holds its file's whole path once, and no bare name.

        A fixed text around one injective part is injective; two file fields, or a
        ``{name}`` beside a path, would need a proof this does not attempt.
        """
        path_fields = [field for _literal, field in self.pieces if field in _FILE_FIELDS]
        return origins == 1 and len(path_fields) == 1 and path_fields[0] != "name"

    @property
    def name_last(self) -> bool:
        """Whether a file's path in the replica is its folder's, then its name: the template
        takes one field from the file's path and ends with it. Then ``render`` of
        ``folder/name`` is ``render`` of ``folder/x`` with ``x`` replaced by ``name``, for
        any name a folder can hold (not ``.``, ``..``, nor with a slash), so a folder's
        files are placed by one ``render``."""
        path_fields = [field for _literal, field in self.pieces if field in _FILE_FIELDS]
        return len(path_fields) == 1 and self.pieces[-1][1] == path_fields[0]

    def render(self, *, host: str, origin: str, root: bytes, path: bytes) -> bytes:
        """The replica-relative path of origin file ``path`` below origin folder ``root``.

        Raise ValueError when the result could escape the replica root.
        """
        return self.renderer(host=host, origin=origin, root=root)(path)

    def renderer(self, *, host: str, origin: str, root: bytes) -> Callable[[bytes], bytes]:
        """``render`` for the files of one origin: its values are prepared once.

        Renders on bytes: file names need not be UTF-8, and ``os.fsencode`` of a formatted
        string is the concatenation of its parts encoded one by one.
        """
        root = root.rstrip(b"/")
        prefix = root + b"/"
        skip = len(prefix)
        # Per piece: literal bytes, then a field taken from the path (a code) or fixed bytes.
        fixed = {"host": os.fsencode(host), "origin": os.fsencode(origin)}
        steps: list[tuple[bytes, int, bytes]] = []
        for literal, field in self.pieces:
            code = _FROM_PATH.get(field or "", 0)
            steps.append((os.fsencode(literal), code, fixed.get(field or "", b"")))
        from_path = [i for i, step in enumerate(steps) if step[1]]
        if len(from_path) == 1:
            # The usual template: fixed text around one part of the path, joined once per
            # file without a loop over the pieces.
            at = from_path[0]
            code = steps[at][1]
            head = b"".join(lit + value for lit, _code, value in steps[:at]) + steps[at][0]
            tail = b"".join(lit + value for lit, _code, value in steps[at + 1:])

            def render_one(path: bytes) -> bytes:
                if not path.startswith(prefix):
                    raise ValueError(f"{path!r} is not inside origin root {root or b'/'!r}")
                if code == _RELPATH:
                    part = path[skip:]
                elif code == _PATH:
                    part = path.lstrip(b"/")
                else:
                    part = path.rpartition(b"/")[2]
                return _checked(head + part + tail)

            return render_one

        def render(path: bytes) -> bytes:
            if not path.startswith(prefix):
                raise ValueError(f"{path!r} is not inside origin root {root or b'/'!r}")
            parts: list[bytes] = []
            for literal, code, value in steps:
                parts.append(literal)
                if code == _RELPATH:
                    parts.append(path[skip:])
                elif code == _PATH:
                    parts.append(path.lstrip(b"/"))
                elif code == _NAME:
                    parts.append(path.rsplit(b"/", 1)[-1])
                else:
                    parts.append(value)
            return _checked(b"".join(parts))

        return render


_RELPATH, _PATH, _NAME = 1, 2, 3
_FROM_PATH = {"relpath": _RELPATH, "path": _PATH, "name": _NAME}


def _checked(rendered: bytes) -> bytes:
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
