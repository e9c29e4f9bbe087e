"""`mae train` when things go wrong: a full disk, a read-only or forbidden folder, a file where the run folder should
be, temporaries a killed run left, a second training into a live run's folder, bad hyper-parameters, unreadable
weights, noise files and data, a loss that turns NaN. Each says what is wrong (exit 2, no traceback) and leaves
nothing half-written taken for done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from fs_faults import fill, run_mae, tmpfs, without_permission_override
from PIL import Image

from mae.checkpoint import load_checkpoint
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.core.files import FileSystemFault, FolderLock, owner_tag
from mae.model import MaskedAutoencoder
from mae.train import TrainOptions, run_training

PRESET = "mae_vit_test_patch8"  # 32 px, 16 patches


@pytest.fixture(scope="module")
def images(tmp_path_factory, real_photos) -> Path:
    """8 small crops of real photos: 1 held out for previews, 7 to train on (3 batches of 2 per epoch)."""
    root = tmp_path_factory.mktemp("fault_data")
    for i in range(8):
        photo = real_photos[i % len(real_photos)]
        height, width = photo.shape[:2]
        top, left = (i * height) // 30, (i * width) // 30
        tile = photo[top : top + height // 2, left : left + width // 2]
        Image.fromarray(tile).resize((48, 40), Image.Resampling.BICUBIC).save(root / f"img_{i}.png")
    return root


def train_args(data: Path, out: Path, *more: object) -> list[object]:
    """A 3-epoch run of the tiny preset (3 optimizer steps an epoch), fp32 on the CPU, no loader processes."""
    return [
        "train", "--data", data, "--out", out, "--model", PRESET, "--epochs", 3, "--warmup-epochs", 1,
        "--batch-size", 2, "--blr", 1e-2, "--workers", 0, "--device", "cpu", *more,
    ]  # fmt: skip


def error_of(output: str) -> str:
    """The `error: ...` and `  hint: ...` lines."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith(("error: ", "  hint: "))]
    assert lines and lines[0].startswith("error: "), output
    return "\n".join(lines)


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith(".tmp"))


def same_weights(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# -------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_while_writing_the_checkpoint_keeps_the_previous_one(images, tmp_path, monkeypatch, capsys) -> None:
    code, _ = run_cli(monkeypatch, capsys, *train_args(images, tmp_path / "whole"))
    assert code == 0
    with tmpfs(tmp_path / "disk", 4096) as disk:  # room for the run, not for a full disk's worth more
        run = disk / "run"
        code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--max-steps", 3))  # epoch 1
        assert code == 0, output
        filler = fill(disk, leave_kib=32)  # the log still fits, a checkpoint (~540 KB) does not

        code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--resume"))
        message = error_of(output)
        assert code == 2, output
        assert f"Cannot write {run / 'checkpoint.pt'}: no space left on the device" in message
        assert "previous checkpoint" in message and "is intact" in message and "--resume" in message
        assert "(epoch 1.000, optimizer step 3)" in message
        payload = load_checkpoint(run / "checkpoint.pt")  # still loads, and holds epoch 1
        assert payload["epoch"] == 1 and payload["position"] == {"epoch": 1, "batch": 0, "step": 3, "images_seen": 6}
        assert temporaries(run) == []

        filler.unlink()
        code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--resume"))
        assert code == 0, output
        same_weights(tmp_path / "whole" / "checkpoint.pt", run / "checkpoint.pt")
        same_weights(tmp_path / "whole" / "checkpoint-3.pt", run / "checkpoint-3.pt")
        assert sorted(p.name for p in (run / "previews").iterdir()) == [f"epoch_000{e}.png" for e in (1, 2, 3)]
        assert temporaries(run) == []


def test_an_epoch_end_output_that_failed_is_written_by_the_resumed_run(images, tmp_path, monkeypatch, capsys) -> None:
    """checkpoint.pt is written first at an epoch end; a fault in what follows (the preview here) is reported with
    that checkpoint, and --resume writes what is missing instead of taking the epoch for done."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "previews").write_text("a file where the previews folder goes")
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run))
    message = error_of(output)
    assert code == 2 and f"Cannot create the folder {run / 'previews'}: a file of that name exists" in message
    assert f"{run / 'checkpoint.pt'} (epoch 1.000, optimizer step 3), is intact" in message
    (run / "previews").unlink()
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--resume"))
    assert code == 0, output
    assert sorted(p.name for p in (run / "previews").iterdir()) == [f"epoch_000{e}.png" for e in (1, 2, 3)]
    import json

    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in events if r["event"] == "epoch"] == [1, 2, 3]


# ------------------------------------------------------------------------------- read-only, permission, file
def test_a_read_only_file_system(images, tmp_path, monkeypatch, capsys) -> None:
    with tmpfs(tmp_path / "ro", 1024, read_only=True) as mount:
        code, output = run_cli(monkeypatch, capsys, *train_args(images, mount / "run"))
        message = error_of(output)
        assert code == 2 and f"Cannot create the folder {mount / 'run'}: the file system is read-only" in message
        assert "hint: choose a writable location" in message
        with pytest.raises(FileSystemFault, match="read-only"):  # the library raises the message too, no OSError
            run_training(
                TrainOptions(data=images, out=mount / "run", model=PRESET, batch_size=2, workers=0, progress=False)
            )


def test_folders_without_write_permission(images, tmp_path, monkeypatch, capsys) -> None:
    """Root obeys permissions once it has no CAP_DAC_OVERRIDE (a child under setpriv)."""
    prefix = without_permission_override()
    parent = tmp_path / "locked"
    parent.mkdir()
    run = tmp_path / "run"  # a run of one epoch, then its previews folder made read-only for everyone
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--max-steps", 3))
    assert code == 0, output
    parent.chmod(0o555)
    (run / "previews").chmod(0o555)
    try:
        new = run_mae(*train_args(images, parent / "run"), prefix=prefix)
        resumed = run_mae(*train_args(images, run, "--resume"), prefix=prefix)
    finally:
        parent.chmod(0o755)
        (run / "previews").chmod(0o755)
    message = error_of(new.stdout + new.stderr)
    assert new.returncode == 2 and f"Cannot create the folder {parent / 'run'}: permission denied" in message
    assert not (parent / "run").exists()

    message = error_of(resumed.stdout + resumed.stderr)  # epoch 2 trained, its checkpoint written, not its preview
    assert resumed.returncode == 2
    # (mae.core.files names the temporary .epoch_0002.png.OWNER.RANDOM.tmp that mkstemp could not create, or the file)
    assert f"Cannot write {run / 'previews'}/" in message and "epoch_0002.png" in message
    assert "permission denied" in message
    assert f"{run / 'checkpoint.pt'} (epoch 2.000, optimizer step 6), is intact: --resume continues" in message
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2 and temporaries(run) == []
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--resume"))
    assert code == 0, output
    assert sorted(p.name for p in (run / "previews").iterdir()) == [f"epoch_000{e}.png" for e in (1, 2, 3)]


def test_a_file_where_the_run_folder_should_be(images, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    out.write_text("not a folder")
    for more in ((), ("--resume",)):
        code, output = run_cli(monkeypatch, capsys, *train_args(images, out, *more))
        message = error_of(output)
        assert code == 2 and f"Cannot create the folder {out}: a file of that name exists" in message, more
        assert "remove or rename that file" in message
    assert out.read_text() == "not a folder"
    code, output = run_cli(monkeypatch, capsys, *train_args(images, out / "inside"))
    assert code == 2 and "a file stands where a folder is needed" in error_of(output)


# ---------------------------------------------------------------------------------- leftovers and the lock
def test_resume_removes_the_temporaries_of_dead_runs_only(images, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--max-steps", 3))
    assert code == 0, output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    host = owner_tag().rpartition("-")[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        full_size = (run / "checkpoint.pt").read_bytes()
        gone = [
            f".checkpoint.pt.{host}-{dead.pid}.abcd1234.tmp",  # a SIGKILLed run's full-size temporary
            ".checkpoint.pt.abcd1234.tmp",  # untagged: an older version's
            ".checkpoint-1.pt.tmp",  # the old epoch-checkpoint copy's
            f".log.jsonl.{host}-{dead.pid}.x1y2z3.tmp",
            f"previews/.epoch_0002.png.{host}-{dead.pid}.q9w8e7.tmp",
        ]
        kept = [
            f".checkpoint.pt.{owner_tag()}.live1234.tmp",  # this process's
            f".checkpoint.pt.{host}-{live.pid}.live5678.tmp",  # another live process's
            f".checkpoint.pt.otherhost-{dead.pid}.abcd1234.tmp",  # another machine's: it may be alive
            ".notes.txt.abcd.tmp",  # not a temporary of the run's files
        ]
        for name in gone + kept:
            (run / name).write_bytes(full_size)
        code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--resume"))
        assert code == 0, output
        assert "removed 5 unfinished temporary files" in " ".join(output.split())
        assert [name for name in gone if (run / name).exists()] == []
        assert [name for name in kept if not (run / name).exists()] == []
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    finally:
        live.kill()
        live.wait()


def test_a_run_folder_in_use_is_refused(images, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    lock = FolderLock(run / ".lock", "the test's run", hint="").acquire()  # as a live `mae train` holds it
    try:
        for more in ((), ("--resume",)):
            code, output = run_cli(monkeypatch, capsys, *train_args(images, run, *more))
            message = error_of(output)
            assert code == 2 and f"The run folder {run} is in use by another mae process" in message, more
            assert f"pid {os.getpid()} on " in message
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written beside the holder's
    finally:
        lock.release()
    code, output = run_cli(monkeypatch, capsys, *train_args(images, run, "--max-steps", 1))
    assert code == 0, output  # released: the folder is free again


# ------------------------------------------------------------------------------------------ hyper-parameters
@pytest.mark.parametrize(
    "option, value, wanted",
    [
        ("--lr", "nan", "--lr must be a finite number above 0, got nan"),
        ("--blr", "inf", "--blr must be a finite number above 0, got inf"),
        ("--min-lr", "inf", "--min-lr must be a finite number, 0 or more, got inf"),
        ("--weight-decay", "nan", "--weight-decay must be a finite number, 0 or more, got nan"),
        ("--checkpoint-minutes", "nan", "--checkpoint-minutes must be a number of minutes, 0 or more"),
        ("--max-minutes", "nan", "--max-minutes must be a number of minutes above 0, got nan"),
        ("--seed", "-1", "--seed must be a whole number from 0 to"),
        ("--accum-iter", "5", "--accum-iter 5 is more than the 3 batches of an epoch"),
    ],
)
def test_bad_hyper_parameters_are_refused_before_anything_is_written(
    images, tmp_path, monkeypatch, capsys, option, value, wanted
) -> None:
    code, output = run_cli(monkeypatch, capsys, *train_args(images, tmp_path / "run", option, value))
    assert code == 2 and wanted in error_of(output), output
    assert not (tmp_path / "run").exists()


def test_bad_hyper_parameters_in_python(images, tmp_path) -> None:
    options = {"data": images, "out": tmp_path / "run", "model": PRESET, "workers": 0, "progress": False}
    bad = {
        "epochs": (0, "--epochs must be a whole number, at least 1, got 0"),
        "warmup_epochs": (None, "--warmup-epochs must be a whole number, at least 0, got None"),
        "batch_size": (1.5, "--batch-size must be a whole number, at least 1, got 1.5"),
        "mask_ratio": (float("nan"), "--mask-ratio must be a number in [0, 1), got nan"),
        "preview_images": (-1, "--preview-images must be a whole number, at least 0, got -1"),
        "lr": (float("-inf"), "--lr must be a finite number above 0, got -inf"),
    }
    with pytest.raises(MAEError) as caught:
        run_training(TrainOptions(**options, **{name: value for name, (value, _) in bad.items()}))
    assert str(caught.value).startswith("Invalid training options: ")
    for _, wanted in bad.values():
        assert wanted in str(caught.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- unreadable inputs
@pytest.fixture
def broken_weights(tmp_path) -> dict[str, Path]:
    from mae.checkpoint import save_random_weights

    whole = save_random_weights(get_preset(PRESET), tmp_path / "whole.pt").read_bytes()
    files = {"empty": b"", "truncated": whole[: len(whole) // 2], "text": b"hello, I am not a checkpoint\n"}
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    return {name: tmp_path / f"{name}.pt" for name in files}


@pytest.mark.parametrize(
    "kind, wanted",
    [
        ("empty", "the file is empty (0 bytes)"),
        ("truncated", "the file is truncated"),
        ("text", "it is not a PyTorch (torch.save) file"),
    ],
)
def test_unreadable_weights_say_why(broken_weights, images, tmp_path, monkeypatch, capsys, kind, wanted) -> None:
    path = broken_weights[kind]
    for args in (["info", path], ["train", "--data", images, "--init", path, "--out", tmp_path / "run"]):
        code, output = run_cli(monkeypatch, capsys, *args)
        message = error_of(output)
        assert code == 2 and f"Cannot read {path}: {wanted}" in message, args


def test_a_noise_file_that_is_no_npy_array(images, tmp_path, monkeypatch, capsys) -> None:
    from mae.checkpoint import save_random_weights

    weights = save_random_weights(get_preset(PRESET), tmp_path / "w.pt")
    (tmp_path / "garbage.npy").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"noise": 1}], dtype=object))
    cases = {
        "garbage.npy": "is not a .npy file (no NumPy header)",
        "empty.npy": "is empty",
        "objects.npy": "it holds Python objects",
    }
    for name, wanted in cases.items():
        path = tmp_path / name
        image = images / "img_0.png"
        args = [
            "reconstruct",
            image,
            "--model",
            weights,
            "--engine",
            "torch",
            "--noise",
            path,
            "--out",
            tmp_path / "x.png",
        ]
        code, output = run_cli(monkeypatch, capsys, *args)
        message = error_of(output)
        assert code == 2 and f"Noise file {path}" in message and wanted in message, name
        assert "a .npy float array of shape [1, 16]" in message
        assert "allow_pickle" not in message and "pickle" not in message.lower()


# ------------------------------------------------------------------------------------------ unreadable data
@pytest.mark.parametrize(
    "files, batch, wanted",
    [
        (
            13,
            2,
            "None of the 12 training files tried could be read as an image (of 13; the other one was not reached: "
            "an epoch drops its incomplete last batch).",
        ),
        (4, 2, "None of the 4 training files could be read as an image."),
        (1, 1, "The only training file could not be read as an image."),
    ],
    ids=["some-not-reached", "all-tried", "one"],
)
def test_a_folder_of_unreadable_files_counts_them_right(tmp_path, monkeypatch, capsys, files, batch, wanted) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(files):
        (data / f"bad_{i:02d}.png").write_bytes(b"not a png")
    more = ("--preview-images", 0, "--batch-size", batch)
    code, output = run_cli(monkeypatch, capsys, *train_args(data, tmp_path / "run", *more))
    message = error_of(output)
    assert code == 2 and message.splitlines()[0] == f"error: {wanted}", message
    assert "(bad_00.png: not an image)" in message


# --------------------------------------------------------------------------------------------- NaN stop
def nan_loss_from_the_start(monkeypatch) -> None:
    real_loss = MaskedAutoencoder.forward_loss

    def nan_loss(self, images, pred, mask):
        return real_loss(self, images, pred, mask) * float("nan")

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", nan_loss)


def test_the_nan_stop_names_only_a_checkpoint_that_exists(images, tmp_path, monkeypatch, capsys) -> None:
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        nan_loss_from_the_start(patch)
        code, output = run_cli(monkeypatch, capsys, *train_args(images, fresh))
    message = error_of(output)
    assert code == 2 and "The loss became nan" in message and "no checkpoint was written" in message
    hint = message.splitlines()[1]
    assert "there is no checkpoint to --resume" in hint and "continues" not in hint
    assert not (fresh / "checkpoint.pt").exists()

    resumed = tmp_path / "resumed"
    code, output = run_cli(monkeypatch, capsys, *train_args(images, resumed, "--max-steps", 3))
    assert code == 0, output
    with monkeypatch.context() as patch:
        nan_loss_from_the_start(patch)
        code, output = run_cli(monkeypatch, capsys, *train_args(images, resumed, "--resume"))
    message = error_of(output)
    assert code == 2
    assert f"the last good checkpoint, {resumed / 'checkpoint.pt'} (epoch 1.000, optimizer step 3), is kept" in message
    assert load_checkpoint(resumed / "checkpoint.pt")["position"]["step"] == 3
