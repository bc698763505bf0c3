"""The benchmark probes that are not cases (``benchmarks/README.md``) keep working."""

from __future__ import annotations

import pytest

from benchmarks import run, startup


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


def test_a_data_set_created_much_slower_once_than_again_is_reported() -> None:
    notes = run.creation_notes([("small", 9.9), ("tree", 4.0), ("small", 0.7),
                                ("medium", 3.0), ("medium", 2.5)])
    assert len(notes) == 1
    assert notes[0].startswith("data set small took 9.9 s, 0.7 s to create")
    assert run.creation_notes([("small", 0.02), ("small", 0.001)]) == []  # both instant
