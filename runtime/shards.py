"""The embedding output folder: row-aligned shard files, done markers, and the run's recorded parameters.

    OUT/
      run.json                 the parameters every shard was computed with (model checksum, pool, resize, ...)
      embeddings/NNNNN.npy     float32|float16 [n, D] (C order); [n, 1+L, D] for pool=tokens
      metadata/NNNNN.parquet   n rows, row i describes embeddings row i: path, key, index, status, error, width, height
      failures/NNNNN.parquet   the inputs of file NNNNN that could not be embedded (same columns + message)
      done/NNNNN.json          written last: row counts, input checksum and sha256 of the three files above

Why failures live apart: embedding-reader pairs embeddings/ and metadata/ file by file and autofaiss indexes every
row of every .npy, so a placeholder row (zeros or NaN) for a broken image would become a bogus neighbour (or break
the index). Failed inputs are therefore in neither, and `failures/` records each with its reason.

Every file is written to a temporary name in its folder, fsynced and renamed; the done marker comes last, so a
shard without a valid marker is simply computed again, and nothing half-written is ever taken as finished. A marker
is valid only if it names this run's parameters and inputs and the files it lists have the recorded checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae import __version__
from mae.errors import MAEError, require
from mae.files import atomic_write

RUN_FILE = "run.json"
RUN_FORMAT = "mae-embeddings"
DONE_FORMAT = "mae-embeddings-shard"
FORMAT_VERSION = 1
FOLDERS = ("embeddings", "metadata", "failures", "done")
METADATA_COLUMNS = ("path", "key", "index", "status", "error", "width", "height")
FAILURE_COLUMNS = (*METADATA_COLUMNS, "message")


def shard_name(number: int) -> str:
    return f"{number:05d}"


def params_checksum(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardRows:
    """One output file's content before writing."""

    embeddings: np.ndarray  # [n, ...] in the output dtype, C order
    metadata: dict[str, list]  # METADATA_COLUMNS -> n values
    failures: dict[str, list]  # FAILURE_COLUMNS -> m values


class OutputFolder:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, folder: str, number: int) -> Path:
        suffix = {"embeddings": ".npy", "metadata": ".parquet", "failures": ".parquet", "done": ".json"}[folder]
        return self.root / folder / f"{shard_name(number)}{suffix}"

    # ------------------------------------------------------------------------------------------ run.json
    def claim(self, params: dict[str, Any]) -> None:
        """Record `params` in run.json, or check that the folder was started with the same ones.

        Several workers may start at once: the first hard-link of a complete temporary file wins, the others
        read it and compare.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        run_path = self.root / RUN_FILE
        record = {
            "format": RUN_FORMAT,
            "format_version": FORMAT_VERSION,
            "toolkit_version": __version__,
            "params": params,
        }
        if not run_path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{RUN_FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(record, indent=2) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp, run_path)
                except FileExistsError:
                    pass
                except OSError:  # no hard links on this file system: exclusive create instead
                    try:
                        with open(run_path, "x") as handle:
                            handle.write(json.dumps(record, indent=2) + "\n")
                    except FileExistsError:
                        pass
            finally:
                Path(tmp).unlink(missing_ok=True)
        self._check_same(run_path, params)

    def _check_same(self, run_path: Path, params: dict[str, Any]) -> None:
        try:
            existing = json.loads(run_path.read_text())
        except (OSError, ValueError) as exc:
            raise MAEError(
                f"{run_path} is unreadable ({exc}); the output folder is damaged.", hint="use a new --out"
            ) from exc
        if existing.get("format") != RUN_FORMAT:
            raise MAEError(f"{self.root} holds something other than mae embeddings ({run_path}).")
        old = existing.get("params", {})
        if old == params:
            return
        changed = sorted(key for key in set(old) | set(params) if old.get(key) != params.get(key))
        if set(changed) <= {"inputs", "inputs_sha256"}:
            raise MAEError(
                f"The input changed since {self.root} was started ({old.get('inputs')} files then, "
                f"{params.get('inputs')} now, or other names): its output files would no longer line up with it.",
                hint="embed the new input into a new --out (or restore the original file list to resume)",
            )
        details = "; ".join(f"{key}: {_short(old.get(key))} -> {_short(params.get(key))}" for key in changed)
        raise MAEError(
            f"{self.root} was started with different settings ({details}). Mixing them would give embeddings that "
            "do not belong together.",
            hint="rerun with the original arguments to resume, or choose a new --out",
        )

    # ---------------------------------------------------------------------------------------------- shards
    def clean_temporaries(self, numbers: list[int]) -> int:
        """Remove temporary files a killed run left for the shards `numbers` (other workers own the rest).

        Each folder is listed once. Returns how many were removed.
        """
        wanted = {shard_name(number) for number in numbers}
        removed = 0
        for folder in FOLDERS:
            directory = self.root / folder
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                # atomic_write's temporaries: ".NNNNN.<suffix>.<random>.tmp"
                name = entry.name
                if name.startswith(".") and name.endswith(".tmp") and name[1:].split(".")[0] in wanted:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def is_done(self, number: int, params_sha256: str, keys_sha256: str) -> dict[str, Any] | None:
        """The done marker of shard `number` if it is complete and belongs to this run, else None."""
        marker_path = self.path("done", number)
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            return None
        if (
            marker.get("format") != DONE_FORMAT
            or marker.get("params_sha256") != params_sha256
            or marker.get("keys_sha256") != keys_sha256
        ):
            return None
        for folder, record in marker.get("files", {}).items():
            path = self.path(folder, number)
            try:
                if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
                    return None
            except (OSError, KeyError, TypeError):
                return None
        return marker if set(marker.get("files", {})) == {"embeddings", "metadata", "failures"} else None

    def write_shard(
        self, number: int, rows: ShardRows, params_sha256: str, keys_sha256: str, index_range: range
    ) -> dict[str, Any]:
        """Write the three data files, then the done marker. Returns the marker."""
        pa = require("pyarrow", "cpu", "Writing embedding metadata (parquet)")
        pq = require("pyarrow.parquet", "cpu", "Writing embedding metadata (parquet)")
        embeddings = np.ascontiguousarray(rows.embeddings)
        if embeddings.shape[0] != len(rows.metadata["path"]):
            raise AssertionError("embeddings and metadata rows differ")  # a bug, never user input
        atomic_write(self.path("embeddings", number), lambda handle: np.save(handle, embeddings, allow_pickle=False))
        for folder, columns, data in (
            ("metadata", METADATA_COLUMNS, rows.metadata),
            ("failures", FAILURE_COLUMNS, rows.failures),
        ):
            table = pa.table({name: pa.array(data[name], type=_ARROW_TYPES[name](pa)) for name in columns})
            atomic_write(self.path(folder, number), lambda handle, table=table: pq.write_table(table, handle))
        files = {}
        for folder in ("embeddings", "metadata", "failures"):
            path = self.path(folder, number)
            files[folder] = {"file": f"{folder}/{path.name}", "bytes": path.stat().st_size, "sha256": _sha256(path)}
        marker = {
            "format": DONE_FORMAT,
            "format_version": FORMAT_VERSION,
            "shard": number,
            "first_index": index_range.start,
            "stop_index": index_range.stop,
            "rows": int(embeddings.shape[0]),
            "failed": len(rows.failures["path"]),
            "failed_by_reason": _count(rows.failures["error"]),
            "keys_sha256": keys_sha256,
            "params_sha256": params_sha256,
            "files": files,
        }
        text = json.dumps(marker, indent=2) + "\n"
        atomic_write(self.path("done", number), lambda handle: handle.write(text.encode()))
        return marker


_ARROW_TYPES = {
    "path": lambda pa: pa.string(),
    "key": lambda pa: pa.string(),
    "index": lambda pa: pa.int64(),
    "status": lambda pa: pa.string(),
    "error": lambda pa: pa.string(),
    "width": lambda pa: pa.int32(),
    "height": lambda pa: pa.int32(),
    "message": lambda pa: pa.string(),
}


def _count(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
