"""Roofline numbers for `mae bench`: the encoder's FLOPs per image, and this machine's peak GEMM throughput.

An engine row's effective GFLOP/s (FLOPs per image x images/s) over the peak of the precision it computes in says
how much of the machine it uses, which a ratio against PyTorch cannot: 2x PyTorch may still be 10% of the CPU.

FLOPs count a multiply-add as 2 and only the matrix products; LayerNorm, softmax, GELU and the additions are a few
percent of a ViT's work. Peaks are one large GEMM per precision, in the libraries that run our graphs, with the same
thread settings as the engines: ONNX Runtime MatMul (fp32) and MatMulInteger (uint8 x int8, the op of our int8
graphs); bf16 (only on CPUs with bf16 instructions) by OpenVINO and PyTorch, the two bf16 engines, the better of the
two where both are installed. A peak is the best of a few runs; on a shared machine it is a lower bound of the true
one. Torch is imported (through the torch engine's module) only for the bf16 peak, and only where it is installed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae.core import hardware
from mae.core.config import MAEConfig

from .engines.onnx import session_options
from .engines.openvino import keep_signal_stack
from .engines.torch import matmul_seconds

PEAK_KINDS = ("fp32", "bf16", "int8")
UNITS = {"fp32": "GFLOP/s", "bf16": "GFLOP/s", "int8": "GOP/s"}


def encoder_flops(config: MAEConfig, kept: int) -> float:
    """FLOPs of one image through the encoder with `kept` patches (T = 1 + K tokens after the class token).

    The patch embedding runs on all L patches (`forward_encoder` embeds, then gathers the kept ones): 2 L (p p C) D.
    Per block, with D the width and H the MLP hidden size: qkv 2 T D 3D, attention scores and weighted sum
    2 (2 T T D), output projection 2 T D D, MLP 2 (2 T D H). ViT-B/16: ~35.1 GFLOP at T = 197, ~8.8 at T = 50.
    """
    tokens, width, hidden = 1 + kept, config.embed_dim, config.encoder_hidden
    patch_embed = 2 * config.num_patches * config.patch_dim * width
    block = (
        2 * tokens * width * 3 * width  # qkv
        + 2 * 2 * tokens * tokens * width  # q k^T and attention x v, all heads together
        + 2 * tokens * width * width  # projection
        + 2 * 2 * tokens * width * hidden  # fc1 and fc2
    )
    return float(patch_embed + config.depth * block)


@dataclass(frozen=True)
class Peak:
    kind: str  # fp32 | bf16 | int8
    gflops: float  # best of `runs`: GFLOP/s (GOP/s for int8)
    shape: tuple[int, int, int]  # M, K, N of the GEMM
    source: str  # what ran it, e.g. "onnxruntime 1.32.0 MatMul"
    runs: int

    @property
    def unit(self) -> str:
        return UNITS[self.kind]

    def describe(self) -> str:
        """'fp32 131 GFLOP/s (onnxruntime 1.32.0 MatMul)'."""
        return f"{self.kind} {self.gflops:.0f} {self.unit} ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "unit": self.unit}


def _best_seconds(run: Callable[[], object], runs: int) -> float:
    run()  # warm-up: packing of the constant operand, thread pools
    best = float("inf")
    for _ in range(max(1, runs)):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return max(best, 1e-9)


def _matmul_graph(kind: str, size: int):  # noqa: ANN202 - onnx.ModelProto
    """y = a @ w with w a constant, as an engine sees a weight: MatMul (fp32) or MatMulInteger (uint8 x int8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "int8":
        weight = rng.integers(-64, 64, (size, size), dtype=np.int8)  # 7-bit, as our int8 weights
        a_type, y_type, op = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
    else:
        weight = rng.standard_normal((size, size), dtype=np.float32)
        a_type, y_type, op = TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "w"], ["y"])],
        f"peak_{kind}",
        [helper.make_tensor_value_info("a", a_type, [size, size])],
        [helper.make_tensor_value_info("y", y_type, [size, size])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime and OpenVINO we support
    onnx.checker.check_model(model)
    return model


def _input(kind: str, size: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "int8":
        return rng.integers(0, 256, (size, size), dtype=np.uint8)
    return rng.standard_normal((size, size), dtype=np.float32)


def _onnxruntime_peak(kind: str, size: int, runs: int, num_threads: int | None) -> Peak:
    import onnxruntime as ort

    session = ort.InferenceSession(
        _matmul_graph(kind, size).SerializeToString(),
        sess_options=session_options(ort, num_threads),  # the onnx engine's settings
        providers=["CPUExecutionProvider"],
    )
    feed = {"a": _input(kind, size)}
    seconds = _best_seconds(lambda: session.run(None, feed), runs)
    op = "MatMulInteger u8 x s8" if kind == "int8" else "MatMul"
    return Peak(kind, 2 * size**3 / seconds / 1e9, (size, size, size), f"onnxruntime {ort.__version__} {op}", runs)


def _openvino_bf16_peak(size: int, runs: int, num_threads: int | None) -> Peak:
    import onnx
    import openvino

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    with tempfile.TemporaryDirectory(prefix="mae-peak-") as folder, keep_signal_stack():
        path = Path(folder) / "matmul.onnx"
        onnx.save(_matmul_graph("fp32", size), str(path))
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        feed = {0: _input("fp32", size)}
        seconds = _best_seconds(lambda: request.infer(feed), runs)
        version = openvino.__version__.split("-")[0]
        return Peak("bf16", 2 * size**3 / seconds / 1e9, (size, size, size), f"openvino {version} bf16 MatMul", runs)


def _torch_bf16_peak(size: int, runs: int) -> Peak:

    seconds, version = matmul_seconds(size, "bf16", runs)
    return Peak("bf16", 2 * size**3 / seconds / 1e9, (size, size, size), f"torch {version} bf16 mm", runs)


def _bf16_peak(size: int, runs: int, num_threads: int | None) -> Peak:
    """The better of OpenVINO and PyTorch (oneDNN's AMX kernels differ between the two), of those that run here
    (not installed, or OpenVINO refusing bf16 on a CPU held below it by ONEDNN_MAX_CPU_ISA: the other one counts)."""
    found: list[Peak] = []
    failures: list[Exception] = []
    for measure in (lambda: _openvino_bf16_peak(size, runs, num_threads), lambda: _torch_bf16_peak(size, runs)):
        try:
            found.append(measure())
        except Exception as exc:
            failures.append(exc)
    if not found:
        raise failures[0]
    return max(found, key=lambda peak: peak.gflops)


def measure_peaks(
    size: int = 1024,
    runs: int = 5,
    num_threads: int | None = None,
    kinds: Sequence[str] = PEAK_KINDS,
    cpu: hardware.CpuInfo | None = None,
) -> tuple[dict[str, Peak], dict[str, str]]:
    """(peaks by kind, {kind: why not measured}) for a size x size x size GEMM, best of `runs` (about a second).

    bf16 is measured only on CPUs with bf16 instructions (elsewhere it is emulated, and refused by the engines).
    num_threads: as the engines get it (None: each library's default).
    """
    cpu = cpu or hardware.cpu_info()
    unknown = [kind for kind in kinds if kind not in PEAK_KINDS]
    if unknown:
        raise ValueError(f"peak kinds are {', '.join(PEAK_KINDS)}, not {', '.join(unknown)}")
    peaks: dict[str, Peak] = {}
    missing: dict[str, str] = {}
    for kind in kinds:
        try:
            if kind != "bf16":
                peaks[kind] = _onnxruntime_peak(kind, size, runs, num_threads)
            elif not cpu.native_bf16:
                missing[kind] = "no bf16 instructions on this CPU"
            else:
                peaks[kind] = _bf16_peak(size, runs, num_threads)
        except ImportError as exc:
            missing[kind] = f"{exc.name or 'a package'} is not installed"
        except Exception as exc:  # a library that cannot run the GEMM here leaves that peak out, not the bench
            missing[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return peaks, missing
