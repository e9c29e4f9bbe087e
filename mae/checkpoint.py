"""Our checkpoints: plain tensors, plain Python containers and the config, readable with weights_only=True.

Layout of the saved dict:
    {"format": "mae-checkpoint", "format_version": 1, "toolkit_version": str,
     "config": MAEConfig.to_dict(), "model": state_dict (original MAE names), ...extra (optimizer, epoch, rng...)}
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .core.config import MAEConfig
from .core.errors import MAEError
from .core.files import atomic_write_bytes, fault
from .model import MaskedAutoencoder

FORMAT = "mae-checkpoint"
FORMAT_VERSION = 1

# Globals a weights-only load may build besides tensors and containers. `argparse.Namespace` only sets
# attributes, and the official MAE training script stores its command line (`args`) as one in every
# checkpoint it writes, so allowing it lets those files load without running anything from them.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


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


def _refused_global(exc: Exception) -> str | None:
    """The `module.name` torch's weights-only unpickler refused, when its message names one."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive
PICKLE_MAGIC = b"\x80"  # the older format starts with a pickle protocol opcode


def _unreadable(path: Path, exc: BaseException) -> MAEError:
    """Why `path` is no PyTorch file torch can read: empty, truncated, damaged or something else."""
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4)
        complete_zip = zipfile.is_zipfile(path)
    except OSError as os_error:
        return fault(os_error, path, "read")
    again = "copy, download or save it again"
    if size == 0:
        return MAEError(
            f"Cannot read {path}: the file is empty (0 bytes).", hint=f"a failed write or copy leaves one; {again}"
        )
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if (head == ZIP_MAGIC and not complete_zip) or isinstance(exc, EOFError) or "unexpected EOF" in detail:
        return MAEError(
            f"Cannot read {path}: the file is truncated (it ends after {size} bytes, before the end of its data).",
            hint=f"it was cut short while being written, copied or downloaded; {again}",
        )
    if head == ZIP_MAGIC:
        return MAEError(
            f"Cannot read {path}: it is a zip archive but not a PyTorch (torch.save) one ({detail}).",
            hint="pass a checkpoint, an official MAE .pth, a HF ViTMAE folder or a bundle",
        )
    if not head.startswith(PICKLE_MAGIC):
        return MAEError(
            f"Cannot read {path}: it is not a PyTorch (torch.save) file.",
            hint="pass a checkpoint, an official MAE .pth, a HF ViTMAE folder or a bundle",
        )
    return MAEError(f"Cannot read {path} as a PyTorch file: it is damaged ({detail}).", hint=f"is it complete? {again}")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True); a file that needs arbitrary unpickling is refused and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise MAEError(f"{path} does not exist or is not a file.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"Unsupported operand|invalid load key", str(exc)):  # not a pickle at all (an image, text...)
            raise MAEError(
                f"Cannot read {path}: it is not a PyTorch (torch.save) file.",
                hint="pass a checkpoint, an official MAE .pth, a HF ViTMAE folder or a bundle",
            ) from exc
        refused = _refused_global(exc)
        what = f" ({refused})" if refused else ""
        raise MAEError(
            f"Refusing to load {path}: it contains Python objects{what} that would have to be unpickled, "
            "which can run code. Nothing from the file was executed.",
            hint="only load files you trust; re-save the weights as plain tensors (torch.save(model.state_dict()))"
            " or as safetensors",
        ) from exc
    except PermissionError as exc:
        raise fault(exc, path, "read") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - garbage makes the unpickler raise anything (EOFError, KeyError, ...)
        raise _unreadable(path, exc) from exc


def is_mae_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def checkpoint_from_payload(payload: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Validate an already-read checkpoint dict; `config` becomes an MAEConfig."""
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MAEError(
            f"{path} is an mae checkpoint of format version {version!r}; this mae reads up to {FORMAT_VERSION}.",
            hint="upgrade mae-toolkit",
        )
    state = payload.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MAEError(f"{path} is an mae checkpoint without a valid 'model' state dict.", hint="is the file complete?")
    if not isinstance(payload.get("config"), dict):
        raise MAEError(f"{path} is an mae checkpoint without its 'config'.", hint="is the file complete?")
    payload = dict(payload)
    payload["config"] = MAEConfig.from_dict(payload["config"])
    return payload


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Our checkpoint as a dict; `config` is returned as an MAEConfig."""
    payload = safe_torch_load(path)
    if not is_mae_checkpoint(payload):
        raise MAEError(f"{path} is not an mae checkpoint.", hint="use mae.weights.load_weights for other formats")
    return checkpoint_from_payload(payload, path)


def save_random_weights(config: MAEConfig, path: str | Path, seed: int = 0, decoder: bool = True) -> Path:
    """A checkpoint of a freshly initialized model (benchmarks of presets), seeded for repeatable numbers."""
    torch.manual_seed(seed)
    network = MaskedAutoencoder(config, decoder=decoder)
    save_checkpoint(path, network.state_dict(), config)
    return Path(path)
