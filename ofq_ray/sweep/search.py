"""The searcher (Optuna's samplers through Ray's OptunaSearch, its study in an Optuna RDB storage) and
the scheduler (ASHA; MO-ASHA when the sweep has several objectives)."""

from __future__ import annotations

import os
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from ..config import ConfigError
from .budget import Budget, BudgetSearcher, class_count
from .spec import Sweep

# --- Optuna / Tune plumbing -----------------------------------------------------------------------------


def optuna_space(search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import optuna

    space: dict[str, Any] = {}
    for key, dist in search.items():
        ((kind, args),) = dist.items()
        if kind in ("choice", "grid"):
            space[key] = optuna.distributions.CategoricalDistribution(args)
        elif kind == "int":
            space[key] = optuna.distributions.IntDistribution(args[0], args[1])
        else:
            space[key] = optuna.distributions.FloatDistribution(args[0], args[1], log=kind == "loguniform")
    return space


def optuna_storage_url(sweep: Sweep, runs_dir: str) -> str:
    """Where the sweep's Optuna study lives: ``tune.optuna_storage`` or ``<runs_dir>/optuna.db``."""
    return sweep.tune.optuna_storage or f"sqlite:///{os.path.join(os.path.abspath(runs_dir), 'optuna.db')}"


def open_optuna_storage(url: str) -> Any:
    """An Optuna RDB storage, or a one-line ConfigError (checked before a sweep creates anything but the
    folder of a new sqlite file, which may be a runs folder nothing else has written to yet: behind an
    MLflow server, the sweep's first local file is its study)."""
    import optuna

    if url.startswith("sqlite:///"):
        folder = os.path.dirname(url[len("sqlite:///") :])
        if folder and not os.path.isdir(folder) and os.path.isdir(os.path.dirname(folder.rstrip("/")) or "/"):
            os.makedirs(folder, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as error:  # unreachable server, bad URL, missing driver
        raise ConfigError(f"tune.optuna_storage: cannot open {url} ({type(error).__name__})") from None


class ResumableOptunaSearch(OptunaSearch):  # type: ignore[misc]
    """Ray's OptunaSearch, with a resume that keeps the study at one Optuna trial per Tune trial.

    Tune saves the searcher with its experiment state every few seconds, while the study in its storage
    changes at once: a driver killed between a suggestion and the next save leaves a RUNNING Optuna trial
    that no restored Tune trial knows. On restore such trials go back to the study's queue (WAITING), so
    the next suggestions take them, with the parameters they already had, instead of adding trials; the
    sampler is then reseeded, as its saved random state would repeat their draws."""

    def restore(self, checkpoint_path: str) -> None:
        import optuna

        super().restore(checkpoint_path)
        study = getattr(self, "_ot_study", None)
        if study is None:
            return
        known = {trial._trial_id for trial in self._ot_trials.values()}
        orphans = [
            trial
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if trial._trial_id not in known
        ]
        for orphan in orphans:
            study._storage.set_trial_state_values(orphan._trial_id, optuna.trial.TrialState.WAITING)
        if orphans:
            # The sampler's random state is the saved one, from before it drew the orphans' parameters: left
            # as is, the next fresh suggestion would draw them again (one configuration trained twice).
            study.sampler.reseed_rng()


def make_searcher(
    sweep: Sweep, storage: Any = None, study_name: str | None = None, budget: Budget | None = None, log: Any = None
) -> Any:
    """OptunaSearch with the sweep's sampler; with ``storage`` (see :func:`open_optuna_storage`) its study
    is kept in that database under ``study_name`` (so optuna-dashboard can watch it and --resume
    continues it), else in memory.

    With ``tune.constraints`` it is wrapped in a :class:`~ofq_ray.sweep.budget.BudgetSearcher` that rejects
    over-budget suggestions before they train (``budget``: the costs on the sweep's data; default: from
    the spec's dataset) and gives every Optuna trial its constraint values, which TPE learns from."""
    import optuna

    settings = sweep.tune
    kind = settings.searcher
    if kind == "auto":
        kind = "nsga2" if settings.multi_objective else "tpe"
    if kind == "grid":
        grid = {key: next(iter(dist.values())) for key, dist in sweep.search.items()}
        sampler: Any = optuna.samplers.GridSampler(grid, seed=settings.seed)
    elif kind == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
    elif kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    metric: Any = settings.metrics if settings.multi_objective else settings.metrics[0]
    mode: Any = settings.modes if settings.multi_objective else settings.modes[0]
    searcher = ResumableOptunaSearch(
        space=optuna_space(sweep.search),
        metric=metric,
        mode=mode,
        sampler=sampler,
        storage=storage,
        study_name=study_name,
    )
    if not settings.constraints:
        return searcher
    if budget is None:
        classes = class_count(sweep.base)
        if classes is None:
            raise ConfigError("tune.constraints: the dataset's class count is unknown; allowed: pass a Budget")
        budget = Budget(sweep, classes)
    return BudgetSearcher(searcher, budget, settings.max_rejections, log)


def make_scheduler(sweep: Sweep, max_t: int) -> Any:
    if sweep.tune.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    from .mo_asha import MultiObjectiveASHA

    grace_period = sweep.tune.scheduler.asha.grace_period
    reduction_factor = sweep.tune.scheduler.asha.reduction_factor
    # One past the last epoch: ASHA stops a trial that reaches max_t, which would kill it before it
    # logs its checkpoints and closes its MLflow run; trials end on their own instead.
    if sweep.tune.multi_objective:  # promote by non-dominated rank over every objective (MO-ASHA)
        return MultiObjectiveASHA(
            sweep.tune.metrics,
            sweep.tune.modes,
            max_t=max_t + 1,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=sweep.tune.metrics[0],
        mode=sweep.tune.modes[0],
        max_t=max_t + 1,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
