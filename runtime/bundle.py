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

from mae import __version__
from mae.config import MAEConfig
from mae.errors import MAEError
from mae.files import atomic_write_text
from mae.runtime.integrity import verify_entry

BUNDLE_FILE = "mae.json"
FORMAT = "mae-bundle"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("fp32", "fp16", "int8")
PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class Preprocessing:
    size: int  # model input side
    resize: str = "center"  # "center": shorter side to size / crop_pct, centre crop; "squash": straight to size
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            size=int(data["size"]),
            resize=data.get("resize", "center"),
            crop_pct=float(data.get("crop_pct", 0.875)),
            interpolation=data.get("interpolation", "bicubic"),
            mean=tuple(data.get("mean", IMAGENET_MEAN)),
            std=tuple(data.get("std", IMAGENET_STD)),
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
        return [p for p in PRECISIONS if p in self.manifest.get("graphs", {})]

    def has_graph(self, part: str, precision: str = "fp32") -> bool:
        return part in self.manifest.get("graphs", {}).get(precision, {})

    @property
    def has_decoder(self) -> bool:
        return self.has_graph("decoder", "fp32")

    def graph(self, part: str, precision: str = "fp32", fresh: bool = False) -> Path:
        """Path of `part` ("encoder" | "decoder") at `precision`, with a clear error when absent or when its files
        are not those mae.json records (`mae.runtime.integrity`; `fresh=True` hashes them again in full)."""
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
        if manifest.get("format") != FORMAT:
            raise MAEError(f"{manifest_path} is not an mae bundle manifest (format={manifest.get('format')!r}).")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise MAEError(
                f"{manifest_path} has format_version {manifest['format_version']}, newer than this mae reads.",
                hint="upgrade mae-toolkit",
            )
        config = MAEConfig.from_dict(manifest["config"])
        pre = Preprocessing.from_dict(manifest.get("preprocessing") or {"size": config.img_size})
        return cls(path=manifest_path.parent, config=config, preprocessing=pre, manifest=manifest)

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
