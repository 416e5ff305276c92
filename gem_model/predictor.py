"""Encode an image once, match many prompts: the interactive interface.

Like segment-anything's `SamPredictor`, the expensive, text-independent image path runs once
per image (and is cached), after which each new prompt costs a text embedding (also cached), a
dot product and an upsampling.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import InvalidInputError
from .model import GemModel, ImageFeatures
from .transforms import get_gem_img_transform, target_size, to_pil_rgb

ImageLike = Union[Image.Image, np.ndarray]


@dataclass
class EncodedImage:
    """GEM features of one image plus what is needed to map them back onto it."""
    features: ImageFeatures          # batch of one, on the model's device
    original_size: tuple[int, int]   # (H0, W0) of the image as given
    input_size: tuple[int, int]      # (H, W) fed to the model
    key: str                         # content + settings hash (cache key)
    cached: bool = False             # True when the features came from the cache


class FeatureCache:
    """LRU cache of image features bounded by their size in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: "OrderedDict[str, ImageFeatures]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Optional[ImageFeatures]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, features: ImageFeatures) -> None:
        size = features.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._items[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class HeatmapPredictor:
    """Aspect-preserving preprocessing, batched cached encoding, maps at the original size.

    Thread-safe: model calls are serialised by an internal lock, so one predictor can serve
    concurrent requests without interleaving forward passes.
    """

    def __init__(self, model: GemModel, image_size: int = 448, resize_mode: str = "short",
                 max_side: Optional[int] = None, cache_bytes: int = 256 * 2**20):
        self.model = model
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.max_side = max_side
        cfg = model.preprocess_cfg
        kwargs = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        self.patch = model.patch_size[0]
        if model.patch_size[0] != model.patch_size[1]:
            raise InvalidInputError("non-square patches are not supported by the predictor")
        self.transform = get_gem_img_transform(image_size, resize_mode, self.patch,
                                               max_side=max_side, **kwargs)
        self.cache = FeatureCache(cache_bytes)
        self._lock = threading.RLock()
        self._settings_key = repr((model.model_name, model.pretrained, model.gem_depth,
                                   model.ss_attn_iter, model.ss_attn_temp, str(model.dtype),
                                   image_size, resize_mode, max_side, model.mode, model.naclip_sigma,
                                   model.slide_crop, model.slide_stride, model.pamr_iters))
        self._current: Optional[EncodedImage] = None

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        return target_size(image.height, image.width, self.image_size, self.patch,
                           self.resize_mode, self.max_side)

    def _key(self, image: Image.Image) -> str:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.size}|{self._settings_key}".encode())
        return digest.hexdigest()

    def encode(self, images: Sequence[ImageLike], batch_size: int = 8) -> list[EncodedImage]:
        """Encode images (PIL or arrays, any size); images of equal model input size share a batch."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        pil_images = [to_pil_rgb(image) for image in images]
        results: list[Optional[EncodedImage]] = [None] * len(pil_images)
        keys = [self._key(image) for image in pil_images]
        # Equal images (same key) in one call are encoded once: `todo` maps key -> indices.
        todo: dict[str, list[int]] = {}
        groups: dict[tuple[int, int], list[str]] = {}   # model input size -> keys, one batch each
        for i, image in enumerate(pil_images):
            original = (image.height, image.width)
            if keys[i] in todo:
                todo[keys[i]].append(i)
                continue
            cached = self.cache.get(keys[i])
            if cached is not None:
                results[i] = EncodedImage(cached, original, cached.input_size, keys[i], cached=True)
            else:
                todo[keys[i]] = [i]
                groups.setdefault(self.input_size(image), []).append(keys[i])

        for size, group in groups.items():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                batch = torch.stack([self.transform(pil_images[todo[key][0]]) for key in chunk])
                with self._lock:
                    features = self.model.encode_image(batch)
                for j, key in enumerate(chunk):
                    # clone: a slice would keep the whole batch alive in the cache
                    single = ImageFeatures(features.gem[j:j + 1].clone(), None, features.input_size,
                                           None if features.guide is None else features.guide[j:j + 1].clone())
                    self.cache.put(key, single)
                    for i in todo[key]:
                        image = pil_images[i]
                        results[i] = EncodedImage(single, (image.height, image.width), size, key)
        return results  # type: ignore[return-value]

    def similarity(self, encoded: EncodedImage, prompts: Sequence[str],
                   output_size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Raw cosine similarity maps [P, h, w] (float32), bilinear from the patch grid to `output_size`
        (default: the original image size). Region extraction wants `gem_model.regions.working_size`."""
        size = tuple(int(v) for v in (output_size or encoded.original_size))
        if len(size) != 2 or min(size) < 1:
            raise InvalidInputError(f"output_size must be (height, width) >= 1, got {output_size!r}")
        with self._lock:
            maps = self.model.similarity(encoded.features, prompts, output_size=size)
        return maps[0].float().cpu().numpy()

    # Patch embeddings, for learning from annotations (gem_model/learning.py) ------------------
    def patch_embeddings(self, encoded: EncodedImage) -> np.ndarray:
        """GEM patch embeddings of an encoded image on its patch grid: float32 [h, w, D], L2-normalised.
        The grid spans the whole image (resized, never cropped)."""
        return encoded.features.gem[0].float().cpu().numpy()

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """[P, D] float32 L2-normalised embeddings of the prompts (the template applied), as `similarity` uses."""
        with self._lock:
            return self.model.encode_text(prompts).float().cpu().numpy()

    def grid_similarity(self, encoded: EncodedImage, prompts: Sequence[str]) -> np.ndarray:
        """Raw cosine similarity maps [P, h, w] (float32) on the patch grid, before any upsampling or
        refinement: what label maps are built from (gem_model/exemplars.py), then `upsample`d."""
        with self._lock:
            text = self.model.encode_text(prompts).to(encoded.features.gem.device)
            sims = torch.einsum("hwd,pd->phw", encoded.features.gem[0].float(), text.float())
        return sims.cpu().numpy()

    def similarity_to(self, encoded: EncodedImage, embeddings) -> np.ndarray:
        """Cosine similarity maps [K, H0, W0] against arbitrary vectors [K, D] (normalised like text
        embeddings), at the resolution `similarity` answers."""
        with self._lock:
            maps = self.model.embedding_similarity(encoded.features, embeddings, output_size=encoded.original_size)
        return maps[0].float().cpu().numpy()

    def upsample(self, grid_maps, encoded: EncodedImage,
                 output_size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Maps on the patch grid [K, h, w] -> [K, H0, W0] (or `output_size`), refined (PAMR) and
        resampled exactly as `similarity` does: any map built on the grid is treated like a text map."""
        maps = torch.as_tensor(np.asarray(grid_maps, dtype=np.float32))
        if maps.dim() != 3:
            raise InvalidInputError(f"grid maps must be [K, h, w], got {tuple(maps.shape)}")
        if tuple(maps.shape[-2:]) != self.grid_size(encoded):
            raise InvalidInputError(f"grid maps are {tuple(maps.shape[-2:])}, the patch grid is {self.grid_size(encoded)}")
        size = tuple(int(v) for v in (output_size or encoded.original_size))
        with self._lock:
            out = self.model.grid_to_image(encoded.features, maps[None], output_size=size)
        return out[0].float().cpu().numpy()

    def grid_size(self, encoded: EncodedImage) -> tuple[int, int]:
        """(rows, cols) of the model's patch grid for this image: what the maps really resolve."""
        return tuple(int(v) for v in encoded.features.gem.shape[1:3])

    # SAM-style convenience ---------------------------------------------------------------------
    def set_image(self, image: ImageLike) -> EncodedImage:
        self._current = self.encode([image])[0]
        return self._current

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        if self._current is None:
            raise InvalidInputError("call set_image() before predict()")
        return self.similarity(self._current, prompts)

