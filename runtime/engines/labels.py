"""Engine labels: the names of `mae bench` rows (and of the measurements `--engine auto` reads back), each an
engine and its options. "NAME" or "NAME-VARIANT"."""

from __future__ import annotations

from typing import Any

# engine label -> (engine name, options). Labels are "NAME" or "NAME-VARIANT".
ENGINE_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", {"precision": "fp32", "device": "cpu"}),
    "torch-bf16": ("torch", {"precision": "bf16", "device": "cpu"}),
    "torch-cuda": ("torch", {"precision": "fp32", "device": "cuda"}),
    "torch-cuda-fp16": ("torch", {"precision": "fp16", "device": "cuda"}),
    "onnx": ("onnx", {"precision": "fp32"}),
    "onnx-fp16": ("onnx", {"precision": "fp16"}),
    "onnx-int8": ("onnx", {"precision": "int8"}),
    "onnx-cpu": ("onnx", {"precision": "fp32", "provider": "cpu"}),
    "onnx-cuda": ("onnx", {"precision": "fp32", "provider": "cuda"}),
    "openvino": ("openvino", {"precision": "fp32"}),  # bf16 compute where the CPU has it (OpenVINO's choice)
    "openvino-f32": ("openvino", {"precision": "fp32", "inference_precision": "f32"}),
    "openvino-int8": ("openvino", {"precision": "int8"}),
    "trt": ("trt", {"precision": "fp32"}),  # what `mae export --format trt` builds by default
    "trt-fp16": ("trt", {"precision": "fp16"}),
}
