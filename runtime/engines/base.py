"""The engine protocol and the factory.

An engine runs ONE graph ("encoder" or "decoder") of a model:

    encoder: {"pixel_values": float32 [B, 3, H, W], "ids_keep": int64 [B, K]}   -> {"latent": [B, 1+K, D]}
    decoder: {"latent": float32 [B, 1+K, D], "ids_restore": int64 [B, L]}      -> {"pred": [B, L, p*p*3]}

Outputs are float32 numpy arrays whatever the engine's internal precision.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Protocol, runtime_checkable

import numpy as np

from mae.errors import MAEError

ENGINE_NAMES = ("auto", "onnx", "trt", "torch", "openvino")
INPUT_NAMES = {"encoder": ("pixel_values", "ids_keep"), "decoder": ("latent", "ids_restore")}
OUTPUT_NAMES = {"encoder": ("latent",), "decoder": ("pred",)}


@runtime_checkable
class Engine(Protocol):
    name: str  # e.g. "onnx", "trt", "torch"
    part: str  # "encoder" | "decoder"
    description: str  # what really runs it, e.g. "onnxruntime 1.32 CPUExecutionProvider fp32"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _engine_class(name: str) -> type:
    if name == "onnx":
        from mae.runtime.engines.onnx import OnnxEngine

        return OnnxEngine
    if name in ("trt", "tensorrt"):
        from mae.runtime.engines.trt import TensorRTEngine

        return TensorRTEngine
    if name == "torch":
        from mae.runtime.engines.torch import TorchEngine

        return TorchEngine
    if name == "openvino":
        from mae.runtime.engines.openvino import OpenVINOEngine

        return OpenVINOEngine
    raise MAEError(f"Unknown engine {name!r}", hint=f"choose one of: {', '.join(ENGINE_NAMES)}")


def create_engine(name: str, model: object, part: str = "encoder", **options: object) -> Engine:
    """Engine `name` for graph `part` of `model` (a bundle directory; the torch engine also takes weights).

    options: precision ("fp32"|"fp16"|"int8"; torch also "bf16"), provider (onnx), device (torch, trt),
    num_threads, ... Options set to None are left at the engine's default, and an option that this engine does not
    have (say `provider` for torch) is dropped, so one set of command-line options can feed every engine.
    name "auto": the engine `mae.runtime.engines.auto.choose` picks for this machine (embedding for the encoder,
    reconstruction for the decoder; precision None lets it choose); the engine's `auto_choice` says what and why.
    """
    if part not in INPUT_NAMES:
        raise MAEError(f"Unknown graph {part!r}: use encoder or decoder")
    if name == "auto":
        from mae.runtime.engines.auto import choose

        choice = choose(model, "embed" if part == "encoder" else "reconstruct", options.pop("precision", None))
        engine = create_engine(
            choice.engine, model, part, **{**options, "precision": choice.precision, **choice.options}
        )
        engine.auto_choice = choice
        return engine
    engine_class = _engine_class(name)
    accepted = inspect.signature(engine_class).parameters
    return engine_class(model, part, **{k: v for k, v in options.items() if v is not None and k in accepted})


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
    from mae.runtime import hardware

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
    from mae.runtime.bundle import PRECISIONS

    if precision not in PRECISIONS:
        raise MAEError(
            f"The {engine} engine runs the bundle's {', '.join(PRECISIONS)} graphs, not {precision}.",
            hint="bf16 is the torch engine's (--engine torch --precision bf16); OpenVINO computes in bf16 by itself"
            " on CPUs that have it",
        )


def load_bundle(model: object, engine: str):  # noqa: ANN201 - returns mae.runtime.bundle.Bundle
    """The bundle `model` points at, or an MAEError that says weights need exporting (or the torch engine)."""
    from pathlib import Path

    from mae.runtime.bundle import Bundle, is_bundle

    path = Path(str(model))
    if not path.exists():
        raise MAEError(f"{path} does not exist.", hint="pass a bundle directory made by `mae export`")
    if not is_bundle(path):
        raise MAEError(
            f"The {engine} engine runs an exported bundle, and {path} is not one (no mae.json).",
            hint=f"export it first (`mae export {path} --out BUNDLE`) or run the weights with --engine torch",
        )
    return Bundle.load(path)
