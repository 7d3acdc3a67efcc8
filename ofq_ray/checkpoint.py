"""Training checkpoints: one ``state.pt`` per checkpoint directory, loadable with ``weights_only=True``.

A checkpoint holds everything needed to resume a stage exactly (model, optimizer, oscillation tracker,
per-epoch history, RNG) and to rebuild the model elsewhere (its run config).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch import nn

from .config import RunConfig, config_from_dict
from .errors import CheckpointError
from .models import create_model
from .quant import quantize_model

FORMAT = "ofq-ray-checkpoint"
VERSION = 1
STATE_FILE = "state.pt"


def save_checkpoint(directory: str, state: dict[str, Any]) -> str:
    """Writes ``state`` to ``directory/state.pt`` atomically (a crash never leaves a truncated file)."""
    os.makedirs(directory, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    torch.save(payload, tmp)
    path = os.path.join(directory, STATE_FILE)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str) -> dict[str, Any]:
    """Reads a checkpoint file or directory (``weights_only=True``) and checks its format."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint: {path} has no {STATE_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or unsafe pickle content
        raise CheckpointError(f"checkpoint: {path} is not readable ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not an ofq-ray checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint: {path} has version {state.get('version')}; allowed: {VERSION}")
    return state


def checkpoint_config(state: dict[str, Any]) -> RunConfig:
    return config_from_dict(state["config"])


def build_model(config: RunConfig, num_classes: int, in_chans: int, img_size: int, quantized: bool) -> nn.Module:
    """The (float or converted) model of a run config, with random weights."""
    model = create_model(
        config.model.name,
        num_classes,
        in_chans=in_chans,
        img_size=img_size,
        drop_path_rate=config.model.drop_path_rate,
    )
    if quantized:
        quantize_model(model, config.quant)
    return model


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load into ``model``; on any mismatch raise a one-line error (the caller discards the model)."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(f"checkpoint: {source} does not fit this model ({first[:160]})") from None


def model_from_checkpoint(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the trained model (quantized if the stage was) from a checkpoint, in eval mode."""
    state = read_checkpoint(path)
    config = checkpoint_config(state)
    data = state["data_info"]
    quantized = state["stage"] != "pretrain"
    model = build_model(config, data["num_classes"], data["in_chans"], data["img_size"], quantized)
    load_model_state(model, state["model_state"], path)
    return model.eval(), state


def load_model(source: str, *, tracking_uri: str | None = None, runs_dir: str = "ofq-runs") -> nn.Module:
    """Loads a trained model (eval mode) from a checkpoint path or an MLflow URI.

    An MLflow URI is fetched through the tracking store (over HTTP from a tracking server such as
    ``ofq-ray ui``) into a temporary folder that is removed once the model is built.

    Example:
        >>> model = load_model("models:/fmnist-cga@champion", tracking_uri="http://127.0.0.1:5000")
    """
    if not source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return model_from_checkpoint(source)[0]
    from .tracking import download_artifacts, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, os.path.abspath(runs_dir))
    with tempfile.TemporaryDirectory(prefix="ofq-ray-model-") as folder:
        model, _ = model_from_checkpoint(download_artifacts(source, folder, tracking_uri=uri))
    return model
