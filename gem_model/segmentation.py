"""Zero-shot semantic segmentation with a GEM model, and the mIoU metric.

`Segmenter` labels every pixel of an image with one of a fixed list of classes: each class is one
or more names; each name becomes a text embedding averaged over prompt templates (CLIP's 80
ImageNet templates by default, as SCLIP, ClearCLIP and NACLIP do); the class scores the maximum
cosine similarity over its names; the pixel takes the best class. Optionally pixels whose best
class probability (softmax of `logit_scale` x scores) stays below `bg_threshold` become
background, and PAMR refines the scores before the decision.

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
from .model import GemModel
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


class Segmenter:
    """Image -> label map over fixed classes (see module docstring)."""

    def __init__(self, model: GemModel, classes: Sequence[Sequence[str]], templates: Sequence[Template],
                 image_size: int = 448, resize_mode: str = "short", background: Optional[int] = None,
                 bg_threshold: float = 0.0, logit_scale: float = 50.0, pamr_iters: int = 0):
        if not classes or any(not names for names in classes):
            raise InvalidInputError("every class needs at least one name")
        if bg_threshold and background is None:
            raise InvalidInputError("bg_threshold needs a background class")
        self.model = model
        self.num_classes = len(classes)
        names = [n for names in classes for n in names]
        starts = np.cumsum([0] + [len(n) for n in classes])
        self.class_words = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self.text = class_embeddings(model, names, templates)            # [Q, D]
        cfg = model.preprocess_cfg
        kwargs = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        self.transform = get_gem_img_transform(image_size, resize_mode, model.patch_size[0], **kwargs)
        self.mean = torch.tensor(kwargs.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
        self.std = torch.tensor(kwargs.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
        self.background = background
        self.bg_threshold = bg_threshold
        self.logit_scale = logit_scale
        self.pamr_iters = pamr_iters

    @torch.inference_mode()
    def scores(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Class scores [C, H, W] at `size` (default: the image's (height, width))."""
        size = size or (image.height, image.width)
        x = self.transform(image).unsqueeze(0)
        features = self.model.encode_image(x)
        text = self.text.to(features.gem.device)
        sims = torch.einsum("bhwd,qd->bqhw", features.gem, text)               # [1, Q, h, w]
        sims = F.interpolate(sims, size=features.input_size, mode="bilinear", align_corners=False)
        scores = torch.stack([sims[:, words].amax(dim=1) for words in self.class_words], dim=1)
        if self.pamr_iters:
            guide = (x.to(scores.device) * self.std.to(scores.device) + self.mean.to(scores.device))
            scores = pamr(guide, scores, iterations=self.pamr_iters)
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        return scores[0]

    def predict(self, image: Image.Image, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Label map int64 [H, W]."""
        scores = self.scores(image, size)
        labels = scores.argmax(dim=0)
        if self.bg_threshold and self.background is not None:
            prob = torch.softmax(scores * self.logit_scale, dim=0).amax(dim=0)
            labels[prob < self.bg_threshold] = self.background
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
