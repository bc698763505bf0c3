"""Logging set-up for the command line only: the library never configures logging."""

from __future__ import annotations

import logging
import sys


def _import_structlog() -> None:
    """Import structlog; without rich where nothing would show rich's output.

    On import, structlog's console renderer and traceback modules load rich (and pygments)
    for colourful tracebacks whenever rich is installed, which it is for our progress bars:
    about 35 ms of a command's start-up, on the core the run's first copies wait for. When
    stderr is not a terminal (cron, a service, a pipe to a log file) those tracebacks would
    be plain text anyway, so structlog is imported as if rich were missing: its renderers
    then format tracebacks plainly. rich itself stays importable.
    """
    if "structlog" in sys.modules or "rich" in sys.modules or sys.stderr.isatty():
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # now `import rich` fails
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def configure(verbosity: int, fmt: str) -> None:
    """-q: errors only; default: warnings; -v: one line per transfer; -vv: debug."""
    _import_structlog()
    import structlog

    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 1 else logging.ERROR
    )
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
