"""Mixed-precision search: searched layer groups, budgets (tune.constraints) and the searcher that rejects
over-budget configurations, on a real OptunaSearch and a real Optuna RDB study (no Ray cluster needed to
call suggest / on_trial_complete); the shipped mixed.yaml preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from ray.tune.search import Searcher

from ofq_ray.config import ConfigError
from ofq_ray.cost import run_cost
from ofq_ray.sweep.budget import REJECTED, STOPPED, Bounds, Budget, BudgetSearcher
from ofq_ray.sweep.mo_asha import MultiObjectiveASHA
from ofq_ray.sweep.search import make_scheduler, make_searcher, optuna_storage_url
from ofq_ray.sweep.spec import load_sweep, sweep_from_dict
from ofq_ray.sweep.stages import plan_stages, trial_config

REPO = Path(__file__).resolve().parents[1]
GROUPS = {"attn": "blocks.*.attn", "mlp": "blocks.*.mlp"}


def _spec(search: dict[str, Any], **tune: Any) -> dict[str, Any]:
    return {
        "name": "mixed",
        "base": {
            "stage": "qat",
            "model": {"name": "vit_digits"},
            "data": {"name": "digits"},
            "quant": {"weight_bits": 4, "act_bits": 4, "layers": [{"match": "blocks.0", "weight_bits": 3}]},
            "kd": {"enabled": False},
        },
        "search": search,
        "tune": {"metric": ["val/top1", "model/size_bytes"], "mode": ["max", "min"], "seed": 0, **tune},
    }


def _size(sweep: Any, **widths: str) -> float:
    values = {f"quant.layers.{group}": width for group, width in widths.items()}
    return run_cost(trial_config(sweep, values), num_classes=10)["model/size_bytes"]


def test_groups_become_searched_keys_and_rules_after_the_base_rules_in_declared_order() -> None:
    sweep = sweep_from_dict(_spec({"quant.layers": {"groups": GROUPS, "choice": ["2/2", 4, "fp"]}}))
    assert sweep.search == {
        "quant.layers.attn": {"choice": ["2/2", "4/4", "fp"]},
        "quant.layers.mlp": {"choice": ["2/2", "4/4", "fp"]},
    }
    config = trial_config(sweep, {"quant.layers.mlp": "fp", "quant.layers.attn": "2/2"})
    assert config.quant.layers == [
        {"match": "blocks.0", "weight_bits": 3},  # the base's own rule first
        {"match": "blocks.*.attn", "weight_bits": 2, "act_bits": 2},
        {"match": "blocks.*.mlp", "weight_bits": None, "act_bits": None},
    ]
    assert plan_stages(sweep) == (["pretrain"], ["qat"])  # a quant search trains QAT per trial


def test_each_makes_one_group_per_module_at_the_globs_depth_with_its_own_widths() -> None:
    sweep = sweep_from_dict(_spec({"quant.layers": {"each": ["blocks.*", "head"], "choice": ["2/2", "3/3"]}}))
    assert sweep.layer_groups == {
        "quant.layers.blocks.0": "blocks.0",
        "quant.layers.blocks.1": "blocks.1",
        "quant.layers.head": "head",
    }
    own = sweep_from_dict(
        _spec(
            {
                "quant.layers": {
                    "groups": {"a": "blocks.0", "b": {"match": "blocks.1", "choice": ["8/8"]}},
                    "choice": [2],
                }
            }
        )
    )
    assert own.search == {"quant.layers.a": {"choice": ["2/2"]}, "quant.layers.b": {"choice": ["8/8"]}}


@pytest.mark.parametrize(
    ("search", "tune", "message"),
    [
        ({"quant.layers": {"choice": ["2/2"]}}, {}, r"^search\.quant\.layers: .* allowed: \{groups: .*\} or \{each: "),
        ({"quant.layers": {"each": "blocks.*", "chioce": [2]}}, {}, r"\.chioce: unknown key; allowed: groups, each"),
        ({"quant.layers": {"each": "blockz.*", "choice": [2]}}, {}, r"each: 'blockz\.\*' matches no quantizable"),
        (
            {"quant.layers": {"groups": {"late": "blocks.7"}, "choice": [2]}},
            {},
            r"groups\.late: 'blocks\.7' matches no",
        ),
        (
            {"quant.layers": {"groups": {"a.b": "blocks.0"}, "choice": [2]}},
            {},
            r"'a\.b' is not allowed as a group name",
        ),
        ({"quant.layers": {"each": "blocks.*", "choice": ["2/2", "9/9"]}}, {}, r"choice\[1\]: '9/9' is not allowed"),
        ({"quant.layers": {"each": "blocks.*"}}, {}, r"no widths to search"),
        ({"optim.lr": {"choice": [1e-3]}}, {"constraints": {"model/size": {"max": 1}}}, r"model/size: unknown metric"),
        ({"optim.lr": {"choice": [1e-3]}}, {"constraints": {"model/bitops": {"maks": 1}}}, r"maks: unknown key"),
        ({"optim.lr": {"choice": [1e-3]}}, {"constraints": {"model/bitops": {"max": -1}}}, r"a number >= 0"),
        ({"optim.lr": {"choice": [1e-3]}}, {"constraints": {"model/bitops": {"min": 9, "max": 1}}}, r"min <= max"),
        (
            {"quant.layers": {"groups": GROUPS, "choice": ["2/2", "8/8"]}},
            {"constraints": {"model/size_bytes": {"max": 1000}}},
            r"^tune\.constraints: no configuration of the search meets the budget: the cheapest "
            r"\(quant\.layers\.attn=2/2, quant\.layers\.mlp=2/2\) has model/size_bytes \d+ > max 1000",
        ),
    ],
)
def test_bad_groups_and_constraints_are_one_line_errors_naming_the_field(
    search: dict[str, Any], tune: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        sweep_from_dict(_spec(search, **tune))
    assert "\n" not in str(error.value)


def _budgeted(tmp_path: Path, **tune: Any) -> tuple[Any, float]:
    """A sweep over attention and MLP widths whose budget only an MLP at 2 bits meets."""
    free = sweep_from_dict(_spec({"quant.layers": {"groups": GROUPS, "choice": ["2/2", "8/8"]}}))
    budget = _size(free, attn="8/8", mlp="2/2")
    assert budget < _size(free, attn="2/2", mlp="8/8")
    spec = _spec(
        {"quant.layers": {"groups": GROUPS, "choice": ["2/2", "8/8"]}, "optim.lr": {"loguniform": [1e-4, 1e-3]}},
        constraints={"model/size_bytes": {"max": budget}},
        **tune,
    )
    spec["base"]["runs_dir"] = str(tmp_path)
    return sweep_from_dict(spec), budget


def test_the_budget_searcher_rejects_over_budget_suggestions_and_the_study_records_them(tmp_path: Path) -> None:
    sweep, budget = _budgeted(tmp_path)
    url = optuna_storage_url(sweep, str(tmp_path))
    messages: list[str] = []
    searcher = make_searcher(sweep, optuna.storages.RDBStorage(url), "budget", log=messages.append)
    assert isinstance(searcher, BudgetSearcher)
    for index in range(6):
        config = searcher.suggest(f"t{index}")
        assert config is not None and config["quant.layers.mlp"] == "2/2", config  # only these fit
        size = searcher.budget.costs(config)["model/size_bytes"]
        assert size <= budget
        searcher.on_trial_result(f"t{index}", {"val/top1": 50.0 + index, "model/size_bytes": size})
        searcher.on_trial_complete(f"t{index}", {"val/top1": 50.0 + index, "model/size_bytes": size})
    assert searcher.rejected >= 1 and any("rejected before trial" in m for m in messages)
    study = optuna.load_study(study_name="budget", storage=url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    rejected = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert len(complete) == 6 and [t.values[0] for t in complete] == [50.0 + i for i in range(6)]
    assert len(rejected) == searcher.rejected and len(study.trials) == 6 + searcher.rejected
    for trial in rejected:  # why, the costs, and the constraint values TPE reads (> 0: infeasible)
        assert trial.params["quant.layers.mlp"] == "8/8"
        why = trial.user_attrs[REJECTED]
        assert why.startswith("model/size_bytes ") and f"> max {budget:.6g}" in why
        assert trial.user_attrs["model/size_bytes"] > budget
        assert trial.constraints["model/size_bytes max"] > 0
    assert all(t.constraints["model/size_bytes max"] <= 0 for t in complete)
    # Tune saves the wrapper's state beside the OptunaSearch's: the id map and the count survive --resume.
    state = searcher.get_state()
    again = make_searcher(sweep, optuna.storages.RDBStorage(url), "budget")
    again.set_state(state)
    assert again.rejected == searcher.rejected and again._asked_as == searcher._asked_as


def test_too_many_rejections_in_a_row_end_the_search_and_say_so(tmp_path: Path) -> None:
    sweep, _ = _budgeted(tmp_path, max_rejections=3, searcher="random")
    messages: list[str] = []
    searcher = make_searcher(sweep, None, None, log=messages.append)
    searcher.budget.constraints = {"model/size_bytes": Bounds(max=1.0)}  # now nothing fits
    assert searcher.suggest("t0") == Searcher.FINISHED
    assert searcher.suggest("t1") == Searcher.FINISHED
    assert searcher.rejected == 3
    assert "3 configurations in a row were over budget" in messages[-1] and "tune.max_rejections" in messages[-1]
    study = searcher.searcher._ot_study
    assert study.user_attrs[STOPPED] == searcher.stopped
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 3


def test_the_budget_is_cached_by_what_the_costs_depend_on(tmp_path: Path) -> None:
    sweep, _ = _budgeted(tmp_path)
    budget = Budget(sweep, 10)
    first = budget.costs({"quant.layers.attn": "2/2", "quant.layers.mlp": "2/2", "optim.lr": 1e-4})
    second = budget.costs({"quant.layers.attn": "2/2", "quant.layers.mlp": "2/2", "optim.lr": 3e-4})
    assert first is second and len(budget._cache) == 1


def test_the_mixed_preset_loads_with_groups_a_size_budget_nsga2_and_mo_asha() -> None:
    sweep = load_sweep(str(REPO / "search_spaces" / "mixed.yaml"))
    assert sweep.base["model"]["name"] == "vit_fmnist_small" and sweep.base["data"]["name"] == "fashion_mnist"
    assert sweep.tune.metrics == ["val/top1", "model/size_bytes"] and sweep.tune.modes == ["max", "min"]
    assert sweep.tune.searcher == "nsga2" and isinstance(make_scheduler(sweep, 4), MultiObjectiveASHA)
    assert len(sweep.layer_groups) >= 3 and set(sweep.tune.constraints) == {"model/size_bytes"}
    assert plan_stages(sweep) == (["pretrain"], ["qat"])
    # The budget excludes uniform W4A4 but admits uniform W2A2.
    budget = sweep.tune.constraints["model/size_bytes"].max
    assert budget is not None
    assert _size(sweep, **{k.removeprefix("quant.layers."): "2/2" for k in sweep.layer_groups}) <= budget
    assert _size(sweep, **{k.removeprefix("quant.layers."): "4/4" for k in sweep.layer_groups}) > budget


def test_the_budget_searcher_pickles_as_tune_stores_it(tmp_path: Path) -> None:
    from ray import cloudpickle

    sweep, _ = _budgeted(tmp_path)
    searcher = make_searcher(sweep, None, None, log=print)
    searcher.suggest("t0")
    copy = cloudpickle.loads(cloudpickle.dumps(searcher))  # as Tune writes tuner.pkl
    assert copy.rejected == searcher.rejected and copy._asked_as == searcher._asked_as and callable(copy.log)


def test_set_overrides_reach_inside_the_group_form() -> None:
    sweep = load_sweep(
        str(REPO / "search_spaces" / "mixed.yaml"),
        ["search.quant.layers.choice=['2/2', '4/4']", "search.quant.layers.each=blocks.*"],
    )
    assert sweep.search == {f"quant.layers.blocks.{i}": {"choice": ["2/2", "4/4"]} for i in range(3)}
