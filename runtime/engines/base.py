"""The engine protocol and the factory.

An engine runs ONE graph ("encoder" or "decoder") of a model:

    encoder: {"pixel_values": float32 [B, 3, H, W], "ids_keep": int64 [B, K]}   -> {"latent": [B, 1+K, D]}
    decoder: {"latent": float32 [B, 1+K, D], "ids_restore": int64 [B, L]}      -> {"pred": [B, L, p*p*3]}

Outputs are float32 numpy arrays whatever the engine's internal precision.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mae.errors import MAEError

ENGINE_NAMES = ("onnx", "trt", "torch", "openvino")
INPUT_NAMES = {"encoder": ("pixel_values", "ids_keep"), "decoder": ("latent", "ids_restore")}
OUTPUT_NAMES = {"encoder": ("latent",), "decoder": ("pred",)}


@runtime_checkable
class Engine(Protocol):
    name: str  # e.g. "onnx", "trt", "torch"
    part: str  # "encoder" | "decoder"
    description: str  # what really runs it, e.g. "onnxruntime 1.32 CPUExecutionProvider fp32"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def create_engine(name: str, model: str, part: str = "encoder", **options: object) -> Engine:
    """Engine `name` for graph `part` of `model` (a bundle directory, or weights for the torch engine).

    options: precision ("fp32"|"fp16"|"int8"), provider (onnx), device (torch), num_threads, ...
    """
    if part not in INPUT_NAMES:
        raise MAEError(f"Unknown graph {part!r}: use encoder or decoder")
    if name == "onnx":
        from mae.runtime.engines.onnx import OnnxEngine

        return OnnxEngine(model, part, **options)
    if name in ("trt", "tensorrt"):
        from mae.runtime.engines.trt import TensorRTEngine

        return TensorRTEngine(model, part, **options)
    if name == "torch":
        from mae.runtime.engines.torch import TorchEngine

        return TorchEngine(model, part, **options)
    if name == "openvino":
        from mae.runtime.engines.openvino import OpenVINOEngine

        return OpenVINOEngine(model, part, **options)
    raise MAEError(f"Unknown engine {name!r}", hint=f"choose one of: {', '.join(ENGINE_NAMES)}")
