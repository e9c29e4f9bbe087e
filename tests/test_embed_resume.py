"""`mae embed` killed at any moment resumes to exactly the output of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from images_corpus import assert_same_output as same_files
from images_corpus import tiny_model_files
from PIL import Image

from mae.runtime.embed import embed

BATCH, SHARD_SIZE = 4, 8
DATA_FOLDERS = ("embeddings", "metadata", "failures", "done")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_model_files(tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """240 small JPEGs of varied content (and two broken files), in nested folders."""
    folder = tmp_path_factory.mktemp("resume_images")
    rng = np.random.default_rng(0)
    for i in range(240):
        sub = folder / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((96, 72), Image.Resampling.BILINEAR).save(sub / f"{i:04d}.jpg", quality=85)
    (folder / "part0" / "0100_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "part1" / "0200_empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bundle, images) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    embed(images, bundle, out, batch_size=BATCH, shard_size=SHARD_SIZE, workers=0, progress=False)
    return out


def command(images: Path, bundle: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "mae.cli", "embed", str(images), "--model", str(bundle), "--out", str(out),
        "--batch-size", str(BATCH), "--shard-size", str(SHARD_SIZE), "--workers", "2",
    ]  # fmt: skip


def session_processes(session: int) -> list[int]:
    """Live processes of a session (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "pid (comm)": state, ppid, pgrp, session
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def assert_same_output(out: Path, reference: Path) -> None:
    same_files(out, reference, DATA_FOLDERS)
    assert json.loads((out / "run.json").read_text()) == json.loads((reference / "run.json").read_text())


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_output(tmp_path, bundle, images, reference):
    out = tmp_path / "out"
    total_files = len(list((reference / "done").iterdir()))
    process = subprocess.Popen(
        command(images, bundle, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            done_dir = out / "done"
            done_at_kill = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
            if done_at_kill >= 1:
                os.kill(process.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
                break
            time.sleep(0.002)
        process.wait(timeout=30)
        # Its decode workers, orphaned, must notice and exit by themselves.
        orphans_deadline = time.monotonic() + 10
        while session_processes(process.pid) and time.monotonic() < orphans_deadline:
            time.sleep(0.1)
        orphans = session_processes(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever happened, leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        stderr = process.stderr.read().decode() if process.stderr else ""
    assert process.returncode == -signal.SIGKILL, f"the run was not killed (rc {process.returncode}): {stderr}"
    assert not orphans, f"decode workers outlived their killed parent: {orphans}"
    assert 1 <= done_at_kill < total_files
    assert len(list((out / "done").glob("*.json"))) < total_files, "killed after the last shard: nothing to resume"

    rerun = subprocess.run(command(images, bundle, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output"]["resumed"] >= 1 and summary["output"]["written_now"] >= 1
    assert summary["output"]["resumed"] + summary["output"]["written_now"] == total_files
    assert summary["counts"] == json.loads((reference / "summary.json").read_text())["counts"]
    assert_same_output(out, reference)


def test_half_written_or_foreign_files_are_never_taken_as_done(tmp_path, bundle, images, reference):
    out = tmp_path / "out"
    options = dict(batch_size=BATCH, shard_size=SHARD_SIZE, workers=0, progress=False)
    embed(images, bundle, out, **options)
    # File 1: killed between the data and the marker, data half written.
    (out / "done" / "00001.json").unlink()
    data = (out / "embeddings" / "00001.npy").read_bytes()
    (out / "embeddings" / "00001.npy").write_bytes(data[: len(data) // 2])
    # File 2: data damaged after its marker was written (checksum mismatch).
    damaged = bytearray((out / "embeddings" / "00002.npy").read_bytes())
    damaged[-1] ^= 0xFF
    (out / "embeddings" / "00002.npy").write_bytes(bytes(damaged))
    # File 3: a marker from another run's parameters.
    marker = json.loads((out / "done" / "00003.json").read_text())
    marker["params_sha256"] = "0" * 64
    (out / "done" / "00003.json").write_text(json.dumps(marker))
    # File 4: metadata gone, marker still there.
    (out / "metadata" / "00004.parquet").unlink()
    # File 5: an unreadable marker. And temporaries a killed run left behind.
    (out / "done" / "00005.json").write_text("{")
    (out / "embeddings" / ".00006.npy.abcd1234.tmp").write_bytes(b"partial")
    (out / "done" / ".00000.json.x.tmp").write_bytes(b"{")

    summary = embed(images, bundle, out, **options)
    assert summary["output"]["written_now"] == 5
    assert_same_output(out, reference)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, bundle, images, reference):
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(images, bundle, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "done").is_dir() and any((out / "done").glob("*.json")):
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
                break
            time.sleep(0.002)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr = stderr.decode()
    assert process.returncode == 130, stderr
    assert "Interrupted." in stderr and "Traceback" not in stderr
    assert len(list((out / "done").glob("*.json"))) < len(list((reference / "done").iterdir()))
    rerun = subprocess.run(command(images, bundle, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_output(out, reference)
