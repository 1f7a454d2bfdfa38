"""A labelled PNG grid: one row per method, one column block per class (or prompt), several images per block.

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
HEADER = 16  # height of the column-label line


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
    """Pixel geometry of a grid: ``side``-pixel cells, ``per_column`` per block, a label column ``label_width`` wide."""

    side: int
    per_column: int
    label_width: int

    @property
    def block(self) -> int:
        """Width of one column block."""
        return self.per_column * self.side + (self.per_column - 1) * INNER_GAP

    def cell_origin(self, row: int, column: int, index: int) -> tuple[int, int]:
        """Top-left corner of image ``index`` of column block ``column`` in row ``row``."""
        x = self.label_width + column * (self.block + GAP) + index * (self.side + INNER_GAP)
        return x, HEADER + row * (self.side + GAP)

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        """Width and height of a grid of ``rows`` rows and ``columns`` column blocks."""
        return self.label_width + columns * (self.block + GAP), HEADER + rows * (self.side + GAP)


def grid_layout(row_labels: Sequence[str], image_side: int, per_column: int) -> GridLayout:
    """The layout for rows labelled ``row_labels`` and images of side ``image_side``."""
    font = ImageFont.load_default()
    label_width = max(_text_size(label, font)[0] for label in row_labels) + 2 * PAD
    return GridLayout(cell_size(image_side), per_column, label_width)


def labelled_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    column_labels: Sequence[str],
    per_column: int,
) -> Image.Image:
    """The grid image.

    Args:
        rows: ``(label, images)`` per row; ``images`` is ``[len(column_labels) * per_column, C, H, W]`` in [0, 1],
            column block after column block. A label may span two lines (``"\\n"``).
        column_labels: one label per column block (class names, prompts).
        per_column: images per column block.
    """
    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    for label, images in rows:
        if images.shape[0] != len(column_labels) * per_column:
            raise ValueError(
                f"row {label!r} has {images.shape[0]} images; expected {len(column_labels)} x {per_column}"
            )
    font = ImageFont.load_default()
    layout = grid_layout([label for label, _ in rows], max(rows[0][1].shape[-2:]), per_column)
    canvas = Image.new("RGB", layout.size(len(rows), len(column_labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels):
        x, _ = layout.cell_origin(0, j, 0)
        draw.text((x + PAD, 2), _fit(text, font, layout.block - PAD), fill="black", font=font)
    for i, (label, images) in enumerate(rows):
        _, y = layout.cell_origin(i, 0, 0)
        draw.text((PAD, y + (layout.side - _text_size(label, font)[1]) // 2), label, fill="black", font=font)
        for k, image in enumerate(images):
            column, index = divmod(k, per_column)
            canvas.paste(to_pil(image, layout.side), layout.cell_origin(i, column, index))
    return canvas
