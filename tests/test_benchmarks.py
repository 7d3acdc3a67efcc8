"""The README's Results section is generated from the committed benchmark JSON and must match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_match_the_committed_benchmark_json() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_benchmark_has_a_result_and_a_plot() -> None:
    for name in ("step_speed_cpu", "oscillation", "accuracy", "sweep_efficiency"):
        assert (REPO / "benchmarks" / "results" / f"{name}.json").is_file(), name
        assert (REPO / "docs" / f"{name}.png").is_file(), name
