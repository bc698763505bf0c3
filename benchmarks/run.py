"""replicator against rsync, side by side on the same data in one run (issue 4).

    python -m benchmarks.run [--quick] [--cases NAME ...] [--repeat N] [--json PATH]

Generates the data sets in a scratch folder, starts a private OpenSSH sshd on 127.0.0.1 (and a
50 ms delay-line proxy in front of it for the wide-area cases), runs every case alternately
with rsync and replicator, compares the trees after every run, prints a table and writes the
results as JSON. Everything started is stopped and the scratch folder removed at the end, on
Ctrl-C and on SIGTERM too.

Exit status: 0 every run completed and every tree compared equal (the ratios do not matter);
1 a tool failed or a tree differed; 3 a run was cut by its time limit or the deadline;
130 interrupted. Cases over SSH are "skipped" (not a failure) when replicator does not
support ssh:// replicas or sshd cannot run here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from . import datasets
from .datasets import Dataset
from .measure import RunResult, compare_trees, kill_running, run_sync, run_tool, snapshot
from .sshd import Sshd, SshdUnavailable
from .wan import Proxy, ProxyUnusable, start_and_check

MiB = 1 << 20
RSYNC, REPLICATOR = "rsync", "replicator"


@dataclass(frozen=True)
class Sizes:
    small_files: int
    small_size: int
    small_folders: int
    medium_files: int
    medium_size: int
    large_size: int
    tree_files: int
    scan_files: int
    stream_bytes: int  # raw stream through the delay proxy (its check)
    wan_small_files: int  # small files over the delay line (the small set when equal)


FULL = Sizes(20_000, 4096, 100, 200, 5 * MiB, 1024 * MiB, 300_000, 1_000_000, 512 * MiB,
             20_000)
# Quick: per-file round trips over a 100 ms RTT are slow, so fewer small files there.
QUICK = Sizes(2_000, 4096, 100, 20, 5 * MiB, 64 * MiB, 20_000, 50_000, 128 * MiB, 300)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    # "copy": fresh destination and inventory; "start": the same with no files (ratio of
    # times); "nochange": all in sync; "scan"
    kind: str
    data: str  # "small", "medium", "large", "tree", "scan"
    link: str  # "local", "ssh", "wan"
    target: str  # the target, as text
    weight: float  # share of the time budget (about the seconds a full run needs)
    whole: bool = False  # rsync -W
    goal: float = 0.0  # ratio (or MB of RSS for "scan") the target asks for

    @property
    def remote(self) -> bool:
        return self.link != "local"


CASES = [
    # Not in the issue: each tool on an empty origin into a fresh destination (and inventory),
    # its fixed cost per run. The ratios of the copy cases include it; "(1) and (2) less
    # start-up" below the table takes it out (informational, no target).
    Case("start-local", "(0) start-up: empty origin, local", "start", "empty", "local",
         "none (informs (1))", 10),
    Case("start-ssh", "(0) start-up: empty origin, SSH", "start", "empty", "ssh",
         "none (informs (2))", 20),
    Case("small-local", "(1) 4 KiB files, local", "copy", "small", "local",
         ">= 1.0x", 40, goal=1.0),
    Case("small-ssh", "(2) 4 KiB files, SSH", "copy", "small", "ssh",
         ">= 1.0x", 150, goal=1.0),
    Case("medium-ssh", "(3) 5 MiB files, SSH", "copy", "medium", "ssh",
         ">= 1.1x", 90, whole=True, goal=1.1),
    Case("large-local", "(4) one big file, local", "copy", "large", "local",
         ">= 2.0x", 40, whole=True, goal=2.0),
    Case("large-ssh", "(4) one big file, SSH", "copy", "large", "ssh",
         ">= 1.1x", 90, whole=True, goal=1.1),
    Case("rescan-local", "(5) no-change re-run, local", "nochange", "tree", "local",
         "<= 0.8x time", 150, goal=0.8),
    Case("scan-rss", "(7) peak RSS of a scan", "scan", "scan", "local",
         "< 200 MB", 120, goal=200.0),
    Case("medium-wan", "(6) 5 MiB files, SSH + 50 ms each way", "copy", "medium", "wan",
         ">= 3.0x", 300, whole=True, goal=3.0),
    Case("small-wan", "(6) 4 KiB files, SSH + 50 ms each way", "copy", "wansmall", "wan",
         ">= 1.0x", 700, goal=1.0),
]
CASE_NAMES = [c.name for c in CASES]


class Interrupted(Exception):
    """SIGTERM: clean up as for Ctrl-C."""


@dataclass
class Outcome:
    case: Case
    status: str = "ok"  # ok | skipped | failed | incomplete
    reason: str = ""
    dataset: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def times(self, tool: str) -> list[float]:
        return [r["seconds"] for r in self.runs if r["tool"] == tool and r["ok"]]


@dataclass
class Bench:
    args: argparse.Namespace
    sizes: Sizes
    scratch: Path
    deadline: float
    replicator: str
    reserve: float
    sshd: Sshd | None = None
    ssh_skip: str = ""  # why SSH cases cannot run ("" when they can)
    ssh_info: dict[str, str] = field(default_factory=dict)
    proxy: Proxy | None = None
    wan_skip: str = ""
    data: dict[str, Dataset] = field(default_factory=dict)
    # Every generation of a data set: (key, seconds); a set dropped and needed again is
    # generated again, the same files, which shows whether file creation slowed down.
    generations: list[tuple[str, float]] = field(default_factory=list)
    log_count: int = 0

    # -- helpers ---------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, name: str) -> Path:
        self.log_count += 1
        folder = self.scratch / "logs"
        folder.mkdir(exist_ok=True)
        return folder / f"{self.log_count:03d}-{name}.log"

    def generation(self) -> dict[str, float]:
        """Seconds each data set took to generate, the last time it was."""
        return dict(self.generations)

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def dataset(self, key: str) -> Dataset:
        if key in self.data:
            return self.data[key]
        s = self.sizes
        root = self.scratch / "data"
        started = time.monotonic()
        self.say(f"  generating data set {key} ...")
        if key == "empty":
            (root / "empty").mkdir(parents=True, exist_ok=True)
            ds = Dataset("empty", root / "empty", 0, 0)
        elif key == "small":
            ds = datasets.small_files(root / "small", s.small_files, s.small_size,
                                      s.small_folders)
        elif key == "wansmall":
            if s.wan_small_files == s.small_files:
                ds = self.dataset("small")
            else:
                ds = datasets.small_files(root / "wansmall", s.wan_small_files, s.small_size,
                                          max(1, min(s.small_folders, s.wan_small_files // 20)))
        elif key == "medium":
            ds = datasets.big_files(root / "medium", s.medium_files, s.medium_size)
        elif key == "large":
            ds = datasets.big_files(root / "large", 1, s.large_size, seed=4)
        elif key == "tree":
            ds = datasets.file_tree(root / "tree" / "a", s.tree_files)
        elif key == "scan":
            part_a = self.dataset("tree")
            more = s.scan_files - part_a.files
            parts = [part_a]
            if more > 0:
                parts.append(datasets.file_tree(root / "tree" / "b", more,
                                                first_folder=part_a.files // 1000, seed=5))
            ds = datasets.combined("scan", root / "tree", parts)
        else:
            raise ValueError(key)
        run_sync()
        took = round(time.monotonic() - started, 2)
        self.generations.append((key, took))
        self.say(f"  data set {key}: {ds.describe()} in {took:.1f} s")
        self.data[key] = ds
        return ds

    def drop_unneeded(self, todo: list[Case]) -> None:
        """Remove data sets no remaining case uses (a big tree takes long to delete)."""
        needed = {c.data for c in todo}
        if "scan" in needed:
            needed.add("tree")
        keep = [self.data[k].path for k in needed if k in self.data]
        for key, ds in list(self.data.items()):
            if key in needed:
                continue
            del self.data[key]
            if not any(ds.path == p or ds.path in p.parents or p in ds.path.parents
                       for p in keep):
                if ds.files > 1000:
                    self.set_aside(ds.path)
                else:
                    subprocess.run(["rm", "-rf", str(ds.path)], check=False)

    def port(self, case: Case) -> int:
        assert self.sshd is not None
        if case.link == "wan":
            assert self.proxy is not None
            return self.proxy.ports[self.sshd.port]
        return self.sshd.port

    def write_config(self, case: Case, src: Path, dst: Path, inventory: Path) -> Path:
        if case.remote:
            assert self.sshd is not None
            key = f"ssh://{self.sshd.user}@127.0.0.1:{self.port(case)}{dst}"
        else:
            key = str(dst)
        lines = [
            "[inventory]", f"path = {json.dumps(str(inventory))}", "",
            "[origins.bench]", f"path = {json.dumps(str(src))}", "settle_seconds = 0", "",
            f"[replicas.{json.dumps(key)}]", 'name = "bench"', 'layout = "{relpath}"',
        ]
        if case.remote:
            assert self.sshd is not None
            lines += [f"identity_file = {json.dumps(str(self.sshd.client_key))}",
                      f"known_hosts = {json.dumps(str(self.sshd.known_hosts))}"]
        path = self.scratch / "cfg" / f"{case.name}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def rsync_argv(self, case: Case, src: Path, dst: Path, dry_run: bool = False) -> list[str]:
        argv = ["rsync", "-a"]
        if case.whole:
            argv.append("-W")
        if dry_run:
            argv.append("-n")
        if case.remote:
            assert self.sshd is not None
            argv += ["-e", self.sshd.rsync_rsh(self.port(case)),
                     f"{src}/", f"{self.sshd.user}@127.0.0.1:{dst}/"]
        else:
            argv += [f"{src}/", f"{dst}/"]
        return argv

    def timeout(self, remaining_cases: int) -> float:
        later = remaining_cases * (20.0 if not self.args.quick else 3.0)
        return min(float(self.args.run_timeout), self.remaining() - self.reserve - later)

    # -- setup ------------------------------------------------------------------------------

    def start_ssh(self, need_wan: bool) -> None:
        sshd = Sshd(self.scratch / "ssh")
        try:
            sshd.start()
            self.sshd = sshd
            self.ssh_info = sshd.probe()
        except (SshdUnavailable, subprocess.SubprocessError, OSError) as exc:
            self.ssh_skip = f"sshd unavailable: {exc}"
            return
        self.say(f"  sshd on 127.0.0.1:{sshd.port}; ssh cipher {self.ssh_info['cipher']}")
        # Does this replicator support ssh:// replicas? `replicator check` against the sshd.
        probe_dst = self.scratch / "dst" / "probe"
        probe_dst.mkdir(parents=True, exist_ok=True)
        probe_src = self.scratch / "data" / "probe"
        probe_src.mkdir(parents=True, exist_ok=True)
        case = Case("ssh-probe", "", "copy", "", "ssh", "", 0)
        cfg = self.write_config(case, probe_src, probe_dst, self.scratch / "inv" / "probe.db")
        (self.scratch / "inv").mkdir(exist_ok=True)
        log = self.log("replicator-ssh-check")
        result = run_tool([self.replicator, "-q", "-c", str(cfg), "check"], log, 60)
        if result.returncode != 0:
            lines = [ln for ln in result.tail(10).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit status {result.returncode}"
            self.ssh_skip = f"replicator cannot use ssh:// replicas here: {why}"
            return
        if need_wan:
            try:
                self.proxy = start_and_check(0.05, [sshd.port], self.log("delayproxy"),
                                             self.sizes.stream_bytes)
            except (ProxyUnusable, OSError, ValueError) as exc:
                self.wan_skip = f"delay proxy unusable: {exc}"
                return
            sshd.trust(self.proxy.ports[sshd.port])
            c = self.proxy.check
            self.say(f"  delay proxy: +{c['added_latency_each_way_s'] * 1e3:.1f} ms each way,"
                     f" raw stream {c['stream_MBps']:.0f} MB/s")

    # -- cases ------------------------------------------------------------------------------

    def run_case(self, case: Case, todo_after: int, case_budget: float) -> Outcome:
        out = Outcome(case)
        if case.remote and self.ssh_skip:
            out.status, out.reason = "skipped", self.ssh_skip
            return out
        if case.link == "wan" and self.wan_skip:
            out.status, out.reason = "skipped", self.wan_skip
            return out
        case_end = time.monotonic() + case_budget
        if self.timeout(todo_after) < 5:
            out.status, out.reason = "incomplete", "deadline reached before the case started"
            return out
        ds = self.dataset(case.data)
        out.dataset = {"files": ds.files, "bytes": ds.bytes, "description": ds.describe(),
                       "generation_s": self.generation().get(case.data)}
        if case.kind in ("copy", "start"):
            self.copy_case(case, ds, out, todo_after, case_end)
        elif case.kind == "nochange":
            self.nochange_case(case, ds, out, todo_after, case_end)
        else:
            self.scan_case(case, ds, out, todo_after)
        return out

    def record(self, out: Outcome, tool: str, label: str, result: RunResult,
               problems: list[str], compared: int | None,
               copied: int | None = None) -> dict[str, Any]:
        run = {
            "tool": tool, "label": label, "argv": result.argv,
            "seconds": round(result.seconds, 4), "tool_seconds": round(result.tool_seconds, 4),
            "sync_seconds": round(result.sync_seconds, 4), "rss_kib": result.rss_kib,
            "rss_source": result.rss_source,
            "returncode": result.returncode, "timed_out": result.timed_out,
            "problems": problems, "content_compared_files": compared, "copied": copied,
            "ok": result.returncode == 0 and not problems,
        }
        if not run["ok"]:
            run["log_tail"] = result.tail(15)
        out.runs.append(run)
        state = "ok" if run["ok"] else ("TIMEOUT" if result.timed_out else "FAILED")
        self.say(f"    {label:<34} {result.seconds:8.2f} s  rss {result.rss_kib / 1024:7.1f} MiB"
                 f"  {state}")
        if result.timed_out:
            out.status = "incomplete"
            out.reason = f"{tool} run cut at the time limit ({result.seconds:.0f} s)"
        elif not run["ok"]:
            out.status = "failed"
            why = problems[0] if problems else f"exit status {result.returncode}"
            tail = result.tail(3).replace("\n", " | ")
            out.reason = f"{tool}: {why}" + (f" ({tail})" if tail and not problems else "")
        return run

    def reset(self, dst: Path, inventory: Path, files: int = 0) -> None:
        """A fresh, empty destination and no inventory.

        A tree of many files is moved aside, not deleted: on ext4 without a journal (these
        machines) the kernel skips inodes freed in the last 60 to 360 s when it allocates
        new ones (``recently_deleted()``), one buffer lookup each, so a run that followed the
        deletion of 20,000 files spent seconds in file creation: more for a slower tool, and
        by how much depended on the run before. The scratch folder goes at the end.
        """
        if dst.exists() and files > 1000:
            self.set_aside(dst)
        subprocess.run(["rm", "-rf", str(dst)], check=True)
        dst.mkdir(parents=True)
        for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
            with suppress(FileNotFoundError):
                os.unlink(f"{inventory}{suffix}")
        run_sync()

    def set_aside(self, path: Path) -> None:
        """Move a tree of many files out of the way, to be removed at the end (see reset)."""
        trash = self.scratch / "trash"
        trash.mkdir(exist_ok=True)
        try:
            path.rename(trash / f"{len(list(trash.iterdir()))}-{path.name}")
        except FileNotFoundError:
            pass  # already gone (with a data set that contained it)

    def copy_case(self, case: Case, ds: Dataset, out: Outcome, todo_after: int,
                  case_end: float) -> None:
        dst = self.scratch / "dst" / case.name
        inventory = self.scratch / "inv" / f"{case.name}.db"
        inventory.parent.mkdir(exist_ok=True)
        cfg = self.write_config(case, ds.path, dst, inventory)
        expected = snapshot(ds.path)
        argv = {RSYNC: self.rsync_argv(case, ds.path, dst),
                REPLICATOR: [self.replicator, "-q", "-c", str(cfg), "sync", "--once"]}
        pair_seconds = 0.0
        for i in range(self.args.repeat):
            if i and time.monotonic() + pair_seconds > case_end:
                out.notes.append(f"{i} of {self.args.repeat} repeats (time budget)")
                break
            pair_started = time.monotonic()
            for tool in (RSYNC, REPLICATOR):
                timeout = self.timeout(todo_after)
                if timeout < 5:
                    out.status, out.reason = "incomplete", "deadline reached"
                    return
                self.reset(dst, inventory, ds.files)
                result = run_tool(argv[tool], self.log(f"{case.name}-{tool}"), timeout)
                problems: list[str] = []
                compared = None
                if result.returncode == 0:
                    problems, compared = compare_trees(ds.path, dst, 1, expected)
                copied = _copied(result) if tool == REPLICATOR else None
                run = self.record(out, tool, f"{tool} #{i + 1}", result, problems, compared,
                                  copied)
                if not run["ok"]:
                    return
            pair_seconds = time.monotonic() - pair_started

    def nochange_case(self, case: Case, ds: Dataset, out: Outcome, todo_after: int,
                      case_end: float) -> None:
        dst = self.scratch / "dst" / case.name
        inventory = self.scratch / "inv" / f"{case.name}.db"
        inventory.parent.mkdir(exist_ok=True)
        cfg = self.write_config(case, ds.path, dst, inventory)
        every = max(1, ds.files // 2000)  # content of a sample; names, sizes, mtimes of all
        expected = snapshot(ds.path)
        sync_argv = [self.replicator, "-q", "-c", str(cfg), "sync", "--once"]
        argv = {RSYNC: self.rsync_argv(case, ds.path, dst), REPLICATOR: sync_argv}
        # Warm-up (not timed as a result): replicator copies everything and records it in its
        # inventory, then rsync finds only folder times to set. Both now have nothing to do.
        self.reset(dst, inventory)
        for tool in (REPLICATOR, RSYNC):
            timeout = self.timeout(todo_after)
            if timeout < 5:
                out.status, out.reason = "incomplete", "deadline reached"
                return
            result = run_tool(argv[tool], self.log(f"{case.name}-warmup-{tool}"), timeout)
            problems: list[str] = []
            compared: int | None = None
            if result.returncode == 0:
                problems, compared = compare_trees(ds.path, dst, every, expected)
            copied = _copied(result) if tool == REPLICATOR else None
            label = ("replicator warm-up (initial copy)" if tool == REPLICATOR
                     else "rsync warm-up (folder times)")
            run = self.record(out, tool, label, result, problems,
                              compared, copied)
            run["warmup"] = True
            run["ok"] = False  # not a timed result
            if result.returncode != 0 or problems:
                return
        pair_seconds = 0.0
        for i in range(self.args.repeat):
            if i and time.monotonic() + pair_seconds > case_end:
                out.notes.append(f"{i} of {self.args.repeat} repeats (time budget)")
                break
            pair_started = time.monotonic()
            for tool in (RSYNC, REPLICATOR):
                timeout = self.timeout(todo_after)
                if timeout < 5:
                    out.status, out.reason = "incomplete", "deadline reached"
                    return
                run_sync()
                result = run_tool(argv[tool], self.log(f"{case.name}-{tool}"), timeout)
                problems, compared = [], None
                copied = _copied(result) if tool == REPLICATOR else None
                if result.returncode == 0:
                    problems, compared = compare_trees(ds.path, dst, every, expected)
                    if copied:
                        problems.append(f"replicator copied {copied} files in a no-change run")
                run = self.record(out, tool, f"{tool} #{i + 1}", result, problems, compared,
                                  copied)
                if not run["ok"]:
                    return
            pair_seconds = time.monotonic() - pair_started

    def scan_case(self, case: Case, ds: Dataset, out: Outcome, todo_after: int) -> None:
        dst = self.scratch / "dst" / case.name
        inventory = self.scratch / "inv" / f"{case.name}.db"
        inventory.parent.mkdir(exist_ok=True)
        cfg = self.write_config(case, ds.path, dst, inventory)
        self.reset(dst, inventory)
        scan = [self.replicator, "-q", "-c", str(cfg), "scan"]
        steps: list[tuple[str, str, list[str]]] = [
            (REPLICATOR, "replicator scan (new inventory)", scan),
            (REPLICATOR, "replicator scan (warm inventory)", scan),
            (RSYNC, "rsync -a -n (reference)",
             self.rsync_argv(case, ds.path, dst, dry_run=True)),
        ]
        for tool, label, argv in steps:
            timeout = self.timeout(todo_after)
            if timeout < 5:
                out.status, out.reason = "incomplete", "deadline reached"
                return
            result = run_tool(argv, self.log(f"{case.name}-{tool}"), timeout)
            problems: list[str] = []
            if tool == REPLICATOR and result.returncode == 0:
                counts = _scan_counts(result)
                want_new = ds.files if "new inventory" in label else 0
                if counts is None:
                    problems.append("no scan summary in replicator's output")
                elif counts[0] != want_new or sum(counts) != ds.files:
                    problems.append(f"scan counted {counts} (new, changed, deleted, unchanged),"
                                    f" expected {want_new} new of {ds.files}")
            run = self.record(out, tool, label, result, problems, None)
            if not run["ok"]:
                return


def _copied(result: RunResult) -> int | None:
    try:
        m = re.search(r"copied (\d+) files", result.log.read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _scan_counts(result: RunResult) -> tuple[int, int, int, int] | None:
    text = result.log.read_text(errors="replace")
    m = re.search(r"(\d+) new, (\d+) changed, (\d+) deleted, (\d+) unchanged", text)
    if not m:
        return None
    a, b, c, d = (int(x) for x in m.groups())
    return a, b, c, d


# --- summaries -------------------------------------------------------------------------------


def summarize(out: Outcome) -> dict[str, Any]:
    """Per tool (or per step for the scan case): median/min/max, rates, RSS; the ratio."""
    files, size = out.dataset.get("files", 0), out.dataset.get("bytes", 0)
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in out.runs:
        if run.get("warmup") or not run["ok"]:
            continue
        key = run["label"] if out.case.kind == "scan" else run["tool"]
        groups.setdefault(key, []).append(run)
    for key, runs in groups.items():
        times = [r["seconds"] for r in runs]
        median = statistics.median(times)
        rows[key] = {
            "runs": len(times), "median_s": round(median, 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "files_per_s": round(files / median, 1) if median > 0 and files else None,
            "MB_per_s": (round(size / median / 1e6, 1)
                         if median > 0 and out.case.kind == "copy" else None),
            "peak_rss_MiB": round(max(r["rss_kib"] for r in runs) / 1024, 1),
        }
    ratio: float | None = None
    paired = _paired_ratio(out)
    bound = ""
    met: bool | None = None
    case = out.case
    if case.kind == "scan":
        fresh = rows.get("replicator scan (new inventory)")
        warm = rows.get("replicator scan (warm inventory)")
        peaks = [r["peak_rss_MiB"] * MiB / 1e6 for r in (fresh, warm) if r]
        if peaks:
            ratio = round(max(peaks), 1)  # MB
            met = ratio < case.goal
    elif RSYNC in rows and REPLICATOR in rows:
        r, p = rows[RSYNC]["median_s"], rows[REPLICATOR]["median_s"]
        ratio = round(p / r if case.kind in ("nochange", "start") else r / p, 3)
        if case.kind == "start":
            met = None  # informational: no target
        else:
            # Met only when the pairs agree: a ratio of medians taken across a change of
            # the disk's speed within the case (seen in runs P and Q) is not a result.
            met = all(x <= case.goal if case.kind == "nochange" else x >= case.goal
                      for x in (ratio, paired) if x is not None)
    elif RSYNC in rows and out.status == "incomplete":
        cut = [x for x in out.runs if x["tool"] == REPLICATOR and x["timed_out"]]
        if cut and case.kind == "copy":
            bound = f"< {rows[RSYNC]['median_s'] / cut[0]['seconds']:.3f}"
            met = False
    return {"tools": rows, "ratio": ratio, "ratio_bound": bound, "target_met": met,
            "ratio_paired": paired}


def _paired_ratio(out: Outcome) -> float | None:
    """The median of the ratios of each rsync run and the replicator run right after it
    (the same repeat): a disk that changes speed during a case moves both runs of a pair, so
    this tells a ratio of medians taken across two states of the machine from a real one."""
    if out.case.kind == "scan":
        return None
    timed = {r["label"]: r["seconds"] for r in out.runs
             if r["ok"] and not r.get("warmup") and r["seconds"] > 0}
    ratios = []
    for label, seconds in timed.items():
        if label.startswith(f"{RSYNC} #"):
            mine = timed.get(label.replace(RSYNC, REPLICATOR, 1))
            if mine is not None:
                ratios.append(mine / seconds if out.case.kind in ("nochange", "start")
                              else seconds / mine)
    return round(statistics.median(ratios), 3) if ratios else None


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render(outcomes: list[Outcome], summaries: list[dict[str, Any]]) -> str:
    lines = ["| case | data | tool | runs | median s | min s | max s | files/s | MB/s"
             " | peak RSS MiB |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for out, summ in zip(outcomes, summaries, strict=True):
        data = out.dataset.get("description", "-")
        if not summ["tools"]:
            lines.append(f"| {out.case.name} | {data} | {out.status}: {out.reason} |"
                         " | | | | | | |")
            continue
        for tool, row in summ["tools"].items():
            lines.append(
                f"| {out.case.name} | {data} | {tool} | {row['runs']} | {_fmt(row['median_s'])}"
                f" | {_fmt(row['min_s'])} | {_fmt(row['max_s'])}"
                f" | {_fmt(row['files_per_s'], 0)} | {_fmt(row['MB_per_s'], 1)}"
                f" | {_fmt(row['peak_rss_MiB'], 1)} |")
    lines += ["", "| case | what | ratio replicator/rsync | median of pair ratios | target"
              " | met |", "|---|---|--:|--:|---|---|"]
    for out, summ in zip(outcomes, summaries, strict=True):
        case = out.case
        if summ["ratio"] is not None:
            unit = (" MB peak RSS" if case.kind == "scan"
                    else "x time" if case.kind in ("nochange", "start") else "x throughput")
            ratio = f"{summ['ratio']:.2f}{unit}"
        elif summ["ratio_bound"]:
            ratio = f"{summ['ratio_bound']}x throughput"
        else:
            ratio = f"{out.status}: {out.reason}" if out.status != "ok" else "-"
        met = {True: "yes", False: "no", None: "-"}[summ["target_met"]]
        status = "" if out.status == "ok" or summ["ratio"] is None else f" ({out.status})"
        paired = "-" if summ.get("ratio_paired") is None else f"{summ['ratio_paired']:.2f}x"
        lines.append(f"| {case.name} | {case.title} | {ratio}{status} | {paired}"
                     f" | {case.target} | {met} |")
    for name, value in less_start_up(outcomes, summaries).items():
        lines.append(f"| {name} | {value['title']} | {value['ratio']:.2f}x throughput | -"
                     " | informational | - |")
    return "\n".join(lines)


def less_start_up(outcomes: list[Outcome], summaries: list[dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    """The small-file ratios without each tool's fixed cost: (rsync's median on the small
    files less its median on an empty origin) over (the same for replicator), where both
    start-up cases and their copy case ran. Medians of different runs: an estimate."""
    tools = {o.case.name: s["tools"] for o, s in zip(outcomes, summaries, strict=True)}
    derived: dict[str, dict[str, Any]] = {}
    for copy, start, title in (("small-local", "start-local", "(1) less start-up"),
                               ("small-ssh", "start-ssh", "(2) less start-up")):
        full, empty = tools.get(copy, {}), tools.get(start, {})
        if not all(t in full and t in empty for t in (RSYNC, REPLICATOR)):
            continue
        parts = {t: full[t]["median_s"] - empty[t]["median_s"] for t in (RSYNC, REPLICATOR)}
        if min(parts.values()) <= 0:
            continue
        derived[f"{copy}-less-start"] = {
            "title": title, "ratio": round(parts[RSYNC] / parts[REPLICATOR], 3),
            "rsync_s": round(parts[RSYNC], 3), "replicator_s": round(parts[REPLICATOR], 3)}
    return derived


# --- environment ----------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first ``name: value`` line of a /proc file; None without one."""
    with suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def environment(replicator: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip() != ""
    kib = _proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(kib.split()[0]) // 1024 // 1024} GiB" if kib else "unknown"
    # Machines of one kind differ in CPU, and the small-file ratios with it (rsync's runs
    # are mostly system calls, ours partly Python): say which one ran.
    cpu = _proc_field("/proc/cpuinfo", "model name") or "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "cpu": cpu, "memory": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "rsync": _first_line(["rsync", "--version"]),
        "ssh": _first_line(["ssh", "-V"]),
        "replicator": _first_line([replicator, "--version"]),
        "commit": commit + ("+uncommitted changes" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


# --- main -------------------------------------------------------------------------------------


@contextmanager
def _signals() -> Iterator[None]:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C cleans up too, even when started from a shell that ignores SIGINT in the
    # background (Python then installs no handler of its own).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="replicator against rsync on the same data, side by side (issue 4).")
    parser.add_argument("--quick", action="store_true",
                        help="small data, 2 repeats, at most 3 minutes (a smoke test)")
    parser.add_argument("--cases", nargs="+", choices=CASE_NAMES, metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASE_NAMES)}")
    parser.add_argument("--repeat", type=int, help="runs per tool and case (default 5; quick 2)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="results file (default benchmarks/results/latest-MODE.json)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="global deadline (default 1800; quick 180), clean-up included")
    parser.add_argument("--run-timeout", type=float, metavar="SECONDS",
                        help="time limit of one tool run (default 900; quick 60)")
    parser.add_argument("--scratch", type=Path, metavar="DIR",
                        help="where the scratch folder is made (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--replicator", metavar="PATH",
                        help="replicator command (default: the one next to this Python)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    # Five: runs on these machines fall into a fast and a slow mode (rsync's small-local
    # took 1.25 to 1.98 s within one case), and a median of three lands on either.
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.budget = args.budget or (180.0 if args.quick else 1800.0)
    args.run_timeout = args.run_timeout or (60.0 if args.quick else 900.0)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _find_replicator(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / "replicator"
    if beside.exists():
        return str(beside)
    found = shutil.which("replicator")
    if not found:
        raise SystemExit("replicator not found: install it (make) or pass --replicator")
    return found


_PLAIN_INSTALL = """\
import json, os, sysconfig
import replicator
paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
package = os.path.dirname(os.path.realpath(replicator.__file__))
print(json.dumps({"editable": not any(package.startswith(os.path.realpath(p) + os.sep)
                                      for p in paths),
                  "source": os.path.dirname(package), "site": paths}))
"""

_SCRIPT = """#!{python}
import re
import sys
from replicator._early import run
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(run())
"""


def plain_install(replicator: str, folder: Path) -> tuple[str, str]:
    """The ``replicator`` command as a wheel installs it, for an editable install: a
    private venv in ``folder`` whose site-packages lists the checkout and the installed
    dependencies, and a console script as pip writes it. An editable install's import
    finder (a .pth file that imports it) costs every Python start about 11 ms, the command
    and each copy helper, which no user who installs the package pays. The same files run:
    the checkout's package, with its extension built in place. Returns (command, what was
    done); the given command if it is not an editable install or anything fails."""
    try:
        python = _script_python(replicator)
        found = subprocess.run([*python, "-c", _PLAIN_INSTALL], capture_output=True,
                               text=True, timeout=60, check=True, cwd=folder.parent)
        info = json.loads(found.stdout)
        if not info["editable"]:
            return replicator, "as installed (not editable)"
        subprocess.run([*python, "-m", "venv", "--without-pip", str(folder)],
                       capture_output=True, timeout=120, check=True)
        venv_python = folder / "bin" / "python"
        purelib = subprocess.run(
            [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        # Directories named in a .pth file are added to the path, but the .pth files in
        # them are not run: the editable finder stays out.
        Path(purelib, "replicator-bench.pth").write_text(
            "\n".join([info["source"], *info["site"]]) + "\n")
        script = folder / "bin" / "replicator"
        script.write_text(_SCRIPT.format(python=venv_python))
        script.chmod(0o755)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        return replicator, f"editable install as it is (no plain layout: {exc})"
    return str(script), f"plain layout of the editable install in {folder}"


def _script_python(replicator: str) -> list[str]:
    """The interpreter a console script runs with (its "#!" line), else this Python."""
    with open(shutil.which(replicator) or replicator, "rb") as script:
        first = script.readline()
    # "#!/path/python" or "#!/usr/bin/env python3"; anything else: this Python.
    return shlex.split(first[2:].decode()) if first.startswith(b"#!") else [sys.executable]


def _byte_compile(replicator: str) -> str:
    """Byte-compile the package the ``replicator`` script imports, as pip does when it
    installs a wheel. Under PYTHONDONTWRITEBYTECODE (set on these machines) an editable
    install is otherwise compiled from source at every start: 29 modules, about 70 ms of
    each run. Returns what was done, for the results' metadata."""
    try:
        python = _script_python(replicator)
        done = subprocess.run(
            [*python, "-c", "import compileall, os, replicator; print(compileall.compile_dir("
             "os.path.dirname(replicator.__file__), quiet=1))"],
            capture_output=True, text=True, timeout=120)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    if done.returncode or done.stdout.strip() != "True":
        return f"failed: {(done.stderr or done.stdout).strip()[-200:]}"
    return f"compiled with {' '.join(python)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if not shutil.which("rsync"):
        print("rsync is not installed (apt-get install rsync)", file=sys.stderr)
        return 2
    replicator = _find_replicator(args.replicator)
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    sizes = QUICK if args.quick else FULL
    parent = args.scratch or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="replicator-bench-", dir=parent))
    replicator, installed = plain_install(replicator, scratch / "install")
    bench = Bench(args, sizes, scratch, started + args.budget, replicator,
                  reserve=15.0 if args.quick else 90.0)
    mode = "quick" if args.quick else "full"
    meta = environment(replicator)
    meta["install"] = installed
    meta["byte_compiled"] = _byte_compile(replicator)
    meta.update({"mode": mode, "repeat": args.repeat, "budget_s": args.budget,
                 "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
                 "scratch": str(scratch)})
    outcomes: list[Outcome] = []
    code = 0
    try:
        with _signals():
            bench.say(f"benchmarks ({mode}): scratch {scratch}, deadline {args.budget:.0f} s")
            if any(c.remote for c in cases):
                bench.start_ssh(need_wan=any(c.link == "wan" for c in cases))
                if bench.ssh_skip:
                    bench.say(f"  SSH cases skipped: {bench.ssh_skip}")
                elif bench.wan_skip:
                    bench.say(f"  wide-area cases skipped: {bench.wan_skip}")
            for index, case in enumerate(cases):
                later = cases[index + 1:]
                weights = sum(c.weight for c in cases[index:])
                budget = max(0.0, bench.remaining() - bench.reserve) * case.weight / weights
                bench.say(f"{case.name}: {case.title} (budget {budget:.0f} s)")
                outcome = bench.run_case(case, len(later), budget)
                if outcome.status == "skipped":
                    bench.say(f"  skipped: {outcome.reason}")
                outcomes.append(outcome)
                bench.drop_unneeded(later)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc}); cleaning up", file=sys.stderr)
        code = 130
    finally:
        _cleanup(bench)
    if code:
        return code
    summaries = [summarize(o) for o in outcomes]
    meta["loadavg_end"] = os.getloadavg()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    table = render(outcomes, summaries)
    print(table)
    print(f"\n{mode} run: {meta['elapsed_s']:.0f} s, {meta['date']}, {meta['cpus']} CPUs"
          f" ({meta['cpu']}), load average {meta['loadavg_start'][0]:.2f} at start,"
          f" {meta['loadavg_end'][0]:.2f} at end; {bench.ssh_info.get('ssh_version', '')}"
          f" cipher {bench.ssh_info.get('cipher', '-')}")
    if bench.proxy is not None:
        c = bench.proxy.check
        print(f"delay proxy: +{c['added_latency_each_way_s'] * 1e3:.1f} ms each way (set"
              f" {c['delay_set_s'] * 1e3:.0f} ms), raw stream {c['stream_MBps']:.0f} MB/s"
              f" ({c['stream_bytes'] / MiB:.0f} MiB)")
    for out in outcomes:
        for note in out.notes:
            print(f"note: {out.case.name}: {note}")
    slow_creation = creation_notes(bench.generations)
    for note in slow_creation:
        print(f"note: {note}")
    document = {
        "meta": meta, "ssh": bench.ssh_info, "ssh_skip": bench.ssh_skip,
        "wan_skip": bench.wan_skip,
        "delay_proxy": bench.proxy.check if bench.proxy is not None else None,
        "data_generation_s": bench.generation(),
        "data_generations": bench.generations,
        "creation_notes": slow_creation,
        "cases": [{"name": o.case.name, "title": o.case.title, "kind": o.case.kind,
                   "link": o.case.link, "target": o.case.target, "status": o.status,
                   "reason": o.reason, "dataset": o.dataset, "notes": o.notes,
                   "summary": s, "runs": o.runs}
                  for o, s in zip(outcomes, summaries, strict=True)],
        "less_start_up": less_start_up(outcomes, summaries),
        "table_markdown": table,
    }
    path = args.json or Path(__file__).resolve().parent / "results" / f"latest-{mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {path}")
    statuses = {o.status for o in outcomes}
    if "failed" in statuses:
        return 1
    if "incomplete" in statuses:
        return 3
    return 0


def creation_notes(generations: Sequence[tuple[str, float]], factor: float = 3.0) -> list[str]:
    """A warning for each data set generated more than once (the same files each time) whose
    slowest generation took over ``factor`` times its fastest: file creation itself was
    slow for part of the run, and the small-file cases that ran then with it. On ext4
    without a journal, large deletions shortly before do this (benchmarks/README.md)."""
    times: dict[str, list[float]] = {}
    for key, took in generations:
        times.setdefault(key, []).append(took)
    notes = []
    for key, each in times.items():
        if len(each) > 1 and max(each) > factor * max(min(each), 0.05):
            listed = ", ".join(f"{t:.1f} s" for t in each)
            notes.append(f"data set {key} took {listed} to create, the same files each time:"
                         f" file creation was slow for part of this run (large deletions"
                         f" just before it?); small-file ratios of that part are disturbed")
    return notes


def _cleanup(bench: Bench) -> None:
    previous: Callable[[int, FrameType | None], Any] | int | None = signal.signal(
        signal.SIGINT, signal.SIG_IGN)  # clean-up is short and bounded: finish it
    try:
        kill_running()
        if bench.proxy is not None:
            bench.proxy.stop()
        if bench.sshd is not None:
            bench.sshd.stop()
        if bench.args.keep:
            bench.say(f"scratch kept: {bench.scratch}")
        else:
            bench.say("removing the scratch folder ...")
            subprocess.run(["rm", "-rf", str(bench.scratch)], check=False)
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
