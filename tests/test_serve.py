"""`mae serve` against a real uvicorn process on 127.0.0.1 (port 0: the server picks a free one and prints it).

Equality with `mae embed` is exact (bitwise) when the server's engine call holds the same images in the same order
as `mae embed`'s (one request of every photo, `mae embed --batch-size` at least as large): the same decode function
gives the same float32 pixels, the same ONNX Runtime graph the same latent, the same numpy calls the same pooled
rows, and JSON carries a float32 exactly (its shortest repr reads back to the same float32). Requests from many
clients are batched as they come, and ONNX Runtime may block a GEMM differently for another batch size, so those
are compared within 1e-5 (relative) only.

No test depends on timing: the batcher is made to wait "forever" (--max-wait-ms 600000) and runs a batch only when
it is full, or when SIGTERM drains it, so what is queued, admitted or refused at each step is certain.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from images_corpus import tiny_model_files
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

FOREVER_MS = "600000"  # a batch runs when full (or on SIGTERM), never because its oldest image waited
HANG_GUARD_S = 120  # only so that a broken server fails the test instead of hanging it


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_model_files(tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def photo_files(photo_dir) -> list[Path]:
    """The photos in the order `mae embed` lists them (sorted keys)."""
    return sorted(photo_dir.iterdir())


class Server:
    """`python -m mae.cli serve BUNDLE ...` in a subprocess; `url` once /readyz answers 200."""

    def __init__(self, bundle: Path, *options: str) -> None:
        command = [sys.executable, "-m", "mae.cli", "serve", str(bundle), "--engine", "onnx", "--port", "0"]
        self.process = subprocess.Popen(
            [*command, "--log-level", "warning", *options], stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.url = ""
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self.listening.wait(HANG_GUARD_S):
            self.process.kill()
            raise AssertionError("the server did not start:\n" + self.stderr)
        self._wait_ready()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self.listening.set()
        self.listening.set()  # the process ended

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.stderr
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:  # between the lifespan start and the listen()
                pass
            time.sleep(0.05)
        raise AssertionError("the server never got ready:\n" + self.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when the labelled series does not exist yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=HANG_GUARD_S).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_metric(self, name: str, value: float, **labels: str) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} never reached {value}:\n{self.stderr}"
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(HANG_GUARD_S)


@pytest.fixture(scope="module")
def server(bundle):
    """Quick to batch (8 images or 5 ms), small limits to test them."""
    running = Server(bundle, "--max-batch", "8", "--max-wait-ms", "5", "--max-images", "8", "--max-request-mb", "4")
    yield running
    assert running.stop() == 0, running.stderr
    assert "Traceback" not in running.stderr, running.stderr


def files_of(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]


def post_embed(url: str, paths: list[Path], npy: bool = False, **params: object) -> httpx.Response:
    headers = {"Accept": "application/octet-stream"} if npy else {}
    query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
    return httpx.post(f"{url}/v1/embed", files=files_of(paths), params=query, headers=headers, timeout=HANG_GUARD_S)


def mae_embed(bundle: Path, folder: Path, out: Path, *options: str) -> np.ndarray:
    """`mae embed` (the command) on `folder`: its embeddings, one row per photo in sorted order."""
    command = [sys.executable, "-m", "mae.cli", "embed", str(folder), "--model", str(bundle), "--out", str(out)]
    done = subprocess.run(
        [*command, "--engine", "onnx", "--workers", "0", "--batch-size", "32", *options],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return np.load(out / "embeddings" / "00000.npy")


def assert_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    body = response.json()
    assert body["error"] == kind and body["message"], body
    return body


# ------------------------------------------------------------------------------------------- equal to embed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("pool", "l2", "dtype"), [("cls+mean", True, "float32"), ("cls", False, "float16"), ("tokens", False, "float32")]
)
def test_one_request_equals_mae_embed_exactly(server, bundle, photo_dir, photo_files, tmp_path, pool, l2, dtype):
    options = ["--pool", pool, "--dtype", dtype] + (["--l2-normalize"] if l2 else [])
    expected = mae_embed(bundle, photo_dir, tmp_path / "out", *options)  # [N, ...]

    response = post_embed(server.url, photo_files, pool=pool, l2_normalize=l2, dtype=dtype)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["shape"] == list(expected.shape) and body["pool"] == pool and body["dtype"] == dtype
    assert [image["name"] for image in body["images"]] == [path.name for path in photo_files]
    from_json = np.asarray(body["embeddings"], dtype=np.float64).astype(expected.dtype)
    assert np.array_equal(from_json, expected)

    as_npy = post_embed(server.url, photo_files, npy=True, pool=pool, l2_normalize=l2, dtype=dtype)
    assert as_npy.status_code == 200 and as_npy.headers["content-type"] == "application/octet-stream"
    array = np.load(io.BytesIO(as_npy.content), allow_pickle=False)
    assert array.dtype == expected.dtype and np.array_equal(array, expected)


@pytest.mark.slow
def test_many_clients_get_their_own_rows(server, bundle, photo_dir, photo_files, tmp_path):
    """Concurrent one-image requests are batched together, and each answer is its own image's row."""
    expected = mae_embed(bundle, photo_dir, tmp_path / "out", "--pool", "mean")
    rounds = 4
    jobs = [index for index in range(len(photo_files)) for _ in range(rounds)]
    results: dict[int, list[np.ndarray]] = {index: [] for index in range(len(photo_files))}

    def client(index: int) -> None:
        response = post_embed(server.url, [photo_files[index]], pool="mean")
        assert response.status_code == 200, response.text
        results[index].append(np.asarray(response.json()["embeddings"], dtype=np.float32)[0])

    threads = [threading.Thread(target=client, args=(index,)) for index in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    for index, rows in results.items():
        assert len(rows) == rounds
        for row in rows:
            np.testing.assert_allclose(row, expected[index], rtol=1e-5, atol=1e-6)
    assert server.metric("mae_serve_errors_total", kind="internal") == 0


def test_raw_bytes_and_base64_json_give_the_same_vector(server, photo_files):
    path = photo_files[0]
    multipart = post_embed(server.url, [path]).json()["embeddings"]
    raw = httpx.post(
        f"{server.url}/v1/embed", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    encoded = base64.b64encode(path.read_bytes()).decode()
    as_json = httpx.post(f"{server.url}/v1/embed", json={"images": [encoded]}, timeout=60)
    assert raw.status_code == 200 and as_json.status_code == 200, (raw.text, as_json.text)
    assert raw.json()["embeddings"] == multipart == as_json.json()["embeddings"]


# ------------------------------------------------------------------------------------------------- errors
def test_undecodable_images_get_400_with_embeds_reasons(server, photo_files, tmp_path):
    from mae.core.preprocess import ImageError, Preprocessing, load_and_preprocess

    good = photo_files[0].read_bytes()
    cases = {"notes.jpg": b"not an image at all", "empty.png": b"", "cut.jpg": good[: len(good) // 3]}
    expected = {}
    for name, data in cases.items():  # what `mae embed`'s decoding says of the same bytes
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError) as caught:
            load_and_preprocess(tmp_path / name, Preprocessing(size=32))
        expected[name] = caught.value.reason
    files = [("images", ("fine.jpg", good, "image/jpeg"))]
    files += [("images", (name, data, "image/jpeg")) for name, data in cases.items()]
    response = httpx.post(f"{server.url}/v1/embed", files=files, timeout=60)
    body = assert_error(response, 400, "bad_image")
    assert {(f["index"], f["name"], f["reason"]) for f in body["failures"]} == {
        (index + 1, name, expected[name]) for index, name in enumerate(cases)
    }
    assert str(tmp_path) not in response.text and "mae-serve-" not in response.text  # no server paths


def test_limits_and_bad_requests(server, photo_files):
    url = f"{server.url}/v1/embed"
    too_many = post_embed(server.url, [photo_files[0]] * 9)  # --max-images 8
    assert_error(too_many, 413, "too_many_images")
    too_large = httpx.post(url, content=b"\0" * (5 << 20), headers={"Content-Type": "image/png"}, timeout=60)
    assert_error(too_large, 413, "too_large")

    def chunked():  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b"\0" * (1 << 20)

    streamed = httpx.post(url, content=chunked(), headers={"Content-Type": "image/png"}, timeout=60)
    assert_error(streamed, 413, "too_large")
    assert_error(
        httpx.post(url, content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(httpx.post(url, content=b"", headers={"Content-Type": "image/png"}), 400, "no_images")
    assert_error(httpx.post(url, json={"images": ["%%%"]}), 400, "bad_request")
    assert_error(httpx.post(url, json={"pictures": []}), 400, "bad_request")
    reconstruct_two = httpx.post(f"{server.url}/v1/reconstruct", files=files_of(photo_files[:2]), timeout=60)
    assert_error(reconstruct_two, 413, "too_many_images")
    bad_pool = post_embed(server.url, [photo_files[0]], pool="max")
    assert bad_pool.status_code == 422 and "Traceback" not in bad_pool.text
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    assert server.metric("mae_serve_errors_total", kind="too_large") >= 2
    assert server.metric("mae_serve_errors_total", kind="too_many_images") >= 2
    assert server.metric("mae_serve_errors_total", kind="invalid_parameter") >= 1


# ------------------------------------------------------------------------------------- status, model, docs
def test_health_model_metrics_and_openapi(server, bundle, photo_files):
    from mae.core.bundle import Bundle
    from mae.runtime.embed import model_checksum

    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    model = httpx.get(f"{server.url}/v1/model").json()
    assert model["config"] == Bundle.load(bundle).config.to_dict()
    assert model["checksums"]["model_sha256"] == model_checksum(str(bundle), "onnx", "fp32")
    assert model["engine"]["name"] == "onnx" and model["engine"]["precision"] == "fp32"
    assert "CPUExecutionProvider" in model["engine"]["encoder"] and model["limits"]["max_batch"] == 8

    assert post_embed(server.url, photo_files[:2]).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("mae_serve_requests_total", "mae_serve_errors_total", "mae_serve_batch_size_bucket",
                 "mae_serve_queue_depth", "mae_serve_admitted_images", "mae_serve_request_seconds_bucket",
                 "mae_serve_engine_seconds_bucket", "mae_serve_queue_seconds_bucket"):  # fmt: skip
        assert name in metrics.text, name
    assert server.metric("mae_serve_requests_total", route="/v1/embed", status="200") >= 1
    assert server.metric("mae_serve_images_total", route="/v1/embed") >= 2
    assert server.metric("mae_serve_queue_depth") == 0 and server.metric("mae_serve_ready") == 1

    schema = httpx.get(f"{server.url}/openapi.json").json()
    routes = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert routes >= {("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/v1/model", "get"),
                      ("/v1/embed", "post"), ("/v1/reconstruct", "post")}  # fmt: skip
    embed = schema["paths"]["/v1/embed"]["post"]
    assert set(embed["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream",
                                                    "application/json"}  # fmt: skip
    assert set(embed["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"400", "413", "422", "503"} <= set(embed["responses"]) and "Retry-After" in embed["responses"]["503"][
        "headers"
    ]
    pools = next(p for p in embed["parameters"] if p["name"] == "pool")["schema"]["enum"]
    assert pools == ["cls", "mean", "cls+mean", "tokens"]
    reconstruct = schema["paths"]["/v1/reconstruct"]["post"]["responses"]["200"]
    assert set(reconstruct["content"]) == {"image/png", "application/x-npz"} and "X-MAE-PSNR" in reconstruct["headers"]
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a dependency: checked where it is installed
        return
    validate(schema)  # a valid OpenAPI 3.1 document


@pytest.mark.slow
def test_reconstruct_matches_the_library(server, bundle, photo_files):
    from mae.runtime.reconstruct import reconstruct

    path = photo_files[0]
    expected = reconstruct([path], str(bundle), engine="onnx", mask_ratio=0.5, seed=3)
    params = {"mask_ratio": 0.5, "seed": 3}
    picture = httpx.post(f"{server.url}/v1/reconstruct", files=files_of([path]), params=params, timeout=60)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png", picture.text
    assert Image.open(io.BytesIO(picture.content)).size == expected.picture().size
    assert float(picture.headers["X-MAE-PSNR"]) == pytest.approx(float(expected.metrics.psnr[0]), abs=1e-3)
    arrays = httpx.post(
        f"{server.url}/v1/reconstruct", files=files_of([path]), params={**params, "format": "npz"}, timeout=60
    )
    assert arrays.status_code == 200 and arrays.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(arrays.content)) as saved:
        assert np.array_equal(saved["mask"], expected.mask)
        np.testing.assert_allclose(saved["pred"], expected.pred, rtol=1e-5, atol=1e-6)
    broken = httpx.post(f"{server.url}/v1/reconstruct", content=b"nope", headers={"Content-Type": "image/png"})
    assert assert_error(broken, 400, "bad_image")["failures"][0]["reason"] == "not_an_image"


# ------------------------------------------------------------------------------------ overload and shutdown
def post_in_thread(url: str, paths: list[Path]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(post_embed(url, paths)), daemon=True)
    thread.start()
    return thread, answers


@pytest.mark.slow
def test_a_full_queue_sheds_with_503_and_retry_after(bundle, photo_files):
    """3 images admitted at most, batches of 3: 2 wait, 2 more do not fit (503), 1 more fills the batch."""
    server = Server(bundle, "--max-batch", "3", "--max-queue", "3", "--max-images", "2", "--max-wait-ms", FOREVER_MS)
    try:
        first, first_answers = post_in_thread(server.url, photo_files[:2])
        server.wait_metric("mae_serve_queue_depth", 2)  # decoded, waiting for a full batch
        refused = post_embed(server.url, photo_files[2:4])
        assert_error(refused, 503, "overloaded")
        assert int(refused.headers["Retry-After"]) >= 1
        assert post_embed(server.url, photo_files[4:5]).status_code == 200  # fills the batch of 3
        first.join(HANG_GUARD_S)
        assert first_answers[0].status_code == 200
        assert server.metric("mae_serve_errors_total", kind="overloaded") == 1
        # Two requests, one engine call of 3 images: the batcher batched.
        assert server.metric("mae_serve_batch_size_count") == 1 and server.metric("mae_serve_batch_size_sum") == 3
        assert server.metric("mae_serve_admitted_images") == 0
    finally:
        assert server.stop() == 0, server.stderr


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_slot(bundle, photo_files):
    server = Server(bundle, "--max-batch", "3", "--max-queue", "3", "--max-images", "2", "--max-wait-ms", FOREVER_MS)
    try:
        request = httpx.Request("POST", f"{server.url}/v1/embed", files=files_of(photo_files[:2]))
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_GUARD_S)
        connection.request("POST", "/v1/embed", body=request.read(), headers=dict(request.headers))
        server.wait_metric("mae_serve_queue_depth", 2)
        connection.close()  # gone without reading its answer
        server.wait_metric("mae_serve_errors_total", 1, kind="disconnected")
        assert server.metric("mae_serve_admitted_images") == 0 and server.metric("mae_serve_queue_depth") == 0
        # Its 2 slots are free again, and its images left the queue: 2 + 1 new ones make the batch of 3.
        second, second_answers = post_in_thread(server.url, photo_files[2:4])
        server.wait_metric("mae_serve_queue_depth", 2)
        assert post_embed(server.url, photo_files[4:5]).status_code == 200
        second.join(HANG_GUARD_S)
        assert second_answers[0].status_code == 200
        assert len(second_answers[0].json()["embeddings"]) == 2
    finally:
        assert server.stop() == 0, server.stderr


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_then_exits_0(bundle, photo_files):
    server = Server(bundle, "--max-batch", "64", "--max-wait-ms", FOREVER_MS)
    waiting = [post_in_thread(server.url, [path]) for path in photo_files[:4]]
    server.wait_metric("mae_serve_queue_depth", 4)  # 4 requests wait for a batch that would never fill
    assert server.stop() == 0, server.stderr  # SIGTERM: the batcher runs what it has, the answers go out
    for thread, answers in waiting:
        thread.join(HANG_GUARD_S)
        assert answers and answers[0].status_code == 200, answers
    assert "Traceback" not in server.stderr, server.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=5)


# ---------------------------------------------------------------------------------------------- the command
def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mae.cli", "serve", *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )


def assert_one_line_error(done: subprocess.CompletedProcess, text: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and text in lines[0], done.stderr
    assert len(lines) <= 2 and all(line.startswith("  hint: ") for line in lines[1:]), done.stderr


def test_bad_command_lines_are_one_line_errors(bundle, tmp_path):
    assert_one_line_error(run_serve(str(tmp_path / "missing")), "does not exist")
    assert_one_line_error(run_serve(str(tmp_path)), "")  # a folder that is not a bundle
    assert_one_line_error(run_serve(str(bundle), "--max-images", "10", "--max-queue", "5"), "--max-images 10")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_serve(str(bundle), "--port", str(port)), "is in use")


def test_the_library_imports_without_the_server_packages():
    """runtime/serve.py imports fastapi, uvicorn and prometheus_client only when a server is built."""
    script = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client'): sys.modules[name] = None\n"
        "import mae.runtime.serve as serve\n"
        "from mae.core.errors import MissingDependency\n"
        "try:\n    serve.serve('nowhere')\nexcept MissingDependency as exc:\n    print(exc.extra, exc.module)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["serve", "uvicorn"]


def test_json_body_equals_multipart_for_many_images(server, photo_files):
    payload = {"images": [base64.b64encode(p.read_bytes()).decode() for p in photo_files[:3]]}
    as_json = httpx.post(
        f"{server.url}/v1/embed", content=json.dumps(payload), headers={"Content-Type": "application/json"}
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["embeddings"] == post_embed(server.url, photo_files[:3]).json()["embeddings"]


# ------------------------------------------------------------------------------------- in-process faults
@pytest.fixture()
def in_process(bundle):
    """The app in this process (starlette's TestClient), for faults a real server cannot be made to have."""
    from starlette.testclient import TestClient

    from mae.runtime.serve import ServeSettings, Service, build_app, load_model

    def make(**settings: object) -> tuple[TestClient, Service]:
        chosen = ServeSettings(str(bundle), engine="onnx", **settings)
        chosen.check()
        service = Service(chosen, load_model(chosen), lambda text: None)
        return TestClient(build_app(service), raise_server_exceptions=False), service

    return make


def json_images(paths: list[Path]) -> dict:
    body = json.dumps({"images": [base64.b64encode(path.read_bytes()).decode() for path in paths]})
    return {"content": body, "headers": {"Content-Type": "application/json"}}


def test_an_upload_that_cannot_be_stored_is_503_and_leaves_no_files(in_process, photo_files, monkeypatch):
    """/dev/shm full while the second of two uploads is written: every file of the request is removed again
    (a leak would fill it further) and the client may retry."""
    import errno

    client, service = in_process()
    real = Path.write_bytes
    written: list[Path] = []

    def second_fails(self: Path, data: bytes) -> int:
        written.append(self)
        if len(written) == 2:
            real(self, data[:100])  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    with client:
        monkeypatch.setattr(Path, "write_bytes", second_fails)
        answer = client.post("/v1/embed", **json_images(photo_files[:2]))
        monkeypatch.undo()
        assert_error(answer, 503, "no_space")
        assert answer.headers["Retry-After"] and "No space left" in answer.json()["message"]
        assert len(written) == 2 and not list(service.decoder.folder.iterdir())
        assert service.admission.images == 0
        assert client.post("/v1/embed", **json_images(photo_files[:1])).status_code == 200  # space again: it works


def test_an_engine_failure_drops_the_rest_of_its_request(in_process, photo_files):
    """A request of 3 images in batches of 2: the first batch fails (500), its third image is never run."""
    client, service = in_process(max_batch=2, max_wait_ms=1)
    with client:
        engine = service.batcher.engine
        real, calls = engine.run, []

        def fails_first(inputs: dict) -> dict:
            calls.append(len(inputs["pixel_values"]))
            if len(calls) == 1:
                raise RuntimeError("the engine broke")
            return real(inputs)

        engine.run = fails_first
        answer = client.post("/v1/embed", **json_images(photo_files[:3]))
        assert_error(answer, 500, "internal")
        assert "Traceback" not in answer.text and "the engine broke" not in answer.text
        assert not service.batcher.queue and service.admission.images == 0
    assert calls == [2]  # the lifespan ran what was queued before it ended: nothing


def test_reconstruct_refuses_a_negative_seed_and_leaves_out_undefined_metrics(in_process, photo_files):
    client, _ = in_process()
    with client:
        files = files_of(photo_files[:1])
        refused = client.post("/v1/reconstruct", files=files, params={"seed": -1})
        assert refused.status_code == 422 and "Traceback" not in refused.text, refused.text
        nothing_removed = client.post("/v1/reconstruct", files=files, params={"mask_ratio": 0})
        assert nothing_removed.status_code == 200, nothing_removed.text
        assert "X-MAE-PSNR" not in nothing_removed.headers and nothing_removed.headers["X-MAE-Mask-Ratio"] == "0.0"
        schema = client.get("/openapi.json").json()
        seed = next(p for p in schema["paths"]["/v1/reconstruct"]["post"]["parameters"] if p["name"] == "seed")
        assert seed["schema"]["minimum"] == 0
        embed_headers = schema["paths"]["/v1/embed"]["post"]["responses"]["200"]["headers"]
        assert {"X-MAE-Shape", "X-MAE-Pool", "X-MAE-Model-SHA256"} <= set(embed_headers)


def test_drain_seconds_0_cancels_at_once_instead_of_waiting_forever(bundle, monkeypatch):
    """uvicorn reads a graceful-shutdown timeout of None as no limit: 0 must reach it as 0."""
    from mae.runtime import serve as serve_module

    seen = {}

    def recording(uvicorn):  # noqa: ANN001, ANN202 - stands in for the draining server class
        class Recording:
            def __init__(self, config, service, stop) -> None:  # noqa: ANN001
                seen["timeout"] = config.timeout_graceful_shutdown
                self.service = service

            def run(self, sockets) -> None:  # noqa: ANN001
                seen["folder"] = self.service.decoder.folder

        return Recording

    monkeypatch.setattr(serve_module, "_server_class", recording)
    serve_module.serve(bundle, engine="onnx", port=0, drain_seconds=0, notes=lambda text: None)
    assert seen["timeout"] == 0
    assert not seen["folder"].exists()  # the upload folder is removed even when the lifespan never ran
