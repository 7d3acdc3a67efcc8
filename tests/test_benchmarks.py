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


def _uniform(width: str, size: float, top1: float) -> dict[str, Any]:
    return {"top1": top1, "bytes": size, "config": {"quant.bits": width}}


def _mixed(size: float, top1: float, attn: str = "2/2") -> dict[str, Any]:
    return {
        "top1": top1,
        "bytes": size,
        "config": {"quant.layers.blocks.0.attn": attn, "quant.layers.blocks.0.mlp": "2/2"},
    }


# Uniform: W2A2 at 100 B (seeds 78, 79), W3A3 at 120 B (80.35, 79.95), W4A4 at 140 B (82, 81).
UNIFORM = [
    _uniform("2/2", 100, 78.0),
    _uniform("3/3", 120, 80.35),
    _uniform("4/4", 140, 82.0),
    _uniform("2/2", 100, 79.0),
    _uniform("3/3", 120, 79.95),
    _uniform("4/4", 140, 81.0),
]


def test_mixed_precision_targets_and_hypervolumes_match_a_hand_computation() -> None:
    import mixed_precision

    # 0.75 x W4A4 = 105 B: the best mixed point there is 80.0 (2 points short of W4A4's 82); at W3A3's
    # 120 B it is 80.85 = W3A3's 80.35 + 0.5 exactly (met); 84.0 at 121 B is over both limits; the 79.0 at
    # 110 B is dominated.
    mixed = [_mixed(105, 80.0, "3/3"), _mixed(120, 80.85, "4/4"), _mixed(121, 84.0), _mixed(110, 79.0)]
    result = mixed_precision.analyze(UNIFORM, mixed)

    widths = result["widths"]
    assert widths["2/2"] == {
        "bytes": 100,
        "top1": 79.0,
        "mean": 78.5,
        "std": pytest.approx(0.5**0.5),
        "runs": [78.0, 79.0],
    }
    assert (widths["3/3"]["top1"], widths["4/4"]["top1"]) == (80.35, 82.0)
    a, b = result["checks"]["w4a4_top1_at_75pct_bytes"], result["checks"]["w3a3_plus_0.5_at_its_bytes"]
    assert (a["max_bytes"], a["needed_top1"], a["mixed_top1"], a["margin"]) == (105, 82.0, 80.0, -2.0)
    assert (b["max_bytes"], b["needed_top1"], b["mixed_top1"]) == (120, 80.85, 80.85)
    assert b["margin"] == pytest.approx(0.0)
    assert result["targets"] == {"w4a4_top1_at_75pct_bytes": False, "w3a3_plus_0.5_at_its_bytes": True, "either": True}
    rows = {row["label"]: row for row in result["comparison"]}
    assert list(rows) == ["W2A2", "W3A3", "W4A4", "0.75 x W4A4"]
    assert rows["W2A2"]["mixed_top1"] is None and rows["W2A2"]["difference"] is None  # nothing at <= 100 B
    assert (rows["W4A4"]["mixed_top1"], rows["W4A4"]["difference"]) == (84.0, 2.0)
    assert rows["W3A3"]["mixed_widths"] == "attn 4, mlp 2"

    # Reference: top-1 10, 1.1 x 140 = 154 B. Uniform front 79 @ 100, 80.35 @ 120, 82 @ 140:
    # 20 x 69 + 20 x 70.35 + 14 x 72; mixed front 80 @ 105, 80.85 @ 120, 84 @ 121: 15 x 70 + 1 x 70.85 + 33 x 74.
    assert result["reference_point"] == {"top1": 10.0, "bytes": pytest.approx(154.0)}
    assert result["hypervolume"]["uniform"] == pytest.approx((20 * 69 + 20 * 70.35 + 14 * 72) / 2**20)
    assert result["hypervolume"]["mixed"] == pytest.approx((15 * 70 + 1 * 70.85 + 33 * 74) / 2**20)
    assert [(p["bytes"], p["top1"]) for p in result["fronts"]["mixed"]] == [(105, 80.0), (120, 80.85), (121, 84.0)]

    # bytes = 60 + 20 x bits: 60 of W4A4's 140 B are fixed; 105 B buys (105 - 60) / 20 = 2.25 bits.
    assert result["headroom"] == {
        "fixed_bytes": pytest.approx(60.0),
        "bytes_per_weight_bit": pytest.approx(20.0),
        "fixed_share_of_w4a4": pytest.approx(60 / 140),
        "bits_at_75pct_w4a4": pytest.approx(2.25),
        "bits_at_w3a3": pytest.approx(3.0),
        "w4a4_minus_w3a3_best": pytest.approx(82.0 - 80.35),
        "w4a4_minus_w3a3_mean": pytest.approx(81.5 - 80.15),
        "w3a3_margin": 0.5,
    }


def test_mixed_precision_byte_limits_are_inclusive_and_margins_exact() -> None:
    import mixed_precision

    # W4A4's 82.0 reached at exactly 75 % of its bytes: met (and so is W3A3 + 0.5 at its bytes).
    met = mixed_precision.analyze(UNIFORM, [_mixed(105, 82.0)])["targets"]
    assert met == {"w4a4_top1_at_75pct_bytes": True, "w3a3_plus_0.5_at_its_bytes": True, "either": True}
    # One byte over a limit does not count: 90.0 at 106 B is not within 75 % of W4A4 (79.0 at 100 B is the
    # best there) but is within W3A3's bytes; 95.0 at 121 B is within neither.
    over_a = mixed_precision.analyze(UNIFORM, [_mixed(106, 90.0), _mixed(100, 79.0)])
    assert over_a["checks"]["w4a4_top1_at_75pct_bytes"]["mixed_top1"] == 79.0
    assert over_a["targets"] == {"w4a4_top1_at_75pct_bytes": False, "w3a3_plus_0.5_at_its_bytes": True, "either": True}
    over_b = mixed_precision.analyze(UNIFORM, [_mixed(121, 95.0), _mixed(100, 79.0)])
    assert over_b["targets"] == {
        "w4a4_top1_at_75pct_bytes": False,
        "w3a3_plus_0.5_at_its_bytes": False,
        "either": False,
    }
    assert over_b["checks"]["w3a3_plus_0.5_at_its_bytes"]["margin"] == pytest.approx(79.0 - 80.85)
    # 16.15 - 15.65 - 0.5 is -1.8e-15 in floats: still exactly the 0.5 points the target asks for.
    low = [_uniform("3/3", 120, 15.65), _uniform("4/4", 140, 82.0)]
    assert mixed_precision.analyze(low, [_mixed(120, 16.15)])["targets"]["w3a3_plus_0.5_at_its_bytes"] is True
    with pytest.raises(ValueError, match="W4A4"):
        mixed_precision.analyze([_uniform("3/3", 120, 80.0)], [_mixed(105, 82.0)])


def test_mixed_precision_widths_label_orders_blocks_numerically() -> None:
    import mixed_precision

    config = {
        "quant.layers.blocks.1.mlp": "4/4",
        "quant.layers.blocks.10.attn": "3/3",
        "quant.layers.blocks.0.attn": "2/4",
        "quant.layers.blocks.0.mlp": "3/3",
        "quant.layers.blocks.1.attn": "2/2",
    }
    assert mixed_precision.widths_label(config) == "attn 2/4-2-3, mlp 3-4"


def test_mixed_precision_arms_validate_with_the_same_trials_epochs_and_fp_stage(tmp_path: Path) -> None:
    import mixed_precision
    import sweep_efficiency

    from ofq_ray.sweep import sweep_from_dict
    from ofq_ray.sweep.budget import Bounds, Budget
    from ofq_ray.sweep.stages import plan_stages, stage_config, trial_config

    setup = mixed_precision.QUICK
    plan = mixed_precision.plan(setup, str(tmp_path), "test")  # every spec through sweep_from_dict, no Ray
    uniform, mixed = plan.uniform, plan.mixed
    assert [s.tune.scheduler for s in [*uniform, mixed]] == [None] * (len(uniform) + 1)  # no early stopping
    assert sum(s.tune.num_samples for s in uniform) == mixed.tune.num_samples == setup.trials == 6
    assert [s.search for s in uniform] == [{"quant.bits": {"grid": ["2/2", "3/3", "4/4"]}}] * 2
    assert len(mixed.layer_groups) == 6  # attn and mlp of the 3 blocks
    configs = [trial_config(s, {"quant.bits": "2/2"}) for s in uniform]
    configs.append(trial_config(mixed, {key: "2/2" for key in mixed.layer_groups}))
    assert {(c.epochs, c.optim.lr, c.quant.qkr) for c in configs} == {(setup.epochs, setup.lr, True)}
    assert [c.seed for c in configs] == [0, 1, 0]  # the uniform arm's QAT seeds differ

    # One FP model for every arm and seed (the shared, cached pretrain stage), sweep_efficiency's at --quick.
    efficiency = sweep_from_dict(sweep_efficiency.spec("e", "none", True, str(tmp_path)))
    fingerprints = set()
    for sweep in [*uniform, mixed, efficiency]:
        assert plan_stages(sweep) == (["pretrain"], ["qat"])
        fingerprints.add(stage_config(sweep, "pretrain", {}, init_from=None).fingerprint(exclude=("init_from",)))
    assert len(fingerprints) == 1

    # The budget is uniform W3A3's exact bytes, and the groups cover every block layer: the mixed arm's
    # uniform configurations cost what the uniform widths cost; all-4/4 is over budget, all-3/3 is not.
    sizes = plan.sizes
    assert sizes["2/2"] < sizes["3/3"] < sizes["4/4"]
    assert mixed.tune.constraints == {"model/size_bytes": Bounds(max=sizes["3/3"])}
    budget = Budget(mixed, 10)
    for width in ("2/2", "3/3", "4/4"):
        costs = budget.costs({key: width for key in mixed.layer_groups})
        assert costs["model/size_bytes"] == sizes[width]
        assert bool(budget.broken(costs)) is (width == "4/4")
    assert mixed_precision.plan(setup, str(tmp_path), "test", budget=False).mixed.tune.constraints == {}


def test_report_renders_the_mixed_precision_tables_and_targets() -> None:
    import mixed_precision

    mixed = [_mixed(105, 80.0, "3/3"), _mixed(120, 80.85, "4/4"), _mixed(121, 84.0), _mixed(110, 79.0)]
    analysis = mixed_precision.analyze(UNIFORM, mixed)
    arms = {
        "uniform": {"trained": 6, "trial_epochs": 24, "rejected": 0, "wall_s": 100.0},
        "mixed": {"trained": 4, "trial_epochs": 16, "rejected": 3, "wall_s": 80.0},
    }
    for arm, row in arms.items():
        row["hypervolume"] = analysis["hypervolume"][arm]
    settings = {
        "model": "vit_fmnist_small",
        "train_subset": 8000,
        "val_subset": 2000,
        "epochs": 4,
        "lr": 1e-3,
        "seeds": [0, 1],
        "widths": ["2/2", "3/3", "4/4"],
        "group_count": 6,
        "budget_bytes": 120.0,
    }
    payload = {"quick": True, "settings": settings, "arms": arms, **analysis}
    lines = report.mixed_section(payload)
    text = "\n".join(lines)
    assert lines[0] == "### Mixed precision vs uniform widths (`benchmarks/mixed_precision.py`)"
    assert "within uniform W3A3's 120 bytes (3 configurations over it rejected before training)" in text
    assert f"| mixed | 4 | 16 | 3 | {analysis['hypervolume']['mixed']:.4f} | 80 |" in lines
    assert "| W2A2: 100 | 79.00 | 78.50 ± 0.71 | - | - | - | - |" in lines
    assert "| W3A3: 120 | 80.35 | 80.15 ± 0.28 | 80.85 | 120 | +0.50 | attn 4, mlp 2 |" in lines
    assert "| 0.75 x W4A4: 105 | 82.00 | - | 80.00 | 105 | -2.00 | attn 3, mlp 2 |" in lines
    assert [line for line in lines if line.startswith("| 1")] == [
        "| 105 | 80.00 | attn 3, mlp 2 |",
        "| 120 | 80.85 | attn 4, mlp 2 |",
        "| 121 | 84.00 | attn 2, mlp 2 |",
    ]
    assert "- mixed reaches uniform W4A4's 82.00 at <= 105 bytes (75 %): 80.00 (**missed**)" in lines
    assert "- mixed beats uniform W3A3 by >= 0.5 points (80.85) at <= 120 bytes: 80.85 (met)" in lines
    assert "- target (either): met" in lines
    assert (
        "- bytes = 60 + 20 x average weight bits: the 8-bit first and last layers and the float parameters are "
        "43 % of W4A4's bytes, so 75 % of W4A4's bytes buys 2.25 weight bits on average." in lines
    )
    assert (
        "- uniform W4A4 - W3A3: +1.65 (best seeds), +1.35 (means): raising every group from 3 to 4 bits gains "
        "at least the 0.5 points" in text
    )


def test_report_renders_the_multi_objective_sweep_table_and_targets() -> None:
    def row(hv: float, trial_epochs: int, stopped: int, wall_s: float, trials: int = 3) -> dict[str, Any]:
        points = [{"trial_id": str(i), "status": "completed", "top1": 80.0, "bytes": 1e5} for i in range(trials)]
        return {"points": points, "hypervolume": hv, "trial_epochs": trial_epochs, "stopped": stopped, "wall_s": wall_s}

    payload = {
        "quick": True,
        "reference_point": {"top1": 10.0, "bytes": 1.1 * 2**20},
        "hypervolume_unit": "top-1 points x MiB",
        "results": {
            "full budget": row(2.0, 108, 0, 500),
            "ASHA (top-1)": row(1.8, 40, 8, 250),
            "MO-ASHA": row(1.97, 50, 7, 300),
        },
        "ratios": {"moasha_hv_fraction": 0.985, "moasha_epoch_fraction": 50 / 108, "moasha_wall_fraction": 0.6},
        "targets": {
            "moasha_hv_at_least_98pct": True,
            "moasha_at_most_50pct_epochs": True,
            "moasha_hv_above_asha": True,
        },
    }
    lines = report.sweep_mo_section(payload)
    text = "\n".join(lines)
    assert "reference point top-1 10 % (chance), 1.100 MiB" in text
    assert "| MO-ASHA | 3 | 1.970 | 0.985 | 50 | 46 % | 7 | 300 |" in lines
    assert "| full budget | 3 | 2.000 | 1.000 | 108 | 100 % | 0 | 500 |" in lines
    assert "- MO-ASHA's hypervolume is 98.5 % of the full budget's (target >= 98 %: met)" in lines
    assert "- with 46 % of its trial-epochs (target <= 50 %: met) and 60 % of its wall time" in lines
    payload["targets"]["moasha_hv_above_asha"] = False
    assert "- MO-ASHA 1.970 vs ASHA on top-1 1.800 (target above: **missed**)" in report.sweep_mo_section(payload)


def test_report_leaves_out_the_sections_whose_json_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    assert report.sweep_mo_section() == [] and report.mixed_section() == []
    text = report.render()
    assert "Multi-objective early stopping" not in text and "Mixed precision" not in text
    assert "### Sweep efficiency (`benchmarks/sweep_efficiency.py`)\n\nNot run yet." in text  # the others say so


def test_step_speed_breakdown_sorts_ops_into_kinds_and_the_report_tabulates_the_extra_time(tmp_path: Path) -> None:
    import json

    import step_speed

    kinds = {
        "aten::addcmul_": "elementwise math",
        "aten::eq": "elementwise math",
        "aten::mm": "GEMM",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "GEMM",
        "aten::gelu_backward": "GELU",
        "Optimizer.step#AdamW.step": "optimizer",
        "LsqLinearBackward": "framework",
        "aten::_to_copy": "framework",
    }
    assert {op: step_speed.op_category(op) for op in kinds} == kinds

    def run(model: str, categories: dict[str, tuple[float, float]]) -> str:
        rows = {name: {"fp+kd": fp, "ofq+kd": ofq, "extra": ofq - fp} for name, (fp, ofq) in categories.items()}
        total = {key: sum(row[key] for row in rows.values()) for key in ("fp+kd", "ofq+kd", "extra")}
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps({"model": model, "breakdown": {"categories": rows, "total": total}}))
        return str(path)

    files = [run("a", {"GEMM": (10.0, 12.0), "GELU": (1.0, 3.0)}), run("b", {"GEMM": (5.0, 8.0)})]
    lines = report.breakdown_lines(files)
    assert "| GEMM | 10.0 -> 12.0 | +2.0 (50%) | 5.0 -> 8.0 | +3.0 (100%) |" in lines
    assert "| GELU | 1.0 -> 3.0 | +2.0 (50%) | - | - |" in lines
    assert "| total | 11.0 -> 15.0 | +4.0 (100%) | 5.0 -> 8.0 | +3.0 (100%) |" in lines
    assert report.breakdown_lines([run("c", {})][:0]) == []
