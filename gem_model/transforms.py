"""Image preprocessing that keeps the aspect ratio.

The GEM authors squash every image to 448x448; a wide image then gets thin, stretched patches.
Here the short (or long) side goes to `image_size` and the other side keeps the aspect ratio,
both rounded to the patch size, so the patch grid covers the whole image with square patches.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("short", "long", "square")


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def target_size(height: int, width: int, image_size: int = 448, patch_size: int = 16,
                resize_mode: str = "short", max_side: int | None = None) -> tuple[int, int]:
    """(H, W) fed to the model for an image of `height` x `width` pixels.

    short: short side -> image_size; long: long side -> image_size; square: image_size^2.
    `max_side` (default 4 * image_size) caps the long side of very elongated images.
    """
    if resize_mode not in RESIZE_MODES:
        raise InvalidInputError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image has no pixels ({width}x{height})")
    if image_size < patch_size:
        raise InvalidInputError(f"image_size {image_size} is smaller than the patch size {patch_size}")
    if resize_mode == "square":
        side = _round_to(image_size, patch_size)
        return side, side
    max_side = max_side or 4 * image_size
    ref = min(height, width) if resize_mode == "short" else max(height, width)
    scale = image_size / ref
    scale = min(scale, max_side / max(height, width))
    return _round_to(height * scale, patch_size), _round_to(width * scale, patch_size)


def to_pil_rgb(image: Union[Image.Image, np.ndarray]) -> Image.Image:
    """PIL image or HxW / HxWx{1,3,4} array (uint8, or float in [0, 1]) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise InvalidInputError(f"image array must be HxW, HxWx3 or HxWx4, got {array.shape}")
        if array.size == 0:
            raise InvalidInputError("image array is empty")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise InvalidInputError("image array contains NaN or infinity")
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise InvalidInputError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def get_gem_img_transform(img_size: int = 448, resize_mode: str = "short", patch_size: int = 16,
                          mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                          max_side: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """A transform PIL image -> [3, H, W] float tensor ready for the model.

    `resize_mode="square"` reproduces the original GEM preprocessing (448x448).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    target_size(1, 1, img_size, patch_size, resize_mode)  # validate arguments now, not per image

    def transform(image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        image = to_pil_rgb(image)
        h, w = target_size(image.height, image.width, img_size, patch_size, resize_mode, max_side)
        resized = image.resize((w, h), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (tensor - mean_t) / std_t

    return transform
