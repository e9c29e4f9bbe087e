"""`mae info BUNDLE`: what a bundle holds, where it came from, and how well each graph matched PyTorch, as plain
data (`mae.reports.export` prints it).

Torch-free (onnx): it reads mae.json, the graphs' metadata_props and the engine sidecars.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mae.core.bundle import GRAPH_PRECISIONS, Bundle
from mae.core.errors import MAEError
from mae.core.integrity import verify_entry

from .metadata import read_metadata


def graph_metadata_of(path: Path) -> dict[str, Any]:
    """The mae.* metadata_props of one graph file (its weights are not read)."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and OSError
        raise MAEError(f"Cannot read {path} as ONNX: {exc}", hint="re-run `mae export`") from exc
    return read_metadata(proto)


def _intact(bundle: Bundle, entry: dict[str, Any]) -> bool:
    """Whether the files of a graph entry are those mae.json records (`mae.core.integrity`)."""
    try:
        verify_entry(bundle.path, entry)
    except MAEError:
        return False
    return True


def bundle_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What `mae info BUNDLE` prints (and `mae export` after an export), as plain data."""
    bundle = Bundle.load(path)
    manifest = bundle.manifest
    graphs = []
    for precision in GRAPH_PRECISIONS:
        for part, entry in (manifest.get("graphs", {}).get(precision) or {}).items():
            file_path = bundle.path / entry["file"]
            report = (manifest.get("verification", {}).get(precision) or {}).get(part) or {}
            on_disk = file_path.stat().st_size if file_path.is_file() else None
            data = entry.get("external_data")
            if on_disk is not None and data and (bundle.path / data["file"]).is_file():
                on_disk += (bundle.path / data["file"]).stat().st_size
            graphs.append(
                {
                    "precision": precision,
                    "part": part,
                    "file": entry["file"],
                    "exists": file_path.is_file(),
                    "intact": _intact(bundle, entry),
                    "bytes": on_disk,
                    "sha256": entry.get("sha256"),
                    "metadata": graph_metadata_of(file_path) if file_path.is_file() else {},
                    "verification": report,
                }
            )
    for precision, parts in (manifest.get("openvino") or {}).items():  # the NNCF int8 model
        for part, entry in (parts or {}).items():
            file_path = bundle.path / entry["file"]
            graphs.append(
                {
                    "precision": precision,
                    "part": f"{part} (OpenVINO)",
                    "file": entry["file"],
                    "exists": file_path.is_file(),
                    "intact": _intact(bundle, entry),
                    "bytes": entry.get("bytes"),
                    "sha256": entry.get("sha256"),
                    "metadata": {},
                    "verification": entry.get("verification") or {},
                }
            )
    engines = []
    for precision, parts in (manifest.get("engines") or {}).items():
        for part, entry in parts.items():
            sidecar_path = bundle.path / entry.get("sidecar", entry["file"] + ".json")
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
            engine_path = bundle.path / entry["file"]
            engines.append(
                {
                    "precision": precision,
                    "part": part,
                    "file": entry["file"],
                    "bytes": engine_path.stat().st_size if engine_path.is_file() else None,
                    "sidecar": sidecar,
                }
            )
    return {
        "path": str(bundle.path),
        "format_version": manifest.get("format_version"),
        "toolkit_version": manifest.get("toolkit_version"),
        "config": bundle.config.to_dict(),
        "preprocessing": bundle.preprocessing.to_dict(),
        "norm_pix_loss": bundle.norm_pix_loss,
        "source": manifest.get("source") or {},
        "opset": manifest.get("opset"),
        "exporter": manifest.get("exporter"),
        "versions": manifest.get("versions") or {},
        "has_decoder": bundle.has_decoder,
        "graphs": graphs,
        "engines": engines,
        "inputs": next(
            (report.get("inputs") for report in (manifest.get("verification") or {}).values() if "inputs" in report),
            None,
        ),
        "int8": manifest.get("int8"),
        "notes": manifest.get("notes") or [],
    }
