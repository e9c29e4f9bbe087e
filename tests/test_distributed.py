"""Data-parallel training: `torchrun` with 2 CPU processes (gloo) equals one process with twice the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae.checkpoint import load_checkpoint
from mae.core.errors import MAEError
from mae.distributed import init_distributed
from mae.train import TrainOptions, run_training

PRESET = "mae_vit_test_patch8"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, real_photos) -> Path:
    """16 small crops of real photos: 3 held out, 13 for training."""
    root = tmp_path_factory.mktemp("ddp_data")
    for i in range(16):
        photo = real_photos[i % len(real_photos)]
        height, width = photo.shape[:2]
        top, left = (i * height) // 40, (i * width) // 40
        tile = photo[top : top + height // 2, left : left + width // 2]
        Image.fromarray(tile).resize((48, 40), Image.Resampling.BICUBIC).save(root / f"img_{i:02d}.png")
    return root


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MAEError, match="WORLD_SIZE"):
        init_distributed("cpu")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_twice_the_batch(image_folder, tmp_path):
    common = ["--data", str(image_folder), "--model", PRESET, "--epochs", "2", "--warmup-epochs", "1"]
    common += ["--blr", "1e-2", "--workers", "0", "--device", "cpu", "--save-every", "1"]
    ddp_out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "mae.cli", "train", *common, "--batch-size", "2", "--out", str(ddp_out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    # one writer: every step and epoch logged once
    records = [json.loads(line) for line in (ddp_out / "log.jsonl").read_text().splitlines()]
    # per rank: 13 images -> 7 (padded) -> 3 batches of 2 per epoch
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 7))
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    assert records[-1]["images"] == 2 * 3 * 2 * 2  # epochs x steps x batch x ranks
    assert sorted(p.name for p in ddp_out.glob("*.pt")) == ["checkpoint-1.pt", "checkpoint-2.pt", "checkpoint.pt"]
    assert not list(ddp_out.glob(".*.tmp"))
    payload = load_checkpoint(ddp_out / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["train"]["world_size"] == 2 and len(payload["rng"]) == 2
    assert json.loads((ddp_out / "run.json").read_text())["effective_batch"] == 4

    # rank r's k-th batch of 2 and the other rank's together are the single process's k-th batch of 4; the
    # gradients are averaged over ranks, so the weights agree
    def options(**changes) -> TrainOptions:  # the torchrun command's options
        base = dict(data=image_folder, model=PRESET, epochs=2, warmup_epochs=1, blr=1e-2, workers=0, device="cpu")
        return TrainOptions(**base, progress=False, **changes)

    single = run_training(options(batch_size=4, out=tmp_path / "single"))
    assert single.global_step == 6
    single_state = load_checkpoint(single.checkpoint)["model"]
    for name, tensor in payload["model"].items():
        expected = single_state[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias adds the same logit to every key of a query, which softmax ignores: its exact gradient
            # is 0, and Adam turns the rounding noise left in its place into steps of up to lr. Bound it by that.
            dim = tensor.shape[0] // 3
            key = slice(dim, 2 * dim)
            assert (tensor[key] - expected[key]).abs().max() <= single.global_step * 1e-2 * 4 / 256
            tensor, expected = tensor.clone(), expected.clone()
            tensor[key] = expected[key] = 0
        torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-5, msg=name)
    single_records = map(json.loads, (tmp_path / "single" / "log.jsonl").read_text().splitlines())
    single_losses = [r["loss"] for r in single_records if r["event"] == "step"]
    ddp_losses = [r["loss"] for r in records if r["event"] == "step"]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)

    # resuming with another number of processes would change the effective batch: refused
    with pytest.raises(MAEError, match="world_size: the run has 2, now 1"):
        run_training(options(batch_size=2, out=ddp_out, resume=True))
