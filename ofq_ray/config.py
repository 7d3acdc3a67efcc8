"""Run configuration: typed dataclasses, YAML in, dotted ``--set`` overrides, one-line errors out.

Every field is validated where it is parsed; an error names the dotted key, the value and what is
allowed, e.g. ``optim.lr: -1.0 is not allowed; allowed: a number > 0``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import InitVar, dataclass, field
from typing import IO, Any, TypeVar

import yaml

from .errors import ConfigError
from .hints import did_you_mean
from .quant.convert import QuantConfig
from .quant.oscillation import metric_names as oscillation_metric_names

STAGES = ("pretrain", "qat", "cga")
# What every epoch of a run reports (train.py's worker loop; tests/test_train.py holds it to that): the
# names a ranking or a sweep's tune.metric may use.
EPOCH_METRICS = (
    "train/loss",
    "train/top1",
    "lr",
    "throughput/img_s",
    "val/top1",
    "val/top5",
    "val/loss",
    "model/size_bytes",
    "model/bitops",
    "epoch",
    "time/epoch_s",
)
CGA_METRICS = ("cga/frozen_frac",)
# Words people use for a metric that spelling alone cannot match ("val/accuracy" is not close to "val/top1").
_METRIC_WORDS = {"accuracy": "top1", "acc": "top1", "acc1": "top1", "acc5": "top5", "error": "top1", "ce": "loss"}

T = TypeVar("T")


def reported_metrics(stage: str, track_oscillation: bool = True) -> tuple[str, ...]:
    """The metrics every epoch of a ``stage`` run reports: ``osc/*`` only for quantized stages that
    track oscillation, ``cga/frozen_frac`` only for cga."""
    names = list(EPOCH_METRICS)
    if stage != "pretrain" and track_oscillation:
        names += oscillation_metric_names()
    if stage == "cga":
        names += CGA_METRICS
    return tuple(names)


def metric_hint(name: str, allowed: tuple[str, ...] | list[str]) -> str:
    """The did-you-mean of a metric name: by spelling, or by its word (``val/accuracy`` -> ``val/top1``)."""
    hint = did_you_mean(name, allowed)
    if hint:
        return hint
    prefix, _, word = name.rpartition("/")
    guess = f"{prefix or 'val'}/{_METRIC_WORDS.get(word.lower(), word.lower())}"
    return f" (did you mean {guess!r}?)" if guess in allowed else ""


# --- YAML --------------------------------------------------------------------------------------------------

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.1 floats (what PyYAML knows: a dot, an optionally signed exponent, sexagesimal, .inf, .nan) plus
# YAML 1.2's exponent without a dot ("1e-5", "1E+3"), which PyYAML reads as a string.
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with one change: numbers written ``1e-5``, ``1E+3`` or ``.5e-2`` are floats."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def load_yaml(stream: str | IO[str]) -> Any:
    """Reads YAML as :func:`yaml.safe_load` does, except that ``1e-5`` is the number, not a string.

    Every YAML read of ofq-ray (run configs, sweep specs, ``--set`` values) goes through here.

    >>> load_yaml("lr: 1e-5\\nrange: [1E+3, .5e-2]\\nn: 3")
    {'lr': 1e-05, 'range': [1000.0, 0.005], 'n': 3}
    """
    return yaml.load(stream, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _spec(
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
    fingerprint: bool = True,
    every_stage: bool = False,
    shared_with: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A field's allowed values, and (for RunConfig's fields) its role, declared once on the field:

    - ``fingerprint=False``: it does not change what a stage learns (how to run it, where to record
      it), so a stage's cache key leaves it out;
    - ``every_stage``: how to run; every stage of a sweep's chain takes it from the sweep's base;
    - ``shared_with``: the earlier stages of a chain (pretrain, qat) that take it from the base, so a
      search over it makes those stages per trial instead of shared.
    """
    return {
        "choices": choices,
        "low": low,
        "high": high,
        "strict": strict,
        "fingerprint": fingerprint,
        "every_stage": every_stage,
        "shared_with": shared_with,
    }


@dataclass
class ModelConfig:
    name: str = "vit_fmnist"
    # Float weights the first stage of a chain starts from (and, for qat without kd.teacher, the
    # teacher): timm's hub (pretrained) or a local .pth/.safetensors file (pretrained_path, which wins).
    # A stage with init_from starts from that checkpoint instead.
    pretrained: bool = False
    pretrained_path: str | None = None
    drop_path_rate: float = field(default=0.0, metadata=_spec(low=0.0, high=1.0))


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None
    img_size: int | None = field(default=None, metadata=_spec(low=1))
    train_subset: int | None = field(default=None, metadata=_spec(low=1))
    val_subset: int | None = field(default=None, metadata=_spec(low=1))
    augment: bool = True
    num_workers: int = field(default=0, metadata=_spec(low=0))
    mixup: float = field(default=0.0, metadata=_spec(low=0.0))
    cutmix: float = field(default=0.0, metadata=_spec(low=0.0))
    label_smoothing: float = field(default=0.0, metadata=_spec(low=0.0, high=1.0))


@dataclass
class OptimConfig:
    lr: float = field(default=5e-4, metadata=_spec(low=0.0, strict=True))
    min_lr: float = field(default=1e-5, metadata=_spec(low=0.0))
    weight_decay: float = field(default=0.05, metadata=_spec(low=0.0))
    warmup_epochs: int = field(default=0, metadata=_spec(low=0))
    warmup_lr: float = field(default=1e-6, metadata=_spec(low=0.0))
    cooldown_epochs: int = field(default=0, metadata=_spec(low=0))
    # "auto": cosine for pretrain/qat, constant for cga (the reference's CGA runs at a constant LR)
    schedule: str = field(default="auto", metadata=_spec(choices=("auto", "cosine", "constant")))
    clip_grad: float | None = field(default=None, metadata=_spec(low=0.0, strict=True))


@dataclass
class KDConfig:
    enabled: bool = True
    # FP teacher checkpoint (path or MLflow URI); None: the stage-1 init for qat, the QAT run's teacher for cga
    teacher: str | None = None


@dataclass
class CGAConfig:
    boundary_range: float = field(default=0.005, metadata=_spec(low=0.0, high=0.4999))
    # None: act on the QKR merged product too unless quant.faithful (the reference skips it)
    include_merged: bool | None = None


@dataclass
class TrackingConfig:
    uri: str | None = None
    experiment: str = "ofq-ray"
    run_name: str | None = None
    # register the best checkpoint as this MLflow model (alias "champion"), e.g. to chain stages by name
    register_as: str | None = None


@dataclass
class RankConfig:
    """The metric and mode that rank a run's epochs: Ray's checkpoint retention, the best checkpoint, the
    ``ofq.<stage>.best_*`` tag and the registered model all read it. A sweep sets it from ``tune.metric``."""

    metric: str = "val/top1"  # one the run reports (checked by RunConfig against its stage)
    mode: str = field(default="max", metadata=_spec(choices=("max", "min")))

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"rank.mode: {self.mode!r} is not allowed; allowed: max, min")

    def score(self, value: Any) -> float:
        """Higher is better: the value, negated for ``min``; -inf for a missing or NaN value."""
        if value is None or math.isnan(value):
            return -math.inf
        return float(value) if self.mode == "max" else -float(value)

    def best(self, items: Iterable[T], value: Callable[[T], Any] | None = None) -> T | None:
        """The best of ``items`` (the first one on ties, so list epochs in order); ``value`` reads an
        item's metric (default: ``item[metric]`` of a mapping); None when there are no items."""
        read = value or (lambda item: typing.cast(dict[str, Any], item).get(self.metric))
        chosen: T | None = None
        chosen_score = -math.inf
        for item in items:
            score = self.score(read(item))
            if chosen is None or score > chosen_score:
                chosen, chosen_score = item, score
        return chosen

    def stage_tags(self, stage: str, best: dict[str, float]) -> dict[str, str]:
        """The tags that say which epoch of a ``stage`` is its ``checkpoints/best``: the ranking metric's
        value there, that epoch, and the ranking (written by the run itself, or by the sweep when it closes
        a trial's run)."""
        return {
            f"ofq.{stage}.best_{self.slug}": f"{best.get(self.metric, float('nan')):.6g}",
            f"ofq.{stage}.best_epoch": str(int(best.get("epoch", -1))),
            f"ofq.{stage}.rank": f"{self.metric} {self.mode}",
        }

    @property
    def slug(self) -> str:
        """The metric as a tag-name fragment: ``val/top1`` -> ``val_top1``."""
        return re.sub(r"[^0-9A-Za-z_.-]", "_", self.metric)


@dataclass
class RunConfig:
    """One training stage (pretrain, qat or cga) on ``workers`` Ray Train workers."""

    stage: str = field(default="pretrain", metadata=_spec(choices=STAGES))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_spec(shared_with=("pretrain", "qat")))
    data: DataConfig = field(default_factory=DataConfig, metadata=_spec(shared_with=("pretrain", "qat")))
    quant: QuantConfig = field(default_factory=QuantConfig, metadata=_spec(shared_with=("qat",)))
    optim: OptimConfig = field(default_factory=OptimConfig)
    kd: KDConfig = field(default_factory=KDConfig, metadata=_spec(shared_with=("qat",)))
    cga: CGAConfig = field(default_factory=CGAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=_spec(fingerprint=False))
    rank: RankConfig = field(default_factory=RankConfig)
    epochs: int = field(default=10, metadata=_spec(low=1))
    batch_size: int = field(
        default=128, metadata=_spec(low=1, shared_with=("pretrain", "qat"))
    )  # global, split over workers
    eval_batch_size: int = field(default=512, metadata=_spec(low=1, shared_with=("pretrain", "qat")))
    workers: int = field(default=1, metadata=_spec(low=1, fingerprint=False, every_stage=True))
    cpus_per_worker: float = field(
        default=1.0, metadata=_spec(low=0.0, strict=True, fingerprint=False, every_stage=True)
    )
    use_gpu: bool = field(default=False, metadata=_spec(every_stage=True))
    # Custom Ray resources each worker also holds, e.g. {node_a: 0.1} to place the workers on the nodes that
    # offer node_a (CPUs and GPUs are cpus_per_worker and use_gpu; see worker_resources).
    resources: dict[str, float] = field(
        default_factory=dict, metadata=_spec(low=0.0, fingerprint=False, every_stage=True)
    )
    precision: str = field(default="fp32", metadata=_spec(choices=("fp32", "bf16"), shared_with=("pretrain", "qat")))
    compile: bool = field(default=False, metadata=_spec(shared_with=("pretrain", "qat")))
    seed: int = field(default=0, metadata=_spec(shared_with=("pretrain", "qat")))
    init_from: str | None = None  # FP weights for qat; the QAT checkpoint for cga (path or MLflow URI)
    runs_dir: str = field(default="ofq-runs", metadata=_spec(fingerprint=False, every_stage=True))
    keep_checkpoints: int = field(default=2, metadata=_spec(low=1, fingerprint=False, every_stage=True))
    max_failures: int = field(default=2, metadata=_spec(low=0, fingerprint=False, every_stage=True))
    track_oscillation: bool = field(default=True, metadata=_spec(every_stage=True))
    # Not a field: True for a stage of a sweep's chain whose init_from is the earlier stage's checkpoint,
    # which exists only once that stage has trained; until then init_from may be None and
    # :meth:`check_start` waits for the run (run_training calls it).
    chained: InitVar[bool] = False

    def __post_init__(self, chained: bool) -> None:
        from .data import DATASETS
        from .models import get_spec

        try:
            get_spec(self.model.name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.data.name not in DATASETS:
            raise ConfigError(
                f"data.name: {self.data.name!r} is not allowed; allowed: {', '.join(DATASETS)}"
                f"{did_you_mean(self.data.name, DATASETS)}"
            )
        if self.batch_size % self.workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not allowed with workers={self.workers}; "
                "allowed: a multiple of workers (it is the global batch)"
            )
        for name, setting in (("CPU", "cpus_per_worker"), ("GPU", "use_gpu")):
            if name in self.resources:
                raise ConfigError(
                    f"resources.{name}: {self.resources[name]!r} is not allowed; allowed: custom resources "
                    f"(set {setting})"
                )
        if not chained:
            self.check_start()
        if self.quant.layers:
            self._check_layer_rules()
        if self.stage == "cga" and self.quant.weight_quantizer != "statsq":
            raise ConfigError("quant.weight_quantizer: CGA needs 'statsq'; allowed: statsq")
        reported = reported_metrics(self.stage, self.track_oscillation)
        if self.rank.metric not in reported:
            raise ConfigError(
                f"rank.metric: {self.rank.metric!r} is not reported by a {self.stage} run; "
                f"allowed: {', '.join(reported)}{metric_hint(self.rank.metric, reported)}"
            )

    def check_start(self) -> None:
        """A one-line error when the stage has nothing to start from: a cga stage needs init_from, a qat
        stage with KD a teacher (kd.teacher, init_from or the pretrained weights)."""
        if self.stage == "cga" and self.init_from is None:
            raise ConfigError(
                "init_from: None is not allowed for stage cga; allowed: a QAT checkpoint path or MLflow URI"
            )
        if (
            self.stage == "qat"
            and self.kd.enabled
            and self.kd.teacher is None
            and self.init_from is None
            and not self.has_pretrained
        ):
            raise ConfigError(
                "kd.teacher: None is not allowed when kd.enabled and neither init_from nor model.pretrained(_path) "
                "is set; allowed: an FP checkpoint path or MLflow URI (or set kd.enabled=false)"
            )

    def _check_layer_rules(self) -> None:
        """Every ``quant.layers`` glob must match a module of this model (built on the meta device: no
        memory, no weights), so a bad rule fails at load and not inside a worker."""
        import torch

        from .models import create_model
        from .quant.convert import resolve_widths

        with torch.device("meta"):
            model = create_model(self.model.name, num_classes=10, img_size=self.data.img_size)
        try:
            resolve_widths(model, self.quant)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def has_pretrained(self) -> bool:
        return self.model.pretrained or self.model.pretrained_path is not None

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker holds (ScalingConfig's resources_per_worker): its CPUs, one GPU with
        use_gpu, and the custom resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources}

    @property
    def quantized(self) -> bool:
        return self.stage != "pretrain"

    @property
    def schedule(self) -> str:
        if self.optim.schedule != "auto":
            return self.optim.schedule
        return "constant" if self.stage == "cga" else "cosine"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, *, exclude: tuple[str, ...] = ()) -> str:
        """A stable hash of everything that changes what is trained (for caching shared stages): every
        field but those declared ``fingerprint=False`` and ``exclude``."""
        left_out = {*run_fields(fingerprint=False), *exclude}
        values = {k: v for k, v in self.to_dict().items() if k not in left_out}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fields(
    *, fingerprint: bool | None = None, every_stage: bool | None = None, shared_with: str = ""
) -> tuple[str, ...]:
    """RunConfig's field names, in declaration order, whose declared role (see :func:`_spec`) matches
    every given one (``shared_with``: a stage among the field's ``shared_with``).

    >>> run_fields(shared_with="qat")
    ('model', 'data', 'quant', 'kd', 'batch_size', 'eval_batch_size', 'precision', 'compile', 'seed')
    """
    out = []
    for item in dataclasses.fields(RunConfig):
        meta = {**_spec(), **dict(item.metadata)}
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            continue
        if every_stage is not None and meta["every_stage"] != every_stage:
            continue
        if shared_with and shared_with not in meta["shared_with"]:
            continue
        out.append(item.name)
    return tuple(out)


# --- parsing ---------------------------------------------------------------------------------------------


def _members(hint: Any) -> tuple[Any, ...]:
    """The types ``hint`` allows: a union's members, else ``hint`` itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _shape(kind: Any) -> type:
    """How a value of ``kind`` is written in YAML: a list, a mapping (dict), or a scalar (object)."""
    origin = typing.get_origin(kind)
    if origin is list:
        return list
    return dict if origin is dict or dataclasses.is_dataclass(kind) else object


def _describe(hint: Any, meta: dict[str, Any]) -> str:
    """What ``hint`` with ``meta`` (see :func:`_spec`) allows, in words, e.g. ``a number >= 0`` or
    ``max, min or a non-empty list of them``."""
    members = _members(hint)
    options = [kind for kind in members if kind is not type(None)]
    words = []
    for kind in options:
        args = typing.get_args(kind)
        if _shape(kind) is list:
            words.append("a non-empty list of " + ("them" if args[0] in options else _describe(args[0], meta)))
        elif typing.get_origin(kind) is dict:
            words.append(f"a mapping of names to {_describe(args[1], meta)}")
        elif dataclasses.is_dataclass(kind):
            words.append("a mapping")
        elif meta.get("choices"):
            words.append(", ".join(meta["choices"]))
        else:
            text = {int: "an integer", float: "a number", bool: "true, false", str: "a string"}.get(kind, str(kind))
            low, high, strict = meta.get("low"), meta.get("high"), meta.get("strict")
            if low is not None and high is not None:
                text += f" in [{low:g}, {high:g}]"
            elif low is not None:
                text += f" {'>' if strict else '>='} {low:g}"
            words.append(text)
    return " or ".join(words) + (" or null" if len(options) < len(members) else "")


def _coerce(value: Any, hint: Any, meta: dict[str, Any], key: str) -> Any:
    """``value`` read as a ``hint``: bool, int, float (finite), str, ``list[X]`` (non-empty),
    ``dict[str, X]``, a dataclass (see :func:`_build`), or a union of these (``X | list[X]``); with
    ``| None`` also null or "none". ``meta`` (see :func:`_spec`) applies to every scalar inside; an error
    names the dotted ``key`` of the bad part (``tune.mode[1]``, ``tune.resources_per_worker.CPU``)."""
    members = _members(hint)
    options = [kind for kind in members if kind is not type(None)]

    def bad(suggestion: str = "") -> ConfigError:
        return ConfigError(f"{key}: {value!r} is not allowed; allowed: {_describe(hint, meta)}{suggestion}")

    if len(options) < len(members) and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    shape = list if isinstance(value, list) else dict if isinstance(value, dict) else object
    kind = next((option for option in options if _shape(option) is shape), None)
    if kind is None or (shape is list and not value):
        raise bad()
    if shape is list:
        (element,) = typing.get_args(kind)
        return [_coerce(item, element, meta, f"{key}[{index}]") for index, item in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return _build(typing.cast(type, kind), value, f"{key}.")
    if shape is dict:
        if not all(isinstance(name, str) for name in value):
            raise bad()
        element = typing.get_args(kind)[1]
        return {name: _coerce(item, element, meta, f"{key}.{name}") for name, item in value.items()}
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad()
        choices = meta.get("choices")
        if choices and value not in choices:
            raise bad(did_you_mean(value, choices))
    low, high, strict = meta.get("low"), meta.get("high"), meta.get("strict")
    if isinstance(value, int | float) and (
        (low is not None and (value <= low if strict else value < low)) or (high is not None and value > high)
    ):
        raise bad()
    return value


def _build(cls: type, data: Any, prefix: str, **init: Any) -> Any:
    """A ``cls`` dataclass from the mapping ``data``, every field read by :func:`_coerce` (``prefix``:
    the dotted key of ``data``; ``init``: ``cls``'s init-only values)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {data!r} is not allowed; allowed: a mapping")
    if cls is QuantConfig:  # reads its own shorthands and layer rules
        try:
            return QuantConfig.from_dict(data)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {', '.join(names)}{did_you_mean(str(key), names)}")
    values = {
        item.name: _coerce(data[item.name], hints[item.name], dict(item.metadata), f"{prefix}{item.name}")
        for item in dataclasses.fields(cls)
        if item.name in data
    }
    try:
        return cls(**values, **init)
    except ConfigError:
        raise
    except ValueError as error:  # QuantConfig and friends already speak in one-line field errors
        raise ConfigError(str(error)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set: {text!r} is not allowed; allowed: KEY=VALUE, e.g. optim.lr=1e-4")
    key, _, raw = text.partition("=")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set: {text!r} is not allowed; the value is not valid YAML") from None
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Sets a dotted key in a nested dict. ``quant.bits: "W/A"`` is shorthand for both widths."""
    if path == ["quant", "bits"]:
        weight, act = parse_bits(value)
        apply_override(data, ["quant", "weight_bits"], weight)
        apply_override(data, ["quant", "act_bits"], act)
        return
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def parse_bits(value: Any) -> tuple[int | None, int | None]:
    """``"2/2"`` -> (2, 2); ``"fp"`` -> (None, None)."""
    text = str(value).strip().lower()
    if text in ("fp", "float", "32/32"):
        return None, None
    parts = text.split("/")
    try:
        weight, act = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(text), int(text))
    except ValueError:
        raise ConfigError(
            f"quant.bits: {value!r} is not allowed; allowed: 'W/A' such as '2/2' or '4/4', or 'fp'"
        ) from None
    return weight, act


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> RunConfig:
    """Reads a YAML run config (or ``base``), applies ``KEY=VALUE`` overrides, validates everything."""
    data: dict[str, Any] = copy.deepcopy(base or {})  # overrides must not reach into the caller's dicts
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config: {path} does not exist")
        with open(path) as handle:
            try:
                loaded = load_yaml(handle) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise ConfigError(f"config: {path}{where} is not valid YAML") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
        data = _merge(data, loaded)
    for text in overrides:
        apply_override(data, *parse_override(text))
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any], *, chained: bool = False) -> RunConfig:
    """The run config of ``data``, validated (``chained``: see :attr:`RunConfig.chained`)."""
    config: RunConfig = _build(RunConfig, data, "", chained=chained)
    return config


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
