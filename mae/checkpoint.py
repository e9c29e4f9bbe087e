"""Our checkpoints: plain tensors, plain Python containers and the config, readable with weights_only=True.

Layout of the saved dict:
    {"format": "mae-checkpoint", "format_version": 1, "toolkit_version": str,
     "config": MAEConfig.to_dict(), "model": state_dict (original MAE names), ...extra (optimizer, epoch, rng...)}
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from mae import __version__
from mae.config import MAEConfig
from mae.errors import MAEError
from mae.runtime.bundle import atomic_write_bytes

FORMAT = "mae-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], config: MAEConfig, **extra: Any):
    """Write atomically (temp file + fsync + rename): a kill never leaves a broken checkpoint."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "config": config.to_dict(),
        "model": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True); a file that needs arbitrary unpickling is refused and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise MAEError(f"{path} does not exist or is not a file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MAEError(
            f"Refusing to load {path}: it contains Python objects that would have to be unpickled (code could run).",
            hint="only load files you trust; re-save the weights as plain tensors (torch.save(model.state_dict()))"
            " or as safetensors",
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MAEError(f"Cannot read {path} as a PyTorch file: {exc}", hint="is the file complete?") from exc


def is_mae_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Our checkpoint as a dict; `config` is returned as an MAEConfig."""
    payload = safe_torch_load(path)
    if not is_mae_checkpoint(payload):
        raise MAEError(f"{path} is not an mae checkpoint.", hint="use mae.weights.load_weights for other formats")
    payload = dict(payload)
    payload["config"] = MAEConfig.from_dict(payload["config"])
    return payload
