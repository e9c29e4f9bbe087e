"""fp16 and int8 variants: structure (fp32 islands, float32 boundaries, quantized MatMuls), tolerances, gates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mae.checkpoint import save_checkpoint
from mae.core.bundle import Bundle
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.core.files import sha256_file
from mae.core.masking import masking_from_noise, random_noise
from mae.export import export_bundle
from mae.export import verify as verify_module
from mae.export.precision import FP32_ISLANDS, topological_sort
from mae.export.verify import TOLERANCES, Tolerance, VerificationError, reference_pixels
from mae.model import MaskedAutoencoder

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def loud_model() -> MaskedAutoencoder:
    """A tiny MAE whose residual stream is in the hundreds: the sum of squares inside a LayerNorm over 32 channels
    is then ~1e6, far past fp16's 65504, so a LayerNorm accumulating in fp16 would overflow (ONNX Runtime's CPU
    kernel accumulates in fp32 whatever the graph says; a GPU fp16 kernel need not). The values themselves fit fp16.
    """
    torch.manual_seed(0)
    config = get_preset("mae_vit_test_patch8")
    model = MaskedAutoencoder(config).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(150.0)
        model.patch_embed.proj.bias.normal_(0, 50.0)
        for param in model.parameters():
            if param.dim() == 1 and param is not model.patch_embed.proj.bias:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def model() -> MaskedAutoencoder:
    return loud_model()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model: MaskedAutoencoder) -> Bundle:
    folder = tmp_path_factory.mktemp("precision")
    save_checkpoint(folder / "loud.pt", model.state_dict(), model.cfg)
    return export_bundle(folder / "loud.pt", folder / "bundle", precisions=("fp32", "fp16", "int8"))


def test_activations_really_are_large(bundle: Bundle, model: MaskedAutoencoder) -> None:
    _, pixels = reference_pixels(bundle.preprocessing)
    with torch.no_grad():
        tokens = model.patch_embed(torch.from_numpy(pixels))  # [N, L, D], the residual stream's start
    assert float((tokens.double() ** 2).sum(-1).max()) > 65504 * 10


def test_fp16_graph_structure(bundle: Bundle) -> None:
    for part in ("encoder", "decoder"):
        proto = onnx.load(str(bundle.graph(part, "fp16")))
        graph = proto.graph
        # float32 at the boundary (ids stay int64): the runtime feeds the same arrays to every precision.
        for value in [*graph.input, *graph.output]:
            assert value.type.tensor_type.elem_type in (FLOAT, onnx.TensorProto.INT64)
        # The weights are fp16 except LayerNorm's own scale and bias.
        floats = [t for t in graph.initializer if t.data_type in (FLOAT, FLOAT16)]
        fp16_bytes = sum(len(t.raw_data) for t in floats if t.data_type == FLOAT16)
        fp32_bytes = sum(len(t.raw_data) for t in floats if t.data_type == FLOAT)
        assert fp16_bytes > 5 * fp32_bytes
        # LayerNorm and Softmax run in fp32: their data input is a Cast to float32.
        producers = {output: node for node in graph.node for output in node.output}
        islands = [node for node in graph.node if node.op_type in FP32_ISLANDS]
        assert {node.op_type for node in islands} == set(FP32_ISLANDS)
        for node in islands:
            cast = producers.get(node.input[0])
            assert cast is not None and cast.op_type == "Cast", node.name
            assert onnx.helper.get_attribute_value(cast.attribute[0]) == FLOAT
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # the types are consistent
        assert inferred.graph.output[0].type.tensor_type.elem_type == FLOAT


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_fp16_within_tolerance_on_photos(bundle: Bundle, model: MaskedAutoencoder) -> None:
    """Independently of the export's own check: fp16 ONNX on CPU vs fp32 PyTorch, both graphs, both ratios."""
    _, pixels = reference_pixels(bundle.preprocessing)
    options = ort.SessionOptions()
    encoder = ort.InferenceSession(str(bundle.graph("encoder", "fp16")), options, ["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(bundle.graph("decoder", "fp16")), options, ["CPUExecutionProvider"])
    tolerance = TOLERANCES["fp16"]
    for ratio in (0.0, 0.75):
        masking = masking_from_noise(random_noise(len(pixels), model.cfg.num_patches, seed=3), ratio)
        with torch.no_grad():
            want = model.forward_encoder(torch.from_numpy(pixels), torch.from_numpy(masking.ids_keep)).numpy()
            want_pred = model.forward_decoder(torch.from_numpy(want), torch.from_numpy(masking.ids_restore)).numpy()
        (latent,) = encoder.run(None, {"pixel_values": pixels, "ids_keep": masking.ids_keep})
        (pred,) = decoder.run(None, {"latent": want, "ids_restore": masking.ids_restore})
        assert latent.dtype == np.float32 and np.isfinite(latent).all() and np.isfinite(pred).all()
        for got, expected in ((latent, want), (pred, want_pred)):
            assert np.abs(got - expected).max() <= tolerance.max_rel * np.abs(expected).max()
        assert cosine(latent[:, 0], want[:, 0]).min() >= tolerance.min_cosine
        assert cosine(latent[:, 1:].mean(1), want[:, 1:].mean(1)).min() >= tolerance.min_cosine
    report = bundle.manifest["verification"]["fp16"]
    for part in ("encoder", "decoder"):
        assert report[part]["passed"] and report[part]["max_rel_diff"] <= tolerance.max_rel
        assert report[part]["bytes"] < bundle.manifest["graphs"]["fp32"][part]["bytes"]


def test_int8_structure_and_report(bundle: Bundle) -> None:
    assert "int8" in bundle.manifest["graphs"] and set(bundle.manifest["graphs"]["int8"]) == {"encoder"}
    ops = {node.op_type for node in onnx.load(str(bundle.graph("encoder", "int8"))).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert "ConvInteger" not in ops  # the patch embedding stays fp32
    report = bundle.manifest["verification"]["int8"]["encoder"]
    assert report["passed"] and min(report["cosine_cls"], report["cosine_mean"]) >= 0.999
    assert report["tolerance"] == {"min_cosine": 0.999}
    assert report["bytes"] < bundle.manifest["graphs"]["fp32"]["encoder"]["bytes"]
    with pytest.raises(MAEError, match="has no int8 decoder"):
        bundle.graph("decoder", "int8")


def test_int8_cosine_gate_fails_cleanly(tmp_path: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the cosine bound the export fails, names the cosine, and the bundle is left as it was."""
    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    manifest = copy / "mae.json"
    text = manifest.read_text()
    (copy / "encoder.int8.onnx").unlink()
    manifest.write_text(text.replace('"int8"', '"int8-removed"'))  # as if int8 had never been exported
    before = {p.name: sha256_file(p) for p in copy.iterdir()}
    monkeypatch.setitem(verify_module.TOLERANCES, "int8", Tolerance(min_cosine=1 - 1e-12))
    with pytest.raises(VerificationError, match=r"lowest pooled-feature cosine 0\.\d+ < 1"):
        export_bundle(copy, copy, precisions=("int8",))
    assert {p.name: sha256_file(p) for p in copy.iterdir()} == before


def test_tolerance_descriptions() -> None:
    assert TOLERANCES["fp32"].describe() == "max |diff| <= 0.0001"
    assert TOLERANCES["int8"].describe() == "cosine >= 0.999"
    assert "0.02 x max |output|" in TOLERANCES["fp16"].describe()


def test_topological_sort() -> None:
    make = onnx.helper.make_node
    nodes = [make("Relu", ["b"], ["c"]), make("Cast", ["x"], ["a"], to=FLOAT), make("Neg", ["a"], ["b"])]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", FLOAT16, [1])],
        [onnx.helper.make_tensor_value_info("c", FLOAT, [1])],
    )
    topological_sort(graph)
    assert [node.op_type for node in graph.node] == ["Cast", "Neg", "Relu"]
    onnx.checker.check_model(onnx.helper.make_model(graph), full_check=True)
    dangling = onnx.helper.make_graph([make("Relu", ["nowhere"], ["c"])], "g", [], [])
    with pytest.raises(MAEError, match="nowhere"):
        topological_sort(dangling)
