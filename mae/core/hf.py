"""Hugging Face ViTMAE checkpoints, without torch: config.json -> MAEConfig, and HF weight names -> ours.

`mae.weights` loads the tensors through these; `mae info` describes a safetensors folder from its config and the
tensor headers alone (`hf_folder_summary`), without PyTorch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ACTIVATIONS, MAEConfig, config_problems, shown, type_problem
from .errors import MAEError

# Hugging Face `hidden_act` values we can run, and the activation each one is.
HF_ACTIVATIONS = {
    "gelu": "gelu",  # exact erf GELU, as the original
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# ViTMAEConfig's defaults, for fields a config.json leaves out (transformers writes them all, hand-made files may not).
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048,
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
}

# The JSON type of each config.json field mae reads (image_size / patch_size: a whole number or a square pair).
HF_KINDS: dict[str, str] = {
    "hidden_size": "int",
    "num_hidden_layers": "int",
    "num_attention_heads": "int",
    "intermediate_size": "int",
    "hidden_act": "str",
    "layer_norm_eps": "float",
    "num_channels": "int",
    "qkv_bias": "bool",
    "decoder_num_attention_heads": "int",
    "decoder_hidden_size": "int",
    "decoder_num_hidden_layers": "int",
    "decoder_intermediate_size": "int",
    "mask_ratio": "float",
    "norm_pix_loss": "bool",
    "head_dim": "int",
    "hidden_dropout_prob": "float",
    "attention_probs_dropout_prob": "float",
}

# The config.json field each MAEConfig field comes from, so that a problem names the key the user can edit.
HF_NAMES = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "decoder_embed_dim": "decoder_hidden_size",
    "decoder_depth": "decoder_num_hidden_layers",
    "decoder_num_heads": "decoder_num_attention_heads",
    "encoder_mlp_dim": "intermediate_size",
    "decoder_mlp_dim": "decoder_intermediate_size",
    "layer_norm_eps": "layer_norm_eps",
    "qkv_bias": "qkv_bias",
    "act": "hidden_act",
    "norm_pix_loss": "norm_pix_loss",
    "mask_ratio": "mask_ratio",
}

_HF_CONFIG_HINT = "correct config.json, or write it again with transformers (ViTMAEConfig(...).save_pretrained(FOLDER))"

HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_HF_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")
# Inside a layer: names of transformers 4.x / files written by 5.x, and 5.x module names.
_HF_LAYER_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV_PARTS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a ViTMAE folder, or an MAEError saying what it is instead."""
    try:
        hf_json = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MAEError(f"Cannot read {folder / 'config.json'}: {exc}") from exc
    if not isinstance(hf_json, dict):
        raise MAEError(
            f"{folder / 'config.json'} must hold a JSON object (a ViTMAE config), got {shown(hf_json)}.",
            hint=_HF_CONFIG_HINT,
        )
    model_type = hf_json.get("model_type")
    if model_type != "vit_mae":
        raise MAEError(
            f"{folder} holds a Hugging Face {model_type!r} model; mae reads ViTMAE ('vit_mae') checkpoints.",
            hint="e.g. facebook/vit-mae-base, or a folder written by ViTMAEForPreTraining.save_pretrained()",
        )
    return hf_json


def convert_hf_state(raw: dict[str, Any], source: Path, fuse: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """HF ViTMAE names -> original MAE names, with split q/k/v fused into one qkv projection by `fuse([q, k, v])`
    (torch.cat for tensors; shapes for a description that reads only headers)."""
    state: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}  # (our block prefix, weight|bias) -> {q, k, v}
    unexpected: list[str] = []
    for key, tensor in raw.items():
        plain = key.removeprefix("vit.")
        if plain in _HF_TOP:
            state[_HF_TOP[plain]] = tensor
            continue
        match = _HF_LAYER.match(key) or _HF_DECODER_LAYER.match(key)
        if match is None:
            unexpected.append(key)
            continue
        blocks = "decoder_blocks" if key.startswith("decoder.") else "blocks"
        prefix = f"{blocks}.{match.group(1)}"
        part, _, kind = match.group(2).rpartition(".")  # kind: weight | bias
        if part in _HF_LAYER_PARTS:
            state[f"{prefix}.{_HF_LAYER_PARTS[part]}.{kind}"] = tensor
        elif part in _HF_QKV_PARTS:
            qkv.setdefault((prefix, kind), {})[_HF_QKV_PARTS[part]] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise MAEError(
            f"{source} has weights a ViTMAE checkpoint should not have: {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""),
            hint="mae reads ViTMAEForPreTraining and ViTMAEModel checkpoints",
        )
    for (prefix, kind), parts in qkv.items():
        missing = [name for name in "qkv" if name not in parts]
        if missing:
            raise MAEError(f"{source}: {prefix} lacks the {'/'.join(missing)} projection {kind}.")
        state[f"{prefix}.attn.qkv.{kind}"] = fuse([parts["q"], parts["k"], parts["v"]])  # [3D(, D)]
    return state


def _square(value: Any, name: str, folder: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise MAEError(f"{folder}/config.json has {name}={list(value)}; mae supports square images and patches.")
        value = value[0]
    if type_problem("int", value):
        raise MAEError(
            f"{folder}/config.json: {name} must be a whole number (or a square pair [n, n]), got {shown(value)}.",
            hint=_HF_CONFIG_HINT,
        )
    return int(value)


def hf_config(hf: dict[str, Any], folder: Path) -> tuple[MAEConfig, list[str]]:
    """ViTMAEConfig fields -> MAEConfig; anything mae cannot reproduce is an error, never silently dropped.
    Every field read is checked for its JSON type first (`"32"`, `2.5`, `"false"` are errors, not 32, 2, True)."""
    values = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    wrong = [
        f"{key} must be {expected}, got {shown(values[key])}"
        for key, kind in HF_KINDS.items()
        if key in values and (expected := type_problem(kind, values[key]))
    ]
    if wrong:
        raise MAEError(f"{folder}/config.json: " + "; ".join(wrong) + ".", hint=_HF_CONFIG_HINT)
    notes = []
    act = values["hidden_act"]
    if act not in HF_ACTIVATIONS:
        raise MAEError(
            f"{folder}/config.json uses hidden_act={act!r}, which mae does not implement.",
            hint=f"supported: {', '.join(HF_ACTIVATIONS)} (mae activations: {', '.join(ACTIVATIONS)})",
        )
    dropout = {k: values.get(k) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if values.get(k)}
    if dropout:
        notes.append(f"dropout in config.json ({dropout}) is not used by mae (inference and MAE pretraining use none)")
    width, decoder_width = values["hidden_size"], values["decoder_hidden_size"]
    mlp, decoder_mlp = values["intermediate_size"], values["decoder_intermediate_size"]
    fields: dict[str, Any] = {
        "img_size": _square(values["image_size"], "image_size", folder),
        "patch_size": _square(values["patch_size"], "patch_size", folder),
        "in_chans": values["num_channels"],
        "embed_dim": width,
        "depth": values["num_hidden_layers"],
        "num_heads": values["num_attention_heads"],
        "decoder_embed_dim": decoder_width,
        "decoder_depth": values["decoder_num_hidden_layers"],
        "decoder_num_heads": values["decoder_num_attention_heads"],
        "encoder_mlp_dim": None if mlp == 4 * width else mlp,
        "decoder_mlp_dim": None if decoder_mlp == 4 * decoder_width else decoder_mlp,
        "layer_norm_eps": float(values["layer_norm_eps"]),
        "qkv_bias": values["qkv_bias"],
        "act": HF_ACTIVATIONS[act],
        "norm_pix_loss": values["norm_pix_loss"],
        "mask_ratio": float(values["mask_ratio"]),
    }
    problems = config_problems(fields, name=HF_NAMES.__getitem__)
    if problems:
        raise MAEError(f"{folder}/config.json: " + "; ".join(problems) + ".", hint=_HF_CONFIG_HINT)
    head_dim = values.get("head_dim")
    if head_dim is not None and head_dim * values["num_attention_heads"] != values["hidden_size"]:
        raise MAEError(f"{folder}/config.json sets head_dim={head_dim}, which differs from hidden_size / heads.")
    config = MAEConfig(**fields)
    if config.layer_norm_eps != 1e-6:
        notes.append(f"LayerNorm eps {config.layer_norm_eps:g} from config.json (the original MAE uses 1e-6)")
    return config, notes
