"""Sweeps: a YAML search space -> Ray Tune with OptunaSearch (TPE / NSGA-II) and ASHA (MO-ASHA for several
objectives), every trial one MLflow child run of the sweep's parent run.

Split by the question each part answers:

- :mod:`.spec`: what the user wrote, read and validated before anything runs;
- :mod:`.stages`: which stages run once for all trials (cached by fingerprint) and each stage's config;
- :mod:`.groups`: ``search.quant.layers``, searched widths for named groups of layers;
- :mod:`.search`: the Optuna searcher (its study in an RDB storage) and the scheduler;
- :mod:`.budget`: ``tune.constraints``, configurations over budget rejected before training;
- :mod:`.mo_asha`: successive halving by non-dominated rank, for several objectives;
- :mod:`.lifecycle`: the trial function and the driver-side callback that closes each trial's run as it ends;
- :mod:`.cluster`: where a trial trains and what it holds, and whether the cluster still fits one;
- :mod:`.runner`: one sweep end to end, and ``--resume``;
- :mod:`.summary`: the table, the front, the plots, the champion, and ``ofq-ray best``.
"""

from .runner import run_sweep
from .spec import Sweep, load_sweep, sweep_from_dict
from .summary import SweepResult, best_trial

__all__ = ["Sweep", "SweepResult", "best_trial", "load_sweep", "run_sweep", "sweep_from_dict"]
