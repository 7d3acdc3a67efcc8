"""Run configs and sweep specs: parsing, overrides, one-line errors, the shipped files, the LR schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from ofq_ray.cli import main
from ofq_ray.config import ConfigError, RankConfig, load_config, load_yaml, parse_bits, reported_metrics
from ofq_ray.engine import LRSchedule
from ofq_ray.sweep.spec import load_sweep
from ofq_ray.sweep.stages import plan_stages, stage_config

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
        (
            ["rank.metric=val/accuracy"],
            r"^rank\.metric: 'val/accuracy' is not reported by a pretrain run; "
            r"allowed: .* \(did you mean 'val/top1'\?\)$",
        ),
        (["rank.metric=osc/mean_freq"], r"^rank\.metric: 'osc/mean_freq' is not reported by a pretrain run"),
        (["rank.mode=lowest"], r"^rank\.mode: 'lowest' is not allowed; allowed: max, min"),
        (["quant=5"], r"^quant: 5 is not allowed; allowed: a mapping$"),
        (["optim=5"], r"^optim: 5 is not allowed; allowed: a mapping$"),
        (["optim.lr=.nan"], r"^optim\.lr: nan is not allowed; allowed: a number > 0$"),
        (
            ["resources={CPU: 2}"],
            r"^resources\.CPU: 2\.0 is not allowed; allowed: custom resources \(set cpus_per_worker\)$",
        ),
        (["resources={node_a: -1}"], r"^resources\.node_a: -1\.0 is not allowed; allowed: a number >= 0$"),
        (["chained=true"], r"^chained: unknown key; allowed: "),
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
    from ofq_ray.sweep.summary import _pareto_front

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


def test_yaml_numbers_in_exponent_form_are_numbers_everywhere(tmp_path: Path) -> None:
    assert load_yaml("[1e-5, 1E+3, .5e-2, -2e3, 1.0e-6, 3, 1.2.3, e5, '1e-5', 2026-11-28]")[:9] == [
        1e-5,
        1e3,
        5e-3,
        -2e3,
        1e-6,
        3,
        "1.2.3",
        "e5",
        "1e-5",  # quoted: a string, as the user wrote it
    ]
    run = tmp_path / "run.yaml"
    run.write_text("stage: pretrain\noptim: {lr: 3e-4, min_lr: 1E-6}\n")
    config = load_config(str(run), ["optim.warmup_lr=5e-7"])
    assert (config.optim.lr, config.optim.min_lr, config.optim.warmup_lr) == (3e-4, 1e-6, 5e-7)
    with pytest.raises(ConfigError, match=r"^optim\.lr: '3e-4' is not allowed; allowed: a number > 0$"):
        load_config(None, ["optim.lr='3e-4'"])  # no second, scattered string-to-number conversion
    spec = (REPO / "search_spaces" / "lr.yaml").read_text()
    written = tmp_path / "lr.yaml"
    written.write_text(spec.replace("{loguniform: [1.0e-4, 3.0e-3]}", "{loguniform: [1e-5, 1e-3]}"))
    sweep = load_sweep(str(written), ["base.optim.weight_decay=1e-2", "search.optim.weight_decay={uniform: [0, 1e-1]}"])
    assert sweep.search["optim.lr"] == {"loguniform": [1e-5, 1e-3]}
    assert sweep.search["optim.weight_decay"] == {"uniform": [0.0, 0.1]}
    assert sweep.base["optim"]["weight_decay"] == 1e-2


def test_the_ranking_defaults_to_top1_and_a_sweep_ranks_its_trial_stages_by_its_metric() -> None:
    assert load_config(None, ["stage=pretrain"]).rank == RankConfig("val/top1", "max")
    sweep = load_sweep(str(REPO / "search_spaces" / "cga.yaml"), ["tune.metric=val/loss", "tune.mode=min"])
    shared, per_trial = plan_stages(sweep)
    ranks = {stage: stage_config(sweep, stage, {}, init_from="runs:/x/checkpoints/best").rank for stage in shared}
    ranks["cga"] = stage_config(sweep, "cga", {}, init_from="runs:/x/checkpoints/best").rank
    # shared stages keep their own ranking (and so their cache entry); the trial's stage takes the sweep's
    assert ranks == {"pretrain": RankConfig(), "qat": RankConfig(), "cga": RankConfig("val/loss", "min")}
    assert per_trial == ["cga"]
    assert {"cga/frozen_frac", "osc/mean_freq"} <= set(reported_metrics("cga"))
    assert not {"cga/frozen_frac", "osc/mean_freq"} & set(reported_metrics("pretrain"))
    assert "osc/mean_freq" not in reported_metrics("qat", track_oscillation=False)


def test_rank_best_prefers_the_earliest_on_ties_and_skips_nan() -> None:
    rows = [{"val/loss": float("nan")}, {"val/loss": 0.7}, {"val/loss": 0.4}, {"val/loss": 0.4}, {}]
    assert RankConfig("val/loss", "min").best(rows) is rows[2]
    assert RankConfig("val/loss", "max").best(rows) is rows[1]
    assert RankConfig().best([]) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tune.metric=val/accuracy"],
            "tune.metric: 'val/accuracy' is not reported by a qat trial; allowed: train/loss, train/top1, lr, "
            "throughput/img_s, val/top1, val/top5, val/loss, model/size_bytes, model/bitops, epoch, time/epoch_s, "
            "osc/mean_freq, osc/frac_gt_0.005, osc/frac_gt_0.01, osc/flip_rate (did you mean 'val/top1'?)",
        ),
        (["tune.metric=[val/top1, model/bytes]", "tune.mode=[max, min]"], "tune.metric: 'model/bytes' is not reported"),
        (["tune.metric=cga/frozen_frac"], "tune.metric: 'cga/frozen_frac' is not reported by a qat trial"),
        (["base.track_oscillation=false", "tune.metric=osc/mean_freq"], "tune.metric: 'osc/mean_freq' is not reported"),
        (["base.rank={metric: val/loss, mode: min}"], "base.rank: a sweep ranks by tune.metric and tune.mode"),
    ],
)
def test_a_bad_sweep_metric_is_one_line_exit_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    runs = tmp_path / "runs"
    args = ["tune", str(REPO / "search_spaces" / "lr.yaml"), f"--set=base.runs_dir={runs}"]
    assert main([*args, *(f"--set={o}" for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ofq-ray: error: ") and message in err, err
    assert not runs.exists()  # no MLflow store, no Ray storage: nothing was trained or written


def test_every_run_field_declares_once_whether_it_changes_what_a_stage_learns() -> None:
    from dataclasses import fields

    from ofq_ray.config import RunConfig, run_fields

    base = load_config(None, ["stage=pretrain"])
    # One other valid value per top-level field; a new RunConfig field must be added here (and declare its role).
    others = {
        "epochs": 3,
        "batch_size": 64,
        "eval_batch_size": 100,
        "workers": 2,
        "cpus_per_worker": 2.0,
        "use_gpu": True,
        "precision": "bf16",
        "compile": True,
        "seed": 1,
        "runs_dir": "/elsewhere",
        "keep_checkpoints": 5,
        "max_failures": 0,
        "track_oscillation": False,
        "optim.lr": 1e-4,
        "model.drop_path_rate": 0.1,
        "data.mixup": 0.5,
        "quant.weight_bits": 4,
        "kd.enabled": False,
        "cga.boundary_range": 0.01,
        "rank.metric": "val/loss",
        "tracking.experiment": "elsewhere",
        "init_from": "/some/fp.pt",
        "resources": {"node_a": 0.1},
    }
    assert {key.split(".")[0] for key in others} | {"stage"} == {f.name for f in fields(RunConfig)}
    left_out = run_fields(fingerprint=False)
    for key, value in others.items():
        changed = load_config(None, ["stage=pretrain", f"{key}={value}"])
        assert (changed.fingerprint() == base.fingerprint()) == (key.split(".")[0] in left_out), key
    assert set(left_out) == {
        "tracking",
        "workers",
        "cpus_per_worker",
        "resources",
        "runs_dir",
        "keep_checkpoints",
        "max_failures",
    }


def test_the_summary_prints_whole_numbers_in_full_and_others_to_4_digits() -> None:
    from ofq_ray.sweep.summary import _fmt

    assert _fmt(106028.0) == "106028" and _fmt(87596.0) != _fmt(87600.0)
    assert _fmt(0.123456) == "0.1235" and _fmt(3) == "3" and _fmt("2/2") == "2/2"


LR = str(REPO / "search_spaces" / "lr.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (  # an element of a list
            ["tune.metric=[val/top1, model/size_bytes]", "tune.mode=[max, mn]"],
            "tune.mode[1]: 'mn' is not allowed; allowed: max, min (did you mean 'min'?)",
        ),
        (
            ["tune.mode=maxx"],
            "tune.mode: 'maxx' is not allowed; allowed: max, min or a non-empty list of them (did you mean 'max'?)",
        ),
        (["tune.mode=[]"], "tune.mode: [] is not allowed; allowed: max, min or a non-empty list of them"),
        (["tune.metric=3"], "tune.metric: 3 is not allowed; allowed: a string or a non-empty list of them"),
        (
            ["tune.metric=[val/top1, val/loss]"],
            "tune.mode: 'max' does not match tune.metric ['val/top1', 'val/loss']; allowed: one mode per metric",
        ),
        (  # a value of a mapping
            ["tune.resources_per_worker={CPU: 1, node_a: -0.5}"],
            "tune.resources_per_worker.node_a: -0.5 is not allowed; allowed: a number >= 0",
        ),
        (
            ["tune.resources_per_worker=[1]"],
            "tune.resources_per_worker: [1] is not allowed; allowed: a mapping of names to a number >= 0",
        ),
        (  # nested dataclasses
            ["tune.scheduler={asha: {grace_priod: 2}}"],
            "tune.scheduler.asha.grace_priod: unknown key; allowed: grace_period, reduction_factor "
            "(did you mean 'grace_period'?)",
        ),
        (
            ["tune.scheduler={asha: {grace_period: 1.5}}"],
            "tune.scheduler.asha.grace_period: 1.5 is not allowed; allowed: an integer >= 1",
        ),
        (
            ["tune.scheduler={asha: {reduction_factor: 1}}"],
            "tune.scheduler.asha.reduction_factor: 1.0 is not allowed; allowed: a number > 1",
        ),
        (["tune.scheduler=asha"], "tune.scheduler: 'asha' is not allowed; allowed: a mapping or null"),
        (
            ["tune.constraints={model/size_bytes: {max: .inf}}"],
            "tune.constraints.model/size_bytes.max: inf is not allowed; allowed: a number >= 0 or null",
        ),
        (
            ["tune.constraints={model/size_bytes: 5}"],
            "tune.constraints.model/size_bytes: 5 is not allowed; allowed: a mapping",
        ),
        (
            ["tune.constraints={model/size_bytes: {}}"],
            "tune.constraints.model/size_bytes: no bound; allowed: {max: N} and/or {min: N}",
        ),
    ],
)
def test_tune_settings_are_typed_and_a_bad_part_is_one_line_naming_its_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_sweep(LR, overrides)
    assert str(error.value) == message


def test_the_scheduler_is_asha_by_default_none_when_said_and_takes_its_rungs_from_the_spec() -> None:
    from ray.tune.schedulers import ASHAScheduler

    from ofq_ray.sweep.mo_asha import MultiObjectiveASHA
    from ofq_ray.sweep.search import make_scheduler
    from ofq_ray.sweep.spec import AshaSettings, SchedulerSettings, sweep_from_dict

    raw = load_yaml((REPO / "search_spaces" / "lr.yaml").read_text())
    del raw["tune"]["scheduler"]
    default = sweep_from_dict(raw)
    assert default.tune.scheduler == SchedulerSettings(AshaSettings(grace_period=1, reduction_factor=3.0))
    assert isinstance(make_scheduler(default, 4), ASHAScheduler)
    for word in ("none", "null", "None"):
        sweep = load_sweep(LR, [f"tune.scheduler={word}"])
        assert sweep.tune.scheduler is None and make_scheduler(sweep, 4) is None
    pareto = load_sweep(str(REPO / "search_spaces" / "pareto.yaml"))  # {asha: {grace_period: 2, reduction_factor: 2}}
    scheduler = make_scheduler(pareto, 9)
    assert isinstance(scheduler, MultiObjectiveASHA) and [m for m, _ in scheduler.rungs] == [2, 4, 8]


def test_a_custom_resource_reaches_rays_scaling_config_and_the_cluster_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from ofq_ray.sweep.cluster import check_sweep_resources
    from ofq_ray.sweep.stages import trial_config
    from ofq_ray.train import scaling_config

    sweep = load_sweep(LR, ["tune.resources_per_worker={CPU: 1, node_a: 0.1}", "tune.workers_per_trial=2"])
    config = trial_config(sweep, {})
    assert (config.cpus_per_worker, config.use_gpu, config.resources) == (1.0, False, {"node_a": 0.1})
    scaling = scaling_config(config)
    assert scaling.resources_per_worker == {"CPU": 1.0, "node_a": 0.1}
    assert scaling.as_placement_group_factory().bundles[-2:] == [{"CPU": 1.0, "node_a": 0.1}] * 2
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "node_a": 1.0})
    check_sweep_resources(sweep)  # 2 trials x 2 workers x 0.1 node_a fit
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError) as error:
        check_sweep_resources(sweep)
    assert str(error.value) == (
        "tune.resources_per_worker: 2 x (0 driver + 2 workers x 0.1 node_a) = 0.4 node_a, but the cluster has 0; "
        "allowed: fewer workers or concurrent trials, or less node_a per worker"
    )


def test_a_chained_stage_validates_before_its_checkpoint_exists_and_cannot_run_without_one() -> None:
    from ofq_ray.sweep.stages import trial_config
    from ofq_ray.train import run_training

    sweep = load_sweep(str(REPO / "search_spaces" / "cga.yaml"))
    shared, _ = plan_stages(sweep)
    assert [stage_config(sweep, stage, {}, init_from=None).init_from for stage in shared] == [None, None]
    config = trial_config(sweep, {})  # cga, starting from the shared qat stage once it has trained
    assert config.stage == "cga" and config.init_from is None
    with pytest.raises(ConfigError, match=r"^init_from: None is not allowed for stage cga"):
        run_training(config)
    started = stage_config(sweep, "cga", {}, init_from="runs:/x/checkpoints/best")
    started.check_start()
