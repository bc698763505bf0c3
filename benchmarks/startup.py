"""Where a run's fixed start-up goes: the interpreter, the libraries the product is built on,
and replicator's own modules, each imported in turn in a fresh interpreter, beside rsync's
whole run on an empty tree (an input to issue 4's small-file cases).

    .venv/bin/python -m benchmarks.startup [--repeat 7]

Each round runs one interpreter that imports the steps below in order and times each step
(a step's time is what it adds to the ones before: ``asyncio`` after ``anyio`` is free).
The table gives medians of the rounds; "rsync, empty tree" is ``rsync -a`` of an empty
folder, timed from the parent. Where a library's import would load ``rich`` only for
colourful tracebacks, the command does not (``_cli_logging``): neither does this probe.
The interpreter is the one the benchmark runs (``run.plain_install``: an editable
install's import finder left out, the package byte-compiled), so the steps are what a
user's installed command pays.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .run import _byte_compile, _find_replicator, _script_python, plain_install

# (label, modules): the interpreter's own start first, then what the command imports, in
# about the order it does. The libraries are the ones the brief prescribes.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stdlib the command needs (json, argparse, tomllib, subprocess, pathlib, dataclasses)",
     ("json", "argparse", "tomllib", "subprocess", "pathlib", "dataclasses")),
    ("asyncio and anyio with its asyncio backend", ("asyncio", "anyio",
                                                     "anyio._backends._asyncio")),
    ("structlog (without rich)", ("structlog",)),
    ("sqlite3 and aiosqlite", ("sqlite3", "aiosqlite")),
    ("replicator: config and CLI", ("replicator._config", "replicator.cli")),
    ("replicator: engine, inventory, events, transports", (
        "replicator._events", "replicator._inventory", "replicator._engine",
        "replicator.transports._local", "replicator._replicator")),
)

# The child imports nothing before its clock starts but sys and time (json is a step).
_CHILD = """
import sys, time
t0 = time.perf_counter()
sys.modules["rich"] = None
times = []
for modules in sys.argv[1].split(";"):
    for name in modules.split(","):
        __import__(name)
    now = time.perf_counter()
    times.append(now - t0)
    t0 = now
print(len(sys.modules), *times)
"""


def _timed(argv: list[str]) -> float:
    """Seconds a command takes, from its start to its exit."""
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--replicator", help="the replicator command (default: as run.py)")
    args = parser.parse_args(argv)
    steps = ";".join(",".join(modules) for _, modules in STEPS)
    bare: list[float] = []
    rsync: list[float] = []
    per_step: list[list[float]] = [[] for _ in STEPS]
    modules = 0
    with tempfile.TemporaryDirectory(prefix="replicator-startup-") as scratch:
        command, installed = plain_install(_find_replicator(args.replicator),
                                           Path(scratch) / "install")
        compiled = _byte_compile(command)
        python = _script_python(command)  # "#!/usr/bin/env python3" is two words
        print(f"{' '.join(python)}: {installed}; byte-compiled: {compiled}", file=sys.stderr)
        empty = Path(scratch) / "empty"
        empty.mkdir()
        for _ in range(max(1, args.repeat)):
            bare.append(_timed([*python, "-c", "pass"]))
            # Not from the checkout's folder: the package comes from where it is installed.
            out = subprocess.run([*python, "-c", _CHILD, steps], check=True, cwd=scratch,
                                 capture_output=True, text=True).stdout
            loaded, *times = out.split()
            modules = int(loaded)
            for index, seconds in enumerate(times):
                per_step[index].append(float(seconds))
            if shutil.which("rsync") is not None:
                shutil.rmtree(empty.parent / "dest", ignore_errors=True)
                rsync.append(_timed(["rsync", "-a", f"{empty}/", f"{empty.parent / 'dest'}/"]))
    print(f"| step | median ms |\n|---|--:|\n| interpreter (`python -c pass`, whole "
          f"process) | {1000 * statistics.median(bare):.1f} |")
    for (label, _), times_ in zip(STEPS, per_step, strict=True):
        print(f"| {label} | {1000 * statistics.median(times_):.1f} |")
    total = sum(statistics.median(t) for t in per_step)
    print(f"| all imports ({modules} modules loaded) | {1000 * total:.1f} |")
    if rsync:
        print(f"| rsync, empty tree (whole process) | {1000 * statistics.median(rsync):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
