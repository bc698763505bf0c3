"""Glob patterns on '/'-separated relative paths, compiled once to a single regex.

Patterns are anchored at the origin root: ``*.fits`` matches only top-level files, and
``**/*.fits`` matches at any depth. A pattern ending in ``/`` means everything below that
folder (``raw/`` is ``raw/**``).
"""

from __future__ import annotations

__all__ = ["GlobSet", "compile_globs", "path_filter"]

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GlobSet:
    """A set of patterns; a path matches when any pattern matches it."""

    patterns: tuple[str, ...]
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def compile(cls, patterns: Sequence[str]) -> GlobSet:
        """Raise ValueError naming the first invalid pattern."""
        parts = []
        for pattern in patterns:
            try:
                parts.append(_translate(pattern))
                re.compile(parts[-1])
            except (ValueError, re.error) as exc:
                raise ValueError(f"invalid glob pattern {pattern!r}: {exc}") from None
        regex = re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL) if parts else None
        return cls(tuple(patterns), regex)

    def match(self, relpath: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(relpath) is not None

    @property
    def regex(self) -> str | None:
        """The one regex (for ``re.DOTALL`` full matches) the patterns compile to."""
        return None if self._regex is None else self._regex.pattern

    def __call__(self, relpath: str) -> bool:
        return self.match(relpath)

    def __bool__(self) -> bool:
        return bool(self.patterns)


def compile_globs(patterns: Sequence[str]) -> GlobSet:
    return GlobSet.compile(patterns)


def path_filter(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """Selection rule of an origin: no include patterns means every file; excludes win."""
    inc, exc = compile_globs(include), compile_globs(exclude)
    return lambda relpath: (not inc or inc.match(relpath)) and not exc.match(relpath)


def _translate(pattern: str) -> str:
    if not pattern:
        raise ValueError("empty pattern")
    if pattern.startswith("/"):
        raise ValueError("patterns are relative to the origin root and must not start with '/'")
    if pattern.endswith("/"):
        pattern += "**"
    components = pattern.split("/")
    out = []
    for i, component in enumerate(components):
        last = i == len(components) - 1
        if component == "**":
            # A trailing ** needs at least one character so that 'raw/**' does not match 'raw'.
            out.append(".+" if last and i > 0 else ".*" if last else "(?:.*/)?")
        else:
            out.append(_translate_component(component) + ("" if last else "/"))
    return "".join(out)


def _translate_component(component: str) -> str:
    if not component:
        raise ValueError("empty path component")
    out = []
    i, n = 0, len(component)
    while i < n:
        c = component[i]
        i += 1
        if c == "*":
            while i < n and component[i] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i
            if j < n and component[j] in "!^":
                j += 1
            if j < n and component[j] == "]":
                j += 1
            j = component.find("]", j)
            if j < 0:
                out.append(re.escape(c))  # an unterminated '[' is literal, as in fnmatch
                continue
            body = component[i:j]
            i = j + 1
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            escaped = "".join(ch if ch == "-" else re.escape(ch) for ch in body)
            # The lookahead keeps negated classes from matching a path separator.
            out.append(f"(?!/)[{'^' if negate else ''}{escaped}]")
        else:
            out.append(re.escape(c))
    return "".join(out)
