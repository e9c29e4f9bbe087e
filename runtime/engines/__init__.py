"""Engines: one small file each behind `Engine.run(inputs) -> outputs`; `create_engine` picks one.

The registry lives here, above the engine files: each engine imports `base` (the protocol and shared checks), and
only this module knows them all. Engine modules are imported when asked for, so that a missing optional package
(onnxruntime, openvino, tensorrt, torch) only matters to the engine that needs it.
"""

from __future__ import annotations

import functools
import inspect

from mae.core.bundle import INPUT_NAMES
from mae.core.errors import MAEError

from .base import ENGINE_NAMES, Engine

__all__ = ["Engine", "create_engine", "engine_class", "engine_options"]


def engine_class(name: str) -> type:
    """The class of engine `name` (its module imported now: light, the heavy packages load when one is created)."""
    if name == "onnx":
        from .onnx import OnnxEngine  # on demand: only this engine's packages matter

        return OnnxEngine
    if name in ("trt", "tensorrt"):
        from .trt import TensorRTEngine  # on demand: only this engine's packages matter

        return TensorRTEngine
    if name == "torch":
        from .torch import TorchEngine  # on demand: only this engine's packages matter

        return TorchEngine
    if name == "openvino":
        from .openvino import OpenVINOEngine  # on demand: only this engine's packages matter

        return OpenVINOEngine
    raise MAEError(f"Unknown engine {name!r}", hint=f"choose one of: {', '.join(ENGINE_NAMES)}")


@functools.cache
def engine_options(name: str) -> frozenset[str]:
    """The options engine `name` takes (its constructor's keyword parameters besides model and part)."""
    return frozenset(inspect.signature(engine_class(name)).parameters) - {"model", "part"}


def create_engine(name: str, model: object, part: str = "encoder", **options: object) -> Engine:
    """Engine `name` for graph `part` of `model` (a bundle directory; the torch engine also takes weights).

    options: precision ("fp32"|"fp16"|"int8"; torch also "bf16"), provider (onnx), device (torch, trt),
    num_threads, ... Options set to None are left at the engine's default. An option that this engine does not have
    but another one does (say `provider` for torch) is dropped, so one set of command-line options can feed every
    engine; an option that no engine has (a misspelling) is an error.
    name "auto": the engine `mae.runtime.engines.auto.choose` picks for this machine (embedding for the encoder,
    reconstruction for the decoder; precision None lets it choose); the engine's `auto_choice` says what and why.
    """
    if part not in INPUT_NAMES:
        raise MAEError(f"Unknown graph {part!r}: use encoder or decoder")
    known = set().union(*(engine_options(engine) for engine in ENGINE_NAMES if engine != "auto"))
    unknown = sorted(set(options) - known)
    if unknown:
        raise MAEError(
            f"No engine has the option(s) {', '.join(unknown)}.",
            hint=f"engine options are: {', '.join(sorted(known))}",
        )
    if name == "auto":
        from .auto import choose  # auto reads the benchmark cache and the hardware: only when asked for

        choice = choose(model, "embed" if part == "encoder" else "reconstruct", options.pop("precision", None))
        engine = create_engine(
            choice.engine, model, part, **{**options, "precision": choice.precision, **choice.options}
        )
        engine.auto_choice = choice
        return engine
    engine_type = engine_class(name)
    accepted = inspect.signature(engine_type).parameters
    return engine_type(model, part, **{k: v for k, v in options.items() if v is not None and k in accepted})
