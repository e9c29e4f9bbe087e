"""`mae embed`: images -> pooled encoder features, batched, pipelined, resumable, split among workers.

Pipeline: worker processes (`workers`, spawned, numpy + Pillow only) decode and pre-process chunks of `batch_size`
images while the main process runs the engine; a bounded window of chunks in flight keeps memory flat and the
engine fed. Images are batched in input order within each output file, so a file's content does not depend on
timing, on how many workers decoded it, or on whether the run was interrupted before. Engines that want static
shapes (TensorRT, OpenVINO) get the last batch of a file padded with copies of its last image; the others run it
smaller.

Features are the encoder's unmasked tokens (`ids_keep = arange(L)`), `latent` [B, 1+L, D], pooled as `cls`
([B, D], the class token), `mean` (mean of the L patch tokens), `cls+mean` ([B, 2D]) or `tokens` (all of them,
[B, 1+L, D]: 3-D files, which embedding-reader does not read). `--l2-normalize` scales each vector (each token for
`tokens`) to unit length; `--dtype float16` casts at the very end.

Output layout, row alignment and why failed images are in `failures/` rather than in the embeddings: see
`mae.runtime.shards`. Every input ends up either as a row of embeddings/ + metadata/ or as a row of failures/ with
its reason; a bad file never stops the job. `strict=True` raises (output kept) if any input failed.

Resuming: run again with the same arguments; output files with a valid done marker are skipped, the rest are
computed again from scratch, giving files identical to an uninterrupted run. The run's parameters (model checksum,
engine, precision, pool, resize, dtype, l2, shard size (images per file), preprocessing and the input list's
checksum) are recorded in run.json, and a different set is refused.

Scale-out: `shard="I/N"` (or RANK/WORLD_SIZE, or a Slurm array) makes this worker (its `WorkerPart`, see
`mae.runtime.inputs`) write the output files k with k % N == I. Each worker writes `summary.json` when N == 1 and
`summary-I-of-N.json` otherwise, so that workers never overwrite each other's summary.

Progress: `embed` prints nothing itself; it reports through `progress` (an `EmbedProgress`): notes (which engine
`auto` chose, a warning that the output may not fit) and the images done. `mae embed` draws them on stderr
(`mae.reports.embed`), which also renders the summary.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mae import __version__
from mae.core.bundle import Bundle, is_bundle
from mae.core.errors import MAEError, require
from mae.core.files import atomic_write, cached_sha256, free_bytes, size_text
from mae.core.integrity import verify_entry
from mae.core.masking import full_ids_keep
from mae.core.numerics import POOLS, l2_normalize, pool_tokens
from mae.core.preprocess import Preprocessing

from .embed_worker import DecodedChunk, DecodeTask, decode_chunk, init_worker, ready
from .engines import create_engine
from .engines.auto import choose
from .engines.openvino import int8_model_path
from .engines.torch import bundle_source
from .inputs import (
    Inputs,
    WorkerPart,
    file_range,
    keys_checksum,
    list_inputs,
    num_output_files,
    output_files_for,
    worker_part,
)
from .shards import (
    FAILURE_COLUMNS,
    METADATA_COLUMNS,
    RUN_FILE,
    FileRows,
    OutputFolder,
    params_checksum,
)

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}  # `--dtype`: of the stored embeddings
STATIC_SHAPE_ENGINES = ("trt", "tensorrt", "openvino")
SUMMARY_FORMAT = "mae-embeddings-summary"
MAX_FILE_BYTES = 4 << 30  # embeddings of one output file, held in memory until written


class EmbedFailures(MAEError):
    """Raised with strict=True when some inputs could not be embedded; the output and summary are written."""

    def __init__(self, message: str, hint: str, summary: dict[str, Any]) -> None:
        super().__init__(message, hint=hint)
        self.summary = summary


def embedding_shape(config: Any, pool: str) -> list[int]:
    """Shape of one image's embedding (without the row axis)."""
    width = config.embed_dim
    if pool == "tokens":
        return [1 + config.num_patches, width]
    return [2 * width if pool == "cls+mean" else width]


@dataclass(frozen=True)
class EmbedSettings:
    """How `embed` computes and stores the embeddings (everything but what, with which model, and where)."""

    pool: str = "cls"
    batch_size: int = 32  # images per engine call
    workers: int = 2  # decoding processes (0: in the main process)
    resize: str | None = None  # "center" | "squash" | None (the bundle's)
    dtype: str = "float32"  # of the stored embeddings: a key of OUTPUT_DTYPES
    l2_normalize: bool = False
    shard_size: int = 10000  # images per output file

    def check(self) -> None:
        if self.pool not in POOLS:
            raise MAEError(f"Unknown pooling {self.pool!r}", hint=f"use one of: {', '.join(POOLS)}")
        if self.dtype not in OUTPUT_DTYPES:
            raise MAEError(f"Unknown dtype {self.dtype!r}", hint="use float32 or float16")
        if self.batch_size < 1 or self.shard_size < 1 or self.workers < 0:
            raise MAEError("batch_size and shard_size must be >= 1 and workers >= 0")


# ------------------------------------------------------------------------------------------------ progress
class EmbedProgress(Protocol):
    """What `embed` says while it runs, for the app to show (`mae embed` draws lines and a bar on stderr)."""

    def note(self, text: str) -> None:
        """A line for the person running the job: which engine `auto` chose, or that the output may not fit."""

    def start(self, total: int, label: str) -> None:
        """`total` images are about to be embedded (0 when every file is done already); `label` names the part."""

    def advance(self, count: int, failed: bool = False) -> None:
        """`count` more images are done: embedded, or failed (`failed`)."""

    def close(self) -> None:
        """The pipeline stopped, finished or not."""


class Silent:
    """An `EmbedProgress` that shows nothing (`progress=False`)."""

    def note(self, text: str) -> None:
        pass

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, count: int, failed: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class NotesOnStderr(Silent):
    """`progress=True`: the notes as lines on stderr, and no bar (the app's renderer draws one)."""

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _progress_from(progress: EmbedProgress | bool | None) -> EmbedProgress:
    if progress is None or progress is False:
        return Silent()
    return NotesOnStderr() if progress is True else progress


# ---------------------------------------------------------------------------------------------------- model
def model_checksum(model: str, engine_name: str, precision: str) -> str:
    """sha256 of what really runs, read in full (never a recorded value): the bundle's graph (for torch its source
    weights; for openvino int8 the NNCF model), or the weights. A bundle file that is not the one mae.json records
    is refused here (`mae.core.integrity`), and resuming compares this with run.json's `model_sha256`."""
    path = Path(model)
    if is_bundle(path):
        bundle = Bundle.load(path)
        if engine_name == "torch":
            source = bundle_source(path, fresh=True)  # read in full and checked: the digest below is the cached one
            return _path_checksum(source, fresh=False)
        # Each file is read in full once, by the check; the entry's digest then comes from the hash cache.
        if engine_name == "openvino" and precision == "int8":  # the NNCF model, not the ONNX Runtime graph
            int8_model_path(bundle, "encoder", fresh=True)  # an MAEError when the bundle has none or it changed
            return verify_entry(bundle.path, bundle.manifest["openvino"]["int8"]["encoder"])
        bundle.graph("encoder", precision, fresh=True)
        return verify_entry(bundle.path, bundle.manifest["graphs"][precision]["encoder"])
    if not path.exists():
        raise MAEError(f"--model {model} does not exist.", hint="pass a bundle directory or weights for --engine torch")
    return _path_checksum(path)


def _path_checksum(path: Path, fresh: bool = True) -> str:
    """sha256 of weights: the file, or a folder's (e.g. Hugging Face) names and contents; `fresh=False` takes the
    hashes cached by a check that has just read the files in full."""
    if path.is_file():
        return cached_sha256(path, fresh=fresh)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.relative_to(path).as_posix()}\0{cached_sha256(item, fresh=fresh)}\n".encode())
    return digest.hexdigest()


def _choose_auto(model: str, out: Path, precision: str | None) -> tuple[str, str | None, dict[str, Any], str]:
    """What `--engine auto` runs: on a resumed run the engine and precision its files were computed with (a
    measurement made since must not make the rest of the run differ), else `mae.runtime.engines.auto.choose`."""

    try:
        recorded = json.loads((out / RUN_FILE).read_text()).get("params", {})
    except (OSError, ValueError, AttributeError):
        recorded = {}
    if recorded.get("engine") and recorded.get("precision") and precision in (None, recorded["precision"]):
        engine, recorded_precision = recorded["engine"], recorded["precision"]
        line = f"engine auto: {engine} {recorded_precision} (resuming: as this run began)"
        return engine, recorded_precision, {}, line
    choice = choose(model, "embed", precision)
    return choice.engine, choice.precision, dict(choice.options), choice.line()


def _preprocessing_for(model: str, engine: Any) -> Preprocessing:
    if is_bundle(Path(model)):
        return Bundle.load(Path(model)).preprocessing
    return Preprocessing(size=engine.config.img_size)


@dataclass(frozen=True)
class _Engine:
    """The encoder that runs, and what a resumed run compares."""

    runner: Any
    name: str
    precision: str
    model_sha256: str
    auto_line: str | None  # what `--engine auto` chose, and why


def _open_engine(
    model: str, out: Path, engine: str | Any, provider: str, precision: str | None, progress: EmbedProgress
) -> _Engine:
    """Choose the engine (`auto`) and create it, or take the engine object given; hash what it runs."""
    auto_line, extra = None, {}
    if engine == "auto":
        engine, precision, extra, auto_line = _choose_auto(model, out, precision)
        progress.note(auto_line)
    precision = precision or "fp32"
    if not isinstance(engine, str):  # created by the caller
        name = getattr(engine, "name", type(engine).__name__)
        return _Engine(engine, name, precision, model_checksum(model, name, precision), auto_line)
    # Hashed in full first (start and resume alike); the engine's own check then finds the hash cached.
    model_sha256 = model_checksum(model, engine, precision)
    options = {"provider": provider, "device": "auto", **extra}
    runner = create_engine(engine, model, part="encoder", precision=precision, **options)
    return _Engine(runner, engine, precision, model_sha256, auto_line)


# ------------------------------------------------------------------------------------------------- decoding
def _ignore_sigint_then_init(max_image_pixels: int | None) -> None:
    # Ctrl-C goes to the whole process group: the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(max_image_pixels)
    # A main process killed with SIGKILL cannot stop its workers, and they would wait for work forever (each holds
    # both ends of the task queue, so they never see it close): leave as soon as the parent is gone.
    parent = os.getppid()

    def exit_when_orphaned() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="exit-when-orphaned", daemon=True).start()


@dataclass
class _Pending:
    task: DecodeTask
    future: Future | None
    generation: int


class Decoder:
    """Decode tasks in `workers` spawned processes (or inline with 0), surviving a worker that dies.

    If a decoder process crashes (a segfault in a codec, the OOM killer), every chunk that was in flight is decoded
    again one image per task, so only the file that kills a process is recorded as failed ("decoder_crashed").
    """

    def __init__(self, workers: int, function: Callable[[DecodeTask], DecodedChunk] = decode_chunk) -> None:
        self.workers = workers
        self.function = function  # module-level, so that spawned processes can import it
        self.generation = 0
        self.restarts = 0
        self.startup_seconds = 0.0
        self.executor: ProcessPoolExecutor | None = None
        if workers > 0:
            self._start()

    def _start(self) -> None:
        began = time.perf_counter()
        self.executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_ignore_sigint_then_init,
            initargs=(Image.MAX_IMAGE_PIXELS,),
        )
        # Start every worker now (spawn + imports, a fraction of a second each) rather than inside the pipeline.
        for warming in [self.executor.submit(ready) for _ in range(self.workers)]:
            with contextlib.suppress(BrokenProcessPool):
                warming.result()
        self.startup_seconds += time.perf_counter() - began

    def _restart(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.generation += 1
        self.restarts += 1
        self._start()

    def submit(self, task: DecodeTask) -> _Pending:
        if self.executor is None:
            return _Pending(task, None, self.generation)
        try:
            return _Pending(task, self.executor.submit(self.function, task), self.generation)
        except BrokenProcessPool:
            self._restart()
            return _Pending(task, self.executor.submit(self.function, task), self.generation)

    def result(self, pending: _Pending) -> DecodedChunk:
        if pending.future is None:
            return self.function(pending.task)
        try:
            return pending.future.result()
        except BrokenProcessPool:
            if pending.generation == self.generation:
                self._restart()
            return self._isolated(pending.task)

    def _isolated(self, task: DecodeTask) -> DecodedChunk:
        parts: list[DecodedChunk] = []
        for index, path in zip(task.indexes, task.paths, strict=True):
            single = DecodeTask([index], [path], task.preprocessing, task.resize)
            try:
                parts.append(self.executor.submit(self.function, single).result())
            except BrokenProcessPool:
                self._restart()
                message = f"{path}: the decoding process died on this file"
                parts.append(DecodedChunk(np.zeros((0,)), [], [], [(index, "decoder_crashed", message)], 0.0))
        arrays = [part.pixel_values for part in parts if part.ok_indexes]
        size = Preprocessing.from_dict(task.preprocessing).size
        pixel_values = np.concatenate(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)
        return DecodedChunk(
            pixel_values,
            [i for part in parts for i in part.ok_indexes],
            [s for part in parts for s in part.sizes],
            [f for part in parts for f in part.failures],
            sum(part.seconds for part in parts),
        )

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Stats:
    decode_seconds: float = 0.0  # summed over workers
    wait_seconds: float = 0.0  # main process waiting for decoded images
    inference_seconds: float = 0.0
    write_seconds: float = 0.0
    batches: int = 0
    padded_rows: int = 0
    embedded: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _FileState:
    """One output file being filled."""

    number: int
    indexes: range
    embeddings: list[np.ndarray] = field(default_factory=list)
    metadata: dict[str, list] = field(default_factory=lambda: {name: [] for name in METADATA_COLUMNS})
    failures: dict[str, list] = field(default_factory=lambda: {name: [] for name in FAILURE_COLUMNS})
    # decoded images waiting for a full batch
    waiting_pixels: list[np.ndarray] = field(default_factory=list)
    waiting_rows: list[tuple[int, tuple[int, int]]] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return len(self.waiting_rows)


def _text(value: str) -> str:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) shown with backslash escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class _Embedder:
    """Decoded images -> batches of `batch_size` within each output file -> the engine -> pooled rows."""

    def __init__(self, engine: Any, inputs: Inputs, settings: EmbedSettings, progress: EmbedProgress) -> None:
        config = engine.config
        self.engine = engine
        self.inputs = inputs
        self.pool = settings.pool
        self.dtype = OUTPUT_DTYPES[settings.dtype]
        self.l2 = settings.l2_normalize
        self.batch_size = settings.batch_size
        self.num_patches = config.num_patches
        self.embed_dim = config.embed_dim
        self.row_shape = tuple(embedding_shape(config, settings.pool))
        self.pad = getattr(engine, "name", "") in STATIC_SHAPE_ENGINES
        self.stats = _Stats()
        self.progress = progress
        self._ids_keep: dict[int, np.ndarray] = {}

    def add_chunk(self, state: _FileState, chunk: DecodedChunk) -> None:
        for index, reason, message in chunk.failures:
            self._record_failure(state, index, reason, message)
        if chunk.ok_indexes:
            state.waiting_pixels.append(chunk.pixel_values)
            state.waiting_rows.extend(zip(chunk.ok_indexes, chunk.sizes, strict=True))
        while state.waiting >= self.batch_size:
            self._run_batch(state, self.batch_size)

    def finish(self, state: _FileState) -> FileRows:
        if state.waiting:
            self._run_batch(state, state.waiting)
        if state.embeddings:
            embeddings = np.concatenate(state.embeddings)
        else:
            embeddings = np.zeros((0, *self.row_shape), dtype=self.dtype)
        return FileRows(np.ascontiguousarray(embeddings), state.metadata, state.failures)

    def _row(self, index: int, error: str | None, size: tuple[int, int] | tuple[None, None]) -> dict[str, Any]:
        """The metadata columns of input `index`: status "ok" with its size, or "error" with the reason."""
        return {
            "path": _text(self.inputs.paths[index]),
            "key": _text(self.inputs.keys[index]),
            "index": index,
            "status": "error" if error else "ok",
            "error": error,
            "width": size[0],
            "height": size[1],
        }

    def _record_failure(self, state: _FileState, index: int, reason: str, message: str) -> None:
        row = {**self._row(index, reason, (None, None)), "message": _text(message)}
        for name in FAILURE_COLUMNS:
            state.failures[name].append(row[name])
        self.stats.failed += 1
        self.stats.failed_by_reason[reason] = self.stats.failed_by_reason.get(reason, 0) + 1
        self.progress.advance(1, failed=True)

    def _take(self, state: _FileState, count: int) -> tuple[np.ndarray, list[tuple[int, tuple[int, int]]]]:
        pixels = state.waiting_pixels[0] if len(state.waiting_pixels) == 1 else np.concatenate(state.waiting_pixels)
        batch, rest = pixels[:count], pixels[count:]
        state.waiting_pixels = [rest] if len(rest) else []
        rows, state.waiting_rows = state.waiting_rows[:count], state.waiting_rows[count:]
        return batch, rows

    def _ids(self, batch: int) -> np.ndarray:
        if batch not in self._ids_keep:
            self._ids_keep[batch] = full_ids_keep(batch, self.num_patches)  # [B, L], all patches in order
        return self._ids_keep[batch]

    def _run_batch(self, state: _FileState, count: int) -> None:
        pixel_values, rows = self._take(state, count)  # [n, 3, S, S]
        real = len(rows)
        if self.pad and real < self.batch_size:
            padding = np.repeat(pixel_values[-1:], self.batch_size - real, axis=0)
            pixel_values = np.concatenate([pixel_values, padding])
            self.stats.padded_rows += self.batch_size - real
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        started = time.perf_counter()
        outputs = self.engine.run({"pixel_values": pixel_values, "ids_keep": self._ids(len(pixel_values))})
        self.stats.inference_seconds += time.perf_counter() - started
        self.stats.batches += 1
        latent = np.asarray(outputs["latent"])  # [B, 1+L, D]
        expected = (len(pixel_values), 1 + self.num_patches, self.embed_dim)
        if latent.shape != expected:
            raise MAEError(
                f"The engine returned latent {latent.shape}, expected {expected}.",
                hint="the engine and the model's config disagree; re-export the bundle",
            )
        vectors = pool_tokens(latent[:real].astype(np.float32, copy=False), self.pool)
        if self.l2:
            vectors = l2_normalize(vectors)
        state.embeddings.append(vectors.astype(self.dtype))
        for index, size in rows:
            values = self._row(index, None, size)
            for name in METADATA_COLUMNS:
                state.metadata[name].append(values[name])
        self.stats.embedded += real
        self.progress.advance(real)


class _Writer:
    """Writes finished output files in a background thread, one at a time, so that the engine keeps running while
    a file is written and fsynced. At most one file waits (bounded memory); errors surface on the next call."""

    def __init__(
        self, out_folder: OutputFolder, params_sha256: str, model_sha256: str, markers: dict[int, dict[str, Any]]
    ) -> None:
        self.out_folder = out_folder
        self.params_sha256 = params_sha256
        self.model_sha256 = model_sha256
        self.markers = markers  # filled in as files are done
        self.seconds = 0.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-writer")
        self.pending: Future | None = None

    def write(self, number: int, rows: FileRows, keys_sha256: str, indexes: range) -> None:
        self.wait()
        self.pending = self.executor.submit(self._write, number, rows, keys_sha256, indexes)

    def _write(self, number: int, rows: FileRows, keys_sha256: str, indexes: range) -> None:
        started = time.perf_counter()
        self.markers[number] = self.out_folder.write_file(
            number, rows, self.params_sha256, keys_sha256, indexes, self.model_sha256
        )
        self.seconds += time.perf_counter() - started

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        """Let a file being written finish (it is complete), then stop the thread."""
        try:
            if self.pending is not None:
                self.pending.exception()
        finally:
            self.executor.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------- the job
@dataclass
class _Job:
    """One worker's run, settled before the first image is decoded."""

    model: str
    engine: _Engine
    inputs: Inputs
    part: WorkerPart
    folder: OutputFolder
    settings: EmbedSettings
    params: dict[str, Any]  # what run.json records and a resumed run must repeat
    params_sha256: str
    plan: dict[str, Any]  # the whole job's (every worker's), as run.json records it
    row_bytes: int  # one image's embedding in the output dtype
    files: list[int] = field(default_factory=list)  # this worker's output files
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)  # done markers: found, then written
    pending: list[int] = field(default_factory=list)  # the files this run writes

    def indexes(self, number: int) -> range:
        return file_range(number, len(self.inputs), self.settings.shard_size)

    def keys_sha256(self, indexes: range) -> str:
        """The checksum of an output file's inputs (positions and keys), recorded in its done marker."""
        return keys_checksum([f"{index}\0{self.inputs.keys[index]}" for index in indexes])

    @property
    def pending_images(self) -> int:
        return sum(len(self.indexes(number)) for number in self.pending)


def _run_params(model: str, opened: _Engine, settings: EmbedSettings, inputs: Inputs) -> dict[str, Any]:
    """The run's parameters (see the module docstring): recorded in run.json, compared when resuming."""
    pre = _preprocessing_for(model, opened.runner)
    return {
        "model_sha256": opened.model_sha256,
        "engine": "trt" if opened.name == "tensorrt" else opened.name,
        "precision": opened.precision,
        "pool": settings.pool,
        "resize": settings.resize or pre.resize,
        "dtype": settings.dtype,
        "l2_normalize": bool(settings.l2_normalize),
        "shard_size": settings.shard_size,
        "preprocessing": pre.to_dict(),
        "embedding_shape": embedding_shape(opened.runner.config, settings.pool),
        "inputs": len(inputs),
        "inputs_sha256": inputs.fingerprint,
    }


def _row_bytes(params: dict[str, Any]) -> int:
    """Bytes of one image's embedding; refused when one output file (held in memory until written) is too large."""
    row_bytes = int(np.prod(params["embedding_shape"])) * np.dtype(OUTPUT_DTYPES[params["dtype"]]).itemsize
    shard_size = params["shard_size"]
    if shard_size * row_bytes > MAX_FILE_BYTES:
        raise MAEError(
            f"One output file of {shard_size} images would hold {shard_size * row_bytes / 2**30:.1f} GiB of "
            f"{params['pool']} embeddings (kept in memory until it is written).",
            hint=f"use --shard-size {max(1, MAX_FILE_BYTES // row_bytes)} or less",
        )
    return row_bytes


def _start_job(
    model: str, opened: _Engine, inputs: Inputs, part: WorkerPart, folder: OutputFolder, settings: EmbedSettings
) -> _Job:
    """Record the run's parameters in run.json (or check them against it) and sort this worker's files into done
    (a valid marker) and pending."""
    params = _run_params(model, opened, settings, inputs)
    row_bytes = _row_bytes(params)
    plan = {
        "workers": part.count,
        "files": num_output_files(len(inputs), settings.shard_size),
        "shard_size": settings.shard_size,
        "inputs": len(inputs),
        "inputs_sha256": inputs.fingerprint,
    }
    plan = folder.claim(params, plan)
    job = _Job(model, opened, inputs, part, folder, settings, params, params_checksum(params), plan, row_bytes)
    # Imported here rather than at the first write, inside the timed pipeline (a third of a second).
    require("pyarrow.parquet", "cpu", "Writing embedding metadata (parquet)")
    job.files = output_files_for(len(inputs), settings.shard_size, part)
    for number in job.files:
        indexes = job.indexes(number)
        marker = folder.is_done(number, job.params_sha256, job.keys_sha256(indexes), indexes)
        if marker is None:
            job.pending.append(number)
        else:
            job.markers[number] = marker
    folder.clean_temporaries(job.files)
    return job


ROW_OVERHEAD_BYTES = 160  # metadata (parquet) and failure rows per image, with room for long paths


def _fit_warning(root: Path, images: int, row_bytes: int) -> str | None:
    """What to say before starting when the output will not fit in the free space (the job would stop with a full
    disk: nothing written is lost, and a rerun after freeing space resumes); None when it fits."""
    needed = images * (row_bytes + ROW_OVERHEAD_BYTES)
    free = free_bytes(root)
    if free is None or needed <= free:
        return None
    return (
        f"warning: this job writes about {size_text(needed)} into {root}, where {size_text(free)} is free; it "
        "will stop when the disk is full (finished files are kept: free space and run it again to resume)."
    )


# -------------------------------------------------------------------------------------------- the pipeline
def _decode_tasks(job: _Job) -> Iterator[tuple[_FileState, bool, DecodeTask]]:
    """The pending files' chunks of `batch_size` images in order, each with True when it ends its file."""
    batch_size = job.settings.batch_size
    for number in job.pending:
        indexes = job.indexes(number)
        state = _FileState(number, indexes)
        for start in range(indexes.start, indexes.stop, batch_size):
            chunk = list(range(start, min(start + batch_size, indexes.stop)))
            paths = [job.inputs.paths[i] for i in chunk]
            task = DecodeTask(chunk, paths, job.params["preprocessing"], job.params["resize"])
            yield state, chunk[-1] == indexes.stop - 1, task


def _feed(job: _Job, decoder: Decoder, embedder: _Embedder, writer: _Writer) -> None:
    """Keep a window of chunks decoding while the engine embeds the oldest; a finished file goes to the writer."""
    window: collections.deque[tuple[_FileState, bool, _Pending]] = collections.deque()
    stream = _decode_tasks(job)
    for state, last, task in itertools.islice(stream, max(2, 2 * job.settings.workers)):
        window.append((state, last, decoder.submit(task)))
    while window:
        state, last, handle = window.popleft()
        waited = time.perf_counter()
        chunk = decoder.result(handle)
        embedder.stats.wait_seconds += time.perf_counter() - waited
        embedder.stats.decode_seconds += chunk.seconds
        next_task = next(stream, None)
        if next_task is not None:
            window.append((next_task[0], next_task[1], decoder.submit(next_task[2])))
        embedder.add_chunk(state, chunk)
        if last:
            rows = embedder.finish(state)
            writer.write(state.number, rows, job.keys_sha256(state.indexes), state.indexes)


def _run_pipeline(job: _Job, progress: EmbedProgress) -> tuple[_Stats, Decoder | None, float]:
    """Decode, embed and write the pending files: the stages' statistics, the decoder, the pipeline's seconds."""
    decoder = Decoder(job.settings.workers) if job.pending else None
    progress.start(job.pending_images, f"embed {job.part.label}" if job.part.count > 1 else "embed")
    embedder = _Embedder(job.engine.runner, job.inputs, job.settings, progress)
    writer = _Writer(job.folder, job.params_sha256, job.engine.model_sha256, job.markers)
    started = time.perf_counter()
    try:
        if decoder is not None:
            _feed(job, decoder, embedder, writer)
        writer.wait()
    finally:
        writer.close()
        progress.close()
        seconds = time.perf_counter() - started
        if decoder is not None:
            decoder.close()
    embedder.stats.write_seconds = writer.seconds
    return embedder.stats, decoder, seconds


# ----------------------------------------------------------------------------------------------- embed
def embed(
    input: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    engine: str | Any = "auto",
    provider: str = "auto",
    precision: str | None = None,
    pool: str = "cls",
    batch_size: int = 32,
    workers: int = 2,
    resize: str | None = None,
    dtype: str = "float32",
    l2_normalize: bool = False,
    shard: str | None = None,
    shard_size: int = 10000,
    strict: bool = False,
    progress: EmbedProgress | bool | None = True,
) -> dict[str, Any]:
    """Embed every image of `input` into `out`; returns the summary (also written to out/summary*.json).

    engine: a name ("onnx", "trt", "torch", "openvino") or an already created encoder engine object.
    resize: "center" | "squash" | None (the bundle's). shard: "I/N", this worker's part (`worker_part`).
    progress: an `EmbedProgress`; True shows its notes on stderr (no bar), False or None nothing.
    See `EmbedSettings` and the module docstring for everything else.
    """
    settings = EmbedSettings(pool, batch_size, workers, resize, dtype, l2_normalize, shard_size)
    settings.check()
    started = time.perf_counter()
    report = _progress_from(progress)
    folder = OutputFolder(out)
    inputs = list_inputs(input, exclude=out)
    part = worker_part(shard)
    opened = _open_engine(str(model), folder.root, engine, provider, precision, report)
    job = _start_job(str(model), opened, inputs, part, folder, settings)
    warning = _fit_warning(folder.root, job.pending_images, job.row_bytes)
    if warning:
        report.note(warning)
    stats, decoder, pipeline_seconds = _run_pipeline(job, report)
    summary = _summary(job, stats, decoder, time.perf_counter() - started, pipeline_seconds)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(folder.root / _summary_name(part), lambda handle: handle.write(text.encode()))
    failed = summary["counts"]["failed"]
    if strict and failed:
        reasons = ", ".join(f"{count} {reason}" for reason, count in summary["counts"]["failed_by_reason"].items())
        raise EmbedFailures(
            f"{failed} of {summary['counts']['assigned']} inputs could not be embedded ({reasons}); "
            f"the rest is written in {folder.root}.",
            hint=f"see {folder.root / 'failures'}/*.parquet for each file and its error",
            summary=summary,
        )
    return summary


# --------------------------------------------------------------------------------------------- the summary
def _summary_name(part: WorkerPart) -> str:
    return "summary.json" if part.count == 1 else f"summary-{part.index}-of-{part.count}.json"


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


def _summary(
    job: _Job, stats: _Stats, decoder: Decoder | None, wall_seconds: float, pipeline_seconds: float
) -> dict[str, Any]:
    """summary*.json: what this worker's files hold (done before or now), this run's speed, and the whole job."""
    params, engine = job.params, job.engine
    engine_section = {
        "name": engine.name,
        "description": getattr(engine.runner, "description", engine.name),
        "precision": params["precision"],
    }
    if engine.auto_line:
        engine_section["auto"] = engine.auto_line
    return {
        "format": SUMMARY_FORMAT,
        "toolkit_version": __version__,
        "worker": {"index": job.part.index, "count": job.part.count, "from": job.part.origin},
        "input": {
            "source": str(job.inputs.source),
            "kind": job.inputs.kind,
            "count": len(job.inputs),
            "skipped_without_image_extension": job.inputs.skipped,
            "sha256": job.inputs.fingerprint,
        },
        "output": {
            "folder": str(job.folder.root),
            "files": len(job.files),
            "written_now": len(job.pending),
            "resumed": len(job.files) - len(job.pending),
            "first_file": min(job.files) if job.files else None,
            "last_file": max(job.files) if job.files else None,
        },
        "counts": _counts(job.markers),
        "this_run": _this_run(stats, wall_seconds, pipeline_seconds),
        "stages": _stages(stats, decoder, job.settings),
        "engine": engine_section,
        "model": {"path": job.model, "sha256": params["model_sha256"]},
        "embedding": {
            "pool": params["pool"],
            "dtype": params["dtype"],
            "l2_normalize": params["l2_normalize"],
            "shape": params["embedding_shape"],
            "layout": "3-D [N, 1+L, D] per file (pool=tokens)"
            if params["pool"] == "tokens"
            else "2-D [N, D] per file, row-aligned with metadata/",
        },
        "preprocessing": {**params["preprocessing"], "resize": params["resize"]},
        # The whole job, not only this worker's part: a file no worker has finished yet is said, never left unsaid.
        "plan": {
            "workers": job.plan["workers"],
            "files": job.plan["files"],
            "done": job.folder.done_count(list(range(job.plan["files"])), job.params_sha256),
        },
    }


def _counts(markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """This worker's files, from their done markers: written now or by an earlier run alike."""
    failed_by_reason: dict[str, int] = {}
    for marker in markers.values():
        for reason, count in marker.get("failed_by_reason", {}).items():
            failed_by_reason[reason] = failed_by_reason.get(reason, 0) + count
    return {
        "assigned": sum(marker["stop_index"] - marker["first_index"] for marker in markers.values()),
        "embedded": sum(marker["rows"] for marker in markers.values()),
        "failed": sum(marker["failed"] for marker in markers.values()),
        "failed_by_reason": dict(sorted(failed_by_reason.items())),
    }


def _this_run(stats: _Stats, wall_seconds: float, pipeline_seconds: float) -> dict[str, Any]:
    processed = stats.embedded + stats.failed
    return {
        "images": processed,
        "embedded": stats.embedded,
        "failed": stats.failed,
        # everything, from listing the inputs and loading the engine to the summary
        "wall_seconds": round(wall_seconds, 3),
        # from the first image decoded to the last file written: the steady pipeline
        "pipeline_seconds": round(pipeline_seconds, 3),
        "images_per_second": _rate(processed, pipeline_seconds),
        "images_per_wall_second": _rate(processed, wall_seconds),
    }


def _stages(stats: _Stats, decoder: Decoder | None, settings: EmbedSettings) -> dict[str, Any]:
    return {
        "decode": {
            "workers": settings.workers,
            "worker_seconds": round(stats.decode_seconds, 3),
            "images_per_worker_second": _rate(stats.embedded + stats.failed, stats.decode_seconds),
            "main_waited_seconds": round(stats.wait_seconds, 3),
            "worker_startup_seconds": round(decoder.startup_seconds, 3) if decoder is not None else 0.0,
            "worker_restarts": decoder.restarts if decoder is not None else 0,
        },
        "inference": {
            "seconds": round(stats.inference_seconds, 3),
            "images_per_second": _rate(stats.embedded, stats.inference_seconds),
            "batches": stats.batches,
            "batch_size": settings.batch_size,
            "padded_rows": stats.padded_rows,
        },
        # in a background thread, overlapped with inference
        "write": {"seconds": round(stats.write_seconds, 3), "background": True},
    }
