"""Reduced-precision variants of the fp32 graphs.

fp16: every float weight and activation in fp16, except LayerNormalization and Softmax, which run in fp32 between
explicit Casts: their sums of squares / exponentials are where fp16 overflows (the sum of squares over 768
channels of activations ~30 is already 7e5 > 65504). ONNX Runtime's CPU LayerNorm accumulates in fp32 anyway
(`stash_type`); TensorRT's fp16 normalization layers need not, and strongly typed TensorRT does what the graph says.
Inputs and outputs stay float32 (Casts at the graph boundary), so the runtime feeds the same arrays to every
precision. All types are explicit, which is what TensorRT 11's strongly typed networks need.

int8, two graphs from one calibration set (`mae.export.calibration`), each gated on held-out images:

- ONNX Runtime (`encoder.int8.onnx`): the weight MatMuls (qkv, proj, fc1, fc2) with int8 weights per output channel
  and uint8 activations quantized per batch (DynamicQuantizeLinear + MatMulInteger). Weights are held to 7 bits
  ([-64, 64], `reduce_range`): x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply u8 x s8 with VPMADDUBSW,
  which sums pairs of products into int16 with saturation; 255 * (64 + 64) = 32640 fits, so no product pair can
  saturate and the integer results are exact, and so identical, on AVX2, AVX-512, VNNI and AMX CPUs
  (`check_int8_weight_range` proves it from the file). 8-bit weights gave pooled cosines of 0.970-0.988 on an
  AVX2-only AMD Zen 3 for weights that gave 0.9999 on a VNNI CPU. Measured on a Sapphire Rapids class CPU,
  ViT-B/16 with random weights, against the same fp32 graph (images/s ratio at K=49 / K=196, worst pooled cosine on
  held-out crops), quiet machine: this 3.11x / 3.01x, 0.99943; 8-bit per-tensor weights 2.96x / 3.05x, 0.99946 (not
  portable); 7-bit per-tensor 2.94x / 2.84x, 0.99922. Loaded machine: static QDQ calibrated on the same images
  (uint8 activations, 7-bit per-channel weights, MinMax ranges) 2.22x / 2.02x, 0.99873, against 2.71x / 3.12x for
  this; the same with percentile ranges 1.86x / 1.89x, 0.9724. Fixed activation ranges lose to per-batch ones on
  both counts here, so the calibration images serve as the gate for this graph. ONNX Runtime's transformer
  optimizer (BiasGelu, SkipLayerNormalization fusions) before quantizing was 5-12% slower. The
  patch-embedding Conv, the attention score products (no constant weight), LayerNorm, Softmax, GELU and the
  residual adds stay fp32.
- OpenVINO (`encoder.int8.xml` + `.bin`): static quantization by NNCF in its transformer mode from the same
  calibration images (fast bias correction; LayerNorm, Softmax, GELU and the residual adds stay float), with NNCF's
  overflow fix on every layer (7-bit weights for the same VPMADDUBSW reason), saved as OpenVINO IR: a real int8
  model that runs on AMX-INT8 / VNNI where the CPU has them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from mae.core.errors import MAEError, require

from .progress import quiet

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


INT8_WEIGHT_LIMIT = 64  # |int8 weight| <= 64: u8 x s8 pairs cannot saturate int16 (255 * 128 = 32640 <= 32767)
INT8_METHOD = {
    "onnxruntime": "dynamic uint8 activations, per-channel 7-bit int8 weights (MatMul)",
    "openvino": "NNCF static quantization (transformer mode, overflow fix on every layer)",
}


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """ONNX Runtime int8 of an fp32 encoder file into `int8_path` (see the module docstring)."""
    require("onnxruntime", "cpu", "The int8 export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet("onnxruntime", "root"):
        quantize_dynamic(
            model_input=os.fspath(fp32_path),
            model_output=os.fspath(int8_path),
            op_types_to_quantize=list(INT8_OPS),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,  # 7-bit weights: exact on CPUs without VNNI
            # Only MatMuls against a weight: the attention score products have two activations.
            extra_options={"MatMulConstBOnly": True},
        )


def check_int8_weight_range(proto: onnx.ModelProto) -> int:
    """The largest |weight| of the int8 weight tensors feeding MatMulInteger; an MAEError above INT8_WEIGHT_LIMIT
    (such a graph would compute wrong results on CPUs without VNNI)."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    largest = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in initializers:
            continue
        weights = numpy_helper.to_array(initializers[node.input[1]]).astype(np.int32)
        largest = max(largest, int(np.abs(weights).max(initial=0)))
    if largest > INT8_WEIGHT_LIMIT:
        raise MAEError(
            f"The int8 graph has weights up to {largest} in magnitude; above {INT8_WEIGHT_LIMIT} the integer "
            "products saturate on CPUs without VNNI (AVX2 and plain AVX-512), giving wrong results there.",
            hint="this is an export bug: quantize with 7-bit weights (reduce_range)",
        )
    return largest


def quantize_openvino_int8(
    fp32_path: Path, xml_path: Path, feeds: list[dict[str, np.ndarray]], fast: bool = False
) -> None:
    """NNCF int8 of an fp32 encoder graph, saved as OpenVINO IR (`xml_path` and the .bin beside it).

    feeds: calibration inputs of the encoder ({"pixel_values", "ids_keep"} batches). fast: skip the bias
    correction (tests of tiny models).
    """
    ov = require("openvino", "openvino", "The OpenVINO int8 export")
    nncf = require("nncf", "openvino", "The OpenVINO int8 export")
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    with quiet("nncf", "openvino", "root"):
        model = ov.Core().read_model(os.fspath(fp32_path))
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            fast_bias_correction=True,
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix.ENABLE,
                # SmoothQuant (on by default in transformer mode) lowered the pooled cosine of small ViTs from
                # 0.9993 to 0.9971 here; the MAE encoder's activations need no migration into the weights.
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
                disable_bias_correction=fast,
            ),
        )
        # compress_to_fp16=False: the float parts stay fp32, as verified.
        ov.save_model(quantized, os.fspath(xml_path), compress_to_fp16=False)
