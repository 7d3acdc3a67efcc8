"""MO-ASHA on synthetic rung results: the non-dominated sort, crowding distances (by hand), and rung
decisions next to Ray's own single-objective ASHA fed the same results."""

from __future__ import annotations

import math
import pickle

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ofq_ray.sweep.mo_asha import MultiObjectiveASHA, crowding_distances, dominates, non_dominated_fronts, rank_keys

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def test_dominance_and_fronts_minimizing_every_objective() -> None:
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))
    points = [(1.0, 5.0), (2.0, 2.0), (5.0, 1.0), (3.0, 3.0), (6.0, 6.0), (2.0, 6.0)]
    fronts = non_dominated_fronts(points)
    assert fronts == [[0, 1, 2], [3, 5], [4]]


def test_crowding_distance_by_hand() -> None:
    # One front of four points on two objectives; ranges 6 (f1: 0..6) and 6 (f2: 0..6).
    points = [(0.0, 6.0), (1.0, 3.0), (4.0, 1.0), (6.0, 0.0)]
    distance = crowding_distances(points, [0, 1, 2, 3])
    assert distance[0] == math.inf and distance[3] == math.inf
    # point 1: neighbours 0 and 2 -> (4-0)/6 + (6-1)/6 = 9/6; point 2: neighbours 1 and 3 -> (6-1)/6 + (3-0)/6 = 8/6
    assert distance[1] == pytest.approx(9 / 6) and distance[2] == pytest.approx(8 / 6)
    keys = rank_keys([*points, (7.0, 7.0)])
    assert sorted(range(5), key=lambda i: keys[i]) == [0, 3, 1, 2, 4]


def _trial(name: str) -> Trial:
    return Trial("trainable", stub=True, trial_id=name)


def test_a_small_low_accuracy_model_survives_a_rung_that_asha_on_accuracy_stops() -> None:
    # (top-1, bytes) at epoch 1 in arrival order: two big accurate models, then a tiny weak one, then one
    # dominated by the first (bigger and less accurate).
    rung = [("big", 90.0, 4000.0), ("mid", 88.0, 3000.0), ("tiny", 60.0, 1000.0), ("worse", 85.0, 4500.0)]
    mo = MultiObjectiveASHA(
        ["val/top1", "model/size_bytes"], ["max", "min"], max_t=9, grace_period=1, reduction_factor=2
    )
    asha = ASHAScheduler(metric="val/top1", mode="max", max_t=9, grace_period=1, reduction_factor=2)
    mo_actions, asha_actions = {}, {}
    for name, top1, size in rung:
        trial = _trial(name)
        asha.on_trial_add(None, trial)
        result = {"training_iteration": 1, "val/top1": top1, "model/size_bytes": size}
        mo_actions[name] = mo.on_trial_result(None, trial, result)
        asha_actions[name] = asha.on_trial_result(None, trial, result)
    assert asha_actions["tiny"] == STOP  # below the accuracy cutoff
    assert mo_actions == {"big": CONTINUE, "mid": CONTINUE, "tiny": CONTINUE, "worse": STOP}
    assert mo.num_stopped == 1
    # A second report inside the same rung is not judged again; the next rung (epoch 2) is.
    assert (
        mo.on_trial_result(None, _trial("tiny"), {"training_iteration": 1.5, "val/top1": 1, "model/size_bytes": 1e9})
        == CONTINUE
    )
    assert mo.decide("big", 2, [91.0, 4000.0]) == CONTINUE  # first at rung 2
    assert mo.decide("mid", 2, [80.0, 4100.0]) == STOP  # dominated by big at rung 2


def test_results_without_the_objectives_continue_and_max_t_stops() -> None:
    mo = MultiObjectiveASHA(["val/top1", "model/size_bytes"], ["max", "min"], max_t=4, grace_period=1)
    assert mo.on_trial_result(None, _trial("a"), {"training_iteration": 1, "val/top1": 50.0}) == CONTINUE
    assert (
        mo.on_trial_result(None, _trial("a"), {"training_iteration": 4, "val/top1": 5.0, "model/size_bytes": 1.0})
        == STOP
    )
    keep_going = MultiObjectiveASHA(["val/top1"], ["max"], max_t=4, grace_period=1, stop_last_trials=False)
    assert keep_going.on_trial_result(None, _trial("a"), {"training_iteration": 4, "val/top1": 5.0}) == CONTINUE
    assert [m for m, _ in MultiObjectiveASHA(["x"], ["min"], max_t=9, grace_period=1, reduction_factor=3).rungs] == [
        1,
        3,
        9,
    ]


def test_bad_settings_are_one_line_errors_and_state_survives_save_restore(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"^tune.mode: 'up' is not allowed; allowed: max, min$"):
        MultiObjectiveASHA(["a", "b"], ["max", "up"])
    with pytest.raises(ValueError, match=r"^tune.metric: .* does not match tune.mode"):
        MultiObjectiveASHA(["a", "b"], ["max"])
    with pytest.raises(ValueError, match=r"^tune.scheduler.asha: "):
        MultiObjectiveASHA(["a"], ["max"], reduction_factor=1)
    mo = MultiObjectiveASHA(["a", "b"], ["max", "min"], max_t=9, grace_period=1, reduction_factor=2)
    mo.decide("t1", 1, [1.0, 1.0])
    path = tmp_path / "scheduler.pkl"
    mo.save(str(path))
    restored = MultiObjectiveASHA(["a", "b"], ["max", "min"])
    restored.restore(str(path))
    assert restored.rungs == mo.rungs and restored.max_t == 9
    assert pickle.loads(pickle.dumps(restored)).rungs == mo.rungs
    assert restored.decide("t2", 1, [0.5, 2.0]) == STOP  # dominated by t1, recorded before the save
