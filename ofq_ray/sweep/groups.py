"""Searched layer groups: ``search: {quant.layers: ...}`` names groups of layers and searches one width
pair per group, so a per-block or attention/MLP mixed-precision search is a few lines of YAML.

Two forms (either takes ``choice``: the widths each group may take, ``"W/A"`` such as ``"2/2"``, a
single integer for both, or ``"fp"`` for float)::

    quant.layers: {groups: {early: "blocks.[0-3]", attn: "blocks.*.attn"}, choice: ["2/2", "4/4"]}
    quant.layers: {each: ["blocks.*.attn", "blocks.*.mlp"], choice: ["2/2", "3/3", "4/4"]}

``groups`` names each group (a glob, or ``{match: glob, choice: [...]}`` with its own widths); ``each``
makes one group per module that a glob matches at the glob's own depth (``blocks.*`` -> ``blocks.0``,
``blocks.1``, ...; a list of globs gives the groups of each in turn). The globs are those of
``quant.layers`` rules, resolved against the model built on the meta device.

Each group is its own categorical search key ``quant.layers.<group>`` (the Optuna parameter, the
``search.quant.layers.<group>`` MLflow param, a column of the summary table). A trial's values become
``quant.layers`` rules ``{match: glob, weight_bits: W, act_bits: A}`` appended after the run config's
own rules, in the order the groups are declared (so a later group wins where two overlap).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

from ..config import ConfigError, RunConfig, parse_bits
from ..hints import did_you_mean
from ..quant.convert import _examples

KEY = "quant.layers"
FORMS = ("groups", "each")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FORM_HINT = "{groups: {NAME: GLOB, ...}, choice: [W/A, ...]} or {each: GLOB, choice: [W/A, ...]}"
_WIDTH_HINT = "'W/A' with widths from 2 to 8 such as '2/2' or '4/4', a single width, or 'fp'"


def _module_names(config: RunConfig) -> list[str]:
    """Every quantizable module of the run's model and every module containing one, in module order."""
    import torch

    from ..models import create_model
    from ..quant.convert import quant_sites

    with torch.device("meta"):
        model = create_model(config.model.name, num_classes=10, img_size=config.data.img_size)
    names: list[str] = []
    for site in quant_sites(model):
        parts = site.name.split(".")
        for end in range(1, len(parts) + 1):
            scope = ".".join(parts[:end])
            if scope not in names:
                names.append(scope)
    return names


def _width(value: Any, where: str) -> str:
    """A width choice as its canonical string: ``4`` -> ``"4/4"``, ``"fp"`` -> ``"fp"``."""
    bad = ConfigError(f"{where}: {value!r} is not allowed; allowed: {_WIDTH_HINT}")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise bad
    try:
        weight, act = parse_bits(value)
    except ConfigError:
        raise bad from None
    if weight is None and act is None:
        return "fp"
    if weight is None or act is None or not (2 <= weight <= 8 and 2 <= act <= 8):
        raise bad
    return f"{weight}/{act}"


def _choices(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {values!r} is not allowed; allowed: a non-empty list of {_WIDTH_HINT}")
    widths: list[str] = []
    for index, value in enumerate(values):
        width = _width(value, f"{where}[{index}]")
        if width not in widths:
            widths.append(width)
    return widths


def layer_groups(spec: Any, base: RunConfig) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Validates the ``search.quant.layers`` group form against the base's model and expands it:
    (``{"quant.layers.<group>": {"choice": [...]}}``, ``{"quant.layers.<group>": glob}``).

    Raises:
        ConfigError: one line naming the field: an unknown form or key, a bad group name, a glob that
            matches no quantizable module, a width that is not allowed.
    """
    where = f"search.{KEY}"
    if not isinstance(spec, dict) or sum(form in spec for form in FORMS) != 1:
        raise ConfigError(f"{where}: {spec!r} is not allowed; allowed: {_FORM_HINT}")
    for key in spec:
        if key not in (*FORMS, "choice"):
            allowed = [*FORMS, "choice"]
            raise ConfigError(
                f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}{did_you_mean(str(key), allowed)}"
            )
    common = _choices(spec["choice"], f"{where}.choice") if "choice" in spec else None
    names = _module_names(base)
    examples = _examples(names)
    search: dict[str, dict[str, Any]] = {}
    globs: dict[str, str] = {}

    def add(group: str, glob: str, choices: list[str] | None, at: str) -> None:
        if choices is None:
            raise ConfigError(f"{at}: no widths to search; allowed: {where}.choice (or a group's own choice)")
        search[f"{KEY}.{group}"] = {"choice": choices}
        globs[f"{KEY}.{group}"] = glob

    if "groups" in spec:
        groups = spec["groups"]
        if not isinstance(groups, dict) or not groups:
            raise ConfigError(
                f"{where}.groups: {groups!r} is not allowed; allowed: a mapping NAME: GLOB (or NAME: {{match, choice}})"
            )
        for name, group in groups.items():
            at = f"{where}.groups.{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(
                    f"{where}.groups: {name!r} is not allowed as a group name; allowed: letters, digits, _ and -"
                )
            choices = common
            if isinstance(group, dict):
                for key in group:
                    if key not in ("match", "choice"):
                        raise ConfigError(f"{at}.{key}: unknown key; allowed: match, choice")
                if "choice" in group:
                    choices = _choices(group["choice"], f"{at}.choice")
                glob = group.get("match")
            else:
                glob = group
            if not isinstance(glob, str) or not glob.strip():
                raise ConfigError(f"{at}: {glob!r} is not allowed; allowed: a glob over module names, e.g. 'blocks.0'")
            if not any(fnmatchcase(n, glob) for n in names):
                raise ConfigError(
                    f"{at}: {glob!r} matches no quantizable module; allowed: a glob over names such as "
                    f"{examples}{did_you_mean(glob, names)}"
                )
            add(name, glob, choices, at)
    else:
        each = spec["each"]
        patterns = each if isinstance(each, list) else [each]
        if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
            raise ConfigError(f"{where}.each: {each!r} is not allowed; allowed: a glob or a list of globs")
        for pattern in patterns:
            depth = pattern.count(".") + 1
            matched = [n for n in names if n.count(".") + 1 == depth and fnmatchcase(n, pattern)]
            if not matched:
                at_depth = [n for n in names if n.count(".") + 1 == depth]
                shown = ", ".join(at_depth[:6]) or examples
                raise ConfigError(
                    f"{where}.each: {pattern!r} matches no quantizable module at its depth ({depth} name parts); "
                    f"allowed: a glob over names such as {shown}{did_you_mean(pattern, at_depth)}"
                )
            for name in matched:
                if f"{KEY}.{name}" in search:
                    raise ConfigError(f"{where}.each: {pattern!r} names {name} a second time; allowed: disjoint globs")
                add(name, name, common, where)
    return search, globs


def group_rules(values: dict[str, Any], globs: dict[str, str]) -> list[dict[str, Any]]:
    """A trial's group values as ``quant.layers`` rules, in the groups' declared order."""
    rules = []
    for key, glob in globs.items():
        if key in values:
            weight, act = parse_bits(values[key])
            rules.append({"match": glob, "weight_bits": weight, "act_bits": act})
    return rules
