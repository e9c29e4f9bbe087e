"""`mae serve` under load: a loopback client at 1, 4, 16 and 64 concurrent clients against the engine alone.

    python bench/serve_load.py                       # ViT-S/16 (random weights), onnx fp32, --max-batch 16
    python bench/serve_load.py --quick --json serve_load.json      # ViT-Ti/16, shorter levels
    python bench/serve_load.py --bundle path/to/bundle --clients 16 --seconds 60

Each client is a thread with one keep-alive HTTP connection that posts one 640x480 JPEG (raw `image/jpeg` bytes,
JSON answer) and posts the next as soon as the answer is in (closed loop). A level runs a warm-up (every client
answered once), then a measured window bounded in time (`--seconds`, stretched to hold at least `--min-batches`
full engine calls so that the batch granularity does not swamp the count, at most `--max-seconds`) and in count
(`--max-requests`); each level runs `--passes` such windows. It reports requests/s, images/s, p50/p99 latency, the
server's mean batch and how busy its engine was (from /metrics), and images/s as a ratio of the engine alone at the
same batch size (min(clients, max batch)): `mae bench`'s measurement (`mae.runtime.bench.timing_rounds`, median batch
time) of the same engine, graph and precision on the same pre-processed JPEGs, run in this process between every
two passes (the server idles then). Each pass is compared with the mean of the measurements just before and after
it, and a level reports the median of its passes, which cancels the drift of a shared machine. Goal: >= 0.8 at
16 clients. Server and client share the CPU: on a 2-core machine the decode,
HTTP and JSON work of the server and the client's own work come out of the engine's time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from embed_speed import make_jpegs, random_weights_bundle

from mae.core.bundle import Bundle
from mae.core.hardware import cpu_info
from mae.core.masking import full_ids_keep
from mae.core.preprocess import load_and_preprocess
from mae.runtime.bench import timing_rounds
from mae.runtime.engines import create_engine

LEVELS = (1, 4, 16, 64)


# ------------------------------------------------------------------------------------------- the server
class ServerProcess:
    """`mae serve` in a subprocess on a free port; `host`, `port` once /readyz answers."""

    def __init__(self, bundle: Path, engine: str, precision: str, max_batch: int, max_wait_ms: float, workers: int):
        command = [sys.executable, "-m", "mae.cli", "serve", str(bundle), "--engine", engine, "--precision", precision]
        command += ["--port", "0", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        command += ["--workers", str(workers), "--max-queue", "1024", "--log-level", "warning"]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()
        self.host, self.port = "", 0

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line)
                match = re.search(r"listening on http://([\d.]+):(\d+)", line)
                if match:
                    self.host, self.port = match.group(1), int(match.group(2))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit("the server stopped:\n" + "".join(self.lines))
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server never got ready:\n" + "".join(self.lines))

    def get(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics this benchmark reads."""
        text = self.get("/metrics")[1]
        wanted = ("mae_serve_batch_size_sum", "mae_serve_batch_size_count", "mae_serve_engine_seconds_sum")
        return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in wanted}

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


# ------------------------------------------------------------------------------------------- the clients
@dataclass
class Level:
    """What the clients saw in the measured window of one level."""

    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, of the requests answered within the window
    errors: dict[str, int] = field(default_factory=dict)  # status (or exception name) -> count
    seconds: float = 0.0
    metrics: list[dict[str, float]] = field(default_factory=list)  # the server's, as the window opens and closes


def connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with Nagle off, as curl and httpx have it: http.client sends the headers and the body
    in two writes, and Nagle would hold the body back until the server's delayed ACK (up to 40 ms a request)."""
    connection = http.client.HTTPConnection(host, port, timeout=600)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def run_level(server: ServerProcess, jpegs: list[bytes], clients: int, seconds: float, max_requests: int) -> Level:
    """`clients` closed-loop clients: a warm-up until each is answered once, then `seconds` (or `max_requests`).

    A request counts where its answer arrives inside the window (images/s is answers per second there), whenever
    it was sent. Clients never pause: an idle keep-alive connection would be closed by the server after 5 s."""
    level = Level(clients)
    lock = threading.Lock()
    warmed_up, warm = threading.Event(), [0]
    window = {"start": float("inf"), "stop": float("inf")}

    def client(offset: int) -> None:
        connection = connect(server.host, server.port)
        count, warmed = offset, False
        while True:
            began = time.perf_counter()
            if began >= window["stop"] or len(level.latencies) >= max_requests:
                break
            body = jpegs[count % len(jpegs)]
            count += 1
            try:
                connection.request("POST", "/v1/embed", body=body, headers={"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                connection.close()
                connection = connect(server.host, server.port)
            ended = time.perf_counter()
            with lock:
                in_window = window["start"] <= ended <= window["stop"]
                if status != "200" and in_window:
                    level.errors[status] = level.errors.get(status, 0) + 1
                elif in_window:
                    level.latencies.append(ended - began)
                if not warmed:
                    warmed, warm[0] = True, warm[0] + 1
                    if warm[0] == clients:
                        warmed_up.set()
        connection.close()

    threads = [threading.Thread(target=client, args=(index * 7,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    warmed_up.wait()  # every client has been answered once: the server is in its steady state
    level.metrics.append(server.metrics())
    window["start"] = time.perf_counter()
    window["stop"] = window["start"] + seconds
    while time.perf_counter() < window["stop"] and len(level.latencies) < max_requests:
        time.sleep(0.05)
    level.metrics.append(server.metrics())
    level.seconds = time.perf_counter() - window["start"]
    for thread in threads:
        thread.join()
    return level


# ---------------------------------------------------------------------------------------------- the engine
def engine_speeds(engine, pixel_values: np.ndarray, batch_sizes: list[int], budget_s: float) -> dict[int, float]:  # noqa: ANN001
    """Images/s of the engine alone at each batch size: `mae bench`'s timing (interleaved rounds, median)."""
    length = engine.config.num_patches
    runners = {}
    for batch in batch_sizes:
        inputs = {"pixel_values": pixel_values[:batch], "ids_keep": full_ids_keep(batch, length)}
        runners[batch] = lambda inputs=inputs: engine.run(inputs)
    times = timing_rounds(runners, budget_s, block_s=0.1, min_rounds=2)
    return {batch: batch / statistics.median(times[batch]) for batch in batch_sizes}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ------------------------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="An exported bundle (default: random-weight --preset).")
    parser.add_argument("--preset", help="Default mae_vit_small_patch16 (--quick: mae_vit_tiny_patch16).")
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2, help="The server's decode threads.")
    parser.add_argument("--clients", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--seconds", type=float, help="Measured window per pass (default 12; --quick 6).")
    parser.add_argument("--min-batches", type=float, help="Full engine calls a window holds at least (default 6).")
    parser.add_argument("--passes", type=int, help="Windows per level, each between two engine runs (default 3).")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="Longest window per level.")
    parser.add_argument("--max-requests", type=int, default=5000, help="Most requests per level.")
    parser.add_argument("--engine-seconds", type=float, help="Engine-alone budget between levels (default 4).")
    parser.add_argument("--quick", action="store_true", help="A smaller model and shorter levels.")
    parser.add_argument("--work-dir", type=Path, help="Keep the bundle and JPEGs here (default: a temporary one).")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args()
    args.preset = args.preset or ("mae_vit_tiny_patch16" if args.quick else "mae_vit_small_patch16")
    args.seconds = args.seconds or (6.0 if args.quick else 12.0)
    args.min_batches = args.min_batches or (4.0 if args.quick else 6.0)
    args.passes = args.passes or (2 if args.quick else 3)
    args.engine_seconds = args.engine_seconds or (2.0 if args.quick else 3.0)
    return args


def level_row(passes: list[tuple[Level, float]], batch: int) -> dict:
    """One level's numbers from its passes (each with the engine-alone speed around it): medians of the rates and
    ratios, latency percentiles of every answer; the server's mean batch and engine busy share from /metrics."""

    def delta(level: Level, name: str) -> float:
        return level.metrics[1][name] - level.metrics[0][name]

    levels = [level for level, _ in passes]
    rates = [len(level.latencies) / level.seconds for level in levels]  # one image per request
    ratios = [rate / speed for rate, (_, speed) in zip(rates, passes, strict=True)]
    latencies = [value for level in levels for value in level.latencies]
    calls = sum(delta(level, "mae_serve_batch_size_count") for level in levels)
    images = sum(delta(level, "mae_serve_batch_size_sum") for level in levels)
    busy = sum(delta(level, "mae_serve_engine_seconds_sum") for level in levels)
    seconds = sum(level.seconds for level in levels)
    errors: dict[str, int] = {}
    for level in levels:
        for status, count in level.errors.items():
            errors[status] = errors.get(status, 0) + count
    return {
        "clients": levels[0].clients,
        "passes": len(levels),
        "window_seconds": round(seconds, 2),
        "requests": len(latencies),
        "requests_per_s": round(statistics.median(rates), 2),
        "images_per_s": round(statistics.median(rates), 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
        "errors": errors,
        "server_mean_batch": round(images / calls, 2) if calls else None,
        "server_engine_busy": round(busy / seconds, 3) if seconds else None,  # share of the windows
        "engine_batch": batch,
        "engine_alone_images_per_s": round(statistics.median(speed for _, speed in passes), 2),
        "ratio": round(statistics.median(ratios), 3),
        "pass_ratios": [round(ratio, 3) for ratio in ratios],
    }


def main() -> None:
    args = parse_args()
    temp = tempfile.TemporaryDirectory(prefix="mae-serve-load-") if args.work_dir is None else None
    work = Path(temp.name) if temp else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args, work)
    finally:
        if temp is not None:
            temp.cleanup()
    print()
    print(f"{'clients':>7} {'req/s':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'busy':>5} "
          f"{'engine':>7} {'ratio':>6}  errors")  # fmt: skip
    for row in result["levels"]:
        print(
            f"{row['clients']:>7} {row['requests_per_s']:>7.2f} {row['images_per_s']:>7.2f} {row['p50_ms']:>8} "
            f"{row['p99_ms']:>8} {row['server_mean_batch']!s:>6} {row['server_engine_busy']!s:>5} "
            f"{row['engine_alone_images_per_s']:>7.2f} {row['ratio']!s:>6}  {row['errors'] or '-'}"
        )
    print(f"(engine alone: images/s at batch min(clients, {args.max_batch}); goal: ratio >= 0.8 at 16 clients)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Bundle and JPEGs, then engine / level / engine / level / ... / engine."""
    began = time.perf_counter()
    bundle = args.bundle or random_weights_bundle(args.preset, work)
    print(f"bundle {bundle} ready in {time.perf_counter() - began:.0f} s")
    folder = work / "jpegs-64"
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    paths = paths if len(paths) == 64 else make_jpegs(folder, 64)
    jpegs = [path.read_bytes() for path in paths]
    engine = create_engine(args.engine, str(bundle), "encoder", precision=args.precision, device="auto")
    pre = Bundle.load(bundle).preprocessing
    pixel_values = np.stack([load_and_preprocess(path, pre)[0] for path in paths[: args.max_batch]])
    batch_sizes = sorted({min(clients, args.max_batch) for clients in args.clients})
    speeds = [engine_speeds(engine, pixel_values, batch_sizes, args.engine_seconds)]
    print(f"engine: {engine.description}; alone: " + ", ".join(f"b{b} {s:.2f} img/s" for b, s in speeds[0].items()))
    server = ServerProcess(bundle, args.engine, args.precision, args.max_batch, args.max_wait_ms, args.workers)
    rows = []
    try:
        for clients in args.clients:
            batch = min(clients, args.max_batch)
            # Long enough for `min_batches` full engine calls at the speed just measured.
            seconds = min(args.max_seconds, max(args.seconds, args.min_batches * args.max_batch / speeds[-1][batch]))
            passes = []
            for _ in range(args.passes):
                level = run_level(server, jpegs, clients, seconds, args.max_requests)
                speeds.append(engine_speeds(engine, pixel_values, batch_sizes, args.engine_seconds))
                passes.append((level, (speeds[-2][batch] + speeds[-1][batch]) / 2))
            rows.append(level_row(passes, batch))
            row = rows[-1]
            print(
                f"{clients:>3} clients: {row['images_per_s']:.2f} img/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} "
                f"ms, mean batch {row['server_mean_batch']}, engine alone {row['engine_alone_images_per_s']} img/s: "
                f"ratio {row['ratio']} (passes {row['pass_ratios']})"
            )
    finally:
        exit_status = server.stop()
    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "cpus": cpu.threads,
        "engine": engine.description,
        "bundle": str(bundle) if args.bundle else args.preset + " (random weights)",
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "server_workers": args.workers,
        "request": "one 640x480 JPEG (image/jpeg), JSON answer, pool cls",
        "levels": rows,
        "engine_alone_images_per_s": [{str(b): round(s, 2) for b, s in speed.items()} for speed in speeds],
        "server_exit_status": exit_status,
    }


if __name__ == "__main__":
    main()
