"""One frozen dataclass describes an MAE architecture; presets follow the original names.

Numpy/stdlib only: `mae.runtime` reads configs from bundles without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mae.errors import MAEError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


# Weights of the decoder half (our names); everything else belongs to the encoder.
DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass(frozen=True)
class MAEConfig:
    img_size: int = 224  # square input side, pixels
    patch_size: int = 16  # square patch side; img_size must be a multiple
    in_chans: int = 3  # RGB
    embed_dim: int = 768  # encoder width D
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # encoder attention heads
    decoder_embed_dim: int = 512  # decoder width
    decoder_depth: int = 8  # decoder blocks
    decoder_num_heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden = ratio * width, unless the explicit sizes below are set
    encoder_mlp_dim: int | None = None  # explicit encoder MLP hidden size (HF `intermediate_size`)
    decoder_mlp_dim: int | None = None  # explicit decoder MLP hidden size (HF `decoder_intermediate_size`)
    layer_norm_eps: float = 1e-6  # original MAE 1e-6; HF ViTMAE default 1e-12
    qkv_bias: bool = True  # bias on the fused qkv projection
    act: str = "gelu"  # MLP activation: exact erf GELU as the original
    norm_pix_loss: bool = False  # loss against per-patch normalized pixels
    mask_ratio: float = 0.75  # default fraction of patches removed in pretraining

    def __post_init__(self) -> None:
        problems = []
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            problems.append(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_num_heads "
                f"{self.decoder_num_heads}"
            )
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            problems.append("embed_dim and decoder_embed_dim must be multiples of 4 (2-D sin-cos position embedding)")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio {self.mask_ratio} must be in [0, 1)")
        if self.act not in ACTIVATIONS:
            problems.append(f"act {self.act!r} must be one of {', '.join(ACTIVATIONS)}")
        if problems:
            raise MAEError("Invalid MAE configuration: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:  # L
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:  # p*p*C, the decoder's output per patch
        return self.patch_size**2 * self.in_chans

    @property
    def encoder_hidden(self) -> int:
        return self.encoder_mlp_dim or int(self.embed_dim * self.mlp_ratio)

    @property
    def decoder_hidden(self) -> int:
        return self.decoder_mlp_dim or int(self.decoder_embed_dim * self.mlp_ratio)

    def num_kept(self, mask_ratio: float) -> int:
        """K = int(L * (1 - mask_ratio)), as the original and Hugging Face."""
        return int(self.num_patches * (1 - mask_ratio))

    def replace(self, **changes: Any) -> MAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MAEError(
                f"Unknown MAE config fields: {', '.join(unknown)}",
                hint="the file was written by a newer mae; upgrade mae-toolkit",
            )
        return cls(**data)


PRESETS: dict[str, MAEConfig] = {
    # The paper's models (decoder 512-d, 8 blocks, 16 heads).
    "mae_vit_base_patch16": MAEConfig(embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": MAEConfig(embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # Smaller ViTs (DeiT widths) with lighter decoders.
    "mae_vit_small_patch16": MAEConfig(
        embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8
    ),
    "mae_vit_tiny_patch16": MAEConfig(
        embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4
    ),
    # Pretrains on a 2-core CPU in minutes: 64 px images, 8 px patches (64 patches).
    "mae_vit_mini_patch8": MAEConfig(
        img_size=64,
        patch_size=8,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # For unit tests: milliseconds per step.
    "mae_vit_test_patch8": MAEConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
}


def get_preset(name: str, **overrides: Any) -> MAEConfig:
    """A preset, with fields such as img_size or patch_size overridden (None values are ignored)."""
    if name not in PRESETS:
        raise MAEError(f"Unknown model preset {name!r}.", hint=f"choose one of: {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
