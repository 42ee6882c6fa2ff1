"""A PNG of exactly what the model receives, for checking slices, window and region.

Each :class:`~RadFMSlicer.imaging.ModelImage` becomes one block: every slice of the
tensor's D axis (channel 0), downscaled to ``tile`` pixels, in a near-square grid read
left-to-right, top-to-bottom (slice 0 = most superior for 3D scans). Blocks sit side by
side in the order given (main image, then region), each under a caption: title/source,
window, tensor shape.
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

from .errors import RadFMError
from .imaging import describe_window

TILE = 128
TILE_GAP = 2  # between tiles of one block
BLOCK_GAP = 16  # between blocks and around the montage
CAPTION_LINES = 3
LINE_HEIGHT = 15
BACKGROUND = (32, 32, 32)


def grid_shape(depth: int) -> tuple:
    """(rows, cols) of tiles for D slices: near-square, never more rows than columns."""
    cols = math.ceil(math.sqrt(depth))
    return math.ceil(depth / cols), cols


def _fit(draw, text, font, width) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]  # keep the end: file names and shapes matter most
    return "..." + text


def render_montage(images, out_png, titles=None, tile: int = TILE) -> str:
    """Write the montage of ``images`` (ModelImage list) to ``out_png``; return its path."""
    if not images:
        raise ValueError("render_montage needs at least one ModelImage")
    titles = list(titles) if titles is not None else [os.path.basename(im.source) or im.source for im in images]
    if len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    layouts = [grid_shape(im.tensor.shape[-1]) for im in images]
    widths = [c * tile + (c - 1) * TILE_GAP for _, c in layouts]
    heights = [r * tile + (r - 1) * TILE_GAP for r, _ in layouts]
    caption_h = CAPTION_LINES * LINE_HEIGHT
    canvas = Image.new(
        "RGB",
        (sum(widths) + BLOCK_GAP * (len(images) + 1), caption_h + max(heights) + 3 * BLOCK_GAP),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    x0 = BLOCK_GAP
    for im, title, (rows, cols), width in zip(images, titles, layouts, widths):
        lines = [title, describe_window(im.window), f"tensor {list(im.tensor.shape)}"]
        for n, line in enumerate(lines):
            draw.text((x0, BLOCK_GAP + n * LINE_HEIGHT), _fit(draw, line, font, width), fill=(230, 230, 230), font=font)
        y0 = BLOCK_GAP * 2 + caption_h
        slices = (im.tensor[0] * 255).round().byte().permute(2, 0, 1).contiguous().numpy()  # [D, rows, cols]
        for d, pixels in enumerate(slices):
            r, c = divmod(d, cols)
            tile_img = Image.fromarray(pixels).resize((tile, tile), Image.Resampling.BOX)
            canvas.paste(tile_img, (x0 + c * (tile + TILE_GAP), y0 + r * (tile + TILE_GAP)))
        x0 += width + BLOCK_GAP
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    canvas.save(out_png)
    return out_png


def check_image_name(path) -> None:
    """Refuse, before any work, an output name PIL cannot write (no or unknown extension)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    known = Image.registered_extensions()
    if known.get(suffix) not in Image.SAVE:
        raise RadFMError(f"cannot write an image to {path}: give a file name ending in .png (or .jpg)")
