"""A labelled PNG grid: one row per method, one column block per class (or prompt), several images per block.

A title line on top names the settings; column blocks that would make the grid wider than :data:`MAX_WIDTH` wrap
into bands (each with its column labels and every row), so long rows stay readable.

Small images (the 8x8 digits) are enlarged with nearest-neighbour so every pixel stays visible; large ones are
shrunk to a thumbnail. Labels use PIL's default font, so no font file is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 40  # images smaller than this are enlarged by an integer factor (8x8 digits -> 40x40)
MAX_CELL = 192  # images larger than this are shrunk to it
GAP = 6  # pixels between column blocks and between rows
INNER_GAP = 2  # pixels between the images of one block
PAD = 4  # text padding
HEADER = 16  # height of the column-label line (and of the title line)
MAX_WIDTH = 1200  # grids wider than this wrap their column blocks into bands


def cell_size(size: int) -> int:
    """Displayed side length of an image of side ``size``."""
    if size < MIN_CELL:
        return size * -(-MIN_CELL // size)
    return min(size, MAX_CELL)


def to_pil(image: torch.Tensor, side: int) -> Image.Image:
    """A ``[C, H, W]`` tensor in [0, 1] as an RGB image of ``side`` x ``side`` pixels."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
    resample = Image.NEAREST if side >= pil.width else Image.LANCZOS
    return pil.resize((side, side), resample)


def _text_size(text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis so that it fits in ``width`` pixels."""
    if _text_size(text, font)[0] <= width:
        return text
    while text and _text_size(text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: ``side``-pixel cells, ``per_column`` per block, a label column ``label_width`` wide.

    Column blocks wrap after ``per_line`` blocks (``None``: never) into *bands* stacked top to bottom; each band
    repeats the column labels and holds all ``rows`` rows. ``title_height`` pixels on top hold the title line.
    """

    side: int
    per_column: int
    label_width: int
    title_height: int = 0
    per_line: int | None = None
    rows: int = 1

    @property
    def block(self) -> int:
        """Width of one column block."""
        return self.per_column * self.side + (self.per_column - 1) * INNER_GAP

    def _line(self, columns: int) -> int:
        return columns if self.per_line is None else min(columns, self.per_line)

    def band_height(self, rows: int) -> int:
        """Height of one band: the column-label line and ``rows`` rows."""
        return HEADER + rows * (self.side + GAP)

    def band_top(self, band: int) -> int:
        """Top of band ``band`` (its column-label line)."""
        return self.title_height + band * self.band_height(self.rows)

    def cell_origin(self, row: int, column: int, index: int) -> tuple[int, int]:
        """Top-left corner of image ``index`` of column block ``column`` in row ``row``."""
        band, place = divmod(column, self.per_line) if self.per_line else (0, column)
        x = self.label_width + place * (self.block + GAP) + index * (self.side + INNER_GAP)
        return x, self.band_top(band) + HEADER + row * (self.side + GAP)

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        """Width and height of a grid of ``rows`` rows and ``columns`` column blocks."""
        bands = -(-columns // self._line(columns))
        return self.label_width + self._line(columns) * (self.block + GAP), self.title_height + bands * self.band_height(rows)


def grid_layout(
    row_labels: Sequence[str], image_side: int, per_column: int, columns: int = 1, title: bool = False,
    max_width: int | None = None,
) -> GridLayout:
    """The layout for rows labelled ``row_labels`` and images of side ``image_side``.

    With ``max_width`` the ``columns`` column blocks wrap into as few bands as keep the grid within it (at least one
    block per band), spread evenly over the bands.
    """
    font = ImageFont.load_default()
    label_width = max(_text_size(label, font)[0] for label in row_labels) + 2 * PAD
    side = cell_size(image_side)
    block = per_column * side + (per_column - 1) * INNER_GAP + GAP
    per_line = None
    if max_width is not None:
        fits = max(1, (max_width - label_width) // block)
        if columns > fits:
            bands = -(-columns // fits)
            per_line = -(-columns // bands)
    return GridLayout(side, per_column, label_width, HEADER if title else 0, per_line, len(row_labels))


def labelled_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    column_labels: Sequence[str],
    per_column: int,
    title: str = "",
    max_width: int | None = MAX_WIDTH,
) -> Image.Image:
    """The grid image.

    Args:
        rows: ``(label, images)`` per row; ``images`` is ``[len(column_labels) * per_column, C, H, W]`` in [0, 1],
            column block after column block. A label may span two lines (``"\\n"``).
        column_labels: one label per column block (class names, prompts).
        per_column: images per column block.
        title: a line above the grid (model, scheduler, steps, scale); none when empty.
        max_width: wrap the column blocks into bands so the grid is at most this wide (``None``: one long row).
    """
    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    for label, images in rows:
        if images.shape[0] != len(column_labels) * per_column:
            raise ValueError(
                f"row {label!r} has {images.shape[0]} images; expected {len(column_labels)} x {per_column}"
            )
    font = ImageFont.load_default()
    layout = grid_layout(
        [label for label, _ in rows], max(rows[0][1].shape[-2:]), per_column, len(column_labels), bool(title), max_width
    )
    canvas = Image.new("RGB", layout.size(len(rows), len(column_labels)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, 2), _fit(title, font, canvas.width - 2 * PAD), fill="black", font=font)
    for j, text in enumerate(column_labels):
        x, y = layout.cell_origin(0, j, 0)
        draw.text((x + PAD, y - HEADER + 2), _fit(text, font, layout.block - PAD), fill="black", font=font)
    band_width = layout.per_line or len(column_labels)
    for i, (label, images) in enumerate(rows):
        for first in range(0, len(column_labels), band_width):  # the row label at the start of every band
            _, y = layout.cell_origin(i, first, 0)
            draw.text((PAD, y + (layout.side - _text_size(label, font)[1]) // 2), label, fill="black", font=font)
        for k, image in enumerate(images):
            column, index = divmod(k, per_column)
            canvas.paste(to_pil(image, layout.side), layout.cell_origin(i, column, index))
    return canvas
