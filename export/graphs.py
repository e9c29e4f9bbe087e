"""PyTorch -> ONNX for the two graphs: the encoder and the decoder, each with dynamic batch and token axes.

Exporter: torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), default opset 18. Why, in short
(the evidence is in docs/export.md): TensorRT 10.0's ONNX parser reads opsets 9-20 and TensorRT 11 up to 25, so
the fused ONNX `Attention` op (opset 23) would shut out TensorRT 10; opset 18 is what the dynamo exporter emits
natively (no version conversion), has `LayerNormalization` as one op, and keeps attention as MatMul + Softmax.
The dynamo graph is also smaller (no Where/Equal/ConstantOfShape around the SDPA scale) and names its output
shapes symbolically (`kept + 1`, a fixed L), and it is the exporter torch still develops.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from torch import nn

from mae.core.bundle import INPUT_NAMES, OUTPUT_NAMES, no_decoder_error
from mae.core.errors import MAEError
from mae.model import MaskedAutoencoder

from .progress import quiet

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is an ONNX op from 17 on; below that it would be decomposed
MAX_OPSET = 25  # the newest TensorRT 11 parses
ATTENTION_OPSET = 23  # from here the exporter emits the fused ONNX Attention op (TensorRT >= 11 only)
EXPORTER = "torch.onnx dynamo"
MAX_BATCH = 65536  # upper bound of the symbolic batch axis; ONNX itself records it as a free dimension

# Ops that would make a graph non-deterministic or smuggle the masking (argsort) inside it.
FORBIDDEN_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "TopK"}
)


class EncoderGraph(nn.Module):
    """The encoder as the ONNX graph sees it: (pixel_values [B,3,H,W], ids_keep [B,K]) -> latent [B,1+K,D]."""

    def __init__(self, model: MaskedAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.model.forward_encoder(pixel_values, ids_keep)


class DecoderGraph(nn.Module):
    """(latent [B,1+K,D], ids_restore [B,L]) -> pred [B,L,p*p*3]."""

    def __init__(self, model: MaskedAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.model.forward_decoder(latent, ids_restore)


@dataclass(frozen=True)
class ExampleInputs:
    """Tracing inputs whose sizes are all distinct and >= 2, so that torch.export neither specializes a dynamic
    axis to 0/1 nor merges two axes that happen to share a value."""

    batch: int
    kept: int


def example_sizes(num_patches: int) -> ExampleInputs:
    if num_patches < 3:
        raise MAEError(
            f"The model has {num_patches} patches; exporting with a dynamic kept-token axis needs at least 3.",
            hint="use a smaller patch size or a larger image size",
        )
    kept = max(3, num_patches // 4)  # the default mask ratio's K on real models; never equal to the batch of 2
    return ExampleInputs(batch=2, kept=min(kept, num_patches))


def check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise MAEError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}.",
            hint=f"the default, {DEFAULT_OPSET}, loads in ONNX Runtime and parses in TensorRT 10 and 11",
        )
    return int(opset)


def export_graph(model: MaskedAutoencoder, part: str, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One graph of `model` (eval mode, fp32, CPU) as an ONNX ModelProto, batch and token axes dynamic."""
    cfg = model.cfg
    length = cfg.num_patches
    sizes = example_sizes(length)
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    generator = torch.Generator().manual_seed(0)
    if part == "encoder":
        module: nn.Module = EncoderGraph(model)
        pixel_values = torch.randn(sizes.batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
        ids_keep = torch.stack([torch.randperm(length, generator=generator)[: sizes.kept] for _ in range(sizes.batch)])
        args: tuple[torch.Tensor, ...] = (pixel_values, ids_keep)  # [B, 3, H, W], [B, K]
        kept_dim = torch.export.Dim("kept", min=1, max=length)
        dynamic_shapes: dict = {"pixel_values": {0: batch_dim}, "ids_keep": {0: batch_dim, 1: kept_dim}}
    elif part == "decoder":
        if not model.has_decoder:
            raise no_decoder_error("The model")
        module = DecoderGraph(model)
        latent = torch.randn(sizes.batch, 1 + sizes.kept, cfg.embed_dim, generator=generator)  # [B, 1+K, D]
        ids_restore = torch.stack([torch.randperm(length, generator=generator) for _ in range(sizes.batch)])
        args = (latent, ids_restore)
        tokens_dim = torch.export.Dim("tokens", min=2, max=1 + length)  # cls + 1..L kept tokens
        dynamic_shapes = {"latent": {0: batch_dim, 1: tokens_dim}, "ids_restore": {0: batch_dim}}
    else:
        raise MAEError(f"Unknown graph {part!r}: use encoder or decoder")

    input_names, output_names = INPUT_NAMES[part], OUTPUT_NAMES[part]
    module.eval()
    try:
        with quiet("torch", "onnxscript", "onnx_ir"), torch.no_grad():  # their DEBUG floods logs and tests
            program = torch.onnx.export(
                module,
                args,
                None,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the message, not the stack
        raise MAEError(
            f"torch.onnx could not export the {part} at opset {opset}: {exc}",
            hint=f"try the default opset ({DEFAULT_OPSET}); report the error if it persists",
        ) from exc
    proto = program.model_proto
    strip_node_metadata(proto)
    fold_weight_constants(proto)
    check_forbidden_ops(proto, part)
    return proto


def strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node notes (FX names, Python stack traces with this machine's paths): they are
    for debugging the exporter, not for the people the bundle is shipped to."""
    for node in proto.graph.node:
        del node.metadata_props[:]


# Ops whose result on constant inputs is computed once at export instead of at every run. The exporter keeps
# parameters as named initializers and leaves e.g. `cls_token + pos_embed[:, :1]` to run time; in an fp16 graph
# ONNX Runtime's CPU cannot fold those itself (no fp16 kernels for constant folding) and says so in a warning.
FOLDABLE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Slice", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat"})


def fold_weight_constants(proto: onnx.ModelProto) -> int:
    """Replace nodes in FOLDABLE_OPS whose inputs are all initializers by initializers holding their result;
    drop initializers nothing uses any more. Returns the number of nodes folded."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    graph_outputs = {value.name for value in graph.output}
    folded = 0
    kept_nodes = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type not in FOLDABLE_OPS or not inputs or any(name not in initializers for name in inputs):
            kept_nodes.append(node)
            continue
        if any(output in graph_outputs for output in node.output) or node.domain not in ("", "ai.onnx"):
            kept_nodes.append(node)
            continue
        single = onnx.helper.make_model(
            onnx.helper.make_graph(
                [node],
                "fold",
                [],
                [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in node.output],
                [initializers[name] for name in inputs],
            ),
            opset_imports=list(proto.opset_import),
        )
        results = ReferenceEvaluator(single).run(None, {})
        for name, value in zip(node.output, results, strict=True):
            tensor = numpy_helper.from_array(value, name)
            graph.initializer.append(tensor)
            initializers[name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept_nodes)
        used = {name for node in graph.node for name in node.input} | graph_outputs
        unused = [tensor for tensor in graph.initializer if tensor.name not in used]
        for tensor in unused:
            graph.initializer.remove(tensor)
        stale = {value.name for value in graph.value_info} - used
        for value in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(value)
    return folded


def op_types(proto: onnx.ModelProto) -> set[str]:
    """Every op type in the graph, subgraphs and local functions included."""
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(proto.graph)
    for function in proto.functions:
        found.update(node.op_type for node in function.node)
    return found


def check_forbidden_ops(proto: onnx.ModelProto, part: str) -> None:
    bad = sorted(op_types(proto) & FORBIDDEN_OPS)
    if bad:
        raise MAEError(
            f"The exported {part} contains {', '.join(bad)}: masking and randomness must stay outside the graphs.",
            hint="this is a bug in mae's model code; please report it",
        )


def graph_opset(proto: onnx.ModelProto) -> int:
    """The default-domain opset the graph declares."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise MAEError("The ONNX graph declares no default-domain opset.")
