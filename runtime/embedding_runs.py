"""Reading finished `mae embed` output folders: what `mae index`, `mae search` and `mae eval` build on.

An embedding run (one `--out` of `mae embed`, see `mae.runtime.shards` for the layout) is usable once every output
file of its plan has a valid done marker. `open_run` checks that, and `EmbeddingRun` hands out the vectors
(float32, 2-D) and the metadata rows file by file, in the order `mae embed` wrote them. Row `r` of the whole run is
row `r - offset` of the file that holds it; `EmbeddingRun.checksum` changes whenever any file is written again (it
covers run.json and every done marker, and the markers carry the sha256 of the data files), so a consumer that
records it notices a re-embedded or extended folder without reading the data.

Several runs can be used together (e.g. one per image folder) only when their vectors are comparable: same model
file, engine, precision, pooling, normalization, pre-processing and shape. `comparable_settings` is that key and
`check_compatible` names the first difference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mae.core.errors import MAEError, require

from .inputs import file_range
from .shards import DONE_FORMAT, RUN_FILE, RUN_FORMAT, OutputFolder, params_checksum

# run.json parameters that must agree for vectors of two runs to be compared (dtype and file sizes need not).
COMPARABLE = (
    "model_sha256",
    "engine",
    "precision",
    "pool",
    "l2_normalize",
    "resize",
    "preprocessing",
    "embedding_shape",
)


@dataclass
class EmbeddingRun:
    """A finished `mae embed` output folder."""

    root: Path
    params: dict[str, Any]  # run.json "params"
    plan: dict[str, Any]  # run.json "plan"
    markers: dict[int, dict[str, Any]]  # output file number -> its done marker
    checksum: str  # sha256 of run.json and every done marker, in file order
    model_path: str | None  # the --model the run was made with (from its summary), if recorded
    offsets: list[int] = field(default_factory=list)  # first row of each file in the whole run

    @property
    def files(self) -> list[int]:
        return sorted(self.markers)

    @property
    def rows(self) -> int:
        return sum(marker["rows"] for marker in self.markers.values())

    @property
    def dim(self) -> int:
        return int(np.prod(self.params["embedding_shape"]))

    def settings(self) -> dict[str, Any]:
        return comparable_settings(self.params)

    def _embeddings(self, number: int, mmap: bool = True) -> np.ndarray:
        """Output file `number`'s embeddings as stored ([n, D], float32 or float16), or an error saying why not."""
        path = OutputFolder(self.root).path("embeddings", number)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise MAEError(f"Cannot read {path}: {exc}", hint=f"run mae embed into {self.root} again") from exc
        if array.ndim != 2:
            raise MAEError(
                f"{path} holds {array.ndim}-D embeddings (pool={self.params.get('pool')}): one vector per image is "
                "needed here.",
                hint="embed with --pool cls, mean or cls+mean",
            )
        return array

    def vectors(self, number: int, mmap: bool = True) -> np.ndarray:
        """float32 [n, D] of output file `number` (float16 files are widened; a memory map when already float32)."""
        array = self._embeddings(number, mmap)
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def take(self, number: int, offsets: np.ndarray) -> np.ndarray:
        """float32 [len(offsets), D]: rows `offsets` (any order) of output file `number`, read through a memory map
        (only those rows are read and widened, whatever the file's dtype)."""
        array = self._embeddings(number)
        try:
            return np.asarray(array[np.asarray(offsets, dtype=np.int64)], dtype=np.float32)
        except IndexError as exc:
            path = OutputFolder(self.root).path("embeddings", number)
            raise MAEError(f"Cannot read {path}: {exc}", hint=f"run mae embed into {self.root} again") from exc

    def metadata(self, number: int, columns: tuple[str, ...] = ("path", "key")) -> dict[str, list[Any]]:
        """Columns of metadata/NNNNN.parquet, row-aligned with `vectors(number)`."""
        pq = require("pyarrow.parquet", "cpu", "Reading embedding metadata (parquet)")
        path = OutputFolder(self.root).path("metadata", number)
        try:
            table = pq.read_table(path, columns=list(columns))
        except (OSError, ValueError) as exc:
            raise MAEError(f"Cannot read {path}: {exc}", hint=f"run mae embed into {self.root} again") from exc
        return {name: table.column(name).to_pylist() for name in columns}

    def all_vectors(self) -> np.ndarray:
        """float32 [rows, D]: every file's vectors in order (read into memory)."""
        parts = [np.asarray(self.vectors(number)) for number in self.files]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def all_metadata(self, columns: tuple[str, ...] = ("path", "key")) -> dict[str, list[Any]]:
        merged: dict[str, list[Any]] = {name: [] for name in columns}
        for number in self.files:
            for name, values in self.metadata(number, columns).items():
                merged[name].extend(values)
        return merged


def comparable_settings(params: dict[str, Any]) -> dict[str, Any]:
    return {name: params.get(name) for name in COMPARABLE}


def is_embedding_run(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def _read_json(path: Path, what: str, root: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        hint = f"run mae embed into {root} again"
        raise MAEError(f"{path} is unreadable ({exc}): {what} is damaged.", hint=hint) from exc


def _model_path(root: Path) -> str | None:
    """The --model of the run, from the summary any worker wrote (run.json records only its checksum)."""
    for summary in sorted(root.glob("summary*.json")):
        try:
            value = json.loads(summary.read_text()).get("model", {}).get("path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    return None


def open_run(path: str | Path, verify: bool = True) -> EmbeddingRun:
    """The finished embedding run in `path`; an `MAEError` that says what is missing otherwise.

    verify=True checks every data file against the sha256 its done marker records (through the hash cache: read
    in full once, then only when a file changed since, by inode, size, mtime or ctime);
    False trusts the markers (their counts and checksums are still compared with run.json).
    """
    root = Path(path)
    if not root.is_dir():
        raise MAEError(f"{root} is not a folder.", hint="pass the --out folder of a finished mae embed run")
    try:
        record = _read_json(root / RUN_FILE, "the embedding run", root)
    except FileNotFoundError:
        raise MAEError(
            f"{root} is not an embedding output folder (it has no {RUN_FILE}).",
            hint="pass the --out folder of mae embed (it holds run.json, embeddings/, metadata/, done/)",
        ) from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or not isinstance(record.get("params"), dict):
        raise MAEError(f"{root / RUN_FILE} is not the run.json of mae embed.", hint="pass a mae embed --out folder")
    params = record["params"]
    plan = record.get("plan") or _plan_of_old_run(params)
    markers = _finished_markers(root, params, plan, verify)
    digest = hashlib.sha256((root / RUN_FILE).read_bytes())
    for number in sorted(markers):
        digest.update(json.dumps(markers[number], sort_keys=True).encode())
    run = EmbeddingRun(root, params, plan, markers, digest.hexdigest(), _model_path(root))
    offset = 0
    for number in run.files:
        run.offsets.append(offset)
        offset += markers[number]["rows"]
    if params.get("pool") == "tokens" or len(params.get("embedding_shape") or []) != 1:
        raise MAEError(
            f"{root} holds every token of each image (pool={params.get('pool')}): one vector per image is needed.",
            hint="embed again with --pool cls, mean or cls+mean",
        )
    return run


def _plan_of_old_run(params: dict[str, Any]) -> dict[str, Any]:
    """run.json of a version before plans: the whole job was one worker's files."""
    inputs, shard_size = params.get("inputs"), params.get("shard_size")
    if not isinstance(inputs, int) or not isinstance(shard_size, int) or shard_size < 1:
        raise MAEError("run.json records no input count or shard size.", hint="run mae embed into a new --out")
    return {"workers": 1, "files": -(-inputs // shard_size), "shard_size": shard_size, "inputs": inputs}


def _finished_markers(root: Path, params: dict[str, Any], plan: dict[str, Any], verify: bool) -> dict[int, dict]:
    """Every output file's valid done marker; an error naming the unfinished ones."""
    folder = OutputFolder(root)
    params_sha256 = params_checksum(params)
    markers, missing = {}, []
    for number in range(plan["files"]):
        indexes = file_range(number, plan["inputs"], plan["shard_size"])
        marker = _marker(folder, number)
        if verify and marker is not None:
            marker = folder.is_done(number, params_sha256, marker.get("keys_sha256"), indexes, cached=True)
        elif marker is not None and marker.get("params_sha256") != params_sha256:
            marker = None
        if marker is None:
            missing.append(number)
        else:
            markers[number] = marker
    if missing:
        names = ", ".join(f"{number:05d}" for number in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MAEError(
            f"{root} is not finished: {len(missing)} of {plan['files']} output files have no valid done marker "
            f"({names}).",
            hint="run the same mae embed command again to finish (or repair) it; it resumes where it stopped",
        )
    return markers


def _marker(folder: OutputFolder, number: int) -> dict[str, Any] | None:
    try:
        marker = json.loads(folder.path("done", number).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == DONE_FORMAT else None


def check_compatible(runs: list[EmbeddingRun]) -> dict[str, Any]:
    """The settings all `runs` share; an `MAEError` naming the first that differs from the first run."""
    if not runs:
        raise MAEError("No embedding folders given.", hint="pass one or more mae embed --out folders")
    first = runs[0].settings()
    for run in runs[1:]:
        other = run.settings()
        for name in COMPARABLE:
            if other[name] != first[name]:
                raise MAEError(
                    f"{run.root} and {runs[0].root} were embedded with different {name} "
                    f"({_short(first[name])} vs {_short(other[name])}): their vectors cannot be compared.",
                    hint="embed every folder with the same bundle, engine, precision, --pool, --l2-normalize and "
                    "--resize, or index them separately",
                )
    return first


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if len(text) > 40 and isinstance(value, str):
        return text[:14] + '…"'
    return text if len(text) <= 60 else text[:57] + "..."
