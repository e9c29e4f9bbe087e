"""What to embed, and which part of it this worker does.

`list_inputs(INPUT)` accepts
- a folder: searched recursively for files with an image extension Pillow reads (case-insensitive); hidden files
  and folders (".name") are skipped, and so is the output folder when it lies inside; links to files are followed,
  links to folders are not (no loops); sorted by path relative to the folder, so the order is the same on every
  machine whatever the mount point;
- a text file of paths, one per line (blank lines and lines starting with "#" ignored; relative paths are relative
  to the text file's folder); its order is kept, every line is an input whatever its extension;
- a glob (`photos/**/*.jpg`, recursive `**` allowed): the matching files, sorted;
- a single image file.

Each input has a `key` (the relative path, the line, or the match) that identifies it independently of where the
data is mounted; the keys' checksum is the input's fingerprint, recorded in the output so that a changed input is
detected rather than silently mixed.

This worker's part (`worker_part`: worker I of N): `--shard I/N`, else torchrun's RANK / WORLD_SIZE, else a Slurm
array's SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (minus SLURM_ARRAY_TASK_MIN), else 0/1. Output files are
numbered over the whole input (file k holds inputs [k * shard_size, (k + 1) * shard_size)) and worker I writes files
k with k % N == I: disjoint, deterministic, and together the whole input.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mae.core.errors import MAEError

LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv", ".tsv")


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of the formats this Pillow can open (not the save-only ones)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True)
class Inputs:
    kind: str  # "folder" | "list" | "glob" | "file"
    source: str  # INPUT as given
    paths: list[str]  # what to open, in order
    keys: list[str]  # mount-independent identity of each input, same order
    skipped: int = 0  # folder files without an image extension

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        return keys_checksum(self.keys)


def keys_checksum(keys: list[str]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def _walk_folder(folder: Path, exclude: Path | None) -> tuple[list[str], list[str], int]:
    extensions = image_extensions()
    found: list[tuple[str, str]] = []
    skipped = 0
    exclude_resolved = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(folder, followlinks=False):
        root_path = Path(root)
        # Prune in place: hidden folders and our own output folder.
        dirs[:] = [
            name
            for name in dirs
            if not name.startswith(".")
            and not (exclude_resolved is not None and (root_path / name).resolve() == exclude_resolved)
        ]
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() not in extensions:
                skipped += 1
                continue
            path = root_path / name
            found.append((path.relative_to(folder).as_posix(), str(path)))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found], [key for key, _ in found], skipped


def _read_list(list_file: Path) -> tuple[list[str], list[str]]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MAEError(
            f"{list_file} is neither an image nor a UTF-8 text file of paths.",
            hint="give a folder, a glob, or a text file with one path per line",
        ) from exc
    except OSError as exc:
        raise MAEError(f"Cannot read {list_file}: {exc}") from exc
    paths, keys = [], []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
        keys.append(entry)
    return paths, keys


def list_inputs(source: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Inputs:
    """The inputs named by `source` (folder, text file of paths, glob or one image); `exclude`: the output folder."""
    text = str(source)
    path = Path(text)
    exclude_path = Path(exclude) if exclude is not None else None
    if path.is_dir():
        paths, keys, skipped = _walk_folder(path, exclude_path)
        inputs = Inputs("folder", text, paths, keys, skipped)
        where = f"the folder {text}"
    elif path.is_file():
        if path.suffix.lower() in image_extensions() and path.suffix.lower() not in LIST_SUFFIXES:
            inputs = Inputs("file", text, [text], [path.name])
        else:
            paths, keys = _read_list(path)
            inputs = Inputs("list", text, paths, keys)
        where = text
    elif _is_glob(text):
        matches = sorted(match for match in globlib.glob(text, recursive=True) if os.path.isfile(match))
        if exclude_path is not None:
            excluded = exclude_path.resolve()
            matches = [match for match in matches if not _inside(Path(match).resolve(), excluded)]
        inputs = Inputs("glob", text, matches, list(matches))
        where = f"files matching {text}"
    else:
        raise MAEError(
            f"{text} does not exist.",
            hint="INPUT is a folder (searched recursively), a text file of paths, or a glob such as 'photos/**/*.jpg'",
        )
    if not inputs.paths:
        extra = f" ({inputs.skipped} files without an image extension were skipped)" if inputs.skipped else ""
        raise MAEError(f"No images in {where}{extra}.", hint="check the path, or pass a text file listing the files")
    return inputs


# ---------------------------------------------------------------------------------------------- worker parts
@dataclass(frozen=True)
class WorkerPart:
    """Which worker this is, of how many (`--shard I/N`): it writes the output files k with k % N == I."""

    index: int  # I, 0-based
    count: int  # N
    origin: str  # "--shard", "RANK/WORLD_SIZE", "SLURM array" or "single"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def _parse_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise MAEError(f"{what} must be an integer, got {value!r}") from exc


def worker_part(shard: str | None = None, environ: dict[str, str] | None = None) -> WorkerPart:
    """This worker's I/N from `--shard` (`shard`), torchrun or Slurm variables, or 0/1."""
    env = os.environ if environ is None else environ
    if shard:
        parts = shard.split("/")
        if len(parts) != 2:
            raise MAEError(f"--shard {shard!r} must look like I/N, e.g. 0/4 (worker 0 of 4).")
        index, count = _parse_int(parts[0], "--shard I"), _parse_int(parts[1], "--shard N")
        origin = "--shard"
    elif env.get("WORLD_SIZE"):
        index, count = _parse_int(env.get("RANK", "0"), "RANK"), _parse_int(env["WORLD_SIZE"], "WORLD_SIZE")
        origin = "RANK/WORLD_SIZE"
    elif env.get("SLURM_ARRAY_TASK_COUNT") and env.get("SLURM_ARRAY_TASK_ID"):
        first = _parse_int(env.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
        index = _parse_int(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID") - first
        count = _parse_int(env["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT")
        origin = "SLURM array"
    else:
        return WorkerPart(0, 1, "single")
    if count < 1 or not 0 <= index < count:
        raise MAEError(f"Shard {index}/{count} ({origin}) is out of range: need 0 <= I < N.")
    return WorkerPart(index, count, origin)


def num_output_files(total: int, shard_size: int) -> int:
    return (total + shard_size - 1) // shard_size


def output_files_for(total: int, shard_size: int, part: WorkerPart) -> list[int]:
    """The global output file numbers worker part.index writes: k with k % N == I."""
    return list(range(part.index, num_output_files(total, shard_size), part.count))


def file_range(number: int, total: int, shard_size: int) -> range:
    """Input positions held by output file `number`."""
    return range(number * shard_size, min((number + 1) * shard_size, total))
