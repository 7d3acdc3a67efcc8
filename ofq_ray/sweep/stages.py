"""Which stages a sweep trains once for all trials (cached in MLflow by fingerprint) and which each trial
runs, and the run config of each.

Stages before the trial stage (the FP model, the QAT model under a CGA search) are built from the spec's
``stages`` overrides; those that no searched key touches run once, are cached by config fingerprint in
MLflow and reused by later sweeps. The others run inside each trial, in the trial's single MLflow run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, RunConfig, _merge, apply_override, config_from_dict, run_fields
from .groups import group_rules

if TYPE_CHECKING:
    from .spec import Sweep

STAGE_ORDER = ("pretrain", "qat", "cga")
# Run-config keys each earlier stage of a chain reads from the sweep's base (the rest is the trial stage's
# own), and the keys every stage inherits (how to run, not what to train): declared on RunConfig's fields.
SHARED_KEYS = {stage: run_fields(shared_with=stage) for stage in ("pretrain", "qat")}
RUN_KEYS = run_fields(every_stage=True)


def _with_values(base: dict[str, Any], values: dict[str, Any], groups: dict[str, str] | None = None) -> dict[str, Any]:
    """``base`` with the searched values set; values of searched layer groups (``groups``: search key ->
    glob, see :mod:`.groups`) become ``quant.layers`` rules after the config's own."""
    data = copy.deepcopy(base)
    groups = groups or {}
    for key, value in values.items():
        if key not in groups:
            apply_override(data, key.split("."), value)
    rules = group_rules(values, groups)
    if rules:
        quant = data.setdefault("quant", {})
        if not isinstance(quant, dict):
            raise ConfigError("quant: allowed: a mapping")
        quant["layers"] = list(quant.get("layers") or []) + rules
    return data


# Run-config keys that may name local files or folders (besides runs_dir, which the runner resolves).
PATH_KEYS = (("data", "root"), ("model", "pretrained_path"), ("init_from",), ("kd", "teacher"))


def absolute_paths(sweep: Sweep) -> None:
    """Makes the relative local paths of the base and the stage overrides absolute, from the driver's
    working folder: each trial runs in a folder of its own, and the driver's own can vanish under it (a Ray
    job's uploaded copy of the repo). Names that are not an existing path (MLflow URIs, ``timm``) stay."""
    for data in (sweep.base, *sweep.stages.values()):
        for path in PATH_KEYS:
            holder = data
            for key in path[:-1]:
                holder = holder.get(key) if isinstance(holder, dict) else None  # type: ignore[assignment]
            value = holder.get(path[-1]) if isinstance(holder, dict) else None
            if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
                holder[path[-1]] = os.path.abspath(value)


# --- planning ------------------------------------------------------------------------------------------


def _base_config(base: dict[str, Any]) -> RunConfig:
    """The base as a run config; without ``init_from`` it starts from the sweep's earlier stages (chained)."""
    return config_from_dict(base, chained=base.get("init_from") is None)


def plan_stages(sweep: Sweep) -> tuple[list[str], list[str]]:
    """(shared stages run once before the trials, stages each trial runs), in order."""
    base = _base_config(sweep.base)
    if base.stage == "pretrain" or sweep.base.get("init_from") is not None:
        return [], [base.stage]
    chain = list(STAGE_ORDER[: STAGE_ORDER.index(base.stage) + 1])
    searched = {key.split(".")[0] for key in sweep.search}
    shared: list[str] = []
    for stage in chain[:-1]:
        if searched & set(SHARED_KEYS[stage]):
            break
        shared.append(stage)
    return shared, chain[len(shared) :]


def stage_config(sweep: Sweep, stage: str, values: dict[str, Any], init_from: str | None) -> RunConfig:
    """The run config of one stage: the trial stage is ``base``; earlier ones take the shared keys of
    ``base`` plus ``stages.<stage>`` overrides. ``values`` are the trial's searched values; ``init_from``
    the checkpoint a qat or cga stage starts from, None while the earlier stage it starts from has not
    trained yet (the config is chained: its start is checked when it runs)."""
    base = _base_config(sweep.base)
    if stage == base.stage:
        data = _with_values(sweep.base, values, sweep.layer_groups)
    else:
        data = {k: copy.deepcopy(v) for k, v in sweep.base.items() if k in SHARED_KEYS[stage] or k in RUN_KEYS}
        shared_values = {k: v for k, v in values.items() if k.split(".")[0] in SHARED_KEYS[stage]}
        data = _with_values(data, shared_values, sweep.layer_groups)
        data = _merge(data, copy.deepcopy(sweep.stages.get(stage, {})))
        data["stage"] = stage
        data.pop("tracking", None)
    data["init_from"] = init_from if stage != "pretrain" else data.get("init_from")
    data.setdefault("tracking", {})
    data["tracking"] = {**data["tracking"], "uri": sweep.mlflow.tracking_uri, "register_as": None}
    data["workers"] = sweep.tune.workers_per_trial
    resources = dict(sweep.tune.resources_per_worker)
    data["cpus_per_worker"] = resources.pop("CPU", 1.0)
    data["use_gpu"] = bool(resources.pop("GPU", 0.0))
    data["resources"] = resources
    data["keep_checkpoints"] = sweep.tune.keep_checkpoints
    if stage in plan_stages(sweep)[1]:  # a trial's stages rank by the sweep's metric; shared ones keep their own
        data["rank"] = {"metric": sweep.rank.metric, "mode": sweep.rank.mode}
    try:
        return config_from_dict(data, chained=init_from is None)
    except ConfigError as error:
        raise ConfigError(f"stages.{stage}: {error}" if stage != base.stage else str(error)) from None


def trial_config(sweep: Sweep, values: dict[str, Any]) -> RunConfig:
    base = _base_config(sweep.base)
    return stage_config(sweep, base.stage, values, init_from=base.init_from)


# --- shared stages (cached) -------------------------------------------------------------------------------


def run_shared_stages(
    sweep: Sweep, stages: list[str], tracking_uri: str, runs_dir: str, log: Any = print
) -> str | None:
    """Runs (or reuses from the MLflow cache) the shared stages; returns the last one's checkpoint URI."""
    from ..tracking import ensure_experiment, register_checkpoint, sanitize_model_name, search_runs
    from ..train import run_training

    source: str | None = None
    previous_fp = ""
    for stage in stages:
        config = stage_config(sweep, stage, {}, init_from=source)
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, experiment=sweep.mlflow.cache_experiment)
        )
        fingerprint = _chain_fingerprint(config, previous_fp)
        ensure_experiment(tracking_uri, sweep.mlflow.cache_experiment, runs_dir)
        cached = search_runs(
            tracking_uri,
            sweep.mlflow.cache_experiment,
            f"tags.`ofq.chain_fingerprint` = '{fingerprint}' and attributes.status = 'FINISHED'",
        )
        if cached:
            run_id = cached[0]["run_id"]
            log(f"[sweep] {stage}: reusing cached run {run_id} (fingerprint {fingerprint})")
        else:
            log(f"[sweep] {stage}: training once for all trials (fingerprint {fingerprint})")
            result = run_training(
                config,
                run_name=f"{stage}-{config.model.name}-{fingerprint[:8]}",
                tags={"ofq.chain_fingerprint": fingerprint, "ofq.first_sweep": sweep.name},
            )
            run_id = result.run_id
            register_checkpoint(
                tracking_uri, run_id, "checkpoints/best", sanitize_model_name(f"ofq-{stage}-{fingerprint[:12]}")
            )
        source = f"runs:/{run_id}/checkpoints/best"
        previous_fp = fingerprint
    return source


def _chain_fingerprint(config: RunConfig, previous: str) -> str:

    return hashlib.sha256(f"{previous}|{config.fingerprint(exclude=('init_from',))}".encode()).hexdigest()[:16]
