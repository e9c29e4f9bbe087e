"""Reduced-precision variants of the fp32 graphs.

fp16: every float weight and activation in fp16, except LayerNormalization and Softmax, which run in fp32 between
explicit Casts: their sums of squares / exponentials are where fp16 overflows (the sum of squares over 768
channels of activations ~30 is already 7e5 > 65504). ONNX Runtime's CPU LayerNorm accumulates in fp32 anyway
(`stash_type`); TensorRT's fp16 normalization layers need not, and strongly typed TensorRT does what the graph says.
Inputs and outputs stay float32 (Casts at the graph boundary), so the runtime feeds the same arrays to every
precision. All types are explicit, which is what TensorRT 11's strongly typed networks need.

int8: ONNX Runtime dynamic quantization of the encoder's weight MatMuls (QOperator form: DynamicQuantizeLinear +
MatMulInteger). ANCHORS.md measured it 2.5-3.9x faster than PyTorch fp32 on this CPU at both mask ratios, without
calibration data; static QDQ was faster only at mask 0.75 and slower at mask 0. The patch-embedding Conv, the
attention score MatMuls (no constant weight) and everything else stay fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from mae.errors import MAEError, require
from mae.export.progress import quiet

FP32_ISLANDS = ("LayerNormalization", "Softmax")  # kept in fp32 inside the fp16 graph
INT8_OPS = ("MatMul",)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """An fp16 copy of an fp32 graph with float32 inputs/outputs and fp32 LayerNorm/Softmax."""
    require("onnxruntime", "cpu", "The fp16 export")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    with quiet("onnxruntime", "root"):
        converted = convert_float_to_float16(
            copy,
            keep_io_types=True,  # float32 in and out, Casts inside
            op_block_list=list(FP32_ISLANDS),
            # The exporter already wrote value_info for every intermediate value; re-inferring would fail on
            # graphs over 2 GB (ViT-H).
            disable_shape_infer=True,
        )
    # The converter leaves some intermediate value_info at float32; they are optional hints, and stale ones make
    # the graph invalid, so drop them all (ONNX Runtime and TensorRT infer them again).
    del converted.graph.value_info[:]
    topological_sort(converted.graph)
    return converted


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so that each comes after the producers of its inputs (the converter appends its Casts at the
    end, which ONNX forbids). Stable: nodes keep their relative order where the data flow allows."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still_pending = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                still_pending.append(node)
        if len(still_pending) == len(pending):
            missing = sorted({n for node in pending for n in node.input if n not in available})[:5]
            raise MAEError(f"The converted graph has inputs that nothing produces: {', '.join(missing)}")
        pending = still_pending
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantization of an fp32 encoder file into `int8_path`."""
    require("onnxruntime", "cpu", "The int8 export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet("onnxruntime", "root"):
        quantize_dynamic(
            model_input=os.fspath(fp32_path),
            model_output=os.fspath(int8_path),
            op_types_to_quantize=list(INT8_OPS),
            weight_type=QuantType.QInt8,
            per_channel=False,
            # Only MatMuls against a weight: the attention score products have two activations.
            extra_options={"MatMulConstBOnly": True},
        )
