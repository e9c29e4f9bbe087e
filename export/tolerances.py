"""What each precision's graphs are held to against PyTorch fp32 (`mae.export.verify` applies it).

Torch-free, so that `mae info` can describe a bundle's tolerances without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mae.runtime.engines.auto import GATE as INT8_GATE  # one home: `auto` and `mae bench` hold engines to it too


@dataclass(frozen=True)
class Tolerance:
    max_abs: float | None = None  # absolute bound on |onnx - torch|
    max_rel: float | None = None  # bound on max |onnx - torch| / max |torch| (scale-free, for reduced precision)
    min_cosine: float | None = None  # bound on the per-image cosine of pooled features (decoder: of pred)

    def describe(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"max |diff| <= {self.max_abs:g}")
        if self.max_rel is not None:
            parts.append(f"max |diff| <= {self.max_rel:g} x max |output|")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return ", ".join(parts)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4),
    # fp16 keeps LayerNorm and softmax in fp32; what is left is fp16 rounding of weights and activations
    # (~5e-4 relative per op), which accumulates over the blocks.
    "fp16": Tolerance(max_rel=2e-2, min_cosine=0.999),
    # int8 moves single values a lot; what matters for embeddings is the direction. Judged on held-out calibration
    # images next to the verification photos; `mae export --int8-min-cosine` changes it.
    "int8": Tolerance(min_cosine=INT8_GATE),
}
