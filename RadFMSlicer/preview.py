"""A PNG of exactly what the model receives, for checking slices, window and region.

Each :class:`~RadFMSlicer.imaging.ModelImage` becomes one block: every slice of the
tensor's D axis (channel 0), downscaled to ``tile`` pixels, in a near-square grid read
left-to-right, top-to-bottom (slice 0 = most superior for 3D scans). Blocks sit side by
side in the order given (main image, then region), each under a caption: title/source,
window, tensor shape.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import storage
from .attention import LABEL as ATTENTION_LABEL
from .errors import RadFMError
from .imaging import describe_window

TILE = 128
TILE_GAP = 2  # between tiles of one block
BLOCK_GAP = 16  # between blocks and around the montage
CAPTION_LINES = 3  # at least; more when a caption wraps in a narrow block
LINE_HEIGHT = 15
BACKGROUND = (32, 32, 32)
TEXT = (230, 230, 230)
NUMBER = (255, 220, 80)  # slice numbers on the tiles
OVERLAY_OPACITY = 0.6  # of the heat colour where the overlay is 1
OVERLAY_CAPTION = f"heat: {ATTENTION_LABEL}"


def grid_shape(depth: int) -> tuple:
    """(rows, cols) of tiles for D slices: near-square, never more rows than columns."""
    cols = math.ceil(math.sqrt(depth))
    return math.ceil(depth / cols), cols


def _wrap(draw, text, font, width) -> list[str]:
    """``text`` in lines no wider than ``width``: whole words where they fit, nothing cut off."""
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    lines = []
    for word in text.split():
        while word:
            if lines and fits(f"{lines[-1]} {word}"):
                lines[-1] += " " + word
                break
            k = len(word)
            while k > 1 and not fits(word[:k]):  # a path longer than the block: split it
                k -= 1
            lines.append(word[:k])
            word = word[k:]
    return lines or [""]


def slice_numbers(image) -> list[int]:
    """The display slice (of the whole scan) each of the model's D slices was taken from (nearest)."""
    depth, n = image.shape[-1], int(image.original_shape[0])
    first = image.crop_box[0][0] if image.crop_box is not None else 0
    return [first + min(n - 1, int(d * n / depth)) for d in range(depth)]


def render_montage(images, out_png, titles=None, tile: int = TILE, edges=None, overlays=None) -> str:
    """Write the montage of ``images`` (ModelImage list) to ``out_png``; return its path.

    Each tile is numbered with the scan slice it shows; ``edges`` (per image: the patient
    directions at its left, right, top and bottom, e.g. ``("R", "L", "A", "P")``, or None)
    are lettered around each block. Captions wrap to the block's width, however small.
    ``overlays`` (per image: a heat map ``[H, W, D]`` in [0, 1] on the tensor's grid, or
    None) is blended over the tiles in red to yellow and named in the caption.
    """
    if not images:
        raise ValueError("render_montage needs at least one ModelImage")
    titles = list(titles) if titles is not None else [os.path.basename(im.source) or im.source for im in images]
    if len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    edges = list(edges) if edges is not None else [None] * len(images)
    overlays = list(overlays) if overlays is not None else [None] * len(images)
    layouts = [grid_shape(im.shape[-1]) for im in images]
    widths = [c * tile + (c - 1) * TILE_GAP for _, c in layouts]
    heights = [r * tile + (r - 1) * TILE_GAP for r, _ in layouts]
    font = ImageFont.load_default(size=12)
    small = ImageFont.load_default(size=max(8, min(12, tile // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [[wrapped for line in (title, describe_window(im.window), f"tensor {list(im.shape)}",
                                      *([OVERLAY_CAPTION] if heat is not None else []))
                 for wrapped in _wrap(measure, line, font, width)]
                for im, title, width, heat in zip(images, titles, widths, overlays)]
    caption_h = max(CAPTION_LINES, *(len(c) for c in captions)) * LINE_HEIGHT
    canvas = Image.new(
        "RGB",
        (sum(widths) + BLOCK_GAP * (len(images) + 1), caption_h + max(heights) + 3 * BLOCK_GAP),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    x0 = BLOCK_GAP
    y0 = BLOCK_GAP * 2 + caption_h
    for im, caption, (rows, cols), width, height, edge, heat in zip(images, captions, layouts, widths, heights,
                                                                     edges, overlays):
        for n, line in enumerate(caption):
            draw.text((x0, BLOCK_GAP + n * LINE_HEIGHT), line, fill=TEXT, font=font)
        slices = im.slices()  # [D, rows, cols] in [0, 1]
        scaled = np.empty(slices.shape[1:], np.float32)  # one slice at a time, while it is in cache
        for d, number in enumerate(slice_numbers(im)):
            r, c = divmod(d, cols)
            x, y = x0 + c * (tile + TILE_GAP), y0 + r * (tile + TILE_GAP)
            np.rint(np.multiply(slices[d], 255, out=scaled), out=scaled)  # half to even, as torch's round
            picture = Image.fromarray(scaled.astype(np.uint8)).resize((tile, tile), Image.Resampling.BOX)
            if heat is not None:
                picture = _heat(picture, heat[:, :, d], tile)
            canvas.paste(picture, (x, y))
            draw.text((x + 2, y + 1), str(number), fill=NUMBER, font=small, stroke_width=1, stroke_fill=(0, 0, 0))
        if edge is not None:  # in the margins around the block, so no pixel of a tile is covered
            left, right, top, bottom = edge
            middle_x, middle_y = x0 + width / 2, y0 + height / 2
            for letter, xy, anchor in ((left, (x0 - 2, middle_y), "rm"), (right, (x0 + width + 2, middle_y), "lm"),
                                       (top, (middle_x, y0 - 2), "mb"), (bottom, (middle_x, y0 + height + 2), "mt")):
                if letter:
                    draw.text(xy, letter, fill=TEXT, font=small, anchor=anchor)
        x0 += width + BLOCK_GAP
    out_png = os.fspath(out_png)
    folder = os.path.dirname(os.path.abspath(out_png))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise storage.StorageError(f"cannot write {out_png}: cannot make the folder {folder} "
                                   f"({exc.strerror or exc})") from None
    encoded = io.BytesIO()
    canvas.save(encoded, format=Image.registered_extensions().get(os.path.splitext(out_png)[1].lower(), "PNG"))
    storage.write_bytes(out_png, encoded.getvalue())  # whole or not at all: a full disk leaves no cut PNG
    return out_png


def _heat(gray: Image.Image, heat, tile: int) -> Image.Image:
    """``gray`` with ``heat`` (rows x cols in [0, 1]) blended on top: red where low, yellow where high."""
    h = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((tile, tile), Image.Resampling.BOX))
    base = np.asarray(gray.convert("RGB"), np.float32)
    colour = np.stack([np.full_like(h, 255.0), 255.0 * h, np.zeros_like(h)], axis=-1)
    alpha = (OVERLAY_OPACITY * h)[..., None]
    return Image.fromarray((base * (1 - alpha) + colour * alpha).round().astype(np.uint8))


def check_image_name(path) -> None:
    """Refuse, before any work, an output name PIL cannot write (no or unknown extension)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    known = Image.registered_extensions()
    if known.get(suffix) not in Image.SAVE:
        raise RadFMError(f"cannot write an image to {path}: give a file name ending in .png (or .jpg)")
