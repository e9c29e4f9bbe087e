"""What each ONNX file says about itself (`metadata_props`), so a lone graph file still describes itself.

Keys (all strings; JSON where structured):
    mae.part               "encoder" | "decoder"
    mae.config             MAEConfig as JSON
    mae.preprocessing      Preprocessing as JSON (size, resize policy, crop_pct, interpolation, mean, std)
    mae.norm_pix_loss      "true" | "false": pred is per-patch normalized pixels when true
    mae.precision          "fp32" | "fp16" | "int8"
    mae.opset              the default-domain opset
    mae.exporter           the exporter that wrote the graph
    mae.toolkit_version    mae's version
    mae.source_sha256      sha256 of the source weights file
    mae.source_format      "mae-checkpoint" | "official" | "huggingface"

No torch here: `mae info` reads these without it.
"""

from __future__ import annotations

import json
from typing import Any

from mae import __version__
from mae.core.config import MAEConfig
from mae.core.preprocess import Preprocessing

PREFIX = "mae."


def graph_metadata(
    part: str,
    config: MAEConfig,
    preprocessing: Preprocessing,
    precision: str,
    opset: int,
    exporter: str,
    source_sha256: str,
    source_format: str,
) -> dict[str, str]:
    return {
        f"{PREFIX}part": part,
        f"{PREFIX}config": json.dumps(config.to_dict(), sort_keys=True),
        f"{PREFIX}preprocessing": json.dumps(preprocessing.to_dict(), sort_keys=True),
        f"{PREFIX}norm_pix_loss": "true" if config.norm_pix_loss else "false",
        f"{PREFIX}precision": precision,
        f"{PREFIX}opset": str(opset),
        f"{PREFIX}exporter": exporter,
        f"{PREFIX}toolkit_version": __version__,
        f"{PREFIX}source_sha256": source_sha256,
        f"{PREFIX}source_format": source_format,
    }


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Replace our keys in an onnx.ModelProto's metadata_props (other producers' keys are kept)."""
    kept = [(entry.key, entry.value) for entry in proto.metadata_props if not entry.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in [*kept, *sorted(metadata.items())]:
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value


def read_metadata(proto: Any) -> dict[str, Any]:
    """Our keys from an onnx.ModelProto, decoded (config / preprocessing as dicts, booleans, ints)."""
    raw = {entry.key[len(PREFIX) :]: entry.value for entry in proto.metadata_props if entry.key.startswith(PREFIX)}
    decoded: dict[str, Any] = dict(raw)
    for key in ("config", "preprocessing"):
        if key in raw:
            decoded[key] = json.loads(raw[key])
    if "norm_pix_loss" in raw:
        decoded["norm_pix_loss"] = raw["norm_pix_loss"] == "true"
    if "opset" in raw:
        decoded["opset"] = int(raw["opset"])
    return decoded
