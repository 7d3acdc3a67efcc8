"""What a sweep asks of the Ray cluster: where each trial trains, what it holds, whether the cluster fits
the sweep before it starts, and whether it still fits one trial while the sweep runs (nodes come and go)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Stopper

from .spec import Sweep
from .stages import trial_config

TRIAL_CPU = 0.01  # a trial that drives a Ray Train worker group holds almost nothing; its workers do


def in_process_trials(sweep: Sweep) -> bool:
    """Whether each trial trains in its own Tune process (one worker per trial) rather than starting a Ray
    Train worker group. Starting a group (its controller, workers and placement group: a handful of new
    Python processes per stage) cost 30-40 s per trial on 2 CPU cores, longer than a small trial trains;
    a one-worker trial gains nothing from it. Every stage of a trial runs with the same workers."""
    return trial_config(sweep, {}).workers == 1


def trial_bundles(sweep: Sweep) -> list[dict[str, float]]:
    """The resource bundles one trial holds while it trains: the worker's own (custom resources included)
    when it trains in its process, else a sliver of CPU for the process that drives the group and one
    bundle per worker."""
    config = trial_config(sweep, {})
    if in_process_trials(sweep):
        return [dict(config.worker_resources)]
    return [{"CPU": TRIAL_CPU}] + [dict(config.worker_resources) for _ in range(config.workers)]


def trial_resources(sweep: Sweep) -> Any:
    """What Tune reserves for each trial (its own process's bundle; a worker group reserves the rest)."""
    from ray import tune

    return tune.PlacementGroupFactory(trial_bundles(sweep)[:1])


def check_sweep_resources(sweep: Sweep) -> None:
    """Fails with one line when ``tune.max_concurrent_trials`` trials, each a driver and its workers,
    cannot fit the Ray cluster (every resource of ``tune.resources_per_worker``, custom ones included)."""
    from ..train import check_resources

    config = trial_config(sweep, {})  # every stage of a trial runs with the same workers and resources
    driver = 0.0 if in_process_trials(sweep) else TRIAL_CPU
    check_resources(config, sweep.tune.max_concurrent_trials, driver, key="tune.resources_per_worker")


def missing_for_one_trial(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """What keeps one trial (its ``bundles``) off the live ``nodes`` (each node's total resources), or None
    when it fits. Bundles are placed greedily, largest first, each on one node (a bundle cannot span
    nodes), which is what a trial's placement group needs."""
    free = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in bundle.items()):
                for name, amount in bundle.items():
                    node[name] = node.get(name, 0.0) - amount
                break
        else:
            wanted = ", ".join(f"{amount:g} {name}" for name, amount in sorted(bundle.items()))
            return f"no live node has {wanted} left for one of a trial's {len(bundles)} bundle(s)"
    return None


def live_nodes() -> list[dict[str, float]]:
    """The total resources of every node the cluster considers alive."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


class ClusterWatch(Stopper):  # type: ignore[misc]
    """A Tune stopper that ends the sweep when the live nodes cannot fit one trial for ``wait_s`` seconds in a
    row (a node lost and not back). Until then Tune keeps waiting, so a node that rejoins is used again.
    ``reason`` says what was missing; checked at most every ``every_s`` seconds.

    Tune pickles its stopper with the experiment and a resumed sweep runs Tune's restored copy, not the one
    the resuming driver made: so the reason is also written to ``note`` (a file), which the driver reads
    (:func:`stop_reason`), and a restored copy starts afresh (another process's clock, perhaps a mended
    cluster) rather than stopping at once for what stopped the earlier run."""

    def __init__(
        self,
        bundles: list[dict[str, float]],
        wait_s: float,
        nodes: Callable[[], list[dict[str, float]]] = live_nodes,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 2.0,
        note: str | None = None,
    ) -> None:
        self.bundles, self.wait_s, self.nodes, self.clock, self.every_s = bundles, wait_s, nodes, clock, every_s
        self.note = note
        self._start()

    def _start(self) -> None:
        self.short_since: float | None = None
        self.checked = -float("inf")
        self.reason: str | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False  # no single trial is stopped; see stop_all

    def stop_all(self) -> bool:
        if self.reason is not None:
            return True
        now = self.clock()
        if now - self.checked < self.every_s:
            return False
        self.checked = now
        missing = missing_for_one_trial(self.bundles, self.nodes())
        if missing is None:
            self.short_since = None
            return False
        if self.short_since is None:
            self.short_since = now
        if now - self.short_since >= self.wait_s:
            self.reason = (
                f"the cluster can no longer fit a trial ({missing}) after waiting {self.wait_s:g} s "
                "(tune.wait_for_nodes_s); the sweep stopped"
            )
            if self.note is not None:
                with open(self.note, "w") as handle:
                    handle.write(self.reason)
            return True
        return False

    def stop_reason(self) -> str | None:
        """Why the sweep was stopped, by this watch or by Tune's restored copy of it; None if it was not."""
        if self.reason is None and self.note is not None and os.path.exists(self.note):
            with open(self.note) as handle:
                return handle.read()
        return self.reason

    def forget(self) -> None:
        """Removes the note an earlier run of the sweep left (a resumed sweep starts with a clean slate)."""
        if self.note is not None and os.path.exists(self.note):
            os.remove(self.note)
