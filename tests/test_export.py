"""`mae export --format onnx`: graphs, verification, metadata, bundles that are never half-written, `mae info`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_runner import run_cli
from images_corpus import tiny_hf_config

from mae.checkpoint import save_checkpoint
from mae.core.bundle import Bundle
from mae.core.config import MAEConfig
from mae.core.errors import MAEError
from mae.core.files import sha256_file
from mae.core.masking import masking_from_noise, random_noise
from mae.export import export_bundle
from mae.export.graphs import FORBIDDEN_OPS, check_opset, export_graph, op_types
from mae.export.metadata import read_metadata
from mae.export.onnx_bundle import Int8Options
from mae.export.verify import VerificationError
from mae.model import MaskedAutoencoder


def make_model(config: MAEConfig, seed: int = 0, decoder: bool = True) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    model = MaskedAutoencoder(config, decoder=decoder).eval()
    with torch.no_grad():  # non-trivial norms, biases and tokens: a mixed-up weight shows in the outputs
        for param in model.parameters():
            if param.dim() == 1 or param.shape[:2] == (1, 1):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def tiny_model() -> MaskedAutoencoder:
    from mae.core.config import get_preset

    return make_model(get_preset("mae_vit_test_patch8"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model: MaskedAutoencoder) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, tiny_model.state_dict(), tiny_model.cfg)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, checkpoint: Path) -> Bundle:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("export") / "bundle")


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".export-" in p.name or p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------- graphs
def test_bundle_layout_and_contract(bundle: Bundle, checkpoint: Path) -> None:
    assert sorted(p.name for p in bundle.path.iterdir()) == ["decoder.onnx", "encoder.onnx", "mae.json"]
    assert bundle.precisions == ["fp32"] and bundle.has_decoder
    config = bundle.config
    L, D = config.num_patches, config.embed_dim  # noqa: N806 - the paper's names

    def io_of(path: Path) -> tuple[list, list]:
        graph = onnx.load(str(path)).graph

        def describe(values):
            return [
                (
                    v.name,
                    v.type.tensor_type.elem_type,
                    [d.dim_value if d.HasField("dim_value") else "dyn" for d in v.type.tensor_type.shape.dim],
                )
                for v in values
            ]

        return describe(graph.input), describe(graph.output)

    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64  # noqa: N806
    assert io_of(bundle.graph("encoder")) == (
        [("pixel_values", F, ["dyn", 3, 32, 32]), ("ids_keep", I64, ["dyn", "dyn"])],
        [("latent", F, ["dyn", "dyn", D])],
    )
    assert io_of(bundle.graph("decoder")) == (
        [("latent", F, ["dyn", "dyn", D]), ("ids_restore", I64, ["dyn", L])],
        [("pred", F, ["dyn", L, config.patch_dim])],
    )
    # The source is recorded so that the torch engine (and `mae export BUNDLE`) can find the weights again.
    assert bundle.manifest["source"] == {
        "path": str(checkpoint.resolve()),
        "format": "mae-checkpoint",
        "sha256": sha256_file(checkpoint),
    }
    for part in ("encoder", "decoder"):
        entry = bundle.manifest["graphs"]["fp32"][part]
        assert (
            entry["sha256"] == sha256_file(bundle.graph(part)) and entry["bytes"] == bundle.graph(part).stat().st_size
        )


def test_no_random_or_argsort_ops(bundle: Bundle) -> None:
    for part in ("encoder", "decoder"):
        found = op_types(onnx.load(str(bundle.graph(part))))
        assert not found & FORBIDDEN_OPS, found & FORBIDDEN_OPS
        assert "Attention" not in found  # plain ops at the default opset: TensorRT 10 parses them
    assert op_types(onnx.load(str(bundle.graph("encoder")))) >= {"LayerNormalization", "Softmax", "GatherElements"}


def test_scan_finds_forbidden_ops() -> None:
    """The scan that guards the exports does see a random op, even inside a subgraph."""
    inner = onnx.helper.make_graph(
        [onnx.helper.make_node("RandomUniform", [], ["r"], shape=[1])],
        "inner",
        [],
        [onnx.helper.make_value_info("r", onnx.TypeProto())],
    )
    outer = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["r"], then_branch=inner, else_branch=inner)], "g", [], []
    )
    found = op_types(onnx.helper.make_model(outer))
    assert {"If", "RandomUniform"} <= found


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_and_kept_tokens(bundle: Bundle, tiny_model: MaskedAutoencoder, batch: int) -> None:
    """One file serves any batch and any number of kept tokens (1..L, i.e. every mask ratio including 0)."""
    config = tiny_model.cfg
    L = config.num_patches  # noqa: N806
    encoder, decoder = session(bundle.graph("encoder")), session(bundle.graph("decoder"))
    generator = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, config.img_size, config.img_size, generator=generator)
    for kept in (1, 2, L // 2, L - 1, L):
        masking = masking_from_noise(random_noise(batch, L, seed=kept), 1 - kept / L)
        assert masking.ids_keep.shape == (batch, kept)
        (latent,) = encoder.run(None, {"pixel_values": pixels.numpy(), "ids_keep": masking.ids_keep})
        (pred,) = decoder.run(None, {"latent": latent, "ids_restore": masking.ids_restore})
        with torch.no_grad():
            want_latent = tiny_model.forward_encoder(pixels, torch.from_numpy(masking.ids_keep))
            want_pred = tiny_model.forward_decoder(want_latent, torch.from_numpy(masking.ids_restore))
        assert latent.shape == (batch, 1 + kept, config.embed_dim)
        np.testing.assert_allclose(latent, want_latent.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(pred, want_pred.numpy(), atol=1e-5, rtol=0)


def test_opset_17_and_bounds(tiny_model: MaskedAutoencoder) -> None:
    proto = export_graph(tiny_model, "encoder", opset=17)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ids_keep = np.array([[3, 1, 4], [0, 15, 9]], dtype=np.int64)
    (latent,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels, "ids_keep": ids_keep}
    )
    with torch.no_grad():
        want = tiny_model.forward_encoder(torch.from_numpy(pixels), torch.from_numpy(ids_keep)).numpy()
    np.testing.assert_allclose(latent, want, atol=1e-5, rtol=0)
    for bad in (13, 99):
        with pytest.raises(MAEError, match="opset"):
            check_opset(bad)


# ------------------------------------------------------------------------------------------ verification
def test_verification_report(bundle: Bundle) -> None:
    report = bundle.manifest["verification"]["fp32"]
    assert report["inputs"]["images"][:2] == ["skimage.data.astronaut", "skimage.data.chelsea"]
    assert report["inputs"]["mask_ratios"] == [0.0, 0.75] and report["inputs"]["batch_sizes"] == [1, 3]
    for part in ("encoder", "decoder"):
        graph = report[part]
        assert graph["passed"] and graph["verified"] and graph["tolerance"] == {"max_abs": 1e-4}
        assert 0 <= graph["max_abs_diff"] < 1e-4
        assert graph["max_abs_diff"] == max(case["max_abs_diff"] for case in graph["cases"])
        assert sorted({(c["mask_ratio"], c["batch"]) for c in graph["cases"]}) == [
            (0.0, 1),
            (0.0, 3),
            (0.75, 1),
            (0.75, 3),
        ]
        assert {c["kept"] for c in graph["cases"]} == {16, 4}
    assert report["encoder"]["cosine_cls"] > 0.999999 and report["encoder"]["cosine_mean"] > 0.999999


def corrupt_initializer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Flip the sign of the largest float weight: a plausible export bug that only values can reveal."""
    tensor = max(
        (t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
        key=lambda t: int(np.prod(t.dims)),
    )
    values = onnx.numpy_helper.to_array(tensor)
    tensor.CopyFrom(onnx.numpy_helper.from_array(-values, tensor.name))
    return proto


def test_corrupted_graph_fails_and_leaves_nothing(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mae.export.onnx_bundle as onnx_bundle

    real_export = onnx_bundle.export_graph
    monkeypatch.setattr(onnx_bundle, "export_graph", lambda *a, **k: corrupt_initializer(real_export(*a, **k)))
    out = tmp_path / "bundle"
    with pytest.raises(VerificationError, match=r"fp32 encoder .* does not match PyTorch: largest \|difference\|"):
        export_bundle(checkpoint, out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_corrupted_variant_leaves_existing_bundle_untouched(
    tmp_path: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mae.export.onnx_bundle as onnx_bundle

    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    before = {p.name: sha256_file(p) for p in copy.iterdir()}
    real_fp16 = onnx_bundle.to_fp16
    monkeypatch.setattr(onnx_bundle, "to_fp16", lambda proto: corrupt_initializer_fp16(real_fp16(proto)))
    with pytest.raises(VerificationError, match="fp16 encoder"):
        export_bundle(copy, copy, precisions=("fp16",))
    assert {p.name: sha256_file(p) for p in copy.iterdir()} == before
    assert leftovers(tmp_path) == []


def corrupt_initializer_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    tensor = max(
        (t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16),
        key=lambda t: int(np.prod(t.dims)),
    )
    values = onnx.numpy_helper.to_array(tensor)
    tensor.CopyFrom(onnx.numpy_helper.from_array(-values, tensor.name))
    return proto


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_round_trip(bundle: Bundle, checkpoint: Path) -> None:
    reloaded = Bundle.load(bundle.path)
    assert reloaded.config == bundle.config and reloaded.preprocessing == bundle.preprocessing
    assert reloaded.preprocessing.size == 32 and reloaded.preprocessing.resize == "center"
    manifest = json.loads((bundle.path / "mae.json").read_text())
    assert manifest["format"] == "mae-bundle" and manifest["opset"] == 18 and manifest["norm_pix_loss"] is False
    for part in ("encoder", "decoder"):
        meta = read_metadata(onnx.load(str(bundle.graph(part))))
        assert meta["part"] == part and meta["precision"] == "fp32" and meta["opset"] == 18
        assert MAEConfig.from_dict(meta["config"]) == bundle.config
        assert meta["preprocessing"] == bundle.preprocessing.to_dict()
        assert meta["norm_pix_loss"] is False
        assert meta["source_sha256"] == sha256_file(checkpoint) and meta["source_format"] == "mae-checkpoint"
        assert meta["toolkit_version"] == manifest["toolkit_version"]


@pytest.mark.slow
def test_norm_pix_loss_and_squash_are_recorded(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    config = tiny_model.cfg.replace(norm_pix_loss=True)
    path = tmp_path / "pix.pt"
    save_checkpoint(path, tiny_model.state_dict(), config)
    (tmp_path / "bundle").mkdir()  # an empty directory is fine to export into
    bundle = export_bundle(path, tmp_path / "bundle", resize="squash", verify=False)
    assert bundle.norm_pix_loss and bundle.preprocessing.resize == "squash"
    from mae.core.files import current_umask

    # Ordinary permissions, not those of the private staging directory / temporary files.
    assert (bundle.path.stat().st_mode & 0o777) == 0o777 & ~current_umask()
    assert ((bundle.path / "mae.json").stat().st_mode & 0o777) == 0o666 & ~current_umask()
    meta = read_metadata(onnx.load(str(bundle.graph("decoder"))))
    assert meta["norm_pix_loss"] is True and meta["preprocessing"]["resize"] == "squash"
    assert bundle.manifest["verification"]["fp32"]["encoder"]["verified"] is False


# ------------------------------------------------------------------------------------------------- bundles
def test_adding_a_precision_keeps_existing_files(tmp_path: Path, bundle: Bundle) -> None:
    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    fp32_before = {name: sha256_file(copy / name) for name in ("encoder.onnx", "decoder.onnx")}
    grown = export_bundle(copy, copy, precisions=("fp16",))  # a bundle as the source: its recorded weights
    assert grown.precisions == ["fp32", "fp16"]
    assert {name: sha256_file(copy / name) for name in fp32_before} == fp32_before
    assert grown.graph("decoder", "fp16").name == "decoder.fp16.onnx"
    assert set(grown.manifest["verification"]) == {"fp32", "fp16"}
    assert leftovers(tmp_path) == []


def test_refuses_other_weights_and_foreign_folders(tmp_path: Path, bundle: Bundle) -> None:
    other = tmp_path / "other.pt"
    model = make_model(bundle.config, seed=1)
    save_checkpoint(other, model.state_dict(), bundle.config)
    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    with pytest.raises(MAEError, match="exported from other weights"):
        export_bundle(other, copy, precisions=("fp16",))
    with pytest.raises(MAEError, match="opset 18"):
        export_bundle(Path(bundle.manifest["source"]["path"]), copy, precisions=("fp16",), opset=17)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not yours")
    with pytest.raises(MAEError, match="not empty and is not an mae bundle"):
        export_bundle(other, foreign)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    with pytest.raises(MAEError, match="Unknown precision"):
        export_bundle(other, tmp_path / "x", precisions=("int4",))


@pytest.mark.slow
def test_in_memory_model_is_not_mutated(tmp_path: Path, tiny_model: MaskedAutoencoder, checkpoint: Path) -> None:
    from mae.weights import load_weights

    loaded = load_weights(checkpoint)
    training_copy = make_model(tiny_model.cfg).train()
    training_copy.load_state_dict(tiny_model.state_dict())
    bundle = export_bundle((training_copy, loaded), tmp_path / "bundle")
    assert training_copy.training  # exported from an eval-mode copy
    assert bundle.manifest["source"]["sha256"] == loaded.sha256


# --------------------------------------------------------------------------------------- weight sources
@pytest.mark.slow
def test_official_layout_round_trip(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    path = tmp_path / "mae_official.pth"
    torch.save({"model": tiny_model.state_dict()}, path)
    bundle = export_bundle(path, tmp_path / "bundle", num_heads=2, decoder_num_heads=2)
    assert bundle.manifest["source"]["format"] == "official" and bundle.has_decoder
    assert bundle.config == tiny_model.cfg
    assert any("norm_pix_loss" in note for note in bundle.manifest["notes"])  # official files do not record it


@pytest.mark.slow
def test_huggingface_round_trip_matches_transformers(tmp_path: Path, real_photos) -> None:
    """A HF ViTMAE folder exports, and the ONNX encoder equals transformers' own ViTMAEModel with the same noise."""
    transformers = pytest.importorskip("transformers")
    hf_config = tiny_hf_config()
    torch.manual_seed(0)
    hf_model = transformers.ViTMAEForPreTraining(hf_config).eval()
    folder = tmp_path / "vit-mae-tiny"
    hf_model.save_pretrained(folder)
    bundle = export_bundle(folder, tmp_path / "bundle")
    assert bundle.manifest["source"]["format"] == "huggingface" and bundle.config.layer_norm_eps == 1e-12

    from mae.core.preprocess import preprocess_image

    pixels = np.stack([preprocess_image(photo, bundle.preprocessing) for photo in real_photos[:3]])
    noise = random_noise(3, bundle.config.num_patches, seed=7)
    masking = masking_from_noise(noise, 0.75)
    (latent,) = session(bundle.graph("encoder")).run(None, {"pixel_values": pixels, "ids_keep": masking.ids_keep})
    with torch.no_grad():
        hf_latent = hf_model.vit(torch.from_numpy(pixels), noise=torch.from_numpy(noise)).last_hidden_state
        hf_pred = hf_model(torch.from_numpy(pixels), noise=torch.from_numpy(noise)).logits
    np.testing.assert_allclose(latent, hf_latent.numpy(), atol=1e-5, rtol=0)
    (pred,) = session(bundle.graph("decoder")).run(None, {"latent": latent, "ids_restore": masking.ids_restore})
    np.testing.assert_allclose(pred, hf_pred.numpy(), atol=1e-5, rtol=0)


def test_encoder_only_with_external_data(tmp_path: Path, tiny_model: MaskedAutoencoder) -> None:
    """Encoder-only weights give an encoder-only bundle; big graphs keep their weights in <file>.data."""
    encoder_only = make_model(tiny_model.cfg, decoder=False)
    path = tmp_path / "encoder_only.pt"
    save_checkpoint(path, encoder_only.state_dict(), tiny_model.cfg)
    bundle = export_bundle(
        path, tmp_path / "bundle", precisions=("fp32", "int8"), external_data_bytes=0, int8=Int8Options(openvino=False)
    )
    assert not bundle.has_decoder and bundle.precisions == ["fp32", "int8"]
    assert sorted(p.name for p in bundle.path.iterdir()) == [
        "encoder.int8.onnx",
        "encoder.int8.onnx.data",
        "encoder.onnx",
        "encoder.onnx.data",
        "mae.json",
    ]
    entry = bundle.manifest["graphs"]["fp32"]["encoder"]
    assert entry["external_data"]["sha256"] == sha256_file(bundle.path / "encoder.onnx.data")
    assert (
        entry["bytes"]
        == (bundle.path / "encoder.onnx").stat().st_size + (bundle.path / "encoder.onnx.data").stat().st_size
    )
    assert any("encoder-only" in note for note in bundle.manifest["notes"])
    with pytest.raises(MAEError, match="has no decoder"):
        bundle.graph("decoder")


# ------------------------------------------------------------------------------------------- info and CLI
def test_describe_bundle(bundle: Bundle) -> None:
    from rich.console import Console

    from mae.reports.export import describe_bundle

    buffer = io.StringIO()
    summary = describe_bundle(bundle.path, console=Console(file=buffer, width=220))
    text = buffer.getvalue()
    assert bundle.manifest["source"]["sha256"] in text
    assert "encoder.onnx" in text and "decoder.onnx" in text and "KiB" in text
    assert f"{bundle.manifest['verification']['fp32']['encoder']['max_abs_diff']:.2e}" in text
    assert "skimage.data.astronaut" in text and "resize center" in text
    assert [(g["precision"], g["part"]) for g in summary["graphs"]] == [("fp32", "encoder"), ("fp32", "decoder")]
    assert summary["graphs"][0]["metadata"]["precision"] == "fp32"


def test_cli_errors_are_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, checkpoint: Path) -> None:
    code, text = run_cli(monkeypatch, capsys, "export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b"))
    assert code == 2 and "missing.pt does not exist" in text and "Traceback" not in text
    code, text = run_cli(monkeypatch, capsys, "export", str(checkpoint), "--format", "trt", "--precision", "int8")
    assert code == 2 and "does not take --precision int8" in text and "Traceback" not in text
    code, text = run_cli(monkeypatch, capsys, "export", str(checkpoint), "--opset", "12", "--out", str(tmp_path / "b"))
    assert code == 2 and "opset 12 is not supported" in text and not (tmp_path / "b").exists()


def test_cli_export_and_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, bundle: Bundle) -> None:
    copy = Path(shutil.copytree(bundle.path, tmp_path / "bundle"))
    code, text = run_cli(monkeypatch, capsys, "export", str(copy), "--precision", "int8")  # --out: the bundle
    assert code == 0 and "int8" in text and "Traceback" not in text
    assert Bundle.load(copy).precisions == ["fp32", "int8"]
    code, text = run_cli(monkeypatch, capsys, "info", str(copy))
    assert code == 0 and "encoder.int8.onnx" in text


# ----------------------------------------------------------------------------------------- graph hygiene
def test_no_local_paths_in_graphs(bundle: Bundle) -> None:
    for part in ("encoder", "decoder"):
        proto = onnx.load(str(bundle.graph(part)))
        assert not any(node.metadata_props for node in proto.graph.node)
        assert "/work/" not in proto.SerializeToString().decode("latin-1")


def test_fold_weight_constants() -> None:
    """`cls + pos[:, :1]` on weights becomes one initializer; the table it came from goes; activations stay."""
    from onnx import numpy_helper

    from mae.export.graphs import fold_weight_constants

    make = onnx.helper.make_node
    pos = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    cls = np.full((1, 1, 4), 0.5, dtype=np.float32)
    initializers = [
        numpy_helper.from_array(pos, "pos"),
        numpy_helper.from_array(cls, "cls"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    nodes = [
        make("Slice", ["pos", "zero", "one", "one"], ["pos_cls"]),
        make("Add", ["cls", "pos_cls"], ["cls_token"]),
        make("Add", ["x", "cls_token"], ["y"]),  # depends on an input: stays
    ]
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1, 4])
    y_info = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 1, 4])
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "g", [x_info], [y_info], initializers),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    assert fold_weight_constants(proto) == 2
    assert [node.op_type for node in proto.graph.node] == ["Add"]
    assert sorted(t.name for t in proto.graph.initializer) == ["cls_token"]
    x = np.ones((2, 1, 4), dtype=np.float32)
    (y,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, x + cls + pos[:, :1])


def test_the_exporter_keeps_its_debug_logging_to_itself(tiny_model: MaskedAutoencoder, caplog) -> None:
    """torch.export, onnxscript and onnx_ir log thousands of DEBUG lines per export: none reach the caller's logs
    (they flooded every failing test's captured log)."""
    import logging

    caplog.set_level(logging.DEBUG)
    export_graph(tiny_model, "encoder", 18)
    noisy = [r for r in caplog.records if r.name.split(".")[0] in ("torch", "onnxscript", "onnx_ir")]
    assert not [r for r in noisy if r.levelno < logging.ERROR], [r.getMessage()[:80] for r in noisy[:5]]


def test_outputs_that_are_not_finite_never_pass_a_cosine_only_gate():
    """The int8 gate holds only the pooled cosine: a NaN cosine used to vanish in min() and a graph whose outputs
    were not finite passed."""
    from mae.core.preprocess import Preprocessing
    from mae.export.tolerances import Tolerance
    from mae.export.verify import Reference, VerificationError, compare_outputs

    class Ones(Reference):
        label = "ones"

        def _compute(self, part, feeds):  # noqa: ANN001, ANN202
            batch, kept = feeds["ids_keep"].shape
            return np.ones((batch, 1 + kept, 8), dtype=np.float32)

    reference = Ones(16, Preprocessing(size=32))

    def broken(feeds):  # noqa: ANN001, ANN202
        out = reference._compute("encoder", feeds).copy()
        out[0, 1:] = np.nan  # one image's patch tokens: the mean-pooled cosine is NaN, the cls one is fine
        return out

    with pytest.raises(VerificationError, match="not finite"):
        compare_outputs(broken, "encoder.int8.onnx", "encoder", "int8", reference, Tolerance(min_cosine=0.999))
    report = compare_outputs(lambda feeds: reference._compute("encoder", feeds), "e", "encoder", "int8", reference,
                             Tolerance(min_cosine=0.999))  # fmt: skip
    assert report["passed"] and report["cosine_mean"] == pytest.approx(1.0)
