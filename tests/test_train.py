"""`mae train`: the paper's recipe, the run directory, exact resume, divergence, precision, --init, the CLI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae.checkpoint import load_checkpoint
from mae.core.config import get_preset
from mae.core.errors import MAEError
from mae.data import find_images, split_holdout
from mae.model import MaskedAutoencoder
from mae.train import (
    TrainOptions,
    learning_rate,
    peak_learning_rate,
    run_training,
    weight_decay_groups,
)

PRESET = "mae_vit_test_patch8"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, real_photos) -> Path:
    """16 small crops of real photos (14 train + 2 held out) and one corrupt file."""
    root = tmp_path_factory.mktemp("train_data")
    for i in range(16):
        photo = real_photos[i % len(real_photos)]
        height, width = photo.shape[:2]
        top, left = (i * height) // 40, (i * width) // 40
        tile = photo[top : top + height // 2, left : left + width // 2]
        suffix = "jpg" if i % 3 else "png"
        Image.fromarray(tile).resize((48, 40), Image.Resampling.BICUBIC).save(root / f"img_{i:02d}.{suffix}")
    (root / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return root


@pytest.fixture(scope="module")
def clean_folder(image_folder, tmp_path_factory) -> Path:
    """The same 16 images without the corrupt file (so that every batch is full)."""
    root = tmp_path_factory.mktemp("clean_data")
    for path in image_folder.iterdir():
        if "broken" not in path.name:
            (root / path.name).write_bytes(path.read_bytes())
    return root


def options(data: Path, out: Path, **changes) -> TrainOptions:
    base = dict(
        data=data,
        out=out,
        model=PRESET,
        epochs=2,
        warmup_epochs=1,
        batch_size=2,
        blr=1e-2,
        workers=0,
        progress=False,
    )
    return TrainOptions(**{**base, **changes})


def log_records(out: Path, event: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if event is None or r["event"] == event]


def assert_same_weights(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ recipe
def test_learning_rate_schedule():
    peak, floor = 1e-3, 1e-5
    assert learning_rate(0.0, peak, floor, 4, 20) == 0.0
    assert learning_rate(1.0, peak, floor, 4, 20) == pytest.approx(peak / 4)
    assert learning_rate(4.0, peak, floor, 4, 20) == pytest.approx(peak)
    assert learning_rate(12.0, peak, floor, 4, 20) == pytest.approx((peak + floor) / 2)  # cosine half way
    assert learning_rate(20.0, peak, floor, 4, 20) == pytest.approx(floor)
    epochs = [4 + 16 * k / 10 for k in range(11)]
    values = [learning_rate(e, peak, floor, 4, 20) for e in epochs]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert learning_rate(0.5, peak, floor, 0, 10) == pytest.approx(
        floor + (peak - floor) * (1 + math.cos(0.05 * math.pi)) / 2
    )


def test_peak_learning_rate_scales_with_effective_batch():
    assert peak_learning_rate(1.5e-4, None, 64, 4, 8) == pytest.approx(1.5e-4 * 2048 / 256)
    assert peak_learning_rate(1.5e-4, 3e-4, 64, 4, 8) == 3e-4


def test_weight_decay_groups(tiny_config):
    model = MaskedAutoencoder(tiny_config)
    groups = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 0.05
    assert "pos_embed" not in no_decay | decay and "decoder_pos_embed" not in no_decay | decay  # fixed sin-cos
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decay
    assert {"blocks.0.norm1.weight", "norm.weight", "decoder_norm.bias", "patch_embed.proj.bias"} <= no_decay
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay | decay == trainable and not no_decay & decay


# -------------------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = run_training(options(image_folder, out, epochs=2, save_every=1, accum_iter=2))
    return out, result


def test_run_writes_the_run_directory(finished_run, image_folder):
    out, result = finished_run
    assert result.stopped == "completed" and result.epochs_completed == 2 and result.epoch_position == 2.0
    # 17 files: 3 held out (one in five), 14 left, the corrupt one among them: 7 batches of 2, 3 optimizer steps
    assert result.global_step == 6
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    assert result.images_per_s > 0
    assert result.epoch_checkpoints == [out / "checkpoint-1.pt", out / "checkpoint-2.pt"]
    assert result.previews == [out / "previews" / "epoch_0001.png", out / "previews" / "epoch_0002.png"]
    assert result.loss_curve == out / "loss_curve.png"
    for path in [result.checkpoint, *result.epoch_checkpoints, *result.previews, result.loss_curve, out / "run.json"]:
        assert path.is_file(), path
    with Image.open(result.previews[0]) as preview:
        assert preview.width > 4 * 32 and preview.height > 3 * 32  # 4 panels, one row per held-out image
    assert [Path(p).name for p, _ in result.skipped_files] == ["zz_broken.jpg"]

    steps = log_records(out, "step")
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in steps)
    assert steps[0]["lr"] == 0.0  # warmup starts from zero
    assert [r["epoch"] for r in log_records(out, "epoch")] == [1, 2]
    skipped = log_records(out, "skipped_file")
    assert len(skipped) == 1 and skipped[0]["reason"] == "corrupt"

    run = json.loads((out / "run.json").read_text())
    assert run["effective_batch"] == 4 and run["peak_lr"] == pytest.approx(1e-2 * 4 / 256)
    assert run["previews_held_out"] and len(run["preview_images"]) == 3
    assert not {Path(p).name for p in run["preview_images"]} & {"zz_broken.jpg"}


def test_checkpoints_load_as_weights(finished_run):
    from mae.weights import load_model

    out, result = finished_run
    payload = load_checkpoint(result.checkpoint)
    images_seen = 2 * (14 - 1)  # every training file each epoch (7 full batches of 2), less the corrupt one
    assert payload["epoch"] == 2
    assert payload["position"] == {"epoch": 2, "batch": 0, "step": 6, "images_seen": images_seen}
    assert payload["config"] == get_preset(PRESET).replace(norm_pix_loss=True)
    model, loaded = load_model(result.checkpoint)
    assert loaded.has_decoder and loaded.config == result.config
    assert load_checkpoint(out / "checkpoint-1.pt")["epoch"] == 1


def test_existing_run_is_never_overwritten(finished_run, image_folder):
    out, _ = finished_run
    with pytest.raises(MAEError, match="already holds a run"):
        run_training(options(image_folder, out))


def test_resume_of_a_finished_run_does_nothing(finished_run, image_folder):
    out, _ = finished_run
    before = (out / "checkpoint.pt").read_bytes()
    result = run_training(options(image_folder, out, save_every=1, accum_iter=2, resume=True))
    assert result.stopped == "already_complete" and result.global_step == 6
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_needs_a_checkpoint_and_the_same_settings(finished_run, image_folder, tmp_path):
    out, _ = finished_run
    with pytest.raises(MAEError, match="no checkpoint.pt"):
        run_training(options(image_folder, tmp_path / "nothing", resume=True))
    with pytest.raises(MAEError, match=r"batch_size: the run has 2, now 4"):
        run_training(options(image_folder, out, accum_iter=2, batch_size=4, resume=True))
    with pytest.raises(MAEError, match="embed_dim"):
        run_training(options(image_folder, out, accum_iter=2, model="mae_vit_mini_patch8", resume=True))
    with pytest.raises(MAEError, match="norm_pix_loss"):
        run_training(options(image_folder, out, accum_iter=2, norm_pix_loss=False, resume=True))
    with pytest.raises(MAEError, match=r"repeat: the run has 1, now 2"):
        run_training(options(image_folder, out, accum_iter=2, repeat=2, resume=True))


# ------------------------------------------------------------------------------------------- exact resume
@pytest.mark.slow  # about 1 s on an idle machine, 10 s on a busy one
@pytest.mark.parametrize(
    "accum_iter, epochs, stop_after_steps", [(1, 2, 6), (4, 3, 1)], ids=["epoch-boundary", "mid-epoch"]
)
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
    clean_folder, tmp_path, accum_iter, epochs, stop_after_steps
):
    # 16 images: 13 train (3 held out) -> 6 batches of 2 per epoch (the 13th image is dropped). accum_iter 1: 6
    # optimizer steps per epoch; accum_iter 4: 1 step after batch 4, and batches 5-6 only accumulate a gradient
    # that the next epoch discards (as the original), so a stop after step 1 resumes at batch 4 of epoch 0.
    def train(out: str, **changes):
        return run_training(options(clean_folder, tmp_path / out, accum_iter=accum_iter, epochs=epochs, **changes))

    whole = train("whole", workers=2)
    first = train("split", max_steps=stop_after_steps)
    assert first.stopped == "max_steps" and first.global_step == stop_after_steps
    position = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["position"]
    assert position["step"] == stop_after_steps
    if accum_iter == 1:
        assert (position["epoch"], position["batch"]) == (1, 0) and first.epochs_completed == 1
    else:
        assert (position["epoch"], position["batch"]) == (0, 4)
    second = train("split", resume=True)
    assert second.stopped == "completed" and second.global_step == whole.global_step

    assert_same_weights(tmp_path / "whole" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt")
    optimizer_whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["optimizer"]
    optimizer_split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["optimizer"]
    for key, state in optimizer_whole["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], optimizer_split["state"][key]["exp_avg_sq"])
    # the log of the split run reads like the uninterrupted one, plus the stop / resume events
    whole_steps = log_records(tmp_path / "whole", "step")
    split_steps = log_records(tmp_path / "split", "step")
    assert [r["step"] for r in split_steps] == [r["step"] for r in whole_steps]
    for a, b in zip(whole_steps, split_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    events = [r["event"] for r in log_records(tmp_path / "split") if r["event"] in ("stopped", "resumed")]
    assert events == ["stopped", "resumed"]


def test_max_minutes_stops_after_a_step_with_a_resumable_checkpoint(clean_folder, tmp_path):
    result = run_training(options(clean_folder, tmp_path / "run", epochs=1, max_minutes=1e-9))
    assert result.stopped == "max_minutes" and result.global_step == 1
    assert load_checkpoint(result.checkpoint)["position"]["step"] == 1
    resumed = run_training(options(clean_folder, tmp_path / "run", epochs=1, resume=True))
    assert resumed.stopped == "completed" and resumed.global_step == 6 and resumed.epochs_completed == 1


# ------------------------------------------------------------------------------------------------ failures
@pytest.mark.parametrize("checkpoint_minutes, last_good_step", [(10.0, 6), (0.0, 8)], ids=["epoch-end", "every-step"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    clean_folder, tmp_path, monkeypatch, checkpoint_minutes, last_good_step
):
    real_loss = MaskedAutoencoder.forward_loss
    calls = {"count": 0}

    def loss_turning_nan(self, images, pred, mask):
        calls["count"] += self.training  # the previews (eval mode) do not count
        loss = real_loss(self, images, pred, mask)
        return loss * float("nan") if calls["count"] > 8 else loss  # epoch 1 has 6 batches: NaN at step 9

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", loss_turning_nan)
    out = tmp_path / "run"
    with pytest.raises(MAEError, match=r"loss became nan .* last good checkpoint") as excinfo:
        run_training(options(clean_folder, out, epochs=3, checkpoint_minutes=checkpoint_minutes))
    assert "epoch 1" in str(excinfo.value)
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == 1 and payload["position"]["step"] == last_good_step
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert log_records(out)[-1] == {"event": "stopped", "reason": "non_finite_loss", "step": 8}


def test_first_interrupt_finishes_the_step_and_checkpoints(clean_folder, tmp_path, monkeypatch):
    import os
    import signal

    real_loss = MaskedAutoencoder.forward_loss
    calls = {"count": 0}

    def loss_then_ctrl_c(self, images, pred, mask):
        calls["count"] += self.training
        if calls["count"] == 4:  # during batch 4 of epoch 1, with accum_iter 2: the stop comes after step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, images, pred, mask)

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", loss_then_ctrl_c)
    out = tmp_path / "run"
    result = run_training(options(clean_folder, out, accum_iter=2))
    assert result.stopped == "interrupted" and result.global_step == 2
    assert load_checkpoint(out / "checkpoint.pt")["position"] == {"epoch": 0, "batch": 4, "step": 2, "images_seen": 8}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    assert run_training(options(clean_folder, out, accum_iter=2, resume=True)).stopped == "completed"


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(MAEError, match="No images found"):
        run_training(options(tmp_path / "data", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_folder_of_unreadable_files_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"bad_{i}.png").write_bytes(b"not a png")
    with pytest.raises(MAEError, match="None of the 4 training files could be read"):
        run_training(options(tmp_path / "data", tmp_path / "out", epochs=1))


def test_too_few_images_for_a_batch(clean_folder, tmp_path):
    with pytest.raises(MAEError, match="no full batch of 64"):
        run_training(options(clean_folder, tmp_path / "out", batch_size=64))


def test_repeat_makes_longer_epochs(clean_folder, tmp_path):
    train_images = len(split_holdout(find_images(clean_folder), 4)[0])  # batch 2, incomplete batches dropped
    once = run_training(options(clean_folder, tmp_path / "once", epochs=1))
    thrice = run_training(options(clean_folder, tmp_path / "thrice", epochs=1, repeat=3))
    assert once.global_step == train_images // 2
    assert thrice.global_step == 3 * train_images // 2


def test_fp16_needs_cuda(clean_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    with pytest.raises(MAEError, match="fp16 training needs a CUDA GPU"):
        run_training(options(clean_folder, tmp_path / "out", precision="fp16"))


def test_bf16_autocast_trains_on_cpu(clean_folder, tmp_path):
    # Insisting: the tiny model trains in bf16 on any CPU, emulated or not (refusal: tests/test_hardware.py).
    bf16 = {"precision": "bf16", "allow_emulated_bf16": True}
    result = run_training(options(clean_folder, tmp_path / "out", max_steps=2, device="cpu", **bf16))
    assert result.global_step == 2 and math.isfinite(result.final_loss)
    assert load_checkpoint(result.checkpoint)["train"]["precision"] == "bf16"


# ---------------------------------------------------------------------------------------------------- init
def test_init_takes_architecture_and_weights_from_the_file(finished_run, clean_folder, tmp_path):
    out, _ = finished_run
    source = out / "checkpoint-1.pt"
    # warmup makes the first step's lr 0: AdamW then changes nothing, so the weights are the loaded ones
    result = run_training(options(clean_folder, tmp_path / "init", model=None, init=source, max_steps=1))
    assert result.config == load_checkpoint(source)["config"]
    assert_same_weights(source, result.checkpoint)
    with pytest.raises(MAEError, match="--init takes the architecture"):
        run_training(options(clean_folder, tmp_path / "both", init=source))

    bigger = run_training(options(clean_folder, tmp_path / "bigger", model=None, init=source, img_size=48, max_steps=1))
    assert bigger.config.img_size == 48 and bigger.config.num_patches == 36
    assert load_checkpoint(bigger.checkpoint)["model"]["pos_embed"].shape == (1, 37, 32)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_train_and_its_errors(clean_folder, tmp_path, monkeypatch, capsys):
    from mae import cli

    def run_cli(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["mae", "train", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("--data", str(empty), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "error: No images found" in err and "Traceback" not in err

    args = ["--data", str(clean_folder), "--model", PRESET, "--out", str(tmp_path / "cli"), "--epochs", "1"]
    args += ["--batch-size", "4", "--workers", "0", "--precision", "fp32", "--no-norm-pix-loss", "--blr", "1e-3"]
    code = 0
    monkeypatch.setattr(sys, "argv", ["mae", "train", *args])
    try:
        cli.main()
    except SystemExit as exc:  # typer may exit 0 after a command
        code = exc.code or 0
    assert code == 0
    payload = load_checkpoint(tmp_path / "cli" / "checkpoint.pt")
    assert payload["epoch"] == 1 and not payload["config"].norm_pix_loss
    assert run_cli(*args) == 2  # the run exists: refused, not overwritten
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- plots
def test_loss_curve_picture_helpers():
    from mae.plots import loss_curve, nice_ticks, smooth

    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.61) == [0.2, 0.3, 0.4, 0.5, 0.6]  # step 0.1: the round step at or above 0.096
    assert nice_ticks(0.13, 0.61, count=4) == [0.2, 0.4, 0.6]  # 0.12 rounds up to a step of 0.2
    assert smooth([2.0, 2.0, 2.0], weight=0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected from the start
    assert smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 1.0 * 0.5 / 0.75])
    picture = loss_curve([1, 2, 3, 4], [1.0, float("nan"), 0.8, 0.7], [0.0, 1e-4, 2e-4, 1e-4])
    assert picture.size == (900, 560)
    colours = {colour for _, colour in picture.getcolors(maxcolors=1 << 16)}
    assert (31, 90, 180) in colours and (200, 100, 30) in colours  # smoothed loss and lr lines drawn

    empty = loss_curve([1], [float("inf")])
    assert (31, 90, 180) not in {colour for _, colour in empty.getcolors(maxcolors=1 << 16)}


def test_the_loss_curve_and_the_summary_say_which_loss_they_quote():
    """The curve quotes the last step's loss, the summaries the epoch mean: each says which (they differed
    unexplained: "last 0.3986" beside "final loss 0.3784")."""
    from mae.plots import loss_axis_label

    assert loss_axis_label([0.5, 0.3986]) == "loss (last step 0.3986)"
