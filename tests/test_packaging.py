"""The extras install sets that work together: ONNX Runtime CPU or GPU (never both), TensorRT with CUDA bindings of
the same CUDA major, each with an upper bound (a new major must be tried before it is taken)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

EXTRAS = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]


def _bounds(requirement: str) -> tuple[str, int, int]:
    """'cuda-python>=12.0,<13' -> ('cuda-python', 12, 13)."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=(\d+)(?:\.\d+)*,<(\d+)", requirement.replace(" ", ""))
    assert match, f"{requirement}: needs a lower and an upper bound (NAME>=A,<B)"
    return match.group(1), int(match.group(2)), int(match.group(3))


def test_onnxruntime_cpu_and_gpu_never_together():
    for name, requirements in EXTRAS.items():
        names = {re.split(r"[<>=\[ ]", r)[0] for r in requirements}
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names, name


def test_tensorrt_extras_pair_one_cuda_major():
    trt_extras = {name: reqs for name, reqs in EXTRAS.items() if name.startswith("tensorrt")}
    assert set(trt_extras) == {"tensorrt", "tensorrt-cu13"}
    for name, requirements in trt_extras.items():
        parsed = {package: (low, high) for package, low, high in map(_bounds, requirements)}
        (trt_package,) = [p for p in parsed if p.startswith("tensorrt")]
        cuda_major = int(trt_package.rpartition("cu")[2])
        low, high = parsed["cuda-python"]
        assert (low, high) == (cuda_major, cuda_major + 1), f"{name}: cuda-python must be CUDA {cuda_major}"
        assert parsed[trt_package][1] <= 12, f"{name}: TensorRT 12 is not supported by the engine build yet"
