"""The bundle: a directory with `mae.json`, `encoder.onnx`, `decoder.onnx` and optional variants/engines.

`mae.json` schema (format_version 1):

    {
      "format": "mae-bundle", "format_version": 1, "toolkit_version": "0.1.0",
      "config": {...MAEConfig fields...},
      "norm_pix_loss": false,
      "preprocessing": {"size": 224, "resize": "center", "crop_pct": 0.875, "interpolation": "bicubic",
                        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "source": {"path": "...", "format": "mae-checkpoint" | "official" | "huggingface", "sha256": "..."},
      "opset": 18, "exporter": "dynamo",
      "graphs": {"fp32": {"encoder": {"file": "encoder.onnx", "sha256": "...", "bytes": 123}, "decoder": {...}},
                 "fp16": {...}, "int8": {"encoder": {...}}},          # decoder may be absent (encoder-only)
      "engines": {"fp16": {"encoder": {"file": "encoder.fp16.engine", "sidecar": "encoder.fp16.engine.json"}}},
      "verification": {...free-form report of the export checks...}
    }

Numpy/stdlib only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .config import MAEConfig, is_whole_number, shown
from .errors import MAEError
from .files import atomic_write_text
from .integrity import verify_entry
from .onnx_metadata import check_graph_metadata
from .preprocess import Preprocessing

BUNDLE_FILE = "mae.json"
FORMAT = "mae-bundle"
FORMAT_VERSION = 1
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")  # of a bundle's ONNX graphs
PARTS = ("encoder", "decoder")
# The graphs' contract, the same for the ONNX graphs, every engine and the export's checks:
#     encoder: (pixel_values [B, 3, H, W], ids_keep [B, K]) -> latent [B, 1+K, D]
#     decoder: (latent [B, 1+K, D], ids_restore [B, L]) -> pred [B, L, p*p*3]
INPUT_NAMES = {"encoder": ("pixel_values", "ids_keep"), "decoder": ("latent", "ids_restore")}
OUTPUT_NAMES = {"encoder": ("latent",), "decoder": ("pred",)}
# What weights or a bundle without a decoder can do, and the note an export of such weights makes.
ENCODER_ONLY = "encoder-only: embeddings, no reconstruction"
NO_DECODER_NOTE = f"The weights have no decoder: the bundle holds the encoder alone ({ENCODER_ONLY})."


def no_decoder_error(what: str) -> MAEError:
    """The error for a decoder (reconstruction, a decoder graph) asked of `what` ("The bundle DIR", "model.pt"),
    which has none."""
    return MAEError(
        f"{what} has no decoder, it holds the encoder only: reconstruction needs the full (decoder) weights.",
        hint="use weights that include the decoder (e.g. mae_visualize_vit_*.pth or a `mae train` checkpoint), or a "
        "bundle exported from them",
    )


def not_a_bundle_error(path: str | os.PathLike, engine: str | None = None) -> MAEError:
    """The error for a path that is not a bundle (no mae.json) where one is needed; `engine`: the engine that
    needs it (the torch engine runs weights, so the hint names it)."""
    if engine is None:
        return MAEError(
            f"{path} is not a bundle (no {BUNDLE_FILE}).",
            hint="create one with `mae export WEIGHTS --format onnx --out DIR`",
        )
    return MAEError(
        f"The {engine} engine runs an exported bundle, and {path} is not one (no {BUNDLE_FILE}).",
        hint=f"export it first (`mae export {path} --out BUNDLE`) or run the weights with --engine torch",
    )


@dataclass
class Bundle:
    path: Path  # the bundle directory
    config: MAEConfig
    preprocessing: Preprocessing
    manifest: dict[str, Any] = field(default_factory=dict)  # the whole mae.json

    @property
    def norm_pix_loss(self) -> bool:
        return bool(self.manifest.get("norm_pix_loss", self.config.norm_pix_loss))

    @property
    def precisions(self) -> list[str]:
        return [p for p in GRAPH_PRECISIONS if p in self.manifest.get("graphs", {})]

    def has_graph(self, part: str, precision: str = "fp32") -> bool:
        return part in self.manifest.get("graphs", {}).get(precision, {})

    @property
    def has_decoder(self) -> bool:
        return self.has_graph("decoder", "fp32")

    def graph(self, part: str, precision: str = "fp32", fresh: bool = False) -> Path:
        """Path of `part` ("encoder" | "decoder") at `precision`, with a clear error when absent or when its files
        are not those mae.json records (`mae.core.integrity`; `fresh=True` hashes them again in full)."""
        if not self.has_graph(part, precision):
            if part == "decoder" and not self.has_decoder:
                raise no_decoder_error(f"The bundle {self.path}")
            have = ", ".join(p for p in self.precisions if self.has_graph(part, p)) or "none"
            raise MAEError(
                f"The bundle {self.path} has no {precision} {part} (it has: {have}).",
                hint=f"run `mae export {self.path} --format onnx --precision {precision}`",
            )
        entry = self.manifest["graphs"][precision][part]
        graph_path = self.path / entry["file"]
        if not graph_path.is_file():
            raise MAEError(f"{graph_path} is listed in {BUNDLE_FILE} but missing.", hint="re-run `mae export`")
        verify_entry(self.path, entry, fresh=fresh)  # what runs is what export verified
        check_graph_metadata(self, part, precision, graph_path)  # and what its own metadata says it is
        return graph_path

    @property
    def recorded_source(self) -> str | None:
        """The source weights' path as recorded in mae.json (relative paths are relative to the bundle)."""
        return (self.manifest.get("source") or {}).get("path")

    def source_path(self) -> Path | None:
        """The weights the bundle was exported from, or None when none is recorded or the file is gone."""
        source = self.recorded_source
        if not source:
            return None
        path = Path(source) if Path(source).is_absolute() else self.path / source
        return path if path.exists() else None

    def source_weights(self, needed_by: str, hint: str) -> Path:
        """`source_path()`, or an error saying that `needed_by` ("The torch engine", "Adding graphs") needs the
        weights and they are gone; `hint`: what to pass instead."""
        path = self.source_path()
        if path is None:
            raise MAEError(
                f"{needed_by} needs the weights that bundle {self.path} was exported from, and they are not at "
                f"{self.recorded_source or '(no source recorded)'}.",
                hint=hint,
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        """The bundle at `path` (its directory or its mae.json), every value mae reads from mae.json checked."""
        path = Path(path)
        manifest_path = path / BUNDLE_FILE if path.is_dir() else path
        if not manifest_path.is_file():
            raise not_a_bundle_error(path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise MAEError(f"Cannot read {manifest_path}: {exc}", hint="re-run `mae export`") from exc
        # Every value mae reads is checked here, so a hand-edited or foreign manifest fails as one line naming the
        # key, never later as a Python error or as every image failing (a 2-value mean broke each decode).
        check = _ManifestCheck(manifest_path)
        check.header(manifest)
        config, pre = check.model(manifest)
        check.source(manifest)
        for section in ("graphs", "engines"):
            check.files(manifest, section)
        return cls(path=manifest_path.parent, config=config, preprocessing=pre, manifest=manifest)

    def save(self) -> None:
        self.manifest.setdefault("format", FORMAT)
        self.manifest.setdefault("format_version", FORMAT_VERSION)
        self.manifest.setdefault("toolkit_version", __version__)
        self.manifest["config"] = self.config.to_dict()
        self.manifest["preprocessing"] = self.preprocessing.to_dict()
        atomic_write_text(self.path / BUNDLE_FILE, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")


class _ManifestCheck:
    """The checks of one mae.json as `Bundle.load` reads it: each stage raises one MAEError naming the key."""

    def __init__(self, manifest_path: Path) -> None:
        self.path = manifest_path
        bundle_dir = manifest_path.parent
        self.source_text = f"{manifest_path.name} in {bundle_dir}"
        self.hint = (
            f"re-export the bundle (mae export WEIGHTS --out {bundle_dir}) or restore the original {BUNDLE_FILE}"
        )

    def wrong(self, key: str, value: Any, expected: str) -> MAEError:
        return MAEError(f"{self.source_text}: {key} must be {expected}, got {shown(value)}.", hint=self.hint)

    def header(self, manifest: Any) -> None:
        """A JSON object of this format, at a version this mae reads."""
        if not isinstance(manifest, dict):
            raise self.wrong("the manifest", manifest, "a JSON object")
        if manifest.get("format") != FORMAT:
            raise MAEError(f"{self.path} is not an mae bundle manifest (format={manifest.get('format')!r}).")
        version = manifest.get("format_version")
        if not is_whole_number(version) or version < 1:
            raise self.wrong("format_version", version, f"a whole number (this mae writes {FORMAT_VERSION})")
        if version > FORMAT_VERSION:
            raise MAEError(
                f"{self.path} has format_version {version}, newer than this mae reads.", hint="upgrade mae-toolkit"
            )

    def model(self, manifest: dict[str, Any]) -> tuple[MAEConfig, Preprocessing]:
        """The architecture, the pre-processing (of the size the graphs take) and the flags and opset."""
        if "config" not in manifest:
            raise MAEError(f"{self.source_text} has no config (the model's architecture).", hint=self.hint)
        config = MAEConfig.from_dict(manifest["config"], source=self.source_text, key="config", hint=self.hint)
        if manifest.get("preprocessing") is None:
            pre = Preprocessing(size=config.img_size)
        else:
            pre = Preprocessing.from_dict(manifest["preprocessing"], source=self.source_text, hint=self.hint)
        if pre.size != config.img_size:
            raise MAEError(
                f"{self.source_text}: preprocessing.size {pre.size} differs from config.img_size {config.img_size} "
                "(the graphs take config.img_size pixels).",
                hint=self.hint,
            )
        for key in ("norm_pix_loss", "norm_pix_loss_known"):
            if key in manifest and not isinstance(manifest[key], bool):
                raise self.wrong(key, manifest[key], "true or false")
        if "opset" in manifest and not is_whole_number(manifest["opset"]):
            raise self.wrong("opset", manifest["opset"], "a whole number")
        return config, pre

    def source(self, manifest: dict[str, Any]) -> None:
        """The recorded source weights: an object whose path and sha256 are strings."""
        recorded_source = manifest.get("source") or {}
        if not isinstance(recorded_source, dict):
            raise self.wrong("source", manifest["source"], "a JSON object")
        for key in ("path", "sha256"):
            if recorded_source.get(key) is not None and not isinstance(recorded_source[key], str):
                raise self.wrong(f"source.{key}", recorded_source[key], "a string")

    def files(self, manifest: dict[str, Any], section: str) -> None:
        """{precision: {part: entry}} with every entry (and its external data) naming a file; graphs' sha256s."""
        if section not in manifest:
            return
        if not isinstance(manifest[section], dict):
            raise self.wrong(section, manifest[section], "a JSON object ({precision: {part: entry}})")
        for precision, parts in manifest[section].items():
            if not isinstance(parts, dict):
                raise self.wrong(f"{section}.{precision}", parts, "a JSON object ({part: entry})")
            for part, entry in parts.items():
                key = f"{section}.{precision}.{part}"
                if not isinstance(entry, dict):
                    raise self.wrong(key, entry, "a JSON object with file and sha256")
                files = [(key, entry)]
                if entry.get("external_data") is not None:
                    files.append((f"{key}.external_data", entry["external_data"]))
                for where, item in files:
                    self._file(where, item, checksum=section == "graphs")

    def _file(self, where: str, item: Any, checksum: bool) -> None:
        if not isinstance(item, dict):
            raise self.wrong(where, item, "a JSON object with file and sha256")
        if not isinstance(item.get("file"), str) or not item["file"]:
            raise self.wrong(f"{where}.file", item.get("file"), "a file name")
        digest = item.get("sha256")
        if checksum and not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise self.wrong(f"{where}.sha256", digest, "64 hexadecimal digits (the file's sha256)")


def is_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / BUNDLE_FILE).is_file() if path.is_dir() else path.name == BUNDLE_FILE and path.is_file()
