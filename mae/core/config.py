"""One frozen dataclass describes an MAE architecture; presets follow the original names.

Numpy/stdlib only: `mae.runtime` reads configs from bundles without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import MAEError

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def shown(value: Any) -> str:
    """A value as it reads in a JSON file (`"32"`, `2.5`, `true`), shortened: for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_whole_number(value: Any) -> bool:
    """An int, but not a bool (JSON `true` is not 1) nor a float (`2.5`, and `32.0` too: files hold integers)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {  # annotation -> (check, what a message says it expects)
    "int": (is_whole_number, "a whole number"),
    "float": (is_number, "a number"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "str": (lambda value: isinstance(value, str), "a string"),
}


def type_problem(kind: str, value: Any) -> str | None:
    """What `value` should be for a field annotated `kind` ("int", "int | None", "float", "bool", "str"), or None."""
    optional = kind.endswith(" | None")
    if optional:
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    ok, expected = _KINDS[kind]
    if ok(value):
        return None
    return expected + (" (or null)" if optional else "")


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
        problems = config_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
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
    def from_dict(
        cls, data: Any, source: str = "MAE config", key: str = "config", hint: str | None = None
    ) -> MAEConfig:
        """An MAEConfig from a JSON object (mae.json's `config`, a checkpoint's, an ONNX graph's `mae.config`).
        Fields left out take their defaults; anything else wrong is one MAEError naming `source` and `key.field`."""
        if not isinstance(data, Mapping):
            raise MAEError(f"{source}: {key} must be a JSON object of MAE config fields, got {shown(data)}.", hint=hint)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MAEError(
                f"{source}: Unknown MAE config fields in {key}: {', '.join(map(str, unknown))}",
                hint="the file was written by a newer mae; upgrade mae-toolkit",
            )
        problems = config_problems(data, name=lambda field: f"{key}.{field}")
        if problems:
            raise MAEError(f"{source}: " + "; ".join(problems) + ".", hint=hint)
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        # 4 in a file is the float 4.0; whole numbers stay ints (numpy ints become Python ints).
        values = {
            name: (float(value) if kinds[name] == "float" else int(value) if is_whole_number(value) else value)
            for name, value in data.items()
        }
        return cls(**values)


# Fields that must be >= 1 (depth too: an encoder has blocks; decoder_depth may be 0).
_POSITIVE = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_num_heads",
)
_POSITIVE_IF_SET = ("encoder_mlp_dim", "decoder_mlp_dim")


def config_problems(values: Mapping[str, Any], name: Callable[[str], str] = str) -> list[str]:
    """What is wrong with MAEConfig field values (a subset: missing ones take their defaults): types first, then
    ranges, then consistency. `name(field)` is how a message names a field (`config.img_size`, HF `image_size`)."""
    fields = {f.name: f for f in dataclasses.fields(MAEConfig)}
    problems = []
    for field_name, value in values.items():
        if field_name in fields and (expected := type_problem(fields[field_name].type, value)):
            problems.append(f"{name(field_name)} must be {expected}, got {shown(value)}")
    if problems:
        return problems
    v = {field_name: values.get(field_name, field.default) for field_name, field in fields.items()}
    for field_name in _POSITIVE:
        if v[field_name] < 1:
            problems.append(f"{name(field_name)} must be at least 1, got {shown(v[field_name])}")
    if v["decoder_depth"] < 0:
        problems.append(f"{name('decoder_depth')} must be 0 or more, got {shown(v['decoder_depth'])}")
    for field_name in _POSITIVE_IF_SET:
        if v[field_name] is not None and v[field_name] < 1:
            problems.append(f"{name(field_name)} must be at least 1 (or null), got {shown(v[field_name])}")
    for field_name in ("mlp_ratio", "layer_norm_eps"):
        if not v[field_name] > 0:
            problems.append(f"{name(field_name)} must be greater than 0, got {shown(v[field_name])}")
    if not 0.0 <= v["mask_ratio"] < 1.0:
        problems.append(f"{name('mask_ratio')} {shown(v['mask_ratio'])} must be in [0, 1)")
    if v["act"] not in ACTIVATIONS:
        problems.append(f"{name('act')} {v['act']!r} must be one of {', '.join(ACTIVATIONS)}")
    if problems:
        return problems
    img_size, patch_size = v["img_size"], v["patch_size"]
    if img_size % patch_size:
        problems.append(f"{name('img_size')} {img_size} must be a multiple of {name('patch_size')} {patch_size}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if v[width] % v[heads]:
            problems.append(f"{name(width)} {v[width]} is not divisible by {name(heads)} {v[heads]}")
    for width in ("embed_dim", "decoder_embed_dim"):
        if v[width] % 4:
            problems.append(f"{name(width)} {v[width]} must be a multiple of 4 (2-D sin-cos position embedding)")
    return problems


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
    # The demo's: learns scikit-learn's digits (enlarged to 32 px, 4 px patches: 64) in a few minutes on 2 CPU cores;
    # a light decoder (64-d), as the paper found enough, keeps the 65 decoder tokens from dominating the step.
    "mae_vit_digits_patch4": MAEConfig(
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
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
