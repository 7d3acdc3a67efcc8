"""The README's Results section is generated from the committed benchmark JSON and must match it; the
oscillation benchmark's measures and verdict, and their rendering, on hand-computed synthetic runs."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # a script folder, not a package

import oscillation  # noqa: E402
import report  # noqa: E402


def test_readme_results_match_the_committed_benchmark_json() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_every_benchmark_has_a_result_and_a_plot() -> None:
    for name in ("step_speed_cpu", "oscillation", "accuracy", "sweep_efficiency"):
        assert (REPO / "benchmarks" / "results" / f"{name}.json").is_file(), name
        assert (REPO / "docs" / f"{name}.png").is_file(), name


def _run(events_per_epoch: list[int], near: float, top1: float = 80.0) -> dict[str, Any]:
    """A run as oscillation.run_seed stores it: 100 weights (all fc1), 10 tracked steps per epoch."""
    probes = []
    for cumulative in itertools.accumulate(events_per_epoch):
        stats = {"oscillations": cumulative, "elements": 100, "near": near, "mean_freq": 1e-3, "flip_rate": 1e-2}
        probes.append({"steps": 10, "overall": stats, "kinds": {"fc1": dict(stats)}})
    return {"history": [{"val/top1": top1}] * len(probes), "probes": probes}


def _seed(seed: int) -> dict[str, Any]:
    # Two QAT epochs, then one: freq_qat = (e1 + e2) / (100 * 20), freq_last = e3 / (100 * 10).
    return {
        "fp_top1": 90.0,
        "runs": {
            oscillation.LSQ: _run([40 + 10 * seed, 20, 10], near=0.1),  # freq_qat 0.03, 0.035; / near 0.3, 0.35
            oscillation.STATSQ_NO_QKR: _run([30, 10, 10], near=0.05),  # 0.02; / near 0.4
            oscillation.STATSQ: _run([30, 10, 40], near=0.2),  # 0.02; / near 0.1; freq_last 0.04
            oscillation.OFQ: _run([30, 10, 2 + 6 * seed], near=0.2),  # freq_last 0.002, 0.008
        },
    }


def test_oscillation_measures_and_verdict_match_a_hand_computation() -> None:
    seeds = [_seed(0), _seed(1)]
    measures = {v.label: oscillation.variant_measures(seeds, v.label, qat_epochs=2) for v in oscillation.VARIANTS}
    lsq = measures[oscillation.LSQ]
    assert lsq["overall"]["freq_qat"]["runs"] == pytest.approx([0.03, 0.035])
    assert lsq["overall"]["freq_qat"]["mean"] == pytest.approx(0.0325)
    assert lsq["overall"]["freq_qat"]["std"] == pytest.approx(0.005 / 2**0.5)
    assert lsq["overall"]["freq_qat_norm"]["runs"] == pytest.approx([0.3, 0.35])
    assert lsq["overall"]["freq_last"]["runs"] == pytest.approx([0.01, 0.01])
    assert lsq["kinds"]["fc1"] == lsq["overall"]
    assert lsq["top1"] == {"mean": 80.0, "std": 0.0, "runs": [80.0, 80.0]}

    result = oscillation.verdict(measures)
    like_for_like = result["statsq_below_lsq_like_for_like"]
    raw, normalized = like_for_like["overall"]["freq_qat"], like_for_like["overall"]["freq_qat_norm"]
    assert (raw["outcome"], raw["lower_in"], raw["seeds"]) == ("holds", 2, 2)
    assert raw["ratio"]["runs"] == pytest.approx([0.02 / 0.03, 0.02 / 0.035])
    assert (normalized["outcome"], normalized["lower_in"]) == ("reversed", 0)
    assert like_for_like["kinds"]["fc1"]["freq_qat"]["outcome"] == "holds"
    assert result["statsq_qkr_below_lsq"]["overall"]["freq_qat_norm"]["outcome"] == "holds"
    cga = result["cga_about_zero"]
    assert cga["overall"]["freq_last"]["ratio"]["runs"] == pytest.approx([0.05, 0.2])
    assert cga["overall"]["freq_last"]["outcome"] == "holds" and cga["about_zero"] is False  # 0.2 > 0.1

    text = result["text"]
    assert len(text) == 3
    assert "raw holds: 2.00e-02 ± 0.00e+00 vs 3.25e-02 ± 3.54e-03" in text[0]
    assert "normalized by the share near a threshold does not hold (the reverse holds)" in text[0]
    assert text[2].startswith('"CGA drives oscillation to about 0"') and ": no: 5.00e-03 ± 4.24e-03 vs" in text[2]


def test_report_renders_the_oscillation_tables_and_verdict() -> None:
    seeds = [_seed(0), _seed(1)]
    measures = {v.label: oscillation.variant_measures(seeds, v.label, qat_epochs=2) for v in oscillation.VARIANTS}
    result = oscillation.verdict(measures)
    payload = {
        "schema": 2,
        "quick": True,
        "model": "vit_fmnist_small",
        "seeds": [0, 1],
        "epochs": {"fp": 1, "qat": 2, "cga": 1},
        "settings": {"near_width": 0.05},
        "variants": {v.label: dataclasses.asdict(v) for v in oscillation.VARIANTS},
        "fp_top1": oscillation.spread([90.0, 90.0]),
        "measures": measures,
        "verdict": result,
        "cga_trajectories": {"0.005": {"steps": [], "frozen_frac": [0.99], "top1": [80.0]}},
    }
    lines = report.oscillation_section(payload)
    text = "\n".join(lines)
    assert "`--quick`, vit_fmnist_small, 2 seeds" in text
    assert "continues the StatsQ + QKR row's QAT checkpoint" in text
    row = f"| {oscillation.LSQ} | 80.00 ± 0.00 | 3.25e-02 ± 3.54e-03 | 10.0 ± 0.0 % | 3.25e-01 ± 3.54e-02 |"
    assert any(line.startswith(row) for line in lines)
    # Per kind: the QAT table leaves out the CGA row (same QAT as StatsQ + QKR), the last-epoch one has it.
    headers = [line for line in lines if line.startswith("| kind |")]
    assert len(headers) == 2 and oscillation.OFQ not in headers[0] and oscillation.OFQ in headers[1]
    assert "| fc1 | 3.25e-02 ± 3.54e-03 (3.25e-01 ± 3.54e-02) |" in text
    assert [line[2:] for line in lines if line.startswith("- ")] == result["text"]
    assert "| 0.005 | 99.00 % | 80.00 | +nan % |" in text


def test_hypervolume_of_a_top1_vs_bytes_front_matches_a_hand_computation() -> None:
    import sweep_efficiency

    reference = (10.0, 200.0)
    # (top-1, bytes): 70 % at 50 B covers [50, 100) x (10, 70]; 80 % at 100 B covers [100, 200) x (10, 80];
    # the dominated (60 %, 60 B) adds nothing, nor does a point beyond the reference.
    points = [(80.0, 100.0), (70.0, 50.0), (60.0, 60.0), (90.0, 250.0)]
    assert sweep_efficiency.hypervolume(points, reference) == pytest.approx(50 * 60 + 100 * 70)
    assert sweep_efficiency.hypervolume([], reference) == 0.0
