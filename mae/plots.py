"""A loss-curve picture drawn with Pillow alone (no matplotlib): raw loss per logged step, a smoothed line on top,
and the learning rate on its own axis underneath."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .core.files import atomic_write_bytes

WIDTH, HEIGHT = 900, 560
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 24, 40, 44
LR_PANEL_HEIGHT = 110  # the learning-rate strip under the loss plot
PANEL_GAP = 36
RAW_COLOUR = (160, 190, 230)
SMOOTH_COLOUR = (31, 90, 180)
LR_COLOUR = (200, 100, 30)
GRID_COLOUR = (225, 225, 225)
AXIS_COLOUR = (60, 60, 60)
MAX_POINTS = 4000  # points drawn per line at most


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing). The default weight averages over
    about a twentieth of the points, so short and long runs look alike."""
    if weight is None:
        weight = 1.0 - 1.0 / max(1.0, len(values) / 20.0)
    smoothed, running, norm = [], 0.0, 0.0
    for value in values:
        running = weight * running + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        smoothed.append(running / norm)
    return smoothed


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw_step = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


class _Axes:
    """Maps data coordinates into a pixel box."""

    def __init__(self, box: tuple[int, int, int, int], x_range: tuple[float, float], y_range: tuple[float, float]):
        self.left, self.top, self.right, self.bottom = box
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range

    def point(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x0) / (self.x1 - self.x0) if self.x1 > self.x0 else 0.5
        fy = (y - self.y0) / (self.y1 - self.y0) if self.y1 > self.y0 else 0.5
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _draw_axes(draw, axes: _Axes, x_ticks, y_ticks, font, label: str) -> None:
    for tick in y_ticks:
        _, y = axes.point(axes.x0, tick)
        draw.line([(axes.left, y), (axes.right, y)], fill=GRID_COLOUR)
        text = _format(tick)
        width = draw.textlength(text, font=font)
        draw.text((axes.left - 8 - width, y - 7), text, fill=AXIS_COLOUR, font=font)
    for tick in x_ticks:
        x, _ = axes.point(tick, axes.y0)
        draw.line([(x, axes.top), (x, axes.bottom)], fill=GRID_COLOUR)
        text = _format(tick)
        width = draw.textlength(text, font=font)
        draw.text((x - width / 2, axes.bottom + 6), text, fill=AXIS_COLOUR, font=font)
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline=AXIS_COLOUR)
    label_width = draw.textlength(label, font=font)
    draw.text((axes.right - label_width, axes.top - 18), label, fill=AXIS_COLOUR, font=font)  # above the box


def _polyline(draw, axes: _Axes, xs, ys, colour, width: int) -> None:
    stride = max(1, len(xs) // MAX_POINTS)  # a long run has more points than the picture has pixels
    points = [axes.point(x, y) for x, y in zip(xs[::stride], ys[::stride], strict=True)]
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    else:
        draw.line(points, fill=colour, width=width, joint="curve")


def loss_curve(
    steps: Sequence[float],
    losses: Sequence[float],
    lrs: Sequence[float] | None = None,
    title: str = "training loss",
    x_label: str = "optimizer step",
) -> Image.Image:
    """The picture: loss (raw and smoothed) against step; the learning rate below when given.

    Non-finite losses are left out (a diverged run still gets a picture of what came before).
    """
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    with_lr = lrs is not None and len(lrs) > 0
    canvas = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(13), _font(16)
    draw.text((MARGIN_LEFT, 12), title, fill="black", font=title_font)
    loss_bottom = HEIGHT - MARGIN_BOTTOM - (LR_PANEL_HEIGHT + PANEL_GAP if with_lr else 0)
    if not points:
        draw.text((WIDTH // 2 - 60, HEIGHT // 2), "no finite loss yet", fill=AXIS_COLOUR, font=font)
        return canvas
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_range = (min(steps), max(steps)) if max(steps) > min(steps) else (min(steps) - 1, max(steps) + 1)
    x_ticks = [t for t in nice_ticks(*x_range, count=8) if x_range[0] <= t <= x_range[1]]

    smoothed = smooth(ys)
    axes = _Axes((MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, loss_bottom), x_range, _y_range(ys))
    y_ticks = [t for t in nice_ticks(axes.y0, axes.y1) if axes.y0 <= t <= axes.y1]
    _draw_axes(draw, axes, x_ticks if not with_lr else [], y_ticks, font, loss_axis_label(ys))
    _polyline(draw, axes, xs, ys, RAW_COLOUR, 1)
    _polyline(draw, axes, xs, smoothed, SMOOTH_COLOUR, 2)

    if with_lr:
        lr_axes = _Axes(
            (MARGIN_LEFT, HEIGHT - MARGIN_BOTTOM - LR_PANEL_HEIGHT, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM),
            x_range,
            (0.0, max(lrs) * 1.05 or 1.0),
        )
        lr_ticks = [t for t in nice_ticks(lr_axes.y0, lr_axes.y1, count=3) if lr_axes.y0 <= t <= lr_axes.y1]
        _draw_axes(draw, lr_axes, x_ticks, lr_ticks, font, "learning rate")
        _polyline(draw, lr_axes, steps, lrs, LR_COLOUR, 2)
    width = draw.textlength(x_label, font=font)
    draw.text(((WIDTH - width) / 2, HEIGHT - 20), x_label, fill=AXIS_COLOUR, font=font)
    return canvas


def loss_axis_label(losses: list[float]) -> str:
    """The loss axis says which loss it quotes: the last optimizer step's, not the epoch mean that training
    summaries call the final loss."""
    return f"loss (last step {_format(losses[-1])})"


def save_loss_curve(path: str | os.PathLike, steps, losses, lrs=None, title: str = "training loss") -> Path:
    """Draw and write the PNG atomically (a reader never sees half a file)."""
    import io

    buffer = io.BytesIO()
    loss_curve(steps, losses, lrs, title=title).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
