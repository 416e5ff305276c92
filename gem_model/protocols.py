"""Each method's own evaluation protocol, as one record per (method, dataset).

A `Protocol` holds every choice that changes a published mIoU besides the model itself: how the
image is resized, the sliding windows, the softmax behind the background threshold, PAMR, the
positional-embedding resize and the class names. `protocol(name, dataset)` gives the preset;
`dataclasses.replace` (or the evaluation command's flags) overrides single choices.

Where each value comes from (docs/EVALUATION.md, "Protocols", has the table):
- clearclip: mc-lan/ClearCLIP @ad68a40, its configs and segmentor (read, not copied).
- naclip: sinahmr/NACLIP @0cac3a6, its configs and segmentor.
- gem: the GEM authors published no evaluation code; the preset is this project's own protocol
  (the one the evaluation command ran before presets existed) with GEM's 448 px input.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidInputError
from .pamr import DEFAULT_DILATIONS, NACLIP_DILATIONS

PROTOCOLS = ("gem", "clearclip", "naclip")
RESIZES = ("patch", "exact")
CROP_FITS = ("pad", "floor")
PROB_OVER = ("classes", "names")
PAMR_AT = ("input", "original")


@dataclass(frozen=True)
class Protocol:
    """How one method is evaluated on one dataset.

    resize:  "patch": the project's transform (short side to image_size, PIL bicubic, both sides
             rounded to the patch size); windows are averaged token by token inside the model.
             "exact": mmsegmentation's keep-ratio rescale (short side to image_size unless the long
             side would pass 2048, sides rounded to whole pixels, bilinear without antialiasing,
             back to 8-bit values), windows averaged on the maps, pixel by pixel.
    crop_fit: for "exact": a window (or the whole image) whose side is not a multiple of the patch
             is zero-padded around its centre and the maps cut back ("pad", ClearCLIP), or encoded
             as the patch convolution sees it, the remainder dropped, and its map stretched over
             the whole window ("floor", NACLIP).
    prob_over: the softmax of logit_scale x cosine behind the background threshold runs over the
             class maxima ("classes", the project's way) or over every name, then the maximum per
             class ("names", ClearCLIP and NACLIP).
    pamr_at: "input": on the class maps (per-name maps with prob_over="names") at the model's input
             resolution; "original": on the per-name maps at the original image resolution (NACLIP).
    names:   class names: "project" (datasets.py, contractions spelled out, background words) or
             the authors' lists ("clearclip", "naclip"; datasets.protocol_classes).
    """
    name: str = "gem"
    method: str = "gem"
    image_size: int = 448
    resize: str = "patch"
    slide_crop: int = 0
    slide_stride: int = 0
    crop_fit: str = "pad"
    logit_scale: float = 50.0
    prob_over: str = "classes"
    bg_threshold: float = 0.0
    pamr_iters: int = 0
    pamr_dilations: tuple[int, ...] = DEFAULT_DILATIONS
    pamr_at: str = "input"
    pos_embed: str = "antialias"
    names: str = "project"

    def __post_init__(self):
        for field, allowed in (("resize", RESIZES), ("crop_fit", CROP_FITS), ("prob_over", PROB_OVER),
                               ("pamr_at", PAMR_AT), ("names", ("project", "clearclip", "naclip"))):
            if getattr(self, field) not in allowed:
                raise InvalidInputError(f"{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")
        if self.slide_stride and not self.slide_crop:
            raise InvalidInputError("a slide stride needs a slide crop")
        if self.slide_crop and self.slide_stride > self.slide_crop:
            raise InvalidInputError(f"slide stride {self.slide_stride} is larger than the crop {self.slide_crop}")
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise InvalidInputError(f"bg_threshold must be in [0, 1], got {self.bg_threshold}")
        if self.pamr_iters < 0:
            raise InvalidInputError(f"pamr_iters must be >= 0, got {self.pamr_iters}")

    def replace(self, **changes) -> "Protocol":
        return dataclasses.replace(self, **changes)


# Background thresholds on the maximum class probability, by dataset (datasets without a
# background class have none).
_CLEARCLIP_THRESHOLDS = {"voc": 0.5, "context60": 0.15, "coco-object": 0.4}
_NACLIP_THRESHOLDS = {"voc": 0.1, "context60": 0.1, "coco-object": 0.1}


def protocol(name: str, dataset: Optional[str] = None) -> Protocol:
    """The preset of method `name` for `dataset` (a datasets.DATASETS key; None or an unknown key,
    e.g. a folder dataset: the method's general settings, no background threshold)."""
    if name == "gem":
        return Protocol()
    if name == "clearclip":
        city = dataset == "cityscapes"
        return Protocol(
            name="clearclip", method="clearclip", image_size=448, resize="exact",
            slide_crop=224 if city else 448, slide_stride=224, crop_fit="pad", logit_scale=50.0,
            prob_over="names", bg_threshold=_CLEARCLIP_THRESHOLDS.get(dataset, 0.0), pamr_iters=0,
            pamr_at="original", pos_embed="authors", names="clearclip")
    if name == "naclip":
        whole = dataset in ("voc", "voc20")
        return Protocol(
            name="naclip", method="naclip", image_size=560 if dataset == "cityscapes" else 336,
            resize="exact", slide_crop=0 if whole else 224, slide_stride=0 if whole else 112,
            crop_fit="floor", logit_scale=40.0, prob_over="names",
            bg_threshold=_NACLIP_THRESHOLDS.get(dataset, 0.0), pamr_iters=10,
            pamr_dilations=NACLIP_DILATIONS, pamr_at="original", pos_embed="authors", names="naclip")
    raise InvalidInputError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
