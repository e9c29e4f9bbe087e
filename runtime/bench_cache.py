"""Where `mae bench --model BUNDLE` leaves its measurements for `--engine auto` to read.

A user cache, not the bundle: the same bundle is copied to machines that differ, and a bundle may be read-only.
The directory is $MAE_CACHE_DIR, else $XDG_CACHE_HOME/mae, else ~/.cache/mae; one file per (bundle, machine):
`bench/<bundle key>/<machine key>.json`.

- bundle key: sha256 over the checksums mae.json records for every graph and model (a re-export changes it);
- machine key: sha256 over the CPU model, its ISA flags (as oneDNN will use them), the thread count and the
  installed versions of onnxruntime(-gpu), openvino, tensorrt and torch: a measurement travels to neither another
  CPU nor another engine version.
"""

from __future__ import annotations

import datetime as _datetime
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from mae.core import hardware
from mae.core.files import atomic_write_text, cache_dir

ENGINE_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "torch")


def _versions() -> dict[str, str]:
    versions = {}
    for package in ENGINE_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def bundle_key(bundle: Any) -> str:
    manifest = bundle.manifest
    sums = []
    for section in ("graphs", "openvino", "engines"):
        for precision, parts in sorted((manifest.get(section) or {}).items()):
            for part, entry in sorted((parts or {}).items()):
                sums.append(f"{section}/{precision}/{part}={(entry or {}).get('sha256')}")
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:24]


def machine(cpu: Any = None) -> dict[str, Any]:

    cpu = cpu or hardware.cpu_info()
    return {"cpu": cpu.model, "flags": sorted(cpu.flags), "threads": cpu.threads, "versions": _versions()}


def machine_key(cpu: Any = None) -> str:
    return hashlib.sha256(json.dumps(machine(cpu), sort_keys=True).encode()).hexdigest()[:24]


def rows_path(bundle: Any, cpu: Any = None) -> Path:
    return cache_dir() / "bench" / bundle_key(bundle) / f"{machine_key(cpu)}.json"


def save_rows(bundle: Any, rows: list[dict[str, Any]], cpu: Any = None) -> Path | None:
    """Store bench rows of `bundle` for this machine; None when the cache cannot be written (never an error: the
    measurement itself was printed)."""

    path = rows_path(bundle, cpu)
    payload = {
        "bundle": str(bundle.path),
        "machine": machine(cpu),
        "measured_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    except OSError:
        return None
    return path


def load_rows(bundle: Any, cpu: Any = None) -> tuple[list[dict[str, Any]], str] | None:
    """(rows, when measured) stored for `bundle` on this machine, or None."""
    path = rows_path(bundle, cpu)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = payload.get("rows")
    if not isinstance(rows, list):
        return None
    return rows, str(payload.get("measured_at", "earlier"))
