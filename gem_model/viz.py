"""Overlay pictures of heatmaps: the image, then one panel per prompt."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Control points of a perceptually ordered blue -> cyan -> yellow -> red ramp.
_RAMP = np.array([[48, 18, 59], [40, 120, 220], [30, 200, 200], [120, 240, 90],
                  [250, 200, 40], [240, 90, 20], [122, 4, 3]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 colours."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def overlay_panels(image: Image.Image, maps: np.ndarray, titles: Sequence[str],
                   panel_width: int = 384, alpha: float = 0.55) -> Image.Image:
    """Compose [image | overlay_1 | ... | overlay_P] with a caption over each panel.

    maps: [P, H, W] at the image's resolution; each is min-max scaled for display.
    """
    image = image.convert("RGB")
    scale = panel_width / image.width
    size = (panel_width, max(1, round(image.height * scale)))
    base = image.resize(size, Image.Resampling.BILINEAR)
    caption = 22
    canvas = Image.new("RGB", (size[0] * (len(maps) + 1), size[1] + caption), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    canvas.paste(base, (0, caption))
    draw.text((4, 4), "image", fill="black", font=font)
    for i, (heat, title) in enumerate(zip(maps, titles), start=1):
        low, high = float(np.min(heat)), float(np.max(heat))
        scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
        colour = Image.fromarray(colorize(scaled)).resize(size, Image.Resampling.BILINEAR)
        canvas.paste(Image.blend(base, colour, alpha), (size[0] * i, caption))
        draw.text((size[0] * i + 4, 4), f"{title}  (max cos {high:.3f})", fill="black", font=font)
    return canvas
