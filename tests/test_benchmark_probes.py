"""The benchmark probes that are not cases (``benchmarks/README.md``) keep working."""

from __future__ import annotations

import pytest

from benchmarks import startup


def test_the_startup_probe_imports_every_step_and_reports_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert startup.main(["--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    data = rows[1:]  # after the header
    labels = [row.split(" | ")[0][2:] for row in data]
    assert labels[1:1 + len(startup.STEPS)] == [label for label, _ in startup.STEPS]
    # Every step took time and the total is their sum, to the rounding of the table.
    times = [float(row.rsplit("|", 2)[1]) for row in data]
    steps = times[1:1 + len(startup.STEPS)]
    assert all(t > 0 for t in steps)
    assert abs(sum(steps) - times[1 + len(startup.STEPS)]) < 0.1 * len(steps)
