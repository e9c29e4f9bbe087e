"""`mae info WEIGHTS`: what a weights file or folder is, printed; torch-free for Hugging Face safetensors folders.

A safetensors folder is described from its config.json and the tensors' headers (names and shapes), through the
same name conversion the loader uses (`mae.core.hf.convert_hf_state`): no tensor is read and PyTorch is not imported,
so it takes a fraction of a second where loading ViT-L took seconds. Every other format (our checkpoints, official
`.pth` files, `.bin` folders) is pickled PyTorch and goes through `mae.weights`. A full check of every tensor's shape
happens where the weights are used (export, `train --init`, the torch engine).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .core.config import DECODER_PREFIXES
from .core.errors import MAEError
from .core.files import sha256_file
from .core.hf import convert_hf_state, hf_config, read_hf_config

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


def safetensors_file(path: Path) -> Path | None:
    """The weights file of a Hugging Face safetensors folder (or the file itself), else None."""
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        return None
    if path.is_file():
        return path if path.name in SAFETENSORS_FILES else None
    return next((folder / name for name in SAFETENSORS_FILES if (folder / name).is_file()), None)


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (a sharded index: every shard's)."""
    import json

    from safetensors import safe_open

    files = [path]
    if path.name.endswith(".index.json"):
        try:
            files = [path.parent / name for name in sorted(set(json.loads(path.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as exc:
            raise MAEError(f"Cannot read the shard index {path}: {exc}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as exc:  # safetensors raises its own errors for truncated or foreign files
            raise MAEError(f"Cannot read {file} as safetensors: {exc}", hint="is the download complete?") from exc
    return shapes


def hf_folder_summary(path: Path) -> dict[str, Any]:
    """The facts `mae.weights.weights_summary` gives, for a safetensors folder, from headers alone."""

    weights_file = safetensors_file(path)
    if weights_file is None:
        raise MAEError(f"{path} is not a Hugging Face safetensors folder.")
    folder = weights_file.parent
    config, notes = hf_config(read_hf_config(folder), folder)
    shapes = convert_hf_state(
        _header_shapes(weights_file), weights_file, lambda parts: (sum(p[0] for p in parts), *parts[0][1:])
    )
    encoder = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(DECODER_PREFIXES))
    decoder = sum(math.prod(s) for k, s in shapes.items() if k.startswith(DECODER_PREFIXES))
    notes.append(f"converted from Hugging Face ViTMAE ({weights_file.name}; q/k/v fused into qkv)")
    return {
        "path": str(folder),
        "source_format": "huggingface",
        "sha256": sha256_file(weights_file),
        "config": config.to_dict(),
        "num_patches": config.num_patches,
        "parameters": {"encoder": encoder, "decoder": decoder, "total": encoder + decoder},
        "has_decoder": decoder > 0,
        "norm_pix_loss": config.norm_pix_loss,
        "norm_pix_loss_assumed": config.norm_pix_loss,
        "norm_pix_loss_known": True,
        "notes": notes,
    }


def describe(path: str | os.PathLike, num_heads: int | None = None, decoder_num_heads: int | None = None) -> dict:
    """`mae info WEIGHTS`: safetensors folders from their headers, everything else through `mae.weights`."""
    path = Path(path)
    if num_heads is None and decoder_num_heads is None and safetensors_file(path) is not None:
        summary = hf_folder_summary(path)
        print_weights_summary(summary)
        return summary
    return describe_weights(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


def describe_weights(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    *,
    norm_pix_loss: bool | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Print what the weights are (rich tables) and return the same facts as `mae.weights.weights_summary`."""
    from .weights import weights_summary  # PyTorch: pickled formats only, not on the safetensors path

    summary = weights_summary(path, num_heads, decoder_num_heads, norm_pix_loss=norm_pix_loss)
    print_weights_summary(summary, console)
    return summary


def _millions(count: int) -> str:
    return f"{count:,} ({count / 1e6:.1f} M)"


def print_weights_summary(summary: dict[str, Any], console: Any = None) -> None:
    """The tables `mae info WEIGHTS` prints."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not summary["has_decoder"]:  # only the decoder's targets depend on it
        pix = "not applicable: no decoder (it only says what the decoder was trained to predict)"
    elif summary["norm_pix_loss_known"]:
        pix = "on" if summary["norm_pix_loss"] else "off"
    else:
        assumed = "on" if summary["norm_pix_loss_assumed"] else "off"
        pix = f"unknown (official checkpoints do not record it); assumed {assumed}"
    if summary["has_decoder"]:
        decoder_text = "yes"
    else:
        decoder_text = "no: features and embeddings only; reconstruction needs decoder weights"

    overview = Table(title=f"Weights: {summary['path']}", show_header=False, title_justify="left")
    overview.add_column(style="bold")
    overview.add_column(overflow="fold")  # the sha256 is worth reading whole
    formats = {"mae-checkpoint": "mae checkpoint", "official": "official MAE (facebookresearch/mae)"}
    overview.add_row("format", formats.get(summary["source_format"], "Hugging Face ViTMAE"))
    overview.add_row("decoder", decoder_text)
    overview.add_row("norm_pix_loss", pix)
    params = summary["parameters"]
    overview.add_row("parameters, encoder", _millions(params["encoder"]))
    overview.add_row("parameters, decoder", _millions(params["decoder"]))
    overview.add_row("parameters, total", _millions(params["total"]))
    overview.add_row("patches", f"{summary['num_patches']}")
    overview.add_row("sha256", summary["sha256"])
    console.print(overview)

    architecture = Table(title="Architecture", title_justify="left")
    architecture.add_column("field", style="bold")
    architecture.add_column("value")
    for name, value in summary["config"].items():
        if not summary["has_decoder"] and (name.startswith("decoder_") or name == "norm_pix_loss"):
            continue  # a model without a decoder has no decoder dimensions
        architecture.add_row(name, "from width x mlp_ratio" if value is None else str(value))
    console.print(architecture)

    for note in summary["notes"]:
        console.print(f"• {note}")
