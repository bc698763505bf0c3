"""How much of a copy helper's time is Python: its batch writer (as installed, with the C
accelerator where it was built, and on its Python path alone) against the same system calls
made by a loop in C, on the same small files (an input to issue 4's decisions).

    .venv/bin/python -m benchmarks.copyloop [--files 10000] [--repeat 3] [--scratch DIR]

Each run copies every file into a new folder in batches of 800, as a helper does: stage
(open the source, fstat, create the temp file, copy_file_range, fchmod, futimens, close),
syncfs, commit (stat the source, rename), syncfs, verify (stat). Runs alternate, each in
its own process; the table gives medians of wall, user and system time. Needs a C compiler
(cc) for the C side. Destination trees are set aside and removed at the end (see README.md
on recently freed inodes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import datasets

_C_LOOP = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
typedef struct { char src[4096]; char name[256]; char tmp[64]; int dfd; struct stat before; } item;
static double secs(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }
int main(int argc, char **argv) {
  const char *srcroot = argv[1], *dst = argv[2];
  int batch = atoi(argv[3]), cap = 1024, n = 0;
  item *items = malloc(cap * sizeof(item));
  mkdir(dst, 0755);
  int root = open(dst, O_RDONLY | O_DIRECTORY);
  DIR *top = opendir(srcroot); struct dirent *d;
  while ((d = readdir(top))) {
    if (d->d_name[0] == '.') continue;
    mkdirat(root, d->d_name, 0755);
    int dfd = openat(root, d->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    char path[4096]; snprintf(path, sizeof path, "%s/%s", srcroot, d->d_name);
    DIR *sub = opendir(path); struct dirent *e;
    while ((e = readdir(sub))) {
      if (e->d_name[0] == '.') continue;
      if (n == cap) items = realloc(items, (cap *= 2) * sizeof(item));
      if (items == NULL) return 1;
      snprintf(items[n].src, 4096, "%s/%s", path, e->d_name);
      snprintf(items[n].name, 256, "%s", e->d_name); items[n].dfd = dfd; n++;
    }
    closedir(sub);
  }
  closedir(top);
  struct timespec t0, t1; struct rusage r0, r1;
  clock_gettime(CLOCK_MONOTONIC, &t0); getrusage(RUSAGE_SELF, &r0);
  for (int b = 0; b < n; b += batch) {
    int end = b + batch < n ? b + batch : n;
    for (int i = b; i < end; i++) {
      item *it = &items[i];
      int s = open(it->src, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
      fstat(s, &it->before);
      snprintf(it->tmp, 64, ".~rep-c-%x.tmp", i);
      int t = openat(it->dfd, it->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
      copy_file_range(s, NULL, t, NULL, 8 << 20, 0);
      fchmod(t, it->before.st_mode & 01777);
      struct timespec ts[2] = {it->before.st_atim, it->before.st_mtim};
      futimens(t, ts);
      close(t); close(s);
    }
    syncfs(root);
    for (int i = b; i < end; i++) {
      struct stat st; stat(items[i].src, &st);
      renameat(items[i].dfd, items[i].tmp, items[i].dfd, items[i].name);
    }
    syncfs(root);
    for (int i = b; i < end; i++) {
      struct stat st; fstatat(items[i].dfd, items[i].name, &st, AT_SYMLINK_NOFOLLOW);
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1); getrusage(RUSAGE_SELF, &r1);
  printf("%d %.3f %.3f %.3f\n", n, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
         secs(r1.ru_utime) - secs(r0.ru_utime), secs(r1.ru_stime) - secs(r0.ru_stime));
  return 0;
}
"""

# The Python side: the copy helper's own writer, timed around its batches only.
_PY_LOOP = r"""
import os, resource, sys, time
from replicator._inventory._types import Kind
from replicator.transports._base import Progress, PutRequest
from replicator.transports._local_batch import BatchWriter
src, dst, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(dst)
requests = []
for folder in sorted(os.listdir(src)):
    for name in sorted(os.listdir(os.path.join(src, folder))):
        path = os.fsencode(os.path.join(src, folder, name))
        st = os.lstat(path)
        requests.append(PutRequest(path, os.fsencode(f"{folder}/{name}"), Kind.FILE,
                                   st.st_size, st.st_mtime_ns, 0o644))
writer = BatchWriter(os.fsencode(dst), True)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for start in range(0, len(requests), batch):
    results = []
    writer.put_batch(requests[start:start + batch], "py", Progress(), results)
    assert all(r.status.value == "copied" for r in results), results[:1]
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(len(requests), f"{t1 - t0:.3f}", f"{r1.ru_utime - r0.ru_utime:.3f}",
      f"{r1.ru_stime - r0.ru_stime:.3f}")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=800)
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args(argv)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("no C compiler (cc): apt-get install gcc", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="copyloop-", dir=args.scratch))
    try:
        src = scratch / "src"
        datasets.small_files(src, args.files, 4096, max(1, args.files // 200))
        binary = scratch / "cloop"
        (scratch / "cloop.c").write_text(_C_LOOP)
        subprocess.run([cc, "-O2", "-o", str(binary), str(scratch / "cloop.c")], check=True)
        # The batch writer as installed (with the accelerator where it was built), and on
        # its Python path alone.
        tools = {"BatchWriter": ([sys.executable, "-c", _PY_LOOP], "0"),
                 "BatchWriter, Python path": ([sys.executable, "-c", _PY_LOOP], "1"),
                 "C, same calls": ([str(binary)], "0")}
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
        for run in range(args.repeat):
            for index, (name, (argv_, pure)) in enumerate(tools.items()):
                dst = scratch / f"dst-{run}-{index}"
                subprocess.run(["sync"], check=True)
                env = dict(os.environ, REPLICATOR_PURE_PYTHON=pure)
                out = subprocess.run([*argv_, str(src), str(dst), str(args.batch)],
                                     capture_output=True, text=True, check=True,
                                     env=env).stdout
                files, wall, user, system = out.split()
                assert int(files) == args.files, out
                rows[name].append((float(wall), float(user), float(system)))
                print(f"  {name:26} run {run + 1}: {wall} s wall, {user} s user,"
                      f" {system} s system", file=sys.stderr)
        print(f"| {args.files:,} x 4 KiB, batches of {args.batch} | wall s | user s | system s |")
        print("|---|--:|--:|--:|")
        for name, values in rows.items():
            medians = [statistics.median(v[i] for v in values) for i in range(3)]
            print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
