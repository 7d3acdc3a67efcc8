"""MLflow tracking: one run per training stage, per-epoch metrics, checkpoint artifacts, model registry.

Everything goes through an explicit :class:`mlflow.MlflowClient` built from a tracking URI, never
through MLflow's fluent "active run" globals, so several runs can be open in one process (a sweep's
parent run and its trials) and Ray workers only need ``(uri, run_id)`` to write into a run.

Layout (see DESIGN.md): experiment = sweep or stage name, one run per training stage, child runs
(tag ``mlflow.parentRunId``) for sweep trials, metrics at ``step=epoch``, the run's ``config.yaml``
as an artifact, and the best checkpoint registered as a model version behind the ``champion`` alias.

Example:
    >>> uri = resolve_tracking_uri(None, "runs")  # doctest: +SKIP
    >>> tracker = RunTracker.create(uri, "smoke", "runs", run_name="qat", params=flatten(config))  # doctest: +SKIP
    >>> tracker.sync_history([{"epoch": 0, "train/loss": 2.3, "val/top1": 11.0}])  # doctest: +SKIP
    1
    >>> tracker.finish()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError, TrackingError
from .hints import did_you_mean

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "EPOCH_METRIC",
    "MAX_PARAM_VALUE_LENGTH",
    "PARENT_RUN_TAG",
    "RUN_STATUSES",
    "RunTracker",
    "artifact_bytes",
    "default_tracking_uri",
    "download_artifacts",
    "ensure_experiment",
    "flatten",
    "register_checkpoint",
    "resolve_alias",
    "resolve_tracking_uri",
    "sanitize_model_name",
    "search_runs",
]

# Mirrors mlflow.utils.validation.MAX_PARAM_VAL_LENGTH; kept here so flatten() does not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
# Mirrors mlflow.utils.validation.MAX_TAG_VAL_LENGTH.
MAX_TAG_VALUE_LENGTH = 8000
# Mirrors mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH / MAX_METRICS_PER_BATCH.
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
# Mirrors mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH (param, metric and tag names).
_MAX_KEY_LENGTH = 250

EPOCH_METRIC = "epoch"
# MLflow 3.x UIs that choose an experiment's view by this tag open ours as model training, not GenAI. 3.17
# ignores it (a global GenAI / model-training switch, see runs_view_url); it costs nothing elsewhere.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DB_FILE_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"

# Artifact stores MLflow must handle itself (cloud buckets, the tracking server's proxy, HTTP).
_REMOTE_ARTIFACT_SCHEMES = ("mlflow-artifacts", "s3", "gs", "wasbs", "abfss", "hdfs", "http", "https", "dbfs", "ftp")
# Tracking servers that pick artifact locations themselves.
_SERVER_SCHEMES = ("http", "https", "databricks")
_ALIAS_PATTERN = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS_PATTERN = re.compile(r"^[vV]\d+$")

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------
# URIs and experiments
# --------------------------------------------------------------------------------------------------


def default_tracking_uri(runs_dir: str) -> str:
    """The local sqlite store ``sqlite:///<absolute runs_dir>/mlflow.db``; creates ``runs_dir``.

    Args:
        runs_dir: Folder holding the store and (see :func:`ensure_experiment`) its artifacts.
            Made absolute, so Ray workers with another working directory reach the same file.
    """
    root = Path(runs_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / DB_FILE_NAME}"


def resolve_tracking_uri(uri: str | None, runs_dir: str) -> str:
    """The tracking URI to use: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the default store.

    A relative sqlite path (``sqlite:///mlruns.db``) is made absolute against the current directory,
    because Ray workers run in other directories and would otherwise open another, empty database.

    Args:
        uri: Explicit URI (from the config or the command line); empty strings count as missing.
        runs_dir: Folder for :func:`default_tracking_uri` when neither ``uri`` nor the variable is set.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_dir)
    return _absolute_sqlite_uri(chosen)


def _absolute_sqlite_uri(uri: str) -> str:
    """Makes ``sqlite:///relative.db`` absolute; leaves every other URI (and in-memory sqlite) alone."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, sep, query = uri[len(prefix) :].partition("?")
    if not path or path.startswith("/") or path == ":memory:":
        return uri
    return f"{prefix}{Path(path).expanduser().resolve()}{sep}{query}"


def _is_server_uri(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in _SERVER_SCHEMES


def runs_view_url(server: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs, in the model-training view: MLflow 3.x opens experiments
    in its GenAI view (traces) unless the URL or the user's last choice says ``workflowType=machine_learning``."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ensure_experiment(uri: str, name: str, runs_dir: str) -> str:
    """Returns the id of experiment ``name``, creating it if missing.

    For local stores (sqlite, other databases, file) a new experiment gets the absolute artifact
    location ``file://<runs_dir>/mlartifacts/<name>``; otherwise MLflow would put artifacts in a
    folder relative to the current directory of whichever process logs first. Tracking servers
    (``http(s)://``) choose the location themselves: ``mlflow-artifacts:/<id>`` on a server that proxies
    artifacts (``ofq-ray ui``), so every upload and download goes through it over HTTP and ``runs_dir``
    need not exist here. An existing experiment keeps its location.
    A new experiment is tagged as model training (``EXPERIMENT_TAGS``).
    Two processes creating the same experiment at once both get its id.

    Args:
        uri: Tracking URI.
        name: Experiment name.
        runs_dir: Root of local artifacts (see above); ignored for tracking servers.

    Raises:
        ValueError: ``name`` is empty, or the experiment exists but was deleted (MLflow keeps the
            name reserved until it is restored or garbage-collected).
    """
    if not name or not name.strip():
        raise ConfigError("experiment name must be a non-empty string")
    client = _client(uri)
    existing = client.get_experiment_by_name(name)
    if existing is None:
        location = None
        if not _is_server_uri(uri):
            folder = re.sub(r"[^\w.\-]", "_", name)  # a safe folder name for any experiment name
            location = (Path(runs_dir).expanduser().resolve() / ARTIFACTS_DIR_NAME / folder).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except Exception as error:
            # Another process won the race: read back what it created.
            if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} (id {existing.experiment_id}) was deleted; restore it with "
            f"`mlflow experiments restore --experiment-id {existing.experiment_id}`, purge it with `mlflow gc`, "
            "or choose another name"
        )
    return str(existing.experiment_id)


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flattens a nested config into MLflow params: dotted keys, string values.

    ``None`` becomes ``"None"``, lists and tuples become one-line JSON (also valid YAML), an empty
    nested mapping becomes ``"{}"``; values longer than MLflow's limit (6000 characters) are cut and
    end in ``"..."``.

    Example:
        >>> flatten({"quant": {"w_bits": 2, "qkr": True}, "milestones": [10, 20], "init_from": None})
        {'quant.w_bits': '2', 'quant.qkr': 'True', 'milestones': '[10, 20]', 'init_from': 'None'}

    Args:
        config: Nested mapping (a parsed YAML config or a dataclass ``asdict``).
        prefix: Key prefix, used by the recursion (``"model"`` gives ``"model.name"``).
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten(value, dotted))
            else:
                flat[dotted] = "{}"
        elif isinstance(value, (list, tuple)):
            flat[dotted] = _truncate(json.dumps(list(value), default=str), MAX_PARAM_VALUE_LENGTH)
        else:
            flat[dotted] = _truncate(str(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


class RunTracker:
    """Handle on one MLflow run; cheap to construct in any process (it only stores uri + run_id).

    The driver creates the run with :meth:`create` and hands ``(uri, run_id)`` (or the pickled
    tracker) to the workers; ``RunTracker(uri, run_id)`` there writes into the same run. Only rank 0
    should log. A resumed training keeps using its run id and calls :meth:`sync_history` with the
    full metric history from its checkpoint, which logs each epoch exactly once.

    Example:
        >>> tracker = RunTracker.create(uri, "ofq", "runs", run_name="cga", params={"lr": "1e-5"})  # doctest: +SKIP
        >>> worker_side = RunTracker(tracker.uri, tracker.run_id)  # doctest: +SKIP
        >>> worker_side.log_epoch(0, {"train/loss": 1.2, "val/top1": 61.5})  # doctest: +SKIP
        >>> tracker.finish("FINISHED")  # doctest: +SKIP

    Attributes:
        uri: Tracking URI of the store holding the run.
        run_id: MLflow run id.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        """Wraps an existing run without contacting the store.

        Args:
            uri: Tracking URI.
            run_id: Id of a run in that store (not checked here; the first call fails if unknown).
        """
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        self.uri = uri
        self.run_id = run_id
        self._client_cache: MlflowClient | None = None
        self._artifact_uri: str | None = None

    def __repr__(self) -> str:
        return f"RunTracker(uri={self.uri!r}, run_id={self.run_id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunTracker) and (self.uri, self.run_id) == (other.uri, other.run_id)

    def __hash__(self) -> int:
        return hash((self.uri, self.run_id))

    def __getstate__(self) -> dict[str, str]:
        # Ship only the identity to Ray workers; each process builds its own client.
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.uri = state["uri"]
        self.run_id = state["run_id"]
        self._client_cache = None
        self._artifact_uri = None

    @property
    def _client(self) -> MlflowClient:
        if self._client_cache is None:
            self._client_cache = _client(self.uri)
        return self._client_cache

    @classmethod
    def create(
        cls,
        uri: str,
        experiment: str,
        runs_dir: str,
        *,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        config_yaml: str | None = None,
    ) -> RunTracker:
        """Creates a run (status ``RUNNING``) in ``experiment``, creating the experiment if missing.

        If logging the params, tags or config fails, the half-made run is marked ``FAILED`` and the
        error re-raised, so a broken run never stays ``RUNNING``.

        Args:
            uri: Tracking URI.
            experiment: Experiment name (see :func:`ensure_experiment`).
            runs_dir: Root of local artifacts for a new experiment.
            run_name: Display name (``mlflow.runName``); need not be unique.
            params: Params, e.g. ``flatten(config)``; values are converted with ``str`` and cut to
                MLflow's limit. Params are immutable in MLflow: log everything here.
            tags: Extra run tags.
            parent_run_id: Parent run (a sweep); sets the ``mlflow.parentRunId`` tag. Must exist.
            config_yaml: Text logged as the artifact ``config.yaml``.

        Raises:
            ValueError: a param or tag name MLflow would reject (checked before anything is created),
                or ``parent_run_id`` names no run in this store.
        """
        from mlflow.entities import Param

        # Validate names first, so that bad input creates neither an experiment nor a run.
        param_list = [
            Param(_check_key("param", k), _truncate(str(v), MAX_PARAM_VALUE_LENGTH)) for k, v in params.items()
        ]
        all_tags = {_check_key("tag", k): _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()}
        client = _client(uri)
        if parent_run_id is not None:
            _get_run_or_raise(client, parent_run_id, f"parent run {parent_run_id!r}")
            all_tags[PARENT_RUN_TAG] = parent_run_id
        experiment_id = ensure_experiment(uri, experiment, runs_dir)
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(uri, run.info.run_id)
        tracker._client_cache = client
        try:
            for batch in _chunks(param_list, _MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(tracker.run_id, params=batch, synchronous=True)
            if config_yaml is not None:
                client.log_text(tracker.run_id, config_yaml, "config.yaml")
        except BaseException:
            client.set_terminated(tracker.run_id, "FAILED")
            raise
        return tracker

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Logs ``metrics`` at ``step=epoch`` plus the metric ``epoch``, in one ``log_batch`` call.

        The ``epoch`` metric is what :meth:`logged_epochs` reads; since the batch is one transaction,
        an epoch counts as logged only if all its metrics landed. NaN is logged as NaN; MLflow's sqlite
        store clamps infinities to +-1.8e308. This does not check for an earlier copy of the epoch:
        after a resume, use :meth:`sync_history`.

        Args:
            epoch: Zero-based epoch index (the MLflow step).
            metrics: Metric name -> number (``int``, ``float`` or numpy scalar; not bool, not tensors:
                call ``.item()`` first). Names may contain ``/``. A key ``"epoch"`` must equal ``epoch``.

        Raises:
            ValueError: a negative epoch, a non-numeric value, an invalid metric name, or a mismatching
                ``"epoch"`` key.
        """
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        epoch = _check_epoch(epoch)
        values = _numeric_metrics(metrics, context=f"epoch {epoch}")
        if EPOCH_METRIC in values and values[EPOCH_METRIC] != epoch:
            raise ValueError(f"metrics[{EPOCH_METRIC!r}] = {values[EPOCH_METRIC]} does not match epoch={epoch}")
        values[EPOCH_METRIC] = float(epoch)
        now = get_current_time_millis()
        # "epoch" goes last so that, should a huge dict need several batches, it lands only after the rest.
        ordered = [Metric(key, value, now, epoch) for key, value in values.items() if key != EPOCH_METRIC]
        ordered.append(Metric(EPOCH_METRIC, float(epoch), now, epoch))
        for batch in _chunks(ordered, _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def logged_epochs(self) -> list[int]:
        """Sorted epochs already logged (the steps of the ``epoch`` metric), without duplicates."""
        history = self._client.get_metric_history(self.run_id, EPOCH_METRIC)
        return sorted({int(metric.step) for metric in history})

    def sync_history(self, history: Sequence[Mapping[str, float]]) -> int:
        """Logs every epoch of ``history`` that the run does not have yet, each exactly once.

        Call it after each epoch with the full history, and after the checkpoint holding that history
        is saved: a crash between the two then leaves MLflow behind the checkpoint, and the resumed
        training fills the gap on its next call. An epoch already in the run is never rewritten.

        Args:
            history: ``history[i]`` holds epoch ``i``'s metrics; an ``"epoch"`` key, if present, must be ``i``.

        Returns:
            How many epochs were logged now.

        Raises:
            ValueError: an entry whose ``"epoch"`` is not its index, or a non-numeric value.
        """
        for index, entry in enumerate(history):
            if EPOCH_METRIC in entry and entry[EPOCH_METRIC] != index:
                raise ValueError(f"history[{index}][{EPOCH_METRIC!r}] = {entry[EPOCH_METRIC]!r}; expected {index}")
        done = set(self.logged_epochs())
        logged = 0
        for index, entry in enumerate(history):
            if index not in done:
                self.log_epoch(index, entry)
                logged += 1
        return logged

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Uploads a file or a directory into the run's artifacts.

        Args:
            local_path: File or directory.
            artifact_path: Folder inside the run's artifacts. A file keeps its name inside it (root
                if ``None``). A directory's contents go into it; if ``None``, into a folder named
                like the directory, so ``log_artifact("out/checkpoint")`` gives ``checkpoint/...``.

        Raises:
            FileNotFoundError: ``local_path`` does not exist.
        """
        path = Path(local_path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path or path.resolve().name)
        elif path.exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log artifact: {local_path!r} does not exist")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Sets (or overwrites) run tags; values are converted with ``str`` and cut to MLflow's limit.

        Raises:
            ValueError: a tag name MLflow would reject.
        """
        from mlflow.entities import RunTag

        tag_list = [RunTag(_check_key("tag", k), _truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
        for batch in _chunks(tag_list, _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=batch, synchronous=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``; case-insensitive).

        Raises:
            ValueError: any other status.
        """
        normalized = status.upper() if isinstance(status, str) else status
        if normalized not in RUN_STATUSES:
            raise ValueError(
                f"status={status!r} is not one of {list(RUN_STATUSES)}{did_you_mean(status, RUN_STATUSES)}"
            )
        self._client.set_terminated(self.run_id, normalized)

    @property
    def artifact_uri(self) -> str:
        """Root URI of the run's artifacts (``file:///...`` for local stores, ``mlflow-artifacts:/...`` on a
        server that proxies them)."""
        if self._artifact_uri is None:
            self._artifact_uri = str(self._client.get_run(self.run_id).info.artifact_uri)
        return self._artifact_uri

    def info(self) -> dict[str, Any]:
        """The run as plain data.

        Returns:
            ``run_id``, ``status``, ``run_name``, ``experiment_id``, ``artifact_uri``, ``start_time``
            and ``end_time`` (ms since the epoch; ``end_time`` ``None`` while running), ``params``,
            ``metrics`` (latest value of each) and ``tags``.
        """
        return _run_to_dict(self._client.get_run(self.run_id))


def search_runs(
    uri: str, experiment: str, filter_string: str = "", *, order_by: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Active runs of ``experiment`` as plain data (see :meth:`RunTracker.info`, plus ``parent_run_id``).

    Example:
        >>> top = search_runs(uri, "cga", "metrics.`val/top1` > 70",  # doctest: +SKIP
        ...                   order_by=["metrics.`val/top1` DESC"])

    Args:
        uri: Tracking URI.
        experiment: Experiment name.
        filter_string: MLflow search filter; names with ``/`` need backticks (``metrics.`val/top1```).
        order_by: MLflow order clauses; default newest first.

    Raises:
        ValueError: no experiment of that name.
    """
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [exp.name for exp in client.search_experiments()]
        raise TrackingError(f"no MLflow experiment named {experiment!r} in {uri}{did_you_mean(experiment, names)}")
    runs: list[dict[str, Any]] = []
    page_token: str | None = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=filter_string,
            order_by=list(order_by) if order_by else None,
            page_token=page_token,
        )
        runs.extend(_run_to_dict(run) for run in page)
        page_token = page.token
        if not page_token:
            return runs


# --------------------------------------------------------------------------------------------------
# Artifacts and registry
# --------------------------------------------------------------------------------------------------


def download_artifacts(uri: str, dst: str | None = None, *, tracking_uri: str) -> str:
    """Resolves an artifact URI or a local path to a local path.

    Accepted forms: ``runs:/<run_id>[/<path>]``, ``models:/<name>@<alias>[/<path>]``,
    ``models:/<name>/<version or latest>[/<path>]``, ``mlflow-artifacts:/...`` (needs an http(s)
    tracking URI), other remote stores MLflow knows (``s3://``...), ``file://...`` and plain paths.

    Remote and run artifacts are copied into ``dst`` (a fresh temporary directory if ``None``; the
    caller owns it). A plain path or ``file://`` URI is returned as is when ``dst`` is ``None``,
    otherwise copied into ``dst``.

    Registry URIs are resolved with ``tracking_uri`` here: MLflow's own ``models:/`` resolution
    ignores the registry URI it is given and reads the process-global default store instead.

    Args:
        uri: What to fetch.
        dst: Existing or new local directory to copy into.
        tracking_uri: Store holding the runs and registered models.

    Returns:
        Local path of the file or directory (``<dst>/<basename>``).

    Raises:
        ValueError: one line naming ``uri``: unknown run, model, version or alias, missing artifact
            or path, or an unsupported form.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme
    if scheme == "runs":
        run_id, _, artifact_path = uri[len("runs:") :].lstrip("/").partition("/")
        if not run_id:
            raise TrackingError(f"{uri!r}: expected runs:/<run_id>/<artifact path>")
        return _download_run_artifact(_client(tracking_uri), tracking_uri, uri, run_id, artifact_path.strip("/"), dst)
    if scheme == "models":
        return _download_model_artifact(tracking_uri, uri, dst)
    if scheme == "file":
        return _local_path(uri, urllib.request.url2pathname(parsed.path), dst)
    if scheme in _REMOTE_ARTIFACT_SCHEMES:
        _check_artifacts_reachable(uri, tracking_uri, repr(uri))
        return _download_with_mlflow(uri, uri, dst, tracking_uri)
    return _local_path(uri, uri, dst)


def artifact_bytes(tracking_uri: str, run_ids: Sequence[str]) -> int:
    """Total size of the runs' artifacts, listed through the store (so also behind a tracking server, where
    the files are not on this machine). Unknown runs count 0.

    Example:
        >>> artifact_bytes("http://127.0.0.1:5000", [trial["run_id"] for trial in trials])  # doctest: +SKIP
        67990366
    """
    client = _client(tracking_uri)
    total = 0
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except Exception as error:
            if _error_code(error) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                continue
            raise
        _check_artifacts_reachable(run.info.artifact_uri, tracking_uri, f"run {run_id}")
        folders: list[str | None] = [None]
        while folders:
            for info in client.list_artifacts(run_id, folders.pop()):
                if info.is_dir:
                    folders.append(info.path)
                else:
                    total += int(info.file_size or 0)
    return total


def sanitize_model_name(name: str) -> str:
    """A valid registered model name close to ``name``: ``/``, ``:`` and whitespace become ``-``.

    Example:
        >>> sanitize_model_name("deit-s/w2a2: cga")
        'deit-s-w2a2-cga'
    """
    cleaned = re.sub(r"[/:\s]+", "-", name.strip()).strip("-.")
    if not cleaned:
        raise ConfigError(f"cannot make a registered model name from {name!r}")
    return cleaned


def register_checkpoint(
    tracking_uri: str,
    run_id: str,
    artifact_path: str,
    name: str,
    alias: str = "champion",
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
    model_description: str | None = None,
) -> int:
    """Registers ``runs:/<run_id>/<artifact_path>`` as a new version of model ``name`` behind ``alias``.

    The artifact is a plain directory (our checkpoint and ``config.yaml``), not an MLflow ``MLmodel``;
    the registry stores the ``runs:/`` source and :func:`download_artifacts` with
    ``models:/<name>@<alias>`` returns that directory. The registered model is created if missing and
    ``alias`` moves to the new version.

    Args:
        tracking_uri: Store holding the run; also used as registry.
        run_id: Run that logged the checkpoint.
        artifact_path: Path of the directory (or file) inside the run's artifacts.
        name: Registered model name; ``/`` and ``:`` are not allowed (see :func:`sanitize_model_name`).
        alias: Alias to point at the new version (letters, digits, ``_``, ``-``).
        tags: Tags of the new model version (e.g. the metric that made it the champion).
        description: The new version's description (markdown in the MLflow UI).
        model_description: The registered model's description; replaces the one it has.

    Returns:
        The new version number.

    Raises:
        ValueError: invalid name or alias, unknown run, or no such artifact in the run.
    """
    from mlflow.utils.validation import path_not_unique

    if not name or not name.strip() or "/" in name or ":" in name or path_not_unique(name):
        raise ConfigError(
            f"invalid registered model name {name!r}: it must be non-empty, contain no '/' or ':' and not "
            f"look like a relative path; try {_safe_suggestion(name)!r}"
        )
    _check_alias(alias)
    client = _client(tracking_uri)
    source = f"runs:/{run_id}/{artifact_path.strip('/')}"
    run = _get_run_or_raise(client, run_id, f"{source!r}: run {run_id!r}")
    _check_artifacts_reachable(run.info.artifact_uri, tracking_uri, repr(source))
    if not _run_artifact_exists(client, run_id, artifact_path.strip("/")):
        raise TrackingError(f"{source!r}: run {run_id} has no artifact {artifact_path!r}")
    try:
        client.create_registered_model(name)
    except Exception as error:
        # Registering into an existing model is the normal case after the first sweep.
        if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
            raise
    if model_description is not None:
        client.update_registered_model(name, description=model_description)
    version = client.create_model_version(
        name, source, run_id=run_id, tags={str(k): str(v) for k, v in (tags or {}).items()}, description=description
    )
    client.set_registered_model_alias(name, alias, str(version.version))
    return int(version.version)


def resolve_alias(tracking_uri: str, name: str, alias: str = "champion") -> dict[str, Any]:
    """The model version behind ``models:/<name>@<alias>``.

    Returns:
        ``{"name", "alias", "version" (int), "run_id", "source", "tags"}``; ``source`` is the
        registered URI (``runs:/<run_id>/<path>`` for :func:`register_checkpoint`).

    Raises:
        ValueError: unknown model or alias.
    """
    version = _model_version(_client(tracking_uri), f"models:/{name}@{alias}", name, alias=alias)
    return {
        "name": name,
        "alias": alias,
        "version": int(version.version),
        "run_id": version.run_id,
        "source": version.source,
        "tags": dict(version.tags or {}),
    }


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    # MLflow caches one store per URI, so a client per call is cheap; registry = tracking store.
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _error_code(error: BaseException) -> str | None:
    code = getattr(error, "error_code", None)
    return code if isinstance(code, str) else None


def _first_line(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return str(message).strip().splitlines()[0]


def _safe_suggestion(name: str) -> str:
    try:
        return sanitize_model_name(name)
    except ValueError:
        return "my-model"


def _chunks(items: Sequence[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _check_epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or int(epoch) < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    return int(epoch)


def _numeric_metrics(metrics: Mapping[str, Any], context: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for key, value in metrics.items():
        # bool is an int subclass, and a tensor would silently sync a GPU: accept real numbers only.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"metric {key!r} ({context}) must be a real number, got {type(value).__name__} {value!r}; "
                "convert tensors with .item()"
            )
        values[_check_key("metric", key)] = float(value)
    return values


def _check_key(kind: str, key: object) -> str:
    """Applies MLflow's rules for param, metric and tag names up front, as a one-line ValueError."""
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    name = str(key)
    if not name or len(name) > _MAX_KEY_LENGTH or not validate_param_and_metric_name(name) or path_not_unique(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-{_MAX_KEY_LENGTH} letters, digits, '_', '-', '.', ' ', ':' or '/', "
            "and nothing that normalizes to another path ('a//b', './a', 'a/')"
        )
    return name


def _check_alias(alias: str) -> None:
    if not alias or not _ALIAS_PATTERN.match(alias) or len(alias) > 255:
        raise ConfigError(f"invalid alias {alias!r}: use letters, digits, '_' and '-' (at most 255 characters)")
    if alias.lower() == "latest" or _VERSION_ALIAS_PATTERN.match(alias):
        raise ConfigError(f"invalid alias {alias!r}: 'latest' and 'v<number>' are reserved by MLflow")


def _get_run_or_raise(client: MlflowClient, run_id: str, what: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as error:
        if _error_code(error) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(f"{what} not found in this tracking store") from None
        raise


def _check_artifacts_reachable(artifact_uri: str, tracking_uri: str, what: str) -> None:
    """A one-line error instead of MLflow's paragraph when artifacts live behind a tracking server
    (``mlflow-artifacts:/``) but the store is opened directly (its sqlite file) rather than through it."""
    if urllib.parse.urlparse(artifact_uri).scheme == "mlflow-artifacts" and not _is_server_uri(tracking_uri):
        raise TrackingError(
            f"{what}: the artifacts are on an MLflow server ({artifact_uri}); use the server as tracking URI "
            "(MLFLOW_TRACKING_URI=http://<host>:<port>, e.g. where `ofq-ray ui` serves this store)"
        )


def _run_artifact_exists(client: MlflowClient, run_id: str, artifact_path: str) -> bool:
    if not artifact_path:
        return True
    parent = posixpath.dirname(artifact_path)
    listing = client.list_artifacts(run_id, parent or None)
    return any(info.path == artifact_path for info in listing)


def _run_to_dict(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "parent_run_id": run.data.tags.get(PARENT_RUN_TAG),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
    }


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Turns MLflow's tqdm download bars off (they flood Ray worker logs) unless the user set the variable."""
    variable = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if variable in os.environ:
        yield
        return
    os.environ[variable] = "false"
    try:
        yield
    finally:
        os.environ.pop(variable, None)


@contextlib.contextmanager
def _destination(dst: str | None) -> Iterator[str]:
    """``dst`` (created), or a fresh temporary directory that is removed again if the download fails."""
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        yield str(Path(dst).resolve())
        return
    temporary = tempfile.mkdtemp(prefix="ofq-ray-artifacts-")
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _download_with_mlflow(label: str, artifact_uri: str, dst: str | None, tracking_uri: str) -> str:
    import mlflow.artifacts

    with _destination(dst) as target:
        try:
            with _quiet_progress_bars():
                return mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=target, tracking_uri=tracking_uri
                )
        except Exception as error:
            raise TrackingError(f"{label!r}: {_first_line(error)}") from None


def _download_run_artifact(
    client: MlflowClient, tracking_uri: str, label: str, run_id: str, artifact_path: str, dst: str | None
) -> str:
    run = _get_run_or_raise(client, run_id, f"{label!r}: run {run_id!r}")
    _check_artifacts_reachable(run.info.artifact_uri, tracking_uri, repr(label))
    if not _run_artifact_exists(client, run_id, artifact_path):
        raise TrackingError(f"{label!r}: run {run_id} has no artifact {artifact_path!r}")
    import mlflow.artifacts

    with _destination(dst) as target:
        try:
            with _quiet_progress_bars():
                return mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=artifact_path or None, dst_path=target, tracking_uri=tracking_uri
                )
        except Exception as error:
            raise TrackingError(f"{label!r}: {_first_line(error)}") from None


def _model_version(
    client: MlflowClient, label: str, name: str, *, alias: str | None = None, version: str | None = None
) -> Any:
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise TrackingError(f"{label!r}: registered model {name!r} has no versions")
            return max(versions, key=lambda found: int(found.version))
        return client.get_model_version(name, str(version))
    except ValueError:
        raise
    except Exception as error:
        if _error_code(error) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        if client.search_registered_models(f"name = '{name}'"):
            what = f"alias {alias!r}" if alias is not None else f"version {version!r}"
            raise TrackingError(f"{label!r}: registered model {name!r} has no {what}") from None
        raise TrackingError(f"{label!r}: no registered model named {name!r}") from None


def _download_model_artifact(tracking_uri: str, uri: str, dst: str | None) -> str:
    body = uri[len("models:") :]
    if body.startswith("//"):
        raise TrackingError(
            f"{uri!r}: models:// URIs with a registry host are not supported; use models:/<name>@<alias>"
        )
    head, _, rest = body.lstrip("/").partition("/")
    client = _client(tracking_uri)
    if "@" in head:
        name, _, alias = head.partition("@")
        found = _model_version(client, uri, name, alias=alias)
        sub_path = rest
    else:
        version, _, sub_path = rest.partition("/")
        if not head or not (version.isdigit() or version == "latest"):
            raise TrackingError(f"{uri!r}: expected models:/<name>@<alias>[/path] or models:/<name>/<version>[/path]")
        name = head
        found = _model_version(client, uri, name, version=version)
    source = str(client.get_model_version_download_uri(name, str(found.version)))
    sub_path = sub_path.strip("/")
    if source.startswith("runs:"):
        run_id, _, base = source[len("runs:") :].lstrip("/").partition("/")
        full_path = posixpath.join(base.strip("/"), sub_path) if sub_path else base.strip("/")
        return _download_run_artifact(client, tracking_uri, uri, run_id, full_path, dst)
    target_uri = posixpath.join(source, sub_path) if sub_path else source
    if urllib.parse.urlparse(target_uri).scheme in ("file", ""):
        local = urllib.request.url2pathname(urllib.parse.urlparse(target_uri).path)
        return _local_path(uri, local, dst)
    _check_artifacts_reachable(target_uri, tracking_uri, repr(uri))
    return _download_with_mlflow(uri, target_uri, dst, tracking_uri)


def _local_path(label: str, path: str, dst: str | None) -> str:
    source = Path(path).expanduser()
    if not source.exists():
        raise TrackingError(f"{label!r}: no such file or directory")
    if dst is None:
        return str(path)
    with _destination(dst) as target:
        copied = Path(target) / source.resolve().name
        if source.is_dir():
            shutil.copytree(source, copied, dirs_exist_ok=True)
        else:
            shutil.copy2(source, copied)
        return str(copied)
