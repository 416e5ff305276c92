"""Zero-shot semantic segmentation with a GEM model, and the mIoU metric.

`Segmenter` labels every pixel of an image with one of a fixed list of classes: each class is one
or more names; each name becomes a text embedding averaged over prompt templates (CLIP's 80
ImageNet templates by default, as SCLIP, ClearCLIP and NACLIP do); the class scores the maximum
cosine similarity over its names; the pixel takes the best class. Optionally pixels whose best
class probability stays below `bg_threshold` become background (the softmax of `logit_scale` x
cosine over the class maxima, or over every name and then the maximum per class, as ClearCLIP and
NACLIP do), and PAMR refines the maps before the decision. How the image is resized, windowed and
refined is a `gem_model.protocols.Protocol`: each method's own evaluation protocol.

`ConfusionMatrix` accumulates one confusion matrix over a whole dataset (pixels labelled 255 are
ignored); IoU_c = TP / (TP + FP + FN), and mIoU averages the classes that occur in the labels or
the predictions (a class absent from both has no IoU and is left out, as mmsegmentation does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError
from .model import GemModel, window_starts
from .pamr import pamr
from .transforms import get_gem_img_transform

IGNORE = 255
Template = Union[str, Callable[[str], str]]


def prompt_templates(kind: str = "imagenet80") -> list[Template]:
    """imagenet80: CLIP's 80 ImageNet templates; simple: open_clip's 7; single: 'a photo of a {}.'."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    choices = {"imagenet80": list(OPENAI_IMAGENET_TEMPLATES), "simple": list(SIMPLE_IMAGENET_TEMPLATES),
               "single": ["a photo of a {}."]}
    if kind not in choices:
        raise InvalidInputError(f"templates must be one of {', '.join(choices)}, got {kind!r}")
    return choices[kind]


def _fill(template: Template, name: str) -> str:
    return template.format(name) if isinstance(template, str) else template(name)


@torch.inference_mode()
def class_embeddings(model: GemModel, names: Sequence[str], templates: Sequence[Template],
                     chunk: int = 256) -> torch.Tensor:
    """[len(names), D]: per name, the mean of the L2-normalised embeddings of every template
    filled with it, L2-normalised again (CLIP's prompt ensembling)."""
    texts = [_fill(t, n) for n in names for t in templates]
    parts = []
    for start in range(0, len(texts), chunk):
        tokens = model.tokenizer(texts[start:start + chunk])
        with model._text_lock:       # _text_features swaps tensors for one call: one caller at a time
            parts.append(F.normalize(model._text_features(tokens).float(), dim=-1))
    embeddings = torch.cat(parts).reshape(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


def authors_resize(image: Image.Image, short_side: int, long_max: int = 2048) -> torch.Tensor:
    """mmsegmentation's keep-ratio rescale, as ClearCLIP's and NACLIP's test pipelines run it:
    scale = min(long_max / long side, short_side / short side), sides int(side * scale + 0.5),
    bilinear without antialiasing (OpenCV's INTER_LINEAR; its fixed-point rounding can differ by
    one grey level), back to 8-bit values. Returns float [3, h, w] in 0..255."""
    width, height = image.size
    scale = min(long_max / max(height, width), short_side / min(height, width))
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)
    if size == (height, width):
        return pixels.float()
    # float64, so that the rounding back to 8 bits is exact: a value landing on .5 in float32
    # rounding would move a pixel by one level, which a logit scale of 50 makes visible
    out = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[0].round().clamp(0, 255).float()


def centre_padding(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zeros that make both sides multiples of `patch`, split around the
    centre (the smaller half left and top)."""
    def split(side):
        extra = (-side) % patch
        return extra // 2, extra - extra // 2
    (left, right), (top, bottom) = split(width), split(height)
    return left, right, top, bottom


class Segmenter:
    """Image -> label map over fixed classes (see module docstring and gem_model.protocols).

    The keyword arguments are a `Protocol`'s fields (resize, slide_crop, ...); a `protocol` given
    sets them all (the model's method and positional-embedding resize are fixed when it is built).
    """

    def __init__(self, model: GemModel, classes: Sequence[Sequence[str]], templates: Sequence[Template],
                 image_size: int = 448, resize_mode: str = "short", background: Optional[int] = None,
                 bg_threshold: float = 0.0, logit_scale: float = 50.0, pamr_iters: int = 0,
                 protocol=None, **choices):
        from .protocols import Protocol

        if protocol is None:
            protocol = Protocol(image_size=image_size, bg_threshold=bg_threshold, logit_scale=logit_scale,
                                pamr_iters=pamr_iters, **choices)
        elif choices:
            protocol = protocol.replace(**choices)
        if not classes or any(not names for names in classes):
            raise InvalidInputError("every class needs at least one name")
        if protocol.bg_threshold and background is None:
            raise InvalidInputError("bg_threshold needs a background class")
        if protocol.resize == "exact" and (model.slide_crop or model.pamr_iters):
            raise InvalidInputError("with resize='exact' the segmenter runs the windows and PAMR itself: "
                                    "build the model without slide_crop and pamr_iters")
        self.model = model
        self.protocol = protocol
        self.num_classes = len(classes)
        names = [n for names in classes for n in names]
        starts = np.cumsum([0] + [len(n) for n in classes])
        self.class_words = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self.text = class_embeddings(model, names, templates)            # [Q, D]
        cfg = model.preprocess_cfg
        kwargs = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        self.transform = get_gem_img_transform(protocol.image_size, resize_mode, model.patch_size[0], **kwargs)
        self.mean = torch.tensor(kwargs.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
        self.std = torch.tensor(kwargs.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
        self.background = background
        self.bg_threshold = protocol.bg_threshold
        self.logit_scale = protocol.logit_scale
        self.pamr_iters = protocol.pamr_iters

    # -- maps --------------------------------------------------------------------------------------
    def _name_maps_patch(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The project's path: per-name cosine maps [1, Q, H, W] at the model input, and that input."""
        x = self.transform(image).unsqueeze(0)
        features = self.model.encode_image(x)
        sims = torch.einsum("bhwd,qd->bqhw", features.gem, self.text.to(features.gem.device))
        sims = F.interpolate(sims, size=features.input_size, mode="bilinear", align_corners=False)
        return sims, x

    def _window_maps(self, crops: torch.Tensor) -> torch.Tensor:
        """Per-name maps [n, Q, h, w] of equally sized windows [n, 3, h, w] (crop_fit rules)."""
        p = self.model.patch_size[0]
        height, width = crops.shape[-2:]
        if self.protocol.crop_fit == "pad":
            left, right, top, bottom = centre_padding(height, width, p)
            padded = F.pad(crops, (left, right, top, bottom))
            features = self.model.encode_image(padded)
            sims = torch.einsum("bhwd,qd->bqhw", features.gem, self.text.to(features.gem.device))
            sims = F.interpolate(sims, size=padded.shape[-2:], mode="bilinear", align_corners=False)
            return sims[..., top:top + height, left:left + width]
        # floor: the patch convolution never reads the last height % p rows and width % p columns
        if height < p or width < p:
            raise InvalidInputError(f"a {width}x{height} window is smaller than one patch")
        features = self.model.encode_image(crops[..., :height - height % p, :width - width % p])
        sims = torch.einsum("bhwd,qd->bqhw", features.gem, self.text.to(features.gem.device))
        return F.interpolate(sims, size=(height, width), mode="bilinear", align_corners=False)

    def _name_maps_exact(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' path: per-name maps [1, Q, h, w] on the rescaled image, and that image
        (normalised, [1, 3, h, w])."""
        mean, std = self.mean * 255.0, self.std * 255.0
        x = ((authors_resize(image, self.protocol.image_size)[None] - mean) / std).to(self.model.device)
        height, width = x.shape[-2:]
        crop, stride = self.protocol.slide_crop, self.protocol.slide_stride or self.protocol.slide_crop
        if not crop:
            return self._window_maps(x), x
        ch, cw = min(crop, height), min(crop, width)
        windows = [(y, x0) for y in window_starts(height, ch, stride) for x0 in window_starts(width, cw, stride)]
        maps = self._window_maps(torch.cat([x[:, :, y:y + ch, x0:x0 + cw] for y, x0 in windows]))
        total = maps.new_zeros(1, maps.shape[1], height, width)
        count = maps.new_zeros(1, 1, height, width)
        for n, (y, x0) in enumerate(windows):
            total[:, :, y:y + ch, x0:x0 + cw] += maps[n]
            count[:, :, y:y + ch, x0:x0 + cw] += 1
        return total / count, x

    def _class_max(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.stack([maps[:, words].amax(dim=1) for words in self.class_words], dim=1)

    @torch.inference_mode()
    def probabilities(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """[C, H, W] at `size` (default the image's): each class's probability, the softmax of
        logit_scale x cosine over the classes' maxima or over every name then the maximum per class
        (`prob_over`), after PAMR where asked. Its argmax is `predict`'s label before the threshold."""
        return self._scores(image, size, probabilities=True)

    @torch.inference_mode()
    def scores(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Class scores [C, H, W] at `size` (default: the image's (height, width)): the class
        maxima of the cosine maps (after PAMR), or with prob_over="names" the class probabilities."""
        return self._scores(image, size, probabilities=self.protocol.prob_over == "names")

    def _scores(self, image: Image.Image, size, probabilities: bool) -> torch.Tensor:
        size = tuple(size or (image.height, image.width))
        proto = self.protocol
        # guide: the image PAMR follows (the normalised model input; the normalisation is per
        # channel, and PAMR divides colour differences by their local spread, so it cancels)
        maps, guide = self._name_maps_exact(image) if proto.resize == "exact" else self._name_maps_patch(image)
        per_name = proto.prob_over == "names"
        if not per_name:
            maps = self._class_max(maps)
        if self.pamr_iters and proto.pamr_at == "input":
            maps = pamr(guide.to(maps.device, maps.dtype), maps, iterations=self.pamr_iters,
                        dilations=proto.pamr_dilations)
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if self.pamr_iters and proto.pamr_at == "original":
            guide = F.interpolate(guide.to(maps.device, maps.dtype), size=size, mode="bilinear", align_corners=False)
            maps = pamr(guide, maps, iterations=self.pamr_iters, dilations=proto.pamr_dilations)
        if not probabilities:
            return maps[0]
        prob = torch.softmax(maps[0] * self.logit_scale, dim=0)
        if per_name:
            prob = self._class_max(prob[None])[0]
        return prob

    def predict(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Label map int64 [H, W]."""
        if self.protocol.prob_over == "names" or self.bg_threshold:
            prob = self.probabilities(image, size)
            labels = prob.argmax(dim=0)
            if self.bg_threshold and self.background is not None:
                labels[prob.amax(dim=0) < self.bg_threshold] = self.background
        else:
            labels = self.scores(image, size).argmax(dim=0)
        return labels.cpu().numpy().astype(np.int64)


class ConfusionMatrix:
    """counts[g, p]: pixels of ground-truth class g predicted as p, over everything added."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, label: np.ndarray, prediction: np.ndarray) -> None:
        label = np.asarray(label)
        prediction = np.asarray(prediction)
        if label.shape != prediction.shape:
            raise InvalidInputError(f"prediction {prediction.shape} and label {label.shape} differ in shape")
        valid = label != IGNORE
        gt = label[valid].astype(np.int64)
        pred = prediction[valid].astype(np.int64)
        bad = (gt < 0) | (gt >= self.num_classes)
        if bad.any():
            raise InvalidInputError(f"label values {sorted(set(gt[bad].tolist()))[:5]} are outside "
                                    f"0..{self.num_classes - 1} and not {IGNORE}")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise InvalidInputError(f"predictions must be in 0..{self.num_classes - 1}")
        self.counts += np.bincount(gt * self.num_classes + pred,
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, -1)

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1]; NaN where the class is in neither labels nor predictions."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")


@dataclass
class EvalResult:
    matrix: ConfusionMatrix
    class_names: list[str]
    images: int
    seconds: float

    @property
    def miou(self) -> float:
        return 100.0 * self.matrix.miou()

    def table(self) -> str:
        iou = self.matrix.iou()
        gt_pixels = self.matrix.counts.sum(1)
        width = max(12, max(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'pixels':>12}"]
        for name, value, pixels in zip(self.class_names, iou, gt_pixels):
            shown = "    n/a" if np.isnan(value) else f"{100 * value:7.2f}"
            lines.append(f"{name:<{width}}  {shown}  {pixels:>12d}")
        return "\n".join(lines)


def evaluate(samples, predict: Callable[[Image.Image, tuple[int, int]], np.ndarray], class_names: Sequence[str],
             progress: bool = True) -> EvalResult:
    """Run `predict(image, (H, W))` on every sample (SampleRef or Sample) into one confusion matrix."""
    import time

    from tqdm import tqdm

    matrix = ConfusionMatrix(len(class_names))
    started = time.perf_counter()
    count = 0
    for ref in tqdm(samples, desc="images", unit="img", disable=not progress):
        sample = ref.load() if hasattr(ref, "load") else ref
        matrix.add(sample.label, predict(sample.image, sample.label.shape))
        count += 1
    return EvalResult(matrix, list(class_names), count, time.perf_counter() - started)
