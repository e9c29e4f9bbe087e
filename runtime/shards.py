"""The embedding output folder: row-aligned output files, done markers, and the run's recorded parameters.

    OUT/
      run.json                 the parameters every file was computed with (model checksum, pool, resize, ...)
                               and the plan: {workers N, files, shard_size, inputs, inputs_sha256}
      embeddings/NNNNN.npy     float32|float16 [n, D] (C order); [n, 1+L, D] for pool=tokens
      metadata/NNNNN.parquet   n rows, row i describes embeddings row i: path, key, index, status, error, width, height
      failures/NNNNN.parquet   the inputs of file NNNNN that could not be embedded (same columns + message)
      done/NNNNN.json          written last: row counts, input and model checksums, sha256 of the three files above

Why failures live apart: embedding-reader pairs embeddings/ and metadata/ file by file and autofaiss indexes every
row of every .npy, so a placeholder row (zeros or NaN) for a broken image would become a bogus neighbour (or break
the index). Failed inputs are therefore in neither, and `failures/` records each with its reason.

Every file is written to a temporary name in its folder, fsynced and renamed; the done marker comes last, so a
file without a valid marker is simply computed again, and nothing half-written is ever taken as finished. A marker
is valid only if it names this run's parameters and inputs, its counts add up to the file's inputs and match the
.npy header, and the files it lists have the recorded checksums. Temporaries are owner-tagged (`mae.core.files`): a run
removes only those of dead processes, so two runs in one folder never delete each other's files.

The plan: a worker with another N than the one run.json records is refused (0/2 and 1/3 together leave files to
nobody); a single worker (N = 1) may always join, since it covers every file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae import __version__
from mae.core.errors import MAEError, require
from mae.core.files import (
    atomic_write,
    cached_sha256,
    current_umask,
    faults,
    make_dirs,
    remove_leftovers,
    sha256_file,
    temporary_name,
)

RUN_FILE = "run.json"
RUN_FORMAT = "mae-embeddings"
DONE_FORMAT = "mae-embeddings-shard"  # the "format" of a done marker (one per output file)
CACHED_HASHES = ("embeddings",)  # files whose sha256 the hash cache keeps (the only large ones)
FORMAT_VERSION = 1
# What link() says on file systems without hard links (FAT, some network mounts, some FUSE).
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)
FOLDERS = ("embeddings", "metadata", "failures", "done")
METADATA_COLUMNS = ("path", "key", "index", "status", "error", "width", "height")
FAILURE_COLUMNS = (*METADATA_COLUMNS, "message")


def file_stem(number: int) -> str:
    return f"{number:05d}"


def params_checksum(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class FileRows:
    """One output file's content before writing."""

    embeddings: np.ndarray  # [n, ...] in the output dtype, C order
    metadata: dict[str, list]  # METADATA_COLUMNS -> n values
    failures: dict[str, list]  # FAILURE_COLUMNS -> m values


class OutputFolder:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, folder: str, number: int) -> Path:
        suffix = {"embeddings": ".npy", "metadata": ".parquet", "failures": ".parquet", "done": ".json"}[folder]
        return self.root / folder / f"{file_stem(number)}{suffix}"

    # ------------------------------------------------------------------------------------------ run.json
    def claim(self, params: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        """Record `params` and the `plan` (who writes which files) in run.json, or check that the folder was started
        with the same.

        Several workers may start at once: the first hard-link of a complete temporary file wins, the others
        read it and compare. Returns the recorded plan.
        """
        make_dirs(self.root)
        run_path = self.root / RUN_FILE
        record = {
            "format": RUN_FORMAT,
            "format_version": FORMAT_VERSION,
            "toolkit_version": __version__,
            "params": params,
            "plan": plan,
        }
        text = json.dumps(record, indent=2) + "\n"
        with faults(run_path, "write"):
            if not run_path.exists():
                self._create_once(run_path, text)
        return self._check_same(run_path, params, plan)

    def _create_once(self, run_path: Path, text: str) -> None:
        """Create run.json unless another worker did first: a complete temporary hard-linked into place."""
        prefix, suffix = temporary_name(RUN_FILE)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=prefix, suffix=suffix)
        try:
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: readable by workers of other users
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, run_path)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:  # a real fault (no space, read-only, ...): the caller says which
                    raise
                # no hard links on this file system: exclusive create instead
                try:
                    with open(run_path, "x") as handle:
                        handle.write(text)
                except FileExistsError:
                    pass
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _check_same(self, run_path: Path, params: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
        try:
            existing = json.loads(run_path.read_text())
        except (OSError, ValueError) as exc:
            raise MAEError(
                f"{run_path} is unreadable ({exc}); the output folder is damaged.", hint="use a new --out"
            ) from exc
        if not isinstance(existing, dict) or existing.get("format") != RUN_FORMAT:
            raise MAEError(f"{self.root} holds something other than mae embeddings ({run_path}).")
        old = existing.get("params", {})
        if old != params:
            raise _changed(self.root, old, params)
        recorded = existing.get("plan") or plan  # run.json of an older version: no plan recorded
        workers, mine = recorded.get("workers"), plan["workers"]
        if mine != 1 and workers != mine:
            raise MAEError(
                f"{self.root} is split among {workers} workers (as its first worker began), but this worker is one "
                f"of {mine}: together they would leave output files to nobody.",
                hint=f"use --shard I/{workers} (I = 0..{workers - 1}) as the others did; a single worker (no --shard) "
                "may always finish the whole job; or choose a new --out",
            )
        return recorded

    # ----------------------------------------------------------------------------------------------- files
    def clean_temporaries(self, numbers: list[int]) -> int:
        """Remove temporary files that a killed run left for the output files `numbers`.

        Only those of dead processes (`mae.core.files.remove_leftovers`): another run writing into the same folder
        keeps its in-flight files. Returns how many were removed.
        """
        removed = 0
        for folder in FOLDERS:
            names = {self.path(folder, number).name for number in numbers}
            removed += remove_leftovers(self.root / folder, names)
        return removed

    def is_done(
        self, number: int, params_sha256: str, keys_sha256: str, indexes: range | None = None, cached: bool = False
    ) -> dict[str, Any] | None:
        """The done marker of output file `number` if it is complete and belongs to this run, else None.

        Complete: it names this run's parameters and inputs, its row counts add up to the file's inputs (`indexes`)
        and match the embeddings file, and the files it lists have the recorded sizes and checksums.
        cached: checksums through the hash cache (`cached_sha256`: a file not changed since it was hashed, by its
        inode, size, mtime and ctime, is not read again), as readers of finished runs do; resuming reads in full.
        """

        marker_path = self.path("done", number)
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(marker, dict)
            or marker.get("format") != DONE_FORMAT
            or marker.get("params_sha256") != params_sha256
            or marker.get("keys_sha256") != keys_sha256
            or set(marker.get("files") or {}) != {"embeddings", "metadata", "failures"}
        ):
            return None
        if indexes is not None and not _counts_add_up(marker, indexes):
            return None
        for folder, record in marker["files"].items():
            path = self.path(folder, number)
            try:
                digest = cached_sha256 if cached and folder in CACHED_HASHES else sha256_file
                if path.stat().st_size != record["bytes"] or digest(path) != record["sha256"]:
                    return None
            except (OSError, KeyError, TypeError, MAEError):
                return None
        return marker if _npy_rows(self.path("embeddings", number)) == marker["rows"] else None

    def done_count(self, numbers: list[int], params_sha256: str) -> int:
        """How many of `numbers` have a done marker of this run (cheap: markers only, no file is hashed)."""
        count = 0
        for number in numbers:
            try:
                marker = json.loads(self.path("done", number).read_text())
            except (OSError, ValueError):
                continue
            count += isinstance(marker, dict) and marker.get("params_sha256") == params_sha256
        return count

    def write_file(
        self,
        number: int,
        rows: FileRows,
        params_sha256: str,
        keys_sha256: str,
        index_range: range,
        model_sha256: str | None = None,
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
            with faults(path, "read back"):
                files[folder] = {
                    "file": f"{folder}/{path.name}",
                    "bytes": path.stat().st_size,
                    # hashed now; the embeddings' hash remembered for readers (is_done with cached=True)
                    "sha256": cached_sha256(path, fresh=True) if folder in CACHED_HASHES else sha256_file(path),
                }
        marker = {
            "format": DONE_FORMAT,
            "format_version": FORMAT_VERSION,
            "shard": number,  # the output file's number
            "first_index": index_range.start,
            "stop_index": index_range.stop,
            "rows": int(embeddings.shape[0]),
            "failed": len(rows.failures["path"]),
            "failed_by_reason": _count(rows.failures["error"]),
            "keys_sha256": keys_sha256,
            "params_sha256": params_sha256,
            "model_sha256": model_sha256,
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


def _counts_add_up(marker: dict[str, Any], indexes: range) -> bool:
    """A marker's counts must describe exactly the file's inputs: an edited count is not taken as done."""
    rows, failed = marker.get("rows"), marker.get("failed")
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (rows, failed)):
        return False
    return (
        marker.get("first_index") == indexes.start
        and marker.get("stop_index") == indexes.stop
        and rows >= 0
        and failed >= 0
        and rows + failed == len(indexes)
        and sum((marker.get("failed_by_reason") or {}).values()) == failed
    )


def _npy_rows(path: Path) -> int | None:
    """The row count in a .npy header (the data is not read)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read_header(handle)
    except (OSError, ValueError):
        return None
    return int(shape[0]) if shape else None


def _changed(root: Path, old: dict[str, Any], params: dict[str, Any]) -> MAEError:
    """The error for a run restarted with other parameters than run.json records."""
    changed = sorted(key for key in set(old) | set(params) if old.get(key) != params.get(key))
    if set(changed) <= {"inputs", "inputs_sha256"}:
        return MAEError(
            f"The input changed since {root} was started ({old.get('inputs')} files then, "
            f"{params.get('inputs')} now, or other names): its output files would no longer line up with it.",
            hint="embed the new input into a new --out (or restore the original file list to resume)",
        )
    if changed == ["model_sha256"]:
        return MAEError(
            f"The model changed since {root} was started (sha256 {str(old.get('model_sha256'))[:12]}… then, "
            f"{str(params.get('model_sha256'))[:12]}… now: re-exported, or other weights): finishing the job would "
            "mix embeddings of two models.",
            hint="embed with the new model into a new --out, or restore the model the job began with to resume",
        )
    details = "; ".join(f"{key}: {_short(old.get(key))} -> {_short(params.get(key))}" for key in changed)
    return MAEError(
        f"{root} was started with different settings ({details}). Mixing them would give embeddings that "
        "do not belong together.",
        hint="rerun with the original arguments to resume, or choose a new --out",
    )


def _count(values: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
