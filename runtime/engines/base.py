"""The engine protocol, and the checks every engine shares (inputs, bundles, precisions).

An engine runs ONE graph ("encoder" or "decoder") of a model:

    encoder: {"pixel_values": float32 [B, 3, H, W], "ids_keep": int64 [B, K]}   -> {"latent": [B, 1+K, D]}
    decoder: {"latent": float32 [B, 1+K, D], "ids_restore": int64 [B, L]}      -> {"pred": [B, L, p*p*3]}

Outputs are float32 numpy arrays whatever the engine's internal precision.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mae.core import hardware
from mae.core.bundle import GRAPH_PRECISIONS, INPUT_NAMES, OUTPUT_NAMES, Bundle, is_bundle, not_a_bundle_error
from mae.core.errors import MAEError

# The graphs' input and output names are the bundle's contract (mae.core.bundle); the engines take them from here.
__all__ = ["ENGINE_NAMES", "INPUT_NAMES", "OUTPUT_NAMES", "Engine", "check_graph_precision", "check_inputs",
           "load_bundle", "warn", "warn_int8_cpu"]  # fmt: skip
ENGINE_NAMES = ("auto", "onnx", "trt", "torch", "openvino")


@runtime_checkable
class Engine(Protocol):
    name: str  # e.g. "onnx", "trt", "torch"
    part: str  # "encoder" | "decoder"
    description: str  # what really runs it, e.g. "onnxruntime 1.32 CPUExecutionProvider fp32"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_inputs(part: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of graph `part` as C-contiguous float32 / int64 arrays, or an MAEError saying what is wrong."""
    expected = INPUT_NAMES[part]
    missing = [name for name in expected if name not in inputs]
    if missing:
        raise MAEError(f"The {part} needs inputs {', '.join(expected)}; missing: {', '.join(missing)}")
    data_name, ids_name = expected
    data = np.ascontiguousarray(inputs[data_name], dtype=np.float32)
    ids = np.asarray(inputs[ids_name])
    if not np.issubdtype(ids.dtype, np.integer):
        raise MAEError(f"{ids_name} must hold integer patch indices, got dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    want_ndim = 4 if data_name == "pixel_values" else 3
    if data.ndim != want_ndim or ids.ndim != 2:
        raise MAEError(f"{data_name} must be {want_ndim}-D and {ids_name} 2-D, got shapes {data.shape} and {ids.shape}")
    if data.shape[0] == 0:
        raise MAEError(f"{data_name} holds no images (batch of 0)")
    if data.shape[0] != ids.shape[0]:
        raise MAEError(f"{data_name} has {data.shape[0]} images but {ids_name} has {ids.shape[0]} rows")
    return {data_name: data, ids_name: ids}


def warn(message: str) -> None:
    """A user-visible warning (e.g. a requested provider that fell back), attributed to the caller's call."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


_INT8_WARNED: set[tuple[str, str, str]] = set()


def warn_int8_cpu(bundle: object, engine: str) -> None:
    """Say once (per bundle, engine and CPU class) when an int8 graph runs on a CPU class it was not verified on.

    The int8 graphs are made so that their integer arithmetic is exact on every x86 class (see
    `mae.export.precision`), so this is a note, not a refusal; a bundle from before that records no CPU at all.
    """

    here = hardware.cpu_info()
    record = bundle.manifest.get("int8") or {}
    verified = record.get("verified_on") or {}
    if verified.get("int8_class") == here.int8_class or (record and not verified):
        return  # verified on this class, or exported unverified on purpose (`mae bench` of random weights)
    key = (str(bundle.path), engine, here.int8_class)
    if key in _INT8_WARNED:
        return
    _INT8_WARNED.add(key)
    if not record:
        warn(
            f"The int8 graph of {bundle.path} comes from an older mae that recorded neither its method nor the CPU it "
            "was verified on; its 8-bit weights can saturate on CPUs without VNNI. Re-export it: "
            f"`mae export {bundle.path} --precision int8`."
        )
        return
    warn(
        f"The int8 graph of {bundle.path} was verified on {verified.get('model')} ({verified.get('int8_class')} int8 "
        f"class); this CPU is {here.model} ({here.int8_class}). Its integer arithmetic is exact on every x86 class, "
        f"but `mae bench --model {bundle.path}` measures its cosine here."
    )


def check_graph_precision(precision: str, engine: str) -> None:
    """Bundles hold fp32, fp16 and int8 graphs; say where bf16 lives instead of "no bf16 graph"."""

    if precision not in GRAPH_PRECISIONS:
        raise MAEError(
            f"The {engine} engine runs the bundle's {', '.join(GRAPH_PRECISIONS)} graphs, not {precision}.",
            hint="bf16 is the torch engine's (--engine torch --precision bf16); OpenVINO computes in bf16 by itself"
            " on CPUs that have it",
        )


def load_bundle(model: object, engine: str):  # noqa: ANN201 - returns mae.core.bundle.Bundle
    """The bundle `model` points at, or an MAEError that says weights need exporting (or the torch engine)."""
    path = Path(str(model))
    if not path.exists():
        raise MAEError(f"{path} does not exist.", hint="pass a bundle directory made by `mae export`")
    if not is_bundle(path):
        raise not_a_bundle_error(path, engine)
    return Bundle.load(path)
