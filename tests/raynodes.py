"""Ray clusters for the tests, made of `ray start --block` processes on this machine: a head and any number
of worker nodes, each in its own session so a node can be removed (all its processes at once, as when a
machine goes away) and added again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RayNodes:
    """A head on 127.0.0.1 (with the dashboard, for jobs and the state API) and worker nodes added to it."""

    def __init__(self, head_cpus: int, head_resources: dict[str, float] | None = None) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ],
            head_cpus,
            head_resources,
        )

    def _start(self, name: str, args: list[str], cpus: int, resources: dict[str, float] | None) -> None:
        command = [RAY, "start", "--block", *args, f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1"]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        self.nodes[name] = subprocess.Popen(
            command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def add(self, name: str, cpus: int, resources: dict[str, float]) -> None:
        """Starts a worker node and waits until it is alive in the cluster. Not until the cluster counts its
        resources: a killed node that offered the same ones is counted until it is marked dead (~30 s)."""
        import ray

        before = {n["NodeID"] for n in ray.nodes()}
        self._start(name, [f"--address={self.address}"], cpus, resources)
        self.wait_for(lambda: any(n["Alive"] and n["NodeID"] not in before for n in ray.nodes()), f"node {name}")

    def remove(self, name: str, resource: str, *, wait: bool = True) -> str:
        """Kills every process of a node at once (its raylet, its workers), as a machine that went away;
        returns its id. With ``wait``, returns once the cluster has marked it dead (see :meth:`wait_dead`)."""
        node = self.node_id(resource)
        process = self.nodes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        if wait:
            self.wait_dead(node)
        return node

    def wait_dead(self, node: str) -> None:
        """Waits until the cluster no longer counts ``node`` alive (a killed node misses its health checks
        for about 30 s first)."""
        import ray

        deadline = time.time() + 180
        while any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
            if time.time() > deadline:
                raise RuntimeError(f"node {node} was killed but the cluster still counts it alive")
            time.sleep(0.5)

    def node_id(self, resource: str) -> str:
        """The id of the live node that offers the custom ``resource``."""
        import ray

        ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
        assert len(ids) == 1, ids
        return str(ids[0])

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not join the cluster at {self.address}")
            time.sleep(0.5)

    def connect(self) -> None:
        """Connects this process as a driver (retrying while the head starts)."""
        import ray

        os.environ["RAY_AUTH_MODE"] = "disabled"
        deadline = time.time() + 90
        while True:
            try:
                ray.init(address=self.address, log_to_driver=False)
                return
            except Exception:
                if time.time() > deadline or self.nodes["head"].poll() is not None:
                    self.stop()
                    raise
                time.sleep(1)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            process = self.nodes.pop(name, None)
            if process is not None:  # worker nodes at once; the head cleanly (its GCS, dashboard, sessions)
                os.killpg(process.pid, signal.SIGTERM if name == "head" else signal.SIGKILL)
                process.wait(timeout=60)
        # `ray start` leaves its address behind; a later auto-detecting Ray helper (Ray Train's placement
        # group cleaner) would then try to reach this dead cluster.
        marker = Path("/tmp/ray/ray_current_cluster")
        if marker.exists() and marker.read_text().strip().endswith(f":{self.port}"):
            marker.unlink()
