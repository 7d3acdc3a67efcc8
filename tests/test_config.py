"""Run configs and sweep specs: parsing, overrides, one-line errors, the shipped files, the LR schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from ofq_ray.config import ConfigError, load_config, parse_bits
from ofq_ray.engine import LRSchedule
from ofq_ray.tune import load_sweep, plan_stages

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_is_valid(path: Path) -> None:
    config = load_config(str(path))
    assert config.stage in ("pretrain", "qat", "cga")


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_space_is_valid(path: Path) -> None:
    sweep = load_sweep(str(path))
    _, per_trial = plan_stages(sweep)
    assert per_trial[-1] == sweep.base["stage"]


def test_cga_search_shares_pretrain_and_qat_but_a_bits_search_trains_qat_per_trial() -> None:
    assert plan_stages(load_sweep(str(REPO / "search_spaces" / "cga.yaml"))) == (["pretrain", "qat"], ["cga"])
    assert plan_stages(load_sweep(str(REPO / "search_spaces" / "bits.yaml"))) == (["pretrain"], ["qat"])
    widths = load_sweep(str(REPO / "search_spaces" / "cga.yaml"), ["search.quant.bits={choice: ['2/2', '4/4']}"])
    assert plan_stages(widths) == (["pretrain"], ["qat", "cga"])


def test_overrides_are_typed_from_yaml_and_validated() -> None:
    config = load_config(None, ["stage=pretrain", "optim.lr=1e-4", "data.train_subset=100", "quant.bits=3/3"])
    assert config.optim.lr == pytest.approx(1e-4) and config.data.train_subset == 100
    assert (config.quant.weight_bits, config.quant.act_bits) == (3, 3)
    assert parse_bits("fp") == (None, None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], r"^optim\.lr: -1\.0 is not allowed; allowed: a number > 0$"),
        (["stage=cgaa"], r"^stage: 'cgaa' is not allowed; allowed: pretrain, qat, cga \(did you mean 'cga'\?\)$"),
        (["optimm.lr=1"], r"^optimm: unknown key; allowed: .* \(did you mean 'optim'\?\)$"),
        (["epochs=2.5"], r"^epochs: 2\.5 is not allowed; allowed: an integer >= 1$"),
        (["quant.weight_bits=1"], r"^quant\.weight_bits: 1 is not allowed"),
        (["cga.boundary_range=0.7"], r"^cga\.boundary_range: 0\.7 is not allowed"),
        (["workers=2", "batch_size=3"], r"^batch_size: 3 is not allowed with workers=2"),
        (["stage=cga"], r"^init_from: None is not allowed for stage cga"),
        (["stage=qat"], r"^kd\.teacher: None is not allowed"),
        (["quant.bits=2-2"], r"^quant\.bits: '2-2' is not allowed"),
        (["optim.lr"], r"^--set: 'optim\.lr' is not allowed; allowed: KEY=VALUE"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [qat\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+ is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_fingerprint_ignores_how_a_run_is_executed_but_not_what_it_trains() -> None:
    base = load_config(None, ["stage=pretrain"])
    assert base.fingerprint() == load_config(None, ["stage=pretrain", "workers=2", "runs_dir=/x"]).fingerprint()
    assert base.fingerprint() != load_config(None, ["stage=pretrain", "optim.lr=1e-4"]).fingerprint()


def test_lr_schedule_matches_the_reference_at_the_spec_epochs() -> None:
    # DeiT-T W2A2: lr 5.47e-4, min 1e-5, warmup 5 from 1e-6, cosine over 300, 10 cooldown epochs (310 in all)
    schedule = LRSchedule(lr=5.47e-4, min_lr=1e-5, epochs=310, warmup_epochs=5, warmup_lr=1e-6, cooldown_epochs=10)
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5) == pytest.approx(
        1e-5 + 0.5 * (5.47e-4 - 1e-5) * (1 + __import__("math").cos(__import__("math").pi * 5 / 300))
    )
    assert schedule(2.5) == pytest.approx(1e-6 + 2.5 * (5.47e-4 - 1e-6) / 5)
    assert schedule(300) == pytest.approx(1e-5)
    assert schedule(309) == pytest.approx(1e-5)
    cga = LRSchedule(lr=1e-5, min_lr=1e-5, epochs=30, kind="constant")
    assert cga(0) == cga(29.5) == pytest.approx(1e-5)  # the reference's CGA stage (epochs 300-329)


def test_pareto_front_keeps_stopped_trials_and_drops_dominated_and_errored_ones() -> None:
    from ofq_ray.tune import _pareto_front

    sweep = load_sweep(str(REPO / "search_spaces" / "pareto.yaml"))
    top1, size = sweep.tune.metrics

    def trial(name: str, status: str, acc: float | None, nbytes: float) -> dict:
        return {"trial_id": name, "status": status, "objectives": {top1: acc, size: nbytes}}

    trials = [
        trial("big", "completed", 85.0, 400_000),
        trial("small_stopped", "stopped", 70.0, 100_000),  # smallest: on the front although ASHA stopped it
        trial("dominated", "completed", 80.0, 400_000),
        trial("errored", "errored", 99.0, 50_000),
        trial("no_metric", "stopped", None, 90_000),
        trial("middle", "completed", 82.0, 200_000),
    ]
    assert {t["trial_id"] for t in _pareto_front(trials, sweep)} == {"big", "small_stopped", "middle"}
