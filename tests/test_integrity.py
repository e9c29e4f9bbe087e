"""Issue 15: what runs is what was verified; shard plans; concurrent runs; file-system faults as messages.

Each test failed before these were built; its docstring names the fault (numbered as in the list of faults found
when operators' bad days were tried on purpose).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from fs_faults import fill, run_mae, tmpfs, without_permission_override
from images_corpus import assert_same_output
from PIL import Image

from mae.core.errors import MAEError
from mae.core.files import FolderLock, cached_sha256, fault, owner_tag, sha256_file
from mae.runtime.embed import embed

BATCH, SHARD_SIZE = 4, 4


# ------------------------------------------------------------------------------------------------- fixtures
def _model(base: Path, seed: int) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a seeded mae_vit_test_patch8."""
    checkpoint, bundle = base / f"model{seed}" / "checkpoint.pt", base / f"model{seed}" / "bundle"
    if not (bundle / "mae.json").is_file():
        import torch

        from mae.checkpoint import save_checkpoint
        from mae.core.config import get_preset
        from mae.export import export_bundle
        from mae.model import MaskedAutoencoder

        torch.manual_seed(seed)
        config = get_preset("mae_vit_test_patch8")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, MaskedAutoencoder(config).state_dict(), config)
        export_bundle(checkpoint, bundle, verify=False)
    return checkpoint, bundle


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("integrity_models")
    return {seed: _model(base, seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 small JPEGs: 5 output files of 4."""
    folder = tmp_path_factory.mktemp("integrity_images")
    rng = np.random.default_rng(0)
    for i in range(20):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((48, 36), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.jpg")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, images) -> Path:
    """The uninterrupted single run with model 0."""
    out = tmp_path_factory.mktemp("integrity_reference") / "out"
    embed(images, models[0][1], out, engine="onnx", batch_size=BATCH, shard_size=SHARD_SIZE, workers=0, progress=False)
    return out


def copy_bundle(bundle: Path, target: Path) -> Path:
    shutil.copytree(bundle, target)
    return target


def embed_args(images: Path, bundle: Path, out: Path, *extra: object) -> list[object]:
    return [
        "embed", images, "--model", bundle, "--out", out, "--engine", "onnx", "--batch-size", BATCH,
        "--shard-size", SHARD_SIZE, "--workers", 0, *extra,
    ]  # fmt: skip


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


# ------------------------------------------------------------------------------------- 1. graph integrity
def test_a_graph_copied_in_from_another_model_is_refused(tmp_path, models, images, monkeypatch, capsys):
    """1: another model's encoder.onnx in a bundle used to run silently (embed and reconstruct)."""
    bundle = copy_bundle(models[0][1], tmp_path / "bundle")
    original = (bundle / "encoder.onnx").read_bytes()
    shutil.copyfile(models[1][1] / "encoder.onnx", bundle / "encoder.onnx")

    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, tmp_path / "out"))
    assert code == 2
    line = one_error(output)
    assert "encoder.onnx" in line and "not the file that was exported" in line
    assert not (tmp_path / "out" / "embeddings").exists() or not any((tmp_path / "out" / "embeddings").iterdir())

    photo = next(images.iterdir())
    code, output = run_cli(monkeypatch, capsys, "reconstruct", photo, "--model", bundle, "--engine", "onnx",
                           "--out", tmp_path / "r.png")  # fmt: skip
    assert code == 2 and "not the file that was exported" in one_error(output)

    code, output = run_cli(monkeypatch, capsys, "info", bundle)  # describes it, and says the graph changed
    assert code == 0 and "CHANGED since export" in output

    (bundle / "encoder.onnx").write_bytes(original)  # restored: runs again
    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, tmp_path / "out"))
    assert code == 0, output


def test_run_json_and_markers_carry_the_real_checksum(reference, models):
    """1: run.json's model_sha256 copied mae.json's value instead of hashing the file."""
    run = json.loads((reference / "run.json").read_text())
    actual = sha256_file(models[0][1] / "encoder.onnx")
    assert run["params"]["model_sha256"] == actual
    for marker_path in (reference / "done").iterdir():
        assert json.loads(marker_path.read_text())["model_sha256"] == actual


def test_resuming_after_the_model_changed_is_refused_not_mixed(tmp_path, models, images, monkeypatch, capsys):
    """1: an interrupted job resumed after a re-export finished with files of two models and exit 0."""
    bundle = copy_bundle(models[0][1], tmp_path / "bundle")
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, *embed_args(images, bundle, out))[0] == 0
    for name in ("00003.json", "00004.json"):  # as if it had been stopped before its last two files
        (out / "done" / name).unlink()
    shutil.rmtree(bundle)
    copy_bundle(models[1][1], bundle)  # a consistent re-export of other weights into the same folder

    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, out))
    assert code == 2
    assert "The model changed since" in one_error(output)
    assert sorted(p.name for p in (out / "done").iterdir()) == ["00000.json", "00001.json", "00002.json"]


def test_the_hash_cache_sees_a_copy_that_keeps_size_and_mtime(tmp_path):
    """The cache is keyed by ctime too: `cp -p` of a same-size file over a graph keeps its mtime."""
    path = tmp_path / "graph.bin"
    path.write_bytes(b"a" * 4096)
    first = cached_sha256(path)
    stat = path.stat()
    time.sleep(0.01)
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert cached_sha256(path) == sha256_file(path) != first


# -------------------------------------------------------------------------------- 2. torch engine source
def test_the_torch_engine_refuses_source_weights_that_changed(tmp_path, models, images, monkeypatch, capsys):
    """2: --engine torch on a bundle loaded its source checkpoint without checking its sha256."""
    from mae.export import export_bundle

    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    shutil.copyfile(models[0][0], checkpoint)
    bundle = tmp_path / "bundle"
    export_bundle(checkpoint, bundle, verify=False)
    shutil.copyfile(models[1][0], checkpoint)  # training continued into the same checkpoint.pt

    photo = next(images.iterdir())
    code, output = run_cli(monkeypatch, capsys, "reconstruct", photo, "--model", bundle, "--engine", "torch",
                           "--out", tmp_path / "r.png")  # fmt: skip
    assert code == 2
    line = one_error(output)
    assert "checkpoint.pt changed since the bundle" in line
    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, tmp_path / "out")[:-4], "--engine", "torch")
    assert code == 2 and "changed since the bundle" in one_error(output)


# ------------------------------------------------------------------------------------------ 3. shard plan
def test_a_different_worker_count_is_refused_and_the_job_says_what_is_missing(
    tmp_path, models, images, reference, monkeypatch, capsys
):
    """3: --shard 0/2 and --shard 1/3 into one --out exited 0 with 6 of 20 files missing and no word."""
    bundle, out = models[0][1], tmp_path / "out"
    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, out, "--shard", "0/2"))
    assert code == 0, output
    assert "3 of 5 output files done; 2 still to write" in output  # files 0, 2, 4 of 0..4
    summary = json.loads((out / "summary-0-of-2.json").read_text())
    assert summary["plan"] == {"workers": 2, "files": 5, "done": 3}

    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, out, "--shard", "1/3"))
    assert code == 2
    assert "split among 2 workers" in one_error(output) and "--shard I/2" in output

    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, out, "--shard", "1/2"))
    assert code == 0 and "still to write" not in output
    assert_same_output(out, reference)


def test_a_single_worker_may_always_finish_a_split_job(tmp_path, models, images, reference, monkeypatch, capsys):
    bundle, out = models[0][1], tmp_path / "out"
    assert run_cli(monkeypatch, capsys, *embed_args(images, bundle, out, "--shard", "1/2"))[0] == 0
    code, output = run_cli(monkeypatch, capsys, *embed_args(images, bundle, out))
    assert code == 0, output
    assert_same_output(out, reference)


def test_edited_marker_counts_are_not_trusted(tmp_path, reference, models, images):
    """8: a done/ marker whose row counts were edited ("1379 embedded of 400") was taken as done."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    marker_path = out / "done" / "00001.json"
    marker = json.loads(marker_path.read_text())
    marker["rows"] = 1379
    marker_path.write_text(json.dumps(marker))
    summary = embed(images, models[0][1], out, engine="onnx", batch_size=BATCH, shard_size=SHARD_SIZE, workers=0,
                    progress=False)  # fmt: skip
    assert summary["output"]["written_now"] == 1
    assert summary["counts"]["embedded"] + summary["counts"]["failed"] == 20
    assert_same_output(out, reference)


def test_run_json_is_created_like_every_other_file(reference):
    """8: run.json was created mode 0600 (mkstemp), unlike every other file."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert (reference / "run.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (reference / "run.json").stat().st_mode & 0o777 == (reference / "summary.json").stat().st_mode & 0o777


# ----------------------------------------------------------------------------------------- 4. concurrency
def test_a_second_run_keeps_the_first_runs_temporaries(tmp_path, reference, models, images):
    """4: a second `mae embed` deleted the first's in-flight temporaries, and the first died."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "done" / "00002.json").unlink()
    live = out / "embeddings" / f".00002.npy.{owner_tag()}.abcd1234.tmp"  # this process: alive
    host = owner_tag().rpartition("-")[0]
    dead = out / "embeddings" / f".00002.npy.{host}-{_dead_pid()}.abcd1234.tmp"
    untagged = out / "metadata" / ".00002.parquet.abcd1234.tmp"  # an older version's
    for path in (live, dead, untagged):
        path.write_bytes(b"half")
    embed(images, models[0][1], out, engine="onnx", batch_size=BATCH, shard_size=SHARD_SIZE, workers=0, progress=False)
    assert live.exists() and not dead.exists() and not untagged.exists()
    live.unlink()
    assert_same_output(out, reference)


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.slow
def test_two_embeds_started_a_moment_apart_both_finish_right(tmp_path, models, images, reference):
    """4: the second of two runs into one --out started 1-2 s apart made the first die (FileNotFoundError)."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mae.cli", *map(str, embed_args(images, models[0][1], out)), "--batch-size", "1"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
    assert first.returncode == 0, outputs[0]
    assert second.returncode == 0, outputs[1]
    assert "Traceback" not in "".join(outputs)
    # batch size is not part of what defines the output (the files are identical): compare with the reference
    assert_same_output(out, reference)


def test_a_second_export_into_the_same_folder_is_told_it_is_in_use(tmp_path, models, monkeypatch, capsys):
    """4: two `mae export` into one --out: the loser died with `OSError: Directory not empty`."""
    out = tmp_path / "bundle"
    with FolderLock(tmp_path / ".bundle.lock", "test", "test"):
        code, output = run_cli(monkeypatch, capsys, "export", models[0][0], "--out", out)
    assert code == 2
    assert "in use by another mae process" in one_error(output) and f"pid {os.getpid()}" in output
    assert not out.exists()


# ----------------------------------------------------------------------------------------- 7. leftovers
def test_staging_folders_of_killed_exports_are_removed(tmp_path, models, monkeypatch, capsys):
    """7: a SIGKILLed export left `.OUT.export-*` staging folders that no later export removed."""
    host = owner_tag().rpartition("-")[0]
    old = tmp_path / ".bundle.export-k2j3h4"  # an earlier version's name
    dead = tmp_path / f".bundle.{host}-{_dead_pid()}.x8y7z6w5.export"
    other = tmp_path / ".otherbundle.export-k2j3h4"  # another bundle's: not ours to remove
    for folder in (old, dead, other):
        folder.mkdir()
        (folder / "encoder.onnx").write_bytes(b"half")
    code, output = run_cli(monkeypatch, capsys, "export", models[0][0], "--out", tmp_path / "bundle")
    assert code == 0, output
    assert not old.exists() and not dead.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".otherbundle.export-k2j3h4", "bundle"]  # no lock left


# --------------------------------------------------------------------------------------- 5. file systems
def test_a_full_disk_is_a_message_and_the_rerun_after_freeing_space_is_identical(tmp_path, models, images, reference):
    """5: a full disk gave `OSError: 249600 requested and 26592 written` (a traceback)."""
    with tmpfs(tmp_path / "disk", 256) as disk:
        out = disk / "out"
        filler = fill(disk, leave_kib=24)
        result = run_mae(*embed_args(images, models[0][1], out))
        assert result.returncode == 2, result.stdout + result.stderr
        line = one_error(result.stderr)
        assert "no space left on the device" in line and str(out) in line
        assert "free space" in result.stderr
        filler.unlink()
        result = run_mae(*embed_args(images, models[0][1], out))
        assert result.returncode == 0, result.stderr
        assert_same_output(out, reference)


def test_a_read_only_file_system_is_a_message(tmp_path, models, images):
    with tmpfs(tmp_path / "ro", 64, read_only=True) as disk:
        result = run_mae(*embed_args(images, models[0][1], disk / "out"))
        assert result.returncode == 2
        assert "read-only" in one_error(result.stderr)
        photo = next(images.iterdir())
        result = run_mae("reconstruct", photo, "--model", models[0][1], "--engine", "onnx", "--out", disk / "r.png")
        assert result.returncode == 2 and "read-only" in one_error(result.stderr)


def test_no_permission_is_a_message(tmp_path, models, images):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        prefix = without_permission_override()
        result = run_mae(*embed_args(images, models[0][1], locked / "out"), prefix=prefix)
        assert result.returncode == 2, result.stderr
        assert "permission denied" in one_error(result.stderr)
        bench = ["bench", "--model", models[0][1], "--engines", "onnx", "--seconds", "0.05", "--mask-ratio", "0.75"]
        result = run_mae(*bench, "--no-roofline", "--json", locked / "b.json", prefix=prefix)
        assert result.returncode == 2 and "permission denied" in one_error(result.stderr), result.stderr
    finally:
        locked.chmod(0o755)


def test_an_existing_file_as_out_is_a_message(tmp_path, models, images, monkeypatch, capsys):
    """5: `--out` an existing file gave FileExistsError."""
    out = tmp_path / "out"
    out.write_text("not a folder")
    code, output = run_cli(monkeypatch, capsys, *embed_args(images, models[0][1], out))
    assert code == 2
    assert "a file of that name exists" in one_error(output)
    assert out.read_text() == "not a folder"


def test_faults_name_the_path_the_cause_and_the_remedy(tmp_path):
    """numpy's short write has no errno; every fault maps to a cause and a remedy."""
    exc = fault(OSError("249600 requested and 26592 written"), tmp_path / "x.npy")
    assert isinstance(exc, MAEError)
    assert "no space left" in exc.message and "x.npy" in exc.message and "free space" in exc.hint
    import errno

    for code, words in ((errno.EROFS, "read-only"), (errno.EACCES, "permission"), (errno.EDQUOT, "quota"),
                        (errno.EIO, "input/output"), (errno.ENOTDIR, "a file stands")):  # fmt: skip
        assert words in fault(OSError(code, os.strerror(code)), tmp_path).message


def test_the_cli_never_shows_a_traceback_for_a_stray_os_error(monkeypatch, capsys, tmp_path):
    from mae import cli

    def broken(**_options):
        raise OSError(28, "No space left on device", str(tmp_path / "somewhere"))

    monkeypatch.setattr("mae.demo.run_demo", broken)
    code, output = run_cli(monkeypatch, capsys, "demo", "--out", tmp_path / "demo")
    assert code == 2 and "no space left" in one_error(output) and str(tmp_path / "somewhere") in output
    assert cli  # the real entry point ran


def test_a_job_that_cannot_fit_says_so_before_it_starts(tmp_path, models, images):
    with tmpfs(tmp_path / "small", 128) as disk:
        fill(disk, leave_kib=4)
        result = run_mae(*embed_args(images, models[0][1], disk / "out"))
        assert "warning: this job writes about" in result.stderr
        assert result.returncode == 2 and "no space left" in one_error(result.stderr)
