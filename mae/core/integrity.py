"""What runs is what was verified: every file a bundle lists is checked against the sha256 `mae.json` records.

`mae export` verifies each graph against PyTorch and records its checksum; a graph copied in from another model,
a cut download or a re-export into the source checkpoint (continued training) would otherwise run silently.

- `verify_entry(bundle, entry, what)` checks a graph entry (`file`, and its `external_data` or OpenVINO
  `weights`) when an engine opens it. The hash is remembered by (device, inode, size, mtime, ctime) in the user
  cache (`mae.core.files.cached_sha256`), so a second open costs a `stat`; `fresh=True` (an embedding job's start and
  every resume) always reads the whole file.
- `verify_source(bundle, fresh)` checks the weights a bundle was exported from before the torch engine loads them.

Stdlib only (torch-free).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MAEError
from .files import cached_sha256
from .hf import HF_WEIGHT_FILES


def _short(digest: str) -> str:
    return f"{digest[:12]}…"


def entry_files(entry: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(file name, recorded sha256) of a graph entry: the graph, its external data or its OpenVINO weights."""
    files = [(entry.get("file"), entry.get("sha256"))]
    extra = entry.get("external_data") or entry.get("weights")
    if isinstance(extra, dict):
        files.append((extra.get("file"), extra.get("sha256")))
    return [(name, digest) for name, digest in files if isinstance(name, str)]


def verify_file(path: Path, recorded: str | None, bundle_dir: Path, fresh: bool = False) -> str:
    """The sha256 of `path`; an MAEError when mae.json records another one. Returns the hash."""
    actual = cached_sha256(path, fresh=fresh)
    if recorded and actual != recorded:
        raise MAEError(
            f"{path} is not the file that was exported and verified: its sha256 is {_short(actual)}, "
            f"{bundle_dir / 'mae.json'} records {_short(recorded)}. It was changed or replaced after export.",
            hint=f"restore the original file, or export the bundle again (mae export WEIGHTS --out {bundle_dir}), "
            "which verifies the new graphs against PyTorch",
        )
    return actual


def verify_entry(bundle_dir: Path, entry: dict[str, Any], fresh: bool = False) -> str:
    """Check every file of a mae.json graph entry; returns the main file's sha256 (as it is on disk)."""
    digests = []
    for name, recorded in entry_files(entry):
        path = bundle_dir / name
        if not path.is_file():
            raise MAEError(f"{path} is listed in mae.json but missing.", hint="re-run `mae export`")
        digests.append(verify_file(path, recorded, bundle_dir, fresh))
    return digests[0]


def source_weights_file(source: Path) -> Path:
    """The file whose sha256 a bundle records for its source: the file itself, or a Hugging Face folder's weights."""
    if source.is_dir():
        for name in HF_WEIGHT_FILES:
            if (source / name).is_file():
                return source / name
    return source


def verify_source(bundle_dir: Path, manifest: dict[str, Any], source: Path, fresh: bool = False) -> str:
    """Refuse source weights that changed since the bundle was exported from them (training continued into the
    same checkpoint, say): the torch engine would run other weights than the bundle's graphs."""
    recorded = (manifest.get("source") or {}).get("sha256")
    weights = source_weights_file(source)
    actual = cached_sha256(weights, fresh=fresh)
    if recorded and actual != recorded:
        raise MAEError(
            f"{weights} changed since the bundle {bundle_dir} was exported from it (sha256 {_short(actual)} now, "
            f"{_short(recorded)} recorded; did training continue into it?): the torch engine would not run the "
            "weights of the bundle's graphs.",
            hint=f"export again to bring the bundle up to date (mae export {weights} --out {bundle_dir}), or pass "
            f"--model {weights} to use those weights as they are now",
        )
    return actual
