"""Every metadata file mae reads is validated: an HF config.json, a bundle's mae.json, the graphs' own metadata_props.
A malformed value is one MAEError naming the file and the key (exit status 2 from the CLI, no traceback), never a
Python error, an ONNX Runtime error or every image failing as decode_error."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_runner import run_cli
from images_corpus import tiny_hf_config, tiny_model_files

from mae.core import onnx_metadata
from mae.core.bundle import Bundle
from mae.core.config import MAEConfig
from mae.core.errors import MAEError
from mae.core.onnx_metadata import check_graph_metadata, read_metadata_props
from mae.weights import load_weights


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_model_files(tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config()
    folder = tmp_path_factory.mktemp("hf") / "vit-mae-tiny"
    transformers.ViTMAEForPreTraining(config).save_pretrained(folder)
    return folder


def hf_copy(source: Path, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the HF folder whose config.json is `edit(config)` (or `config` edited in place when that is None)."""
    folder = Path(shutil.copytree(source, tmp_path / source.name))
    config = json.loads((folder / "config.json").read_text())
    edited = edit(config)
    (folder / "config.json").write_text(json.dumps(config if edited is None else edited))
    return folder


def bundle_copy(source: Path, tmp_path: Path, edit: Callable[[dict], object], name: str = "bundle") -> Path:
    """A copy of the bundle whose mae.json is `edit(manifest)` (or the manifest edited in place when that is None)."""
    folder = Path(shutil.copytree(source, tmp_path / name))
    manifest = json.loads((folder / "mae.json").read_text())
    edited = edit(manifest)
    (folder / "mae.json").write_text(json.dumps(manifest if edited is None else edited))
    return folder


def one_line_error(code: int, output: str) -> str:
    """The error line of a failed command, after checking it failed as a user error should."""
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


# --------------------------------------------------------------------------------------- HF config.json
def set_key(key: str, value: object) -> Callable[[dict], None]:
    return lambda config: config.__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "key", "found"),
    [
        (set_key("hidden_size", "32"), "hidden_size", '"32"'),
        (set_key("num_hidden_layers", 2.5), "num_hidden_layers", "2.5"),
        (set_key("mask_ratio", "high"), "mask_ratio", '"high"'),
        (set_key("norm_pix_loss", "false"), "norm_pix_loss", '"false"'),  # was read as True
        (set_key("qkv_bias", 1), "qkv_bias", "1"),
        (set_key("image_size", "32"), "image_size", '"32"'),
        (set_key("hidden_size", 30), "hidden_size", "30"),  # not divisible by the heads: named as in config.json
        (set_key("mask_ratio", 1.0), "mask_ratio", "1.0"),
        (lambda config: [config], "JSON object", "[{"),
    ],
    ids=["hidden_size_str", "layers_float", "mask_ratio_str", "norm_pix_loss_str", "qkv_bias_int", "image_size_str",
         "hidden_size_indivisible", "mask_ratio_1", "list_at_top"],
)  # fmt: skip
def test_hf_config_json_is_validated(hf_folder, tmp_path, edit, key, found):
    folder = hf_copy(hf_folder, tmp_path, edit)
    with pytest.raises(MAEError) as info:
        load_weights(folder)
    message = info.value.message
    assert f"{folder}/config.json" in message or str(folder / "config.json") in message, message
    assert key in message and found in message, message
    assert info.value.hint and "\n" not in message


def test_hf_config_errors_through_the_cli(hf_folder, tmp_path, monkeypatch, capsys):
    folder = hf_copy(hf_folder, tmp_path, set_key("hidden_size", "32"))
    line = one_line_error(*run_cli(monkeypatch, capsys, "info", folder))
    assert "config.json" in line and 'hidden_size must be a whole number, got "32"' in line
    listed = hf_copy(hf_folder, tmp_path / "list", lambda config: [config])
    line = one_line_error(*run_cli(monkeypatch, capsys, "info", listed))
    assert "config.json must hold a JSON object" in line


def test_hf_config_that_was_valid_still_loads(hf_folder, tmp_path):
    folder = hf_copy(hf_folder, tmp_path, set_key("norm_pix_loss", True))
    assert load_weights(folder).config.norm_pix_loss is True
    assert load_weights(hf_folder).config.norm_pix_loss is False


# -------------------------------------------------------------------------------------------- mae.json
def set_config(**changes: object) -> Callable[[dict], None]:
    return lambda manifest: manifest["config"].update(changes)


def drop(*keys: str) -> Callable[[dict], None]:
    """Remove manifest[keys[0]]...[keys[-1]]."""

    def edit(manifest: dict) -> None:
        for key in keys[:-1]:
            manifest = manifest[key]
        del manifest[keys[-1]]

    return edit


@pytest.mark.parametrize(
    ("edit", "key", "found"),
    [
        (set_config(img_size="32"), "config.img_size", '"32"'),
        (set_config(depth=2.5), "config.depth", "2.5"),
        (set_config(qkv_bias="true"), "config.qkv_bias", '"true"'),
        (set_config(img_size=36), "config.img_size", "36"),  # not a multiple of patch_size 8
        (drop("config"), "config", "no config"),
        (lambda manifest: manifest.__setitem__("config", [32, 8]), "config", "[32, 8]"),
        (lambda manifest: [manifest], "manifest", "[{"),
        (lambda manifest: manifest["preprocessing"].update(mean=[0.5, 0.5]), "preprocessing.mean", "[0.5, 0.5]"),
        (lambda manifest: manifest["preprocessing"].update(std=[0.2, 0.0, 0.2]), "preprocessing.std", "0.0"),
        (lambda manifest: manifest["preprocessing"].update(size=64), "preprocessing.size", "64"),
        (lambda manifest: manifest["preprocessing"].update(resize="fill"), "preprocessing.resize", '"fill"'),
        (lambda manifest: manifest["preprocessing"].update(crop_pct=0), "preprocessing.crop_pct", "0"),
        (lambda manifest: manifest["preprocessing"].update(interpolation="nearest"), "preprocessing.interpolation",
         '"nearest"'),
        (lambda manifest: manifest.__setitem__("norm_pix_loss", "false"), "norm_pix_loss", '"false"'),
        (lambda manifest: manifest.__setitem__("format_version", "1"), "format_version", '"1"'),
        (lambda manifest: manifest["graphs"]["fp32"]["encoder"].update(sha256="abc"), "graphs.fp32.encoder.sha256",
         '"abc"'),
        (drop("graphs", "fp32", "decoder", "file"), "graphs.fp32.decoder.file", "null"),
        (lambda manifest: manifest.__setitem__("graphs", ["encoder.onnx"]), "graphs", '["encoder.onnx"]'),
    ],
    ids=["img_size_str", "depth_float", "qkv_bias_str", "img_size_indivisible", "no_config", "config_list",
         "manifest_list", "mean_2_values", "std_zero", "size_not_img_size", "resize", "crop_pct", "interpolation",
         "norm_pix_loss_str", "format_version_str", "sha256", "no_file", "graphs_list"],
)  # fmt: skip
def test_mae_json_is_validated(bundle_dir, tmp_path, edit, key, found):
    folder = bundle_copy(bundle_dir, tmp_path, edit)
    with pytest.raises(MAEError) as info:
        Bundle.load(folder)
    message = info.value.message
    assert f"mae.json in {folder}" in message, message
    assert key in message and found in message, message
    assert "re-export the bundle" in info.value.hint and "\n" not in message


def test_mae_json_errors_through_the_cli(bundle_dir, tmp_path, monkeypatch, capsys):
    listed = bundle_copy(bundle_dir, tmp_path, lambda manifest: [manifest], "listed")
    line = one_line_error(*run_cli(monkeypatch, capsys, "info", listed))
    assert f"mae.json in {listed}: the manifest must be a JSON object" in line
    no_config = bundle_copy(bundle_dir, tmp_path, drop("config"), "no_config")
    line = one_line_error(*run_cli(monkeypatch, capsys, "info", no_config))
    assert f"mae.json in {no_config} has no config" in line


def test_a_two_value_mean_fails_the_embedding_up_front(bundle_dir, tmp_path, photo_dir, monkeypatch, capsys):
    """It used to turn every image into an undocumented decode_error, with exit status 0."""
    folder = bundle_copy(bundle_dir, tmp_path, lambda manifest: manifest["preprocessing"].update(mean=[0.5, 0.5]))
    out = tmp_path / "out"
    code, output = run_cli(
        monkeypatch, capsys, "embed", photo_dir, "--model", folder, "--out", out, "--engine", "onnx", "--workers", "0"
    )
    line = one_line_error(code, output)
    assert "preprocessing.mean must be 3 numbers (one per RGB channel), got [0.5, 0.5]" in line
    assert not list(out.rglob("*.npy")) and not list(out.rglob("*.parquet"))  # nothing embedded, no decode_error
    assert "decode_error" not in output


# ---------------------------------------------------------------------- mae.json against the graphs' metadata
def edited_size(manifest: dict) -> None:
    manifest["config"]["img_size"] = 64  # a consistent manifest of another model: only the graphs disagree
    manifest["preprocessing"]["size"] = 64


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (edited_size, "says img_size 64, preprocessing.size 64 but encoder.onnx was exported for img_size 32, "
         "preprocessing.size 32"),
        (set_config(patch_size=16), "says patch_size 16 but encoder.onnx was exported for patch_size 8"),
        (set_config(layer_norm_eps=1e-12), "says layer_norm_eps 1e-12 but encoder.onnx was exported for "
         "layer_norm_eps 1e-06"),
        (lambda manifest: manifest["preprocessing"].update(mean=[0.5, 0.5, 0.5]), "says preprocessing.mean "
         "[0.5, 0.5, 0.5] but encoder.onnx was exported for preprocessing.mean [0.485, 0.456, 0.406]"),
    ],
    ids=["img_size", "patch_size", "layer_norm_eps", "mean"],
)  # fmt: skip
def test_mae_json_must_agree_with_the_graphs(bundle_dir, tmp_path, edit, says):
    folder = bundle_copy(bundle_dir, tmp_path, edit)
    bundle = Bundle.load(folder)  # the manifest alone is consistent
    with pytest.raises(MAEError) as info:
        bundle.graph("encoder")
    message = info.value.message
    assert message.startswith(f"mae.json in {folder} {says}"), message
    assert message.endswith("the manifest was edited or belongs to another export.")
    assert "restore the original mae.json" in info.value.hint


def test_edited_img_size_through_the_cli(bundle_dir, tmp_path, photo_dir, monkeypatch, capsys):
    folder = bundle_copy(bundle_dir, tmp_path, edited_size)
    out = tmp_path / "out"
    code, output = run_cli(
        monkeypatch, capsys, "embed", photo_dir, "--model", folder, "--out", out, "--engine", "onnx", "--workers", "0"
    )
    line = one_line_error(code, output)
    assert "img_size 64" in line and "encoder.onnx was exported for img_size 32" in line
    assert not list(out.rglob("*.npy"))


def test_a_graph_listed_as_another_part_is_refused(bundle_dir, tmp_path):
    def swap(manifest: dict) -> None:
        graphs = manifest["graphs"]["fp32"]
        graphs["encoder"], graphs["decoder"] = graphs["decoder"], graphs["encoder"]

    bundle = Bundle.load(bundle_copy(bundle_dir, tmp_path, swap))
    with pytest.raises(MAEError, match="lists decoder.onnx as the fp32 encoder, but the graph says it is the fp32 "):
        bundle.graph("encoder")


# --------------------------------------------------------------------------------- the protobuf reader
def test_reader_matches_onnx_on_exported_graphs(bundle_dir):
    onnx = pytest.importorskip("onnx")
    bundle = Bundle.load(bundle_dir)
    for part in ("encoder", "decoder"):
        path = bundle.graph(part)
        expected = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
        assert read_metadata_props(path) == expected
        assert expected[f"{onnx_metadata.PREFIX}part"] == part
        assert MAEConfig.from_dict(json.loads(expected["mae.config"])) == bundle.config


def test_reader_seeks_over_the_graph(bundle_dir, monkeypatch):
    """A few hundred bytes read of a file that is mostly graph; and cheap enough to run at every graph open."""
    path = Bundle.load(bundle_dir).graph("encoder")
    requested = []

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, size=-1):
            assert size >= 0, "never read to the end"
            requested.append(size)
            return self.stream.read(size)

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    opened = lambda *args: Counting(open(*args))  # noqa: E731, SIM115 - closed by Counting.__exit__
    monkeypatch.setattr(onnx_metadata, "open", opened, raising=False)
    props = read_metadata_props(path)
    metadata_bytes = sum(len(key) + len(value) for key, value in props.items())
    assert sum(requested) < metadata_bytes + 512 < path.stat().st_size // 10
    monkeypatch.undo()
    bundle = Bundle.load(bundle_dir)
    started = time.perf_counter()
    for _ in range(50):
        check_graph_metadata(bundle, "encoder", "fp32", path)
    assert (time.perf_counter() - started) / 50 < 0.01  # measured: ~0.1 ms


def test_graph_without_mae_metadata_passes(bundle_dir, tmp_path):
    """An older or foreign producer's graph: nothing to compare, nothing refused; other producers' keys are read."""
    onnx = pytest.importorskip("onnx")
    folder = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    path = folder / "encoder.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    assert read_metadata_props(path) == {}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "producer.note", "not ours"
    onnx.save(proto, str(path))
    assert read_metadata_props(path) == {"producer.note": "not ours"}
    manifest = json.loads((folder / "mae.json").read_text())
    manifest["graphs"]["fp32"]["encoder"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["config"]["patch_size"] = 16  # unverifiable without the graph's metadata
    (folder / "mae.json").write_text(json.dumps(manifest))
    assert Bundle.load(folder).graph("encoder", fresh=True) == path


def test_reader_refuses_truncated_and_foreign_files(bundle_dir, tmp_path):
    data = (bundle_dir / "encoder.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(MAEError, match="not a complete ONNX model"):
        read_metadata_props(tmp_path / "cut.onnx")
    (tmp_path / "text.onnx").write_bytes(b"\x0f\xff\xff")  # wire type 7
    with pytest.raises(MAEError, match="not an ONNX model"):
        read_metadata_props(tmp_path / "text.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert read_metadata_props(tmp_path / "empty.onnx") == {}
