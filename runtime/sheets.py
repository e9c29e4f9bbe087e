"""Contact sheets (Pillow only): each query beside its neighbours, and near-duplicate groups, with scores.

One row per query (or group), one tile per image: the picture fitted into a square of `tile` pixels on grey, and
under it a caption (rank and score, then the file name). A file that no longer opens gets a tile that says so
instead of stopping the sheet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mae.core.files import atomic_write
from mae.core.preprocess import DECODE_ERRORS

BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (236, 236, 236)
QUERY_FRAME = (33, 102, 172)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
GAP = 8


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def thumbnail(path: str | None, tile: int) -> Image.Image:
    """The image at `path` fitted into tile x tile, enlarged if smaller (EXIF orientation applied), or a tile saying
    it cannot be opened."""
    square = Image.new("RGB", (tile, tile), TILE_BACKGROUND)
    try:
        if path is None:
            raise OSError("no file")
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            scale = min(tile / image.width, tile / image.height)
            # Small images (digits, icons) are enlarged to fill the tile, by whole pixels so they stay sharp.
            resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, resample)
            square.paste(image, ((tile - image.width) // 2, (tile - image.height) // 2))
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        ImageDraw.Draw(square).text((8, tile // 2 - 8), "cannot open", fill=MUTED, font=_font(14))
    return square


def _shorten(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def _sheet(rows: list[list[tuple[str | None, str, str]]], tile: int, title: str) -> Image.Image:
    """rows of (path, first caption line, second caption line) tiles; the first tile of each row framed."""
    columns = max((len(row) for row in rows), default=1)
    caption = 34
    title_height = 30
    width = GAP + columns * (tile + GAP)
    height = title_height + GAP + len(rows) * (tile + caption + GAP)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(16), _font(12)
    draw.text((GAP, 6), title, fill=TEXT, font=big)
    for r, row in enumerate(rows):
        top = title_height + GAP + r * (tile + caption + GAP)
        for c, (path, line1, line2) in enumerate(row):
            left = GAP + c * (tile + GAP)
            sheet.paste(thumbnail(path, tile), (left, top))
            if c == 0:
                draw.rectangle([left - 3, top - 3, left + tile + 2, top + tile + 2], outline=QUERY_FRAME, width=3)
            draw.text((left, top + tile + 3), _shorten(line1, draw, small, tile), fill=TEXT, font=small)
            draw.text((left, top + tile + 18), _shorten(line2, draw, small, tile), fill=MUTED, font=small)
    return sheet


def _save(image: Image.Image, path: str | os.PathLike) -> Path:
    target = Path(path)
    atomic_write(target, lambda handle: image.save(handle, format="PNG"))
    return target


def search_sheet(result: dict[str, Any], path: str | os.PathLike, tile: int = 128) -> Path:
    """`mae search`'s contact sheet: one row per query, the query (framed) then its neighbours with rank and score."""
    rows = []
    for query in result["queries"]:
        row = [(query["path"], "query", Path(query["path"] or query["query"]).name)]
        for item in query["neighbours"]:
            row.append((item["path"], f"#{item['rank']}  {item['score']:.4f}", Path(item["path"]).name))
        rows.append(row)
    title = f"mae search: {len(rows)} queries, {result['k']} neighbours each ({result['metric']} similarity)"
    return _save(_sheet(rows, tile, title), path)


def duplicates_sheet(summary: dict[str, Any], path: str | os.PathLike, tile: int = 112, per_group: int = 8) -> Path:
    """The largest near-duplicate groups, one row each (up to `per_group` members, each with its best score with
    another member of the group)."""
    rows = []
    for group in summary["largest_groups"]:
        row = []
        for position, member in enumerate(group["members"][:per_group]):
            line1 = (
                f"group {group['group']} ({group['size']})  {member['score']:.4f}"
                if position == 0
                else (f"{member['score']:.4f}")
            )
            row.append((member["path"], line1, Path(member["path"]).name))
        rows.append(row)
    title = f"near-duplicates above {summary['threshold']}: {summary['groups']} groups, {summary['pairs']} pairs"
    if not rows:
        rows = [[(None, "no pairs above the threshold", "")]]
    return _save(_sheet(rows, tile, title), path)
