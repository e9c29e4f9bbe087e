"""`mae serve`: a bundle's encoder (POST /v1/embed) and decoder (POST /v1/reconstruct) as an HTTP service.

Why FastAPI on uvicorn: an ASGI app lets one event loop hold thousands of slow clients while the CPU-heavy work
runs in threads, which is what dynamic batching needs (many requests waiting cheaply for one engine call). FastAPI
gives the OpenAPI schema from the routes and their query parameters (the request bodies and the non-JSON responses
are declared by hand, see `_openapi_*`), and uvicorn is the most used ASGI server, drains in-flight requests on
SIGTERM and accepts a socket we bound ourselves (so a port in use is one clear error before the engine loads).
LitServe and Ray Serve bring their own process models and batching, which would bypass our engines' padding and
our pre-processing; Triton needs its own model repository and C++ server. Both packages are imported only when a
server is built (`require(..., "serve", ...)`): this module imports with numpy and Pillow alone.

One process, one engine: `--workers` are decode *threads*, not uvicorn processes, because every process would load
its own engine and split the batches that make the engine fast.

The path of an embed request (shapes: S = image side, L = patches, D = width):
1. the gate (`_Gate`, pure ASGI): a body over `--max-request-mb` gets 413 (from Content-Length, or counted as it
   streams), and more requests at once than `--max-queue` get 503 + Retry-After before any body is read;
2. the route reads the images (multipart files, raw image bytes, or JSON with base64), 413 past `--max-images`;
3. admission (`Admission`): the images must fit in the `--max-queue` images admitted at once, else 503 +
   Retry-After: the server never holds more than that, whatever the load;
4. decode in a thread pool (`UploadDecoder`): the bytes go to a temporary file and through `decode_chunk`, the
   function `mae embed`'s workers run, so the pixels and the failure reasons ("not_an_image", "truncated", ...)
   are those of `mae embed`; any failure is 400 with every failing image's reason;
5. the batcher (`Batcher`, its own thread): images of many requests are grouped into one engine call of up to
   `--max-batch` images, or fewer once the oldest has waited `--max-wait-ms`; static-shape engines (TensorRT,
   OpenVINO) get the batch padded as `mae embed` pads it. Each request's latent rows [n, 1+L, D] are filled in by
   the engine thread and its future resolved on the event loop: results go back to the right caller;
6. pooling, l2 and dtype with `mae.core.numerics` in the pool (`embedding_rows`: the steps of `mae embed`), then
   JSON, or .npy bytes for `Accept: application/octet-stream`.
A client that disconnects while it waits has its images taken out of the queue and its slot freed. Reconstruction
(one image) is decoded the same way in the pool, then `mae.runtime.reconstruct.reconstruct` runs the engines on its
pixels (a `PreparedImage`) on the engine thread, between batches, so that only that thread ever runs an engine.

SIGTERM: uvicorn stops accepting, in-flight requests finish (the batcher stops waiting for more images and runs
what it has), then the process exits 0; after `--drain-seconds` the stragglers are cancelled. Errors are JSON
`{"error": kind, "message": ...}`; an unexpected exception is logged on the server and answered with 500 and no
traceback.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at definition time, and the
# routes are defined inside `_add_*_routes` with names (Request, Literal choices) that only exist there.

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mae import __version__
from mae.core.bundle import Bundle, is_bundle, not_a_bundle_error
from mae.core.errors import MAEError, require
from mae.core.masking import full_ids_keep
from mae.core.numerics import POOLS, l2_normalize, pool_tokens

from .embed import OUTPUT_DTYPES, STATIC_SHAPE_ENGINES, embedding_shape, model_checksum
from .embed_worker import DecodedChunk, DecodeTask, decode_chunk
from .engines import Engine, create_engine
from .engines.auto import choose
from .reconstruct import PreparedImage, ReconstructionResult, reconstruct

LOG = logging.getLogger("mae.serve")
WORK_ROUTES = ("/v1/embed", "/v1/reconstruct")  # the routes that take images (gated, admitted, batched)
ROUTES = ("/healthz", "/readyz", "/metrics", "/v1/model", *WORK_ROUTES)
NPY_TYPES = ("application/octet-stream", "application/x-npy")  # `Accept` values that ask for .npy bytes
NPZ_TYPES = ("application/x-npz", "application/zip")
DRAIN_BYTES = 64 << 20  # a refused body is read (and dropped) up to this, so the client sees the answer, not a reset
CLIENT_GONE = 499  # nginx's "client closed request": only the metrics ever see it
Pool = Literal[POOLS]  # type: ignore[valid-type]
OutputDType = Literal[tuple(OUTPUT_DTYPES)]  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ServeSettings:
    """How `mae serve` runs: the model, where it listens, how it batches, and what it refuses."""

    model: str  # a bundle directory
    engine: str = "auto"  # a name for `create_engine`, or auto (`mae.runtime.engines.auto.choose`, for embeddings)
    provider: str = "auto"  # ONNX Runtime execution provider
    precision: str | None = None  # None: auto's choice, else fp32
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed)
    max_batch: int = 32  # most images per engine call
    max_wait_ms: float = 5.0  # how long the oldest waiting image waits for more before its batch runs
    workers: int = 2  # decode threads
    max_queue: int = 256  # images admitted at once (decoding, waiting or in the engine); beyond: 503
    max_images: int = 64  # most images in one request; beyond: 413
    max_request_mb: float = 32.0  # largest request body; beyond: 413
    resize: str | None = None  # "center" | "squash" | None (the bundle's)
    drain_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    log_level: str = "info"  # uvicorn's

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * (1 << 20))

    def check(self) -> None:
        if self.max_batch < 1 or self.workers < 1 or self.max_queue < 1 or self.max_images < 1:
            raise MAEError("--max-batch, --workers, --max-queue and --max-images must be >= 1")
        if self.max_wait_ms < 0 or self.drain_seconds < 0 or self.max_request_mb <= 0:
            raise MAEError("--max-wait-ms and --drain-seconds must be >= 0, --max-request-mb > 0")
        if self.max_images > self.max_queue:
            raise MAEError(
                f"--max-images {self.max_images} is more than --max-queue {self.max_queue}: such a request could "
                "never be admitted.",
                hint=f"use --max-queue {self.max_images} or more, or fewer --max-images",
            )
        if not 0 <= self.port <= 65535:
            raise MAEError(f"--port {self.port} must be in 0..65535")


# -------------------------------------------------------------------------------------------------- errors
class HTTPProblem(Exception):
    """An answer other than 200: `status`, a short `kind` (the metrics label) and a message for the client."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> bytes:
        return json.dumps({"error": self.kind, "message": self.message, **self.extra}).encode()


def _image_failures(chunk: DecodedChunk, names: list[str]) -> HTTPProblem:
    """400 naming every image that could not be decoded, with `mae embed`'s reason for each."""
    failures = [
        {"index": index, "name": names[index], "reason": reason, "message": message}
        for index, reason, message in chunk.failures
    ]
    first = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    message = f"image {first['index']} ({first['name']}): {first['reason']}: {first['message']}{more}"
    return HTTPProblem(400, "bad_image", message, extra={"failures": failures})


# --------------------------------------------------------------------------------------------------- model
@dataclass
class LoadedModel:
    """The engines that serve, created and warmed before the first request, and what /v1/model says of them."""

    bundle: Bundle
    encoder: Engine
    decoder: Engine | None  # None: the bundle has no decoder (/v1/reconstruct answers 501)
    engine: str  # the engine's name, as `mae embed` records it
    precision: str
    resize: str  # the resize mode every image gets ("center" | "squash")
    model_sha256: str  # of what the encoder runs (`mae.runtime.embed.model_checksum`, as `mae embed` records it)
    pad: bool  # static-shape engine: batches padded to max_batch, as `mae embed` pads them
    notes: list[str] = field(default_factory=list)  # what auto chose, and why


def load_model(settings: ServeSettings) -> LoadedModel:
    """Choose (auto), create and warm the encoder, and the decoder when the bundle has one."""
    path = Path(settings.model)
    if not path.exists():
        raise MAEError(f"{path} does not exist.", hint="pass a bundle directory made by `mae export`")
    if not is_bundle(path):
        raise not_a_bundle_error(path, settings.engine)
    bundle = Bundle.load(path)
    engine, precision, extra, notes = settings.engine, settings.precision, {}, []
    if engine == "auto":  # the embedding choice: the encoder is what most requests run
        choice = choose(str(bundle.path), "embed", precision)
        engine, precision, extra, notes = choice.engine, choice.precision, dict(choice.options), [choice.line()]
    precision = precision or "fp32"
    model_sha256 = model_checksum(str(bundle.path), engine, precision)  # reads the graph in full, checks it
    options = {"provider": settings.provider, "device": "auto", **extra}
    encoder = create_engine(engine, str(bundle.path), "encoder", precision=precision, **options)
    decoder = None
    if bundle.has_decoder:
        # As `mae reconstruct`: a bundle without this precision's decoder (int8 encoders) runs the fp32 decoder.
        decoder_precision = precision if engine == "torch" or bundle.has_graph("decoder", precision) else "fp32"
        decoder = create_engine(engine, str(bundle.path), "decoder", precision=decoder_precision, **options)
    loaded = LoadedModel(
        bundle=bundle,
        encoder=encoder,
        decoder=decoder,
        engine="trt" if engine == "tensorrt" else engine,
        precision=precision,
        resize=settings.resize or bundle.preprocessing.resize,
        model_sha256=model_sha256,
        pad=engine in STATIC_SHAPE_ENGINES,
        notes=notes,
    )
    _warm(loaded, settings.max_batch)
    return loaded


def _warm(model: LoadedModel, max_batch: int) -> None:
    """One call at every batch shape the batcher will use first (allocations, kernel choice, TensorRT profiles),
    so that the first client does not pay for it and /readyz means it."""
    size, length = model.bundle.config.img_size, model.bundle.config.num_patches
    for batch in [max_batch] if model.pad else sorted({1, max_batch}):
        pixel_values = np.zeros((batch, 3, size, size), np.float32)  # [B, 3, S, S]
        model.encoder.run({"pixel_values": pixel_values, "ids_keep": full_ids_keep(batch, length)})
    if model.decoder is not None:
        picture = np.zeros((size, size, 3), np.uint8)
        reconstruct([picture], str(model.bundle.path), engines=(model.encoder, model.decoder), resize=model.resize)


def model_description(model: LoadedModel, settings: ServeSettings) -> dict[str, Any]:
    """GET /v1/model: the bundle's config and checksums, the engines and precision in use, the limits."""
    bundle, config = model.bundle, model.bundle.config
    return {
        "bundle": bundle.path.name,
        "toolkit_version": __version__,
        "bundle_toolkit_version": bundle.manifest.get("toolkit_version"),
        "config": config.to_dict(),
        "preprocessing": {**bundle.preprocessing.to_dict(), "resize": model.resize},
        "engine": {
            "name": model.engine,
            "precision": model.precision,
            "encoder": model.encoder.description,
            "decoder": None if model.decoder is None else model.decoder.description,
            "notes": model.notes,
        },
        "checksums": {
            "model_sha256": model.model_sha256,  # what `mae embed` records as model.sha256
            "graphs": bundle.manifest.get("graphs", {}),
            "source": bundle.manifest.get("source", {}),
        },
        "embedding_shapes": {pool: embedding_shape(config, pool) for pool in POOLS},
        "limits": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            "max_images": settings.max_images,
            "max_request_bytes": settings.max_request_bytes,
        },
    }


# ------------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class Upload:
    name: str  # the client's file name, or "image N"
    data: bytes


class UploadDecoder:
    """Uploaded bytes -> float32 pixel values [n, 3, S, S] through `decode_chunk`, the very function `mae embed`'s
    workers run on files (pre-processing and failure reasons alike). The bytes go to a file first because that
    function, and the pre-processing under it, read files; in /dev/shm that costs a memory copy."""

    def __init__(self, model: LoadedModel) -> None:
        self.preprocessing = model.bundle.preprocessing.to_dict()
        self.resize = model.resize
        shm = Path("/dev/shm")
        self.folder = Path(tempfile.mkdtemp(prefix="mae-serve-", dir=shm if os.access(shm, os.W_OK) else None))

    def write(self, uploads: list[Upload]) -> list[Path]:
        """Each upload in a file of its own; all of them removed again if one cannot be written (e.g. /dev/shm
        full: a 503 the client may retry, never files left behind that would fill it further)."""
        paths = [self.folder / f"{uuid.uuid4().hex}-{index}" for index in range(len(uploads))]
        try:
            for path, upload in zip(paths, uploads, strict=True):
                path.write_bytes(upload.data)
        except OSError as exc:
            for path in paths:
                path.unlink(missing_ok=True)
            LOG.warning("cannot store an upload in %s: %s", self.folder, exc)
            raise HTTPProblem(
                503, "no_space", f"the server cannot hold the upload now ({exc.strerror or exc}); retry later",
                headers={"Retry-After": "1"},
            ) from exc  # fmt: skip
        return paths

    def decode(self, uploads: list[Upload]) -> DecodedChunk:
        """Decode in the calling (pool) thread; failure messages name the client's file, not ours."""
        paths = self.write(uploads)
        try:
            task = DecodeTask(list(range(len(uploads))), [str(path) for path in paths], self.preprocessing, self.resize)
            chunk = decode_chunk(task)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)
        chunk.failures = [
            (index, reason, message.replace(str(paths[index]), uploads[index].name))
            for index, reason, message in chunk.failures
        ]
        return chunk

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- batcher
class Ticket:
    """One request's images in the batcher: the engine thread fills `latent` row by row, then resolves `future`
    on the request's event loop."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.count = count
        self.remaining = count  # touched by the engine thread only
        self.latent: np.ndarray | None = None  # [n, 1+L, D], allocated at the first row
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.failed = False  # set by the engine thread: the rest of its rows are not run

    def fill(self, row: int, latent_row: np.ndarray) -> None:
        if self.latent is None:
            self.latent = np.empty((self.count, *latent_row.shape), np.float32)
        self.latent[row] = latent_row
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(self._settle, self.latent, None)

    def fail(self, error: BaseException) -> None:
        self.failed = True
        self.loop.call_soon_threadsafe(self._settle, None, error)

    def _settle(self, latent: np.ndarray | None, error: BaseException | None) -> None:
        if self.future.done():  # cancelled: the client left
            return
        if error is None:
            self.future.set_result(latent)
        else:
            self.future.set_exception(error)


@dataclass
class _Item:
    ticket: Ticket
    row: int
    pixels: np.ndarray  # [3, S, S]
    queued_at: float  # time.monotonic()


@dataclass
class _Call:
    """Work other than an embed batch, run on the engine thread between batches (reconstruction)."""

    function: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """The engine thread: images of many requests grouped into calls of up to `max_batch` images, or fewer once the
    oldest has waited `max_wait` seconds. Only this thread runs the engines."""

    def __init__(self, model: LoadedModel, max_batch: int, max_wait: float, metrics: "ServeMetrics") -> None:
        self.engine = model.encoder
        self.pad = model.pad
        self.num_patches = model.bundle.config.num_patches
        self.embed_dim = model.bundle.config.embed_dim
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.metrics = metrics
        self.queue: deque[_Item] = deque()
        self.calls: deque[_Call] = deque()
        self.ready = threading.Condition()
        self.flushing = False  # draining: run what is queued without waiting for more
        self.stopping = False
        self.images_per_second = 0.0  # moving average of the engine's speed, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="mae-serve-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, pixel_values: np.ndarray, loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue one request's images [n, 3, S, S] together (a batch never sees half of them arrive)."""
        ticket = Ticket(len(pixel_values), loop)
        now = time.monotonic()
        with self.ready:
            self.queue.extend(_Item(ticket, row, pixels, now) for row, pixels in enumerate(pixel_values))
            self.metrics.queue_depth.set(len(self.queue))
            self.ready.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client left: its images leave the queue (rows already in the engine are dropped when done)."""
        ticket.future.cancel()
        with self.ready:
            self.queue = deque(item for item in self.queue if item.ticket is not ticket)
            self.metrics.queue_depth.set(len(self.queue))

    def call(self, function: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """Run `function` on the engine thread (between batches); its result or exception comes back in the future."""
        work = _Call(function, loop.create_future(), loop)
        with self.ready:
            self.calls.append(work)
            self.ready.notify()
        return work.future

    def flush(self) -> None:
        with self.ready:
            self.flushing = True
            self.ready.notify()

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        with self.ready:
            self.stopping = self.flushing = True
            self.ready.notify()
        self.thread.join()

    def _next(self) -> list[_Item] | _Call | None:
        """The next work: a call, or a batch once it is full or its oldest image has waited long enough."""
        with self.ready:
            while True:
                if self.calls:
                    return self.calls.popleft()
                if not self.queue:
                    if self.stopping:
                        return None
                    self.ready.wait()
                    continue
                left = self.queue[0].queued_at + self.max_wait - time.monotonic()
                if len(self.queue) >= self.max_batch or left <= 0 or self.flushing:
                    batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
                    self.metrics.queue_depth.set(len(self.queue))
                    return batch
                self.ready.wait(left)

    def _loop(self) -> None:
        while (work := self._next()) is not None:
            if isinstance(work, _Call):
                if not work.future.cancelled():  # its client left while it waited
                    _run_call(work)
            else:
                try:
                    self._run(work)
                except Exception as exc:  # the engine failed: these requests get 500, the next batch may work
                    LOG.exception("the engine failed on a batch of %d images", len(work))
                    for ticket in {id(item.ticket): item.ticket for item in work}.values():
                        ticket.fail(exc)
                    with self.ready:  # the failed requests' other rows (a request larger than a batch) never run
                        self.queue = deque(item for item in self.queue if not item.ticket.failed)
                        self.metrics.queue_depth.set(len(self.queue))

    def _run(self, batch: list[_Item]) -> None:
        """One engine call, the way `mae embed` makes it: stacked float32 pixels, every patch kept, padded with
        copies of the last image for static-shape engines; each row goes back to its request."""
        started = time.monotonic()
        pixel_values = np.stack([item.pixels for item in batch])  # [b, 3, S, S]
        real = len(batch)
        if self.pad and real < self.max_batch:
            pixel_values = np.concatenate([pixel_values, np.repeat(pixel_values[-1:], self.max_batch - real, axis=0)])
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        ids_keep = full_ids_keep(len(pixel_values), self.num_patches)  # [B, L]: every patch, in order
        latent = np.asarray(self.engine.run({"pixel_values": pixel_values, "ids_keep": ids_keep})["latent"])
        expected = (len(pixel_values), 1 + self.num_patches, self.embed_dim)  # [B, 1+L, D]
        if latent.shape != expected:
            raise MAEError(f"The engine returned latent {latent.shape}, expected {expected}.")
        finished = time.monotonic()
        for index, item in enumerate(batch):
            if not item.ticket.future.cancelled():
                item.ticket.fill(item.row, latent[index])
            self.metrics.queue_seconds.observe(started - item.queued_at)
        seconds = finished - started
        self.metrics.batch_size.observe(real)
        self.metrics.engine_seconds.observe(seconds)
        speed = real / max(seconds, 1e-9)
        self.images_per_second = speed if not self.images_per_second else 0.8 * self.images_per_second + 0.2 * speed


def _run_call(work: _Call) -> None:
    try:
        result, error = work.function(), None
    except Exception as exc:  # handed to the waiting request, which turns it into an answer
        result, error = None, exc

    def settle() -> None:
        if work.future.done():
            return
        if error is None:
            work.future.set_result(result)
        else:
            work.future.set_exception(error)

    work.loop.call_soon_threadsafe(settle)


# ----------------------------------------------------------------------------------------------- metrics
class ServeMetrics:
    """GET /metrics: Prometheus text from a registry of this server's own (never the process-global one)."""

    def __init__(self, max_batch: int) -> None:
        prom = require("prometheus_client", "serve", "mae serve's /metrics")
        prom.disable_created_metrics()  # no *_created series: they double the output and say nothing here
        self.prom = prom
        self.registry = registry = prom.CollectorRegistry()
        seconds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        sizes = sorted({1, *(2**k for k in range(max_batch.bit_length() + 1) if 2**k <= max_batch), max_batch})
        self.requests = prom.Counter(
            "mae_serve_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=registry
        )
        self.errors = prom.Counter(
            "mae_serve_errors", "Requests refused or failed, by kind", ["kind"], registry=registry
        )
        self.images = prom.Counter("mae_serve_images", "Images answered, by route", ["route"], registry=registry)
        self.latency = prom.Histogram(
            "mae_serve_request_seconds", "Request latency, by route", ["route"], buckets=seconds, registry=registry
        )
        self.batch_size = prom.Histogram(
            "mae_serve_batch_size", "Images per engine call (padding not counted)", buckets=sizes, registry=registry
        )
        self.engine_seconds = prom.Histogram(
            "mae_serve_engine_seconds", "Seconds per engine call", buckets=seconds, registry=registry
        )
        self.queue_seconds = prom.Histogram(
            "mae_serve_queue_seconds", "Seconds an image waited for its engine call", buckets=seconds, registry=registry
        )
        self.queue_depth = prom.Gauge("mae_serve_queue_depth", "Images waiting for the engine", registry=registry)
        self.admitted = prom.Gauge(
            "mae_serve_admitted_images", "Images admitted: decoding, waiting or in the engine", registry=registry
        )
        self.ready = prom.Gauge("mae_serve_ready", "1 when /readyz answers 200", registry=registry)

    def render(self) -> bytes:
        return self.prom.generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        return self.prom.CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------------------------- admission
class Admission:
    """At most `limit` images admitted at once (decoding, waiting or in the engine): the bound that keeps memory
    flat under any load. Used from the event loop only."""

    def __init__(self, limit: int, metrics: ServeMetrics, batcher: Batcher) -> None:
        self.limit = limit
        self.images = 0
        self.requests = 0  # requests past the gate (bodies being read or images admitted), also at most `limit`
        self.metrics = metrics
        self.batcher = batcher

    def retry_after(self) -> int:
        """Seconds until the admitted images are likely done, from the engine's recent speed (1 to 60)."""
        speed = self.batcher.images_per_second
        return 1 if speed <= 0 else max(1, min(60, math.ceil(self.images / speed)))

    def overloaded(self, what: str) -> HTTPProblem:
        return HTTPProblem(
            503,
            "overloaded",
            f"the server is full ({what}); retry later",
            headers={"Retry-After": str(self.retry_after())},
        )

    def admit(self, count: int) -> None:
        if self.images + count > self.limit:
            raise self.overloaded(f"{self.images} of {self.limit} images admitted, this request has {count}")
        self.images += count
        self.metrics.admitted.set(self.images)

    def release(self, count: int) -> None:
        self.images -= count
        self.metrics.admitted.set(self.images)


# ------------------------------------------------------------------------------------------------ results
def embedding_rows(latent: np.ndarray, pool: str, l2: bool, dtype: str) -> np.ndarray:
    """latent [n, 1+L, D] -> the rows `mae embed` writes: pooled, unit length when asked, cast last."""
    vectors = pool_tokens(latent.astype(np.float32, copy=False), pool)  # [n, D], [n, 2D] or [n, 1+L, D]
    if l2:
        vectors = l2_normalize(vectors)
    return vectors.astype(OUTPUT_DTYPES[dtype])


@dataclass(frozen=True)
class Reply:
    """A 200 answer, framework-free: the bytes, their media type and extra headers."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbedOptions:
    pool: str = "cls"
    l2_normalize: bool = False
    dtype: str = "float32"
    npy: bool = False  # .npy bytes instead of JSON


def embeddings_reply(latent: np.ndarray, chunk: DecodedChunk, names: list[str], options: EmbedOptions, model: dict):
    """The embed answer: .npy bytes (shape and settings in headers) or JSON with a row per image."""
    vectors = embedding_rows(latent, options.pool, options.l2_normalize, options.dtype)
    headers = {
        "X-MAE-Shape": ",".join(map(str, vectors.shape)),
        "X-MAE-Pool": options.pool,
        "X-MAE-Model-SHA256": model["sha256"],
    }
    if options.npy:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(vectors), allow_pickle=False)
        return Reply(buffer.getvalue(), "application/octet-stream", headers)
    payload = {
        "model": model,
        "pool": options.pool,
        "l2_normalize": options.l2_normalize,
        "dtype": options.dtype,
        "shape": list(vectors.shape),
        "images": [{"name": name, "width": w, "height": h} for name, (w, h) in zip(names, chunk.sizes, strict=True)],
        "embeddings": vectors.tolist(),  # float32 -> float -> shortest repr: reads back to the same float32
    }
    return Reply(json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(), "application/json", headers)


def reconstruction_reply(result: ReconstructionResult, name: str, npz: bool) -> Reply:
    """The 4-panel PNG, or the arrays `mae reconstruct --save-arrays` writes (npz); PSNR and MSE on the removed
    patches in headers either way."""
    result.names = [name]  # the picture's row label: the client's name, not our temporary file
    psnr, mse = float(result.metrics.psnr[0]), float(result.metrics.mse[0])
    headers = {"X-MAE-Mask-Ratio": str(result.mask_ratio)}
    if math.isfinite(mse):  # NaN when nothing was removed (mask_ratio 0): no measure, so no header
        headers.update({"X-MAE-PSNR": f"{psnr:.4f}", "X-MAE-MSE": f"{mse:.6f}"})
    buffer = io.BytesIO()
    if npz:
        np.savez(buffer, **result.arrays(), psnr=result.metrics.psnr, mse=result.metrics.mse)
        return Reply(buffer.getvalue(), "application/x-npz", headers)
    result.picture().save(buffer, format="PNG")
    return Reply(buffer.getvalue(), "image/png", headers)


# ------------------------------------------------------------------------------------------------- service
class Service:
    """What the routes call, without any web framework: admission, decoding, batching and the answers."""

    def __init__(self, settings: ServeSettings, model: LoadedModel, notes: Callable[[str], None]) -> None:
        self.settings = settings
        self.model = model
        self.notes = notes
        self.metrics = ServeMetrics(settings.max_batch)
        self.batcher = Batcher(model, settings.max_batch, settings.max_wait_ms / 1000.0, self.metrics)
        self.admission = Admission(settings.max_queue, self.metrics, self.batcher)
        self.decoder = UploadDecoder(model)
        self.pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="mae-serve-decode")
        self.description = model_description(model, settings)
        self.model_summary = {"sha256": model.model_sha256, "engine": model.engine, "precision": model.precision}
        self.draining = False
        self.address = ""

    @property
    def ready(self) -> bool:
        return self.batcher.alive and not self.draining

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 and the batcher stops waiting for more images."""
        self.draining = True
        self.metrics.ready.set(0)
        self.batcher.flush()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any):  # noqa: ANN201 - the ASGI lifespan protocol
        self.batcher.start()
        self.metrics.ready.set(1)
        self.notes(f"mae serve: listening on {self.address} (docs: {self.address}/docs)")
        try:
            yield
        finally:
            self.metrics.ready.set(0)
            self.batcher.stop()
            self.pool.shutdown(wait=True)
            self.decoder.close()

    async def in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def embed(self, uploads: list[Upload], options: EmbedOptions, gone: Callable[[], Awaitable[None]]) -> Reply:
        """Admit, decode (pool), batch (engine thread), answer (pool); `gone` finishes if the client leaves."""
        self.admission.admit(len(uploads))
        ticket = None
        try:
            chunk = await self.in_pool(self.decoder.decode, uploads)
            names = [upload.name for upload in uploads]
            if chunk.failures:
                raise _image_failures(chunk, names)
            ticket = self.batcher.submit(chunk.pixel_values, asyncio.get_running_loop())
            latent = await _unless_gone(ticket.future, gone)  # [n, 1+L, D]
            reply = await self.in_pool(embeddings_reply, latent, chunk, names, options, self.model_summary)
            self.metrics.images.labels("/v1/embed").inc(len(uploads))
            return reply
        finally:
            if ticket is not None:  # its rows leave the queue before its slots are freed (a no-op once done)
                self.batcher.cancel(ticket)
            self.admission.release(len(uploads))

    async def reconstruct(
        self, upload: Upload, mask_ratio: float, seed: int, npz: bool, gone: Callable[[], Awaitable[None]]
    ) -> Reply:
        """One image: decoded as embed decodes it (400 with the same reasons), reconstructed on the engine thread."""
        model = self.model
        if model.decoder is None:
            raise HTTPProblem(501, "no_decoder", f"the bundle {model.bundle.path.name} has no decoder")
        self.admission.admit(1)
        try:
            chunk = await self.in_pool(self.decoder.decode, [upload])
            if chunk.failures:
                raise _image_failures(chunk, [upload.name])
            image = PreparedImage(upload.name, chunk.sizes[0], chunk.pixel_values[0])  # decoded once, in the pool
            engines = (model.encoder, model.decoder)

            def run() -> ReconstructionResult:  # the engines only: decoding stays off the engine thread
                return reconstruct(
                    [image], str(model.bundle.path), mask_ratio=mask_ratio, seed=seed, engines=engines,
                )  # fmt: skip

            future = self.batcher.call(run, asyncio.get_running_loop())
            try:
                result = await _unless_gone(future, gone)
            finally:
                future.cancel()  # a no-op once done; else the engine thread skips it
            reply = await self.in_pool(reconstruction_reply, result, upload.name, npz)
            self.metrics.images.labels("/v1/reconstruct").inc()
            return reply
        finally:
            self.admission.release(1)


class ClientGone(Exception):
    """The client disconnected while its request waited."""


async def _unless_gone(future: asyncio.Future, gone: Callable[[], Awaitable[None]]) -> Any:
    """The future's result, or ClientGone as soon as `gone()` returns: the client disconnected (the caller then
    takes its work back from the batcher)."""
    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if future in done:
        return future.result()
    raise ClientGone()


async def wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has gone. Call it only once the body is read: later messages are disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -------------------------------------------------------------------------------------------- request bodies
async def read_uploads(request: Any, max_images: int) -> list[Upload]:
    """The images of a request: multipart files (any field name), JSON {"images": [base64, ...]}, or the body
    itself (image/* or application/octet-stream). 413 past `max_images`, 400 with none or a malformed body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        uploads = await _multipart_uploads(request, max_images)
    elif media_type == "application/json":
        uploads = _json_uploads(await request.body(), max_images)
    elif media_type.startswith("image/") or media_type in ("application/octet-stream", ""):
        body = await request.body()
        uploads = [Upload("image 0", body)] if body else []
    else:
        raise HTTPProblem(
            415,
            "unsupported_media_type",
            f"a body of {media_type} cannot hold images: send multipart/form-data files, image/* or "
            'application/octet-stream bytes, or application/json {"images": [base64, ...]}',
        )
    if not uploads:
        raise HTTPProblem(400, "no_images", "the request holds no image")
    if len(uploads) > max_images:
        raise _too_many(len(uploads), max_images)
    return uploads


def _too_many(count: int | None, max_images: int) -> HTTPProblem:
    what = f"{count} images" if count is not None else "more images"
    return HTTPProblem(413, "too_many_images", f"{what} in one request; this server takes at most {max_images}")


async def _multipart_uploads(request: Any, max_images: int) -> list[Upload]:
    from starlette.datastructures import UploadFile  # fastapi's own foundation: here only when serving
    from starlette.formparsers import MultiPartException, MultiPartParser

    try:
        form = await MultiPartParser(request.headers, request.stream(), max_files=max_images).parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many(None, max_images) from exc
        raise HTTPProblem(400, "bad_request", f"malformed multipart body: {exc.message}") from exc
    try:
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename or f"image {len(uploads)}", await value.read()))
        return uploads
    finally:
        await form.close()


def _json_uploads(body: bytes, max_images: int) -> list[Upload]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPProblem(400, "bad_request", f"the body is not JSON: {exc}") from exc
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise HTTPProblem(400, "bad_request", 'JSON bodies are {"images": ["<base64>", ...]}')
    if len(images) > max_images:
        raise _too_many(len(images), max_images)
    uploads = []
    for index, text in enumerate(images):
        if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
            text = text.split(",", 1)[1]
        try:
            uploads.append(Upload(f"image {index}", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise HTTPProblem(400, "bad_request", f"images[{index}] is not base64: {exc}") from exc
    return uploads


def wants(request: Any, media_types: tuple[str, ...]) -> bool:
    accept = request.headers.get("accept", "").lower()
    return any(media_type in accept for media_type in media_types)


# ------------------------------------------------------------------------------------------------ the gate
class _Gate:
    """Pure ASGI, around the whole app: request counts and latency per route and status, and for the image routes
    the body limit (413) and the request bound (503) before a byte of the body is kept."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]

        async def noted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            if route in WORK_ROUTES and scope["method"] == "POST":
                await self._work(scope, receive, noted_send)
            else:
                await self.app(scope, receive, noted_send)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _work(self, scope: dict, receive: Callable, send: Callable) -> None:
        service, limit = self.service, self.service.settings.max_request_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            problem = HTTPProblem(413, "too_large", f"the request has {int(length)} bytes, more than {limit}")
            await _refuse(problem, receive, send, service.metrics)
            return
        admission = service.admission
        if admission.requests >= service.settings.max_queue:
            await _refuse(admission.overloaded(f"{admission.requests} requests"), receive, send, service.metrics)
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body, or a Content-Length that lied
                raise HTTPProblem(413, "too_large", f"the request has more than {limit} bytes")
            return message

        admission.requests += 1
        try:
            await self.app(scope, counted_receive, send)
        finally:
            admission.requests -= 1


async def _refuse(problem: HTTPProblem, receive: Callable, send: Callable, metrics: ServeMetrics) -> None:
    """Answer `problem` without the app. The body is read and dropped first (up to DRAIN_BYTES): a server that
    answers and closes while the client still sends makes the client see a reset instead of the answer."""
    drained, more = 0, True
    while more and drained <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            break
        drained += len(message.get("body", b""))
        more = message.get("more_body", False)
    metrics.errors.labels(problem.kind).inc()
    headers = [
        (b"content-type", b"application/json"),
        *((k.lower().encode(), v.encode()) for k, v in problem.headers.items()),
    ]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": problem.body()})


# --------------------------------------------------------------------------------------------------- OpenAPI
_BINARY = {"type": "string", "format": "binary"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a short kind: too_large, too_many_images, bad_image, ..."},
        "message": {"type": "string"},
        "failures": {
            "type": "array",
            "description": "bad_image: each image that could not be decoded, with mae embed's reason",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "name": {"type": "string"},
                    "reason": {"type": "string", "examples": ["not_an_image", "truncated", "empty", "too_large"]},
                    "message": {"type": "string"},
                },
            },
        },
    },
}


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds until the queue is likely to have room",
                "schema": {"type": "integer"},
            }
        }
    return response


def _openapi_images_body(many: bool) -> dict[str, Any]:
    """The request body of the image routes, in the three forms `read_uploads` reads."""
    files = {"type": "array", "items": _BINARY} if many else _BINARY
    base64_images = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}, "minItems": 1}
    if not many:
        base64_images["maxItems"] = 1
    what = "one or more images" if many else "one image"
    return {
        "required": True,
        "description": f"{what}: multipart files (any field name), the image bytes themselves, or JSON with base64",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"images": files}}},
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
            "application/json": {
                "schema": {"type": "object", "required": ["images"], "properties": {"images": base64_images}}
            },
        },
    }


_EMBED_JSON = {
    "type": "object",
    "required": ["model", "pool", "l2_normalize", "dtype", "shape", "images", "embeddings"],
    "properties": {
        "model": {
            "type": "object",
            "properties": {"sha256": {"type": "string"}, "engine": {"type": "string"}, "precision": {"type": "string"}},
        },
        "pool": {"type": "string", "enum": list(POOLS)},
        "l2_normalize": {"type": "boolean"},
        "dtype": {"type": "string", "enum": list(OUTPUT_DTYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}, "description": "[N, D], [N, 2D] or [N, 1+L, D]"},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"}},
            },
        },
        "embeddings": {"type": "array", "description": "one row per image, in request order", "items": {}},
    },
}
_IMAGE_ERRORS = {
    400: _error("an image could not be decoded (every failing image with its reason), or a malformed body"),
    413: _error("the body is larger than --max-request-mb, or holds more images than --max-images"),
    415: _error("a body type that cannot hold images"),
    500: _error("an unexpected failure (logged on the server)"),
    503: _error("the queue is full (--max-queue): retry after Retry-After seconds", retry_after=True),
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}}


# -------------------------------------------------------------------------------------------------- the app
def build_app(service: Service) -> Any:
    """The FastAPI app over `service` (fastapi imported here: only a server needs it)."""
    fastapi = require("fastapi", "serve", "mae serve")
    require("fastapi.exception_handlers", "serve", "mae serve")  # submodules the handlers below use
    require("python_multipart", "serve", "Reading multipart uploads")  # python-multipart, which starlette parses with
    from starlette.requests import ClientDisconnect  # a client that left while its body was read

    app = fastapi.FastAPI(
        title="mae serve",
        version=__version__,
        description="A Masked Autoencoder bundle's encoder (embeddings) and decoder (reconstructions), batched.",
        lifespan=service.lifespan,
        redoc_url=None,
    )
    app.add_middleware(_Gate, service=service)

    async def problem(request: Any, exc: HTTPProblem) -> Any:
        service.metrics.errors.labels(exc.kind).inc()
        return fastapi.responses.Response(exc.body(), exc.status, exc.headers, media_type="application/json")

    async def gone(request: Any, exc: Exception) -> Any:
        return await problem(request, HTTPProblem(CLIENT_GONE, "disconnected", "the client disconnected"))

    async def unexpected(request: Any, exc: Exception) -> Any:
        # Logged with its traceback by the server (starlette re-raises it); the client gets one generic line.
        service.metrics.errors.labels("internal").inc()
        body = json.dumps({"error": "internal", "message": "internal error (see the server log)"}).encode()
        return fastapi.responses.Response(body, 500, media_type="application/json")

    async def invalid(request: Any, exc: Exception) -> Any:  # FastAPI's own 422 (what the OpenAPI schema says)
        service.metrics.errors.labels("invalid_parameter").inc()
        return await fastapi.exception_handlers.request_validation_exception_handler(request, exc)

    app.add_exception_handler(HTTPProblem, problem)
    app.add_exception_handler(fastapi.exceptions.RequestValidationError, invalid)
    app.add_exception_handler(ClientGone, gone)
    app.add_exception_handler(ClientDisconnect, gone)
    app.add_exception_handler(Exception, unexpected)
    _add_status_routes(app, service, fastapi)
    _add_embed_route(app, service, fastapi)
    _add_reconstruct_route(app, service, fastapi)
    return app


def _json(fastapi: Any, payload: Any, status: int = 200) -> Any:
    return fastapi.responses.Response(json.dumps(payload).encode(), status, media_type="application/json")


def _reply(fastapi: Any, reply: Reply) -> Any:
    return fastapi.responses.Response(reply.body, 200, reply.headers, media_type=reply.media_type)


def _add_status_routes(app: Any, service: Service, fastapi: Any) -> None:
    status_json = {"content": {"application/json": {"schema": _STATUS}}}

    @app.get("/healthz", response_model=None, responses={200: {"description": "the process is up", **status_json}})
    async def healthz() -> Any:
        """Liveness: the process answers."""
        return _json(fastapi, {"status": "ok"})

    readiness = {200: {"description": "ready", **status_json}, 503: {"description": "not ready", **status_json}}

    @app.get("/readyz", response_model=None, responses=readiness)
    async def readyz() -> Any:
        """Readiness: the engines are loaded and warmed, the engine thread runs, and the server is not draining."""
        if service.ready:
            return _json(fastapi, {"status": "ready"})
        return _json(fastapi, {"status": "draining" if service.draining else "engine stopped"}, 503)

    metrics_text = {
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    }

    @app.get(
        "/metrics", response_model=None, response_class=fastapi.responses.PlainTextResponse, responses=metrics_text
    )
    async def metrics() -> Any:
        """Requests and errors by kind, batch sizes, queue depth, latency histograms (Prometheus text)."""
        return fastapi.responses.Response(service.metrics.render(), media_type=service.metrics.content_type)

    described = {200: {"description": "the model", "content": {"application/json": {"schema": {"type": "object"}}}}}

    @app.get("/v1/model", response_model=None, responses=described)
    async def model() -> Any:
        """The bundle's config, pre-processing and checksums, the engines and precision in use, the limits."""
        return _json(fastapi, service.description)


def _add_embed_route(app: Any, service: Service, fastapi: Any) -> None:
    from fastapi import Query, Request

    responses = {
        200: {
            "description": "one vector (or token matrix) per image, in request order",
            "headers": {
                "X-MAE-Shape": {"description": "the array's shape, comma-separated", "schema": {"type": "string"}},
                "X-MAE-Pool": {"description": "the pooling used", "schema": {"type": "string"}},
                "X-MAE-Model-SHA256": {"description": "sha256 of the model that ran", "schema": {"type": "string"}},
            },
            "content": {
                "application/json": {"schema": _EMBED_JSON},
                "application/octet-stream": {
                    "schema": {**_BINARY, "description": "with Accept: application/octet-stream: a .npy array [N, ...]"}
                },
            },
        },
        **_IMAGE_ERRORS,
    }

    @app.post(
        "/v1/embed", response_model=None, responses=responses, openapi_extra={"requestBody": _openapi_images_body(True)}
    )
    async def embed(
        request: Request,
        pool: Pool = Query("cls", description="cls token, mean of the patch tokens, both, or every token"),
        l2_normalize: bool = Query(False, description="unit-length vectors (each token for pool=tokens)"),
        dtype: OutputDType = Query("float32", description="of the vectors"),
    ) -> Any:
        """Embed images exactly as `mae embed` does (same pre-processing, engine, pooling, l2 and dtype)."""
        uploads = await read_uploads(request, service.settings.max_images)
        options = EmbedOptions(pool, l2_normalize, dtype, npy=wants(request, NPY_TYPES))
        gone = functools.partial(wait_for_disconnect, request.receive)
        return _reply(fastapi, await service.embed(uploads, options, gone))


def _add_reconstruct_route(app: Any, service: Service, fastapi: Any) -> None:
    from fastapi import Query, Request

    headers = {
        name: {"description": text, "schema": {"type": "number"}}
        for name, text in (
            ("X-MAE-PSNR", "PSNR (dB) on the removed patches (absent when none is removed: mask_ratio 0)"),
            ("X-MAE-MSE", "MSE there (absent likewise)"),
            ("X-MAE-Mask-Ratio", "the mask ratio used"),
        )
    }
    responses = {
        200: {
            "description": "original | masked | reconstruction | reconstruction + visible, or the arrays",
            "headers": headers,
            "content": {
                "image/png": {"schema": _BINARY},
                "application/x-npz": {"schema": {**_BINARY, "description": "pred, mask, ids_restore, latent, ..."}},
            },
        },
        **_IMAGE_ERRORS,
        501: _error("the bundle has no decoder"),
    }

    @app.post(
        "/v1/reconstruct",
        response_model=None,
        response_class=fastapi.responses.Response,  # PNG or npz: no JSON besides the errors
        responses=responses,
        openapi_extra={"requestBody": _openapi_images_body(False)},
    )
    async def reconstruct_image(
        request: Request,
        mask_ratio: float = Query(0.75, ge=0.0, lt=1.0, description="share of the patches removed"),
        seed: int = Query(0, ge=0, le=2**63 - 1, description="the masking noise's seed, as mae reconstruct --seed"),
        format: Literal["png", "npz"] | None = Query(None, description="default: npz for Accept: application/x-npz"),
    ) -> Any:
        """Reconstruct one masked image as `mae reconstruct` does; PSNR and MSE of the removed patches in headers."""
        (upload,) = await read_uploads(request, 1)
        npz = format == "npz" or (format is None and wants(request, NPZ_TYPES))
        gone = functools.partial(wait_for_disconnect, request.receive)
        return _reply(fastapi, await service.reconstruct(upload, mask_ratio, seed, npz, gone))


# ----------------------------------------------------------------------------------------------------- serve
def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound now (not listening until the engine is ready): a port in use is one clear error
    before anything loads, and port 0 picks a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MAEError(f"--host {host}: {exc.strerror}", hint="an address such as 127.0.0.1 or 0.0.0.0") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: a restart right after a stop works
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == 98 or "in use" in str(exc):
            raise MAEError(f"{host}:{port} is in use.", hint="stop what listens there, or use another --port") from exc
        raise MAEError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _notes_on_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serve(
    model: str,
    engine: str = "auto",
    provider: str = "auto",
    precision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    workers: int = 2,
    max_queue: int = 256,
    max_images: int = 64,
    max_request_mb: float = 32.0,
    resize: str | None = None,
    drain_seconds: float = 30.0,
    log_level: str = "info",
    notes: Callable[[str], None] = _notes_on_stderr,
) -> None:
    """Serve `model` (a bundle directory) until SIGTERM or Ctrl-C; see the module docstring and `ServeSettings`.

    Returns once in-flight requests have drained after SIGTERM (exit status 0); Ctrl-C drains too, then raises
    KeyboardInterrupt. Bad settings, a missing bundle or a port in use raise MAEError before anything serves.
    """
    settings = ServeSettings(
        str(model), engine, provider, precision, host, port, max_batch, max_wait_ms, workers, max_queue,
        max_images, max_request_mb, resize, drain_seconds, log_level,
    )  # fmt: skip
    settings.check()
    uvicorn = require("uvicorn", "serve", "mae serve")
    require("prometheus_client", "serve", "mae serve's /metrics")
    require("fastapi", "serve", "mae serve")  # checked before the engine loads (which can take minutes), as build_app
    require("python_multipart", "serve", "Reading multipart uploads")
    sock = bind(host, port)
    stop = _StopBeforeServing()
    service = None
    try:
        with stop.installed():
            loaded = load_model(settings)
            for line in loaded.notes:
                notes(line)
            notes(f"mae serve: {loaded.bundle.path} on {loaded.encoder.description}")
            service = Service(settings, loaded, notes)
            service.address = _url(sock)
            app = build_app(service)
            config = uvicorn.Config(
                app, log_level=log_level, timeout_graceful_shutdown=drain_seconds, access_log=False,
                lifespan="on",
            )  # fmt: skip
            server = _server_class(uvicorn)(config, service, stop)
            server.run(sockets=[sock])
    finally:
        sock.close()
        if service is not None:  # the lifespan removes it too; not when startup failed or a second Ctrl-C forced exit
            service.decoder.close()


class _StopBeforeServing:
    """SIGTERM before uvicorn takes the signals (while the engine loads) must still stop the server, and uvicorn
    re-raises the SIGTERM it drained for once it is done: this handler makes that a clean exit (status 0)."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    @contextlib.contextmanager
    def installed(self):  # noqa: ANN202 - a context manager
        previous = signal.signal(signal.SIGTERM, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _server_class(uvicorn: Any) -> type:
    """uvicorn.Server that tells the service when a drain begins (readiness off, the batcher flushes) and stops at
    once when SIGTERM came during start-up."""

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: Any, service: Service, stop: _StopBeforeServing) -> None:
            super().__init__(config)
            self.service = service
            self.stop = stop

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.service.begin_drain()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.stop.requested:
                self.handle_exit(signal.SIGTERM, None)

    return DrainingServer
