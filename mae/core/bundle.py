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
PRECISIONS = ("fp32", "fp16", "int8")
PARTS = ("encoder", "decoder")


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
        return [p for p in PRECISIONS if p in self.manifest.get("graphs", {})]

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
                raise MAEError(
                    f"The bundle {self.path} has no decoder: reconstruction needs the full (decoder) weights.",
                    hint="export from weights that include the decoder (e.g. mae_visualize_vit_*.pth or `mae train`)",
                )
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

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        path = Path(path)
        manifest_path = path / BUNDLE_FILE if path.is_dir() else path
        if not manifest_path.is_file():
            raise MAEError(
                f"{path} is not a bundle (no {BUNDLE_FILE}).",
                hint="create one with `mae export WEIGHTS --format onnx --out DIR`",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise MAEError(f"Cannot read {manifest_path}: {exc}", hint="re-run `mae export`") from exc

        # Every value mae reads is checked here, so a hand-edited or foreign manifest fails as one line naming the
        # key, never later as a Python error or as every image failing (a 2-value mean broke each decode).
        bundle_dir = manifest_path.parent
        source = f"{manifest_path.name} in {bundle_dir}"
        hint = f"re-export the bundle (mae export WEIGHTS --out {bundle_dir}) or restore the original {BUNDLE_FILE}"

        def wrong(key: str, value: Any, expected: str) -> MAEError:
            return MAEError(f"{source}: {key} must be {expected}, got {shown(value)}.", hint=hint)

        if not isinstance(manifest, dict):
            raise wrong("the manifest", manifest, "a JSON object")
        if manifest.get("format") != FORMAT:
            raise MAEError(f"{manifest_path} is not an mae bundle manifest (format={manifest.get('format')!r}).")
        version = manifest.get("format_version")
        if not is_whole_number(version) or version < 1:
            raise wrong("format_version", version, f"a whole number (this mae writes {FORMAT_VERSION})")
        if version > FORMAT_VERSION:
            raise MAEError(
                f"{manifest_path} has format_version {version}, newer than this mae reads.",
                hint="upgrade mae-toolkit",
            )
        if "config" not in manifest:
            raise MAEError(f"{source} has no config (the model's architecture).", hint=hint)
        config = MAEConfig.from_dict(manifest["config"], source=source, key="config", hint=hint)
        if manifest.get("preprocessing") is None:
            pre = Preprocessing(size=config.img_size)
        else:
            pre = Preprocessing.from_dict(manifest["preprocessing"], source=source, hint=hint)
        if pre.size != config.img_size:
            raise MAEError(
                f"{source}: preprocessing.size {pre.size} differs from config.img_size {config.img_size} "
                "(the graphs take config.img_size pixels).",
                hint=hint,
            )
        for key in ("norm_pix_loss", "norm_pix_loss_known"):
            if key in manifest and not isinstance(manifest[key], bool):
                raise wrong(key, manifest[key], "true or false")
        if "opset" in manifest and not is_whole_number(manifest["opset"]):
            raise wrong("opset", manifest["opset"], "a whole number")
        recorded_source = manifest.get("source") or {}
        if not isinstance(recorded_source, dict):
            raise wrong("source", manifest["source"], "a JSON object")
        for key in ("path", "sha256"):
            if recorded_source.get(key) is not None and not isinstance(recorded_source[key], str):
                raise wrong(f"source.{key}", recorded_source[key], "a string")
        for section in ("graphs", "engines"):
            if section not in manifest:
                continue
            if not isinstance(manifest[section], dict):
                raise wrong(section, manifest[section], "a JSON object ({precision: {part: entry}})")
            for precision, parts in manifest[section].items():
                if not isinstance(parts, dict):
                    raise wrong(f"{section}.{precision}", parts, "a JSON object ({part: entry})")
                for part, entry in parts.items():
                    key = f"{section}.{precision}.{part}"
                    if not isinstance(entry, dict):
                        raise wrong(key, entry, "a JSON object with file and sha256")
                    files = [(key, entry)]
                    if entry.get("external_data") is not None:
                        files.append((f"{key}.external_data", entry["external_data"]))
                    for where, item in files:
                        if not isinstance(item, dict):
                            raise wrong(where, item, "a JSON object with file and sha256")
                        if not isinstance(item.get("file"), str) or not item["file"]:
                            raise wrong(f"{where}.file", item.get("file"), "a file name")
                        digest = item.get("sha256")
                        if section == "graphs" and not (
                            isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")
                        ):
                            raise wrong(f"{where}.sha256", digest, "64 hexadecimal digits (the file's sha256)")
        return cls(path=bundle_dir, config=config, preprocessing=pre, manifest=manifest)

    def save(self) -> None:
        self.manifest.setdefault("format", FORMAT)
        self.manifest.setdefault("format_version", FORMAT_VERSION)
        self.manifest.setdefault("toolkit_version", __version__)
        self.manifest["config"] = self.config.to_dict()
        self.manifest["preprocessing"] = self.preprocessing.to_dict()
        atomic_write_text(self.path / BUNDLE_FILE, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")


def is_bundle(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / BUNDLE_FILE).is_file() if path.is_dir() else path.name == BUNDLE_FILE and path.is_file()
