"""Confusion-matrix pictures for `mae eval`, drawn with Pillow alone: one panel per classifier, side by side.

Each panel: rows are the true classes, columns the predicted ones, both named; a cell's colour is its share of the
true class's images (white 0 % to dark blue 100 %, so rows with few images read like rows with many), its number
is the count, and each row's total stands at its right. A colour bar explains the scale. With many classes the
cells shrink: counts are written only when a cell is large enough to hold them, names only when a row is tall
enough to read. `ConfusionLayout` holds every position, so tests (and callers) can find a cell without drawing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mae.core.files import atomic_write_bytes

EMPTY_COLOUR = (255, 255, 255)  # 0 % of the row
FULL_COLOUR = (8, 48, 107)  # 100 % of the row
GRID_COLOUR = (210, 210, 210)
TEXT_COLOUR = (30, 30, 30)
MAX_PANEL_SIDE = 720  # pixels of a panel's matrix at most, whatever the number of classes
MAX_CELL, MIN_CELL_FOR_COUNTS, MIN_CELL_FOR_NAMES = 44, 22, 11
MAX_NAME_CHARS = 18
MARGIN, GAP, TITLE_HEIGHT, BAR_WIDTH = 16, 40, 44, 14
SUBTITLE = "rows: true class, columns: predicted"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


@dataclass(frozen=True)
class ConfusionPanel:
    """One matrix to draw."""

    title: str  # e.g. "model (mean pool): top-1 81.7 %"
    matrix: np.ndarray  # [C, C] counts, row = true class, column = predicted class


def short_name(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def cell_colour(share: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1), linear in each channel."""
    share = min(1.0, max(0.0, float(share)))
    return tuple(round(e + (f - e) * share) for e, f in zip(EMPTY_COLOUR, FULL_COLOUR, strict=True))


@dataclass(frozen=True)
class ConfusionLayout:
    """Where everything goes, for `num_classes` classes and `panels` panels."""

    num_classes: int
    panels: int
    cell: int  # side of a cell, pixels
    name_width: int  # room for the row names (and the height of the column names)
    total_width: int  # room for the row totals right of each matrix
    title_width: int = 0  # the widest panel title or subtitle: a panel is never narrower (2 classes, long titles)

    @classmethod
    def of(cls, class_names: Sequence[str], panels: int, titles: Sequence[str] = ()) -> ConfusionLayout:
        count = max(1, len(class_names))
        cell = max(1, min(MAX_CELL, MAX_PANEL_SIDE // count))
        name_width = 0
        if cell >= MIN_CELL_FOR_NAMES:
            font = _font(cls.font_size(cell))
            name_width = 8 + max(round(font.getlength(short_name(name))) for name in class_names)
        widths = [_font(15).getlength(title) for title in titles] + [_font(11).getlength(SUBTITLE)]
        title_width = round(max(widths)) + 8
        return cls(count, panels, cell, name_width, 44 if cell >= MIN_CELL_FOR_NAMES else 0, title_width)

    @staticmethod
    def font_size(cell: int) -> int:
        return max(8, min(14, cell // 2))

    @property
    def matrix_side(self) -> int:
        return self.cell * self.num_classes

    @property
    def panel_width(self) -> int:
        return max(self.name_width + self.matrix_side + self.total_width, self.title_width)

    @property
    def top(self) -> int:
        """y of the matrices' top edge: below the title and the column names."""
        return MARGIN + TITLE_HEIGHT + self.name_width

    @property
    def size(self) -> tuple[int, int]:
        width = 2 * MARGIN + self.panels * self.panel_width + (self.panels - 1) * GAP + GAP + BAR_WIDTH + 48
        return width, self.top + max(self.matrix_side, 100) + 30 + MARGIN

    def matrix_left(self, panel: int) -> int:
        return MARGIN + panel * (self.panel_width + GAP) + self.name_width

    def cell_box(self, panel: int, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell, right and bottom exclusive."""
        left = self.matrix_left(panel) + column * self.cell
        top = self.top + row * self.cell
        return left, top, left + self.cell, top + self.cell

    @property
    def bar_box(self) -> tuple[int, int, int, int]:
        left = MARGIN + self.panels * self.panel_width + (self.panels - 1) * GAP + GAP
        height = max(100, self.matrix_side)
        return left, self.top, left + BAR_WIDTH, self.top + height


def _column_names(canvas: Image.Image, layout: ConfusionLayout, panel: int, names: Sequence[str], font) -> None:
    """Column names written upwards above each column (text drawn flat, then turned)."""
    for column, name in enumerate(names):
        text = short_name(name)
        strip = Image.new("L", (layout.name_width, layout.cell), 0)
        ImageDraw.Draw(strip).text((4, layout.cell / 2), text, fill=255, font=font, anchor="lm")
        turned = strip.rotate(90, expand=True)  # [name_width high, cell wide], reading bottom to top
        left = layout.matrix_left(panel) + column * layout.cell
        canvas.paste(Image.new("RGB", turned.size, TEXT_COLOUR), (left, layout.top - layout.name_width), turned)


def _draw_panel(canvas: Image.Image, layout: ConfusionLayout, index: int, panel: ConfusionPanel, names) -> None:
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size(layout.cell))
    matrix = np.asarray(panel.matrix, np.int64)
    totals = matrix.sum(axis=1)
    left = layout.matrix_left(index)
    draw.text((left - layout.name_width, MARGIN), panel.title, fill=TEXT_COLOUR, font=_font(15))
    draw.text((left - layout.name_width, MARGIN + 20), SUBTITLE, fill=TEXT_COLOUR, font=_font(11))
    for row in range(layout.num_classes):
        for column in range(layout.num_classes):
            count = int(matrix[row, column])
            share = count / totals[row] if totals[row] else 0.0
            box = layout.cell_box(index, row, column)
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=cell_colour(share))
            if count and layout.cell >= MIN_CELL_FOR_COUNTS:
                colour = (255, 255, 255) if share > 0.5 else TEXT_COLOUR
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), str(count), fill=colour, font=font,
                          anchor="mm")  # fmt: skip
        if layout.name_width:
            middle = layout.top + row * layout.cell + layout.cell / 2
            draw.text((left - 6, middle), short_name(names[row]), fill=TEXT_COLOUR, font=font, anchor="rm")
            draw.text((left + layout.matrix_side + 6, middle), str(int(totals[row])), fill=TEXT_COLOUR, font=font,
                      anchor="lm")  # fmt: skip
    side = layout.matrix_side
    if layout.total_width:
        draw.text((left + side + 6, layout.top - 4), "n", fill=TEXT_COLOUR, font=font, anchor="lb")
    draw.rectangle([left - 1, layout.top - 1, left + side, layout.top + side], outline=GRID_COLOUR)
    if layout.name_width:
        _column_names(canvas, layout, index, names, font)


def _draw_colour_bar(canvas: Image.Image, layout: ConfusionLayout) -> None:
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = layout.bar_box
    for y in range(top, bottom):
        draw.line([(left, y), (right - 1, y)], fill=cell_colour(1.0 - (y - top) / max(1, bottom - top - 1)))
    draw.rectangle([left - 1, top - 1, right, bottom], outline=GRID_COLOUR)
    font = _font(11)
    for share, y in ((1.0, top), (0.5, (top + bottom) / 2), (0.0, bottom)):
        draw.text((right + 4, y), f"{share:.0%}", fill=TEXT_COLOUR, font=font, anchor="lm")
    draw.text((left, bottom + 8), "of the row", fill=TEXT_COLOUR, font=font)


def confusion_picture(panels: Sequence[ConfusionPanel], class_names: Sequence[str]) -> Image.Image:
    """The panels side by side with one colour bar; the size is `ConfusionLayout.of(class_names, len(panels),
    titles)`."""
    for panel in panels:
        if np.shape(panel.matrix) != (len(class_names), len(class_names)):
            raise ValueError(f"{panel.title}: a {np.shape(panel.matrix)} matrix for {len(class_names)} classes")
    layout = ConfusionLayout.of(class_names, len(panels), [panel.title for panel in panels])
    canvas = Image.new("RGB", layout.size, "white")
    for index, panel in enumerate(panels):
        _draw_panel(canvas, layout, index, panel, class_names)
    _draw_colour_bar(canvas, layout)
    return canvas


def save_confusion_picture(
    path: str | os.PathLike, panels: Sequence[ConfusionPanel], class_names: Sequence[str]
) -> Path:
    """Draw and write the PNG atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    confusion_picture(panels, class_names).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
