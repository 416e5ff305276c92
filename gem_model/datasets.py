"""Semantic segmentation benchmarks as their official releases lay them out: class names and readers.

Nothing here downloads anything; see docs/EVALUATION.md for where to get each dataset.

Every reader lists `SampleRef`s whose `load()` gives `Sample(name, image, label)`: `image` a PIL
RGB image, `label` an int64 array [H, W] of class indices in 0..C-1 or IGNORE (255). Each
dataset's `classes` are lists of names: a class scores the maximum over its names (the background class of VOC, Context-60 and
COCO-Object is a list of typical background words, as in SCLIP, ClearCLIP and NACLIP).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import GemError

IGNORE = 255

# What "background" is matched with: one query per word, the class scores their maximum.
BACKGROUND_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain",
    "stair", "floor", "hill", "rail", "fence",
)

# Dataset label names, with the spelled-out form used as the text query where the label is a
# contraction ("pottedplant" -> "potted plant").
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)

CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)

ADE_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base",
    "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

COCO_OBJECT_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)

# The class names of ClearCLIP's and NACLIP's evaluation (their configs/cls_*.txt, mc-lan/ClearCLIP
# @ad68a40 and sinahmr/NACLIP @0cac3a6), as changes to the lists above. Both keep the label files'
# contractions ("pottedplant", "chestofdrawers") and say "ship" and "table" for VOC's boat and
# dining table; NACLIP adds synonyms for person and tv monitor and keeps the background words where
# ClearCLIP queries the word "background"; on Context-60 both query "background".
_PERSON_SYNONYMS = ("person", "person in shirt", "person in jeans", "person in dress",
                    "person in sweater", "person in skirt", "person in jacket")
_VOC_RENAMES = {"boat": ("ship",), "dining table": ("table",), "potted plant": ("pottedplant",)}
_AUTHORS_NAMES = {
    ("naclip", "voc"): {**_VOC_RENAMES, "person": _PERSON_SYNONYMS,
                        "tv monitor": ("television monitor", "tv monitor", "monitor", "television", "screen")},
    ("clearclip", "voc"): {**_VOC_RENAMES, "tv monitor": ("tvmonitor",), "background": ("background",)},
    ("naclip", "coco-object"): {"person": _PERSON_SYNONYMS + ("body",)},
    ("clearclip", "coco-object"): {"background": ("background",)},
}
for _who in ("naclip", "clearclip"):
    _AUTHORS_NAMES[(_who, "voc20")] = {k: v for k, v in _AUTHORS_NAMES[(_who, "voc")].items() if k != "background"}
    _AUTHORS_NAMES[(_who, "context")] = {"potted plant": ("pottedplant",), "tv monitor": ("tvmonitor",)}
    _AUTHORS_NAMES[(_who, "context60")] = {**_AUTHORS_NAMES[(_who, "context")], "background": ("background",)}
    _AUTHORS_NAMES[(_who, "ade")] = "join"          # every multi-word name written as one word
    _AUTHORS_NAMES[(_who, "cityscapes")] = "join"


@dataclass
class Sample:
    name: str
    image: Image.Image
    label: np.ndarray     # int64 [H, W]: class index or IGNORE


@dataclass
class SampleRef:
    """Where one sample lives; `load()` reads it."""
    name: str
    image_path: Path
    label_path: Path
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None

    def load(self) -> Sample:
        label = read_label_png(self.label_path)
        if self.transform is not None:
            label = self.transform(label)
        if not self.image_path.is_file():
            raise GemError(f"{self.name}: image not found: {self.image_path}")
        image = _open_rgb(self.image_path)
        if (image.height, image.width) != label.shape:
            raise GemError(f"{self.name}: image is {image.width}x{image.height} but its label is "
                           f"{label.shape[1]}x{label.shape[0]}")
        return Sample(self.name, image, label)


@dataclass
class DatasetSpec:
    """A benchmark: its classes (each a list of query names) and how to read it."""
    key: str
    title: str
    classes: list[tuple[str, ...]]
    reader: Callable[[Path, str], list[SampleRef]] = field(repr=False)
    background: Optional[int] = None     # index of the background class, if the set has one
    split: str = "val"

    @property
    def class_names(self) -> list[str]:
        """One display name per class (the first query name)."""
        return ["background" if i == self.background else names[0]
                for i, names in enumerate(self.classes)]


# -- readers -------------------------------------------------------------------------------------

def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise GemError(f"{what} not found: {path} (see docs/EVALUATION.md for the expected layout)")
    return path


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise GemError(f"split file not found: {path} (see docs/EVALUATION.md for the expected layout)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_label_png(path: Path) -> np.ndarray:
    """Class indices of a label PNG: palette PNGs give their indices, grey PNGs their values."""
    with Image.open(path) as label:
        if label.mode not in ("P", "L", "I", "I;16"):
            raise GemError(f"{path}: label images must be palette or single-channel PNGs, got mode {label.mode}")
        return np.asarray(label).astype(np.int64)


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _paired(ids: Sequence[str], image_dir: Path, label_dir: Path, image_ext: str, label_suffix: str,
            transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> list[SampleRef]:
    return [SampleRef(name, image_dir / f"{name}{image_ext}", label_dir / f"{name}{label_suffix}", transform)
            for name in ids]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 (unlabelled) -> IGNORE, every other class moves down by one (ADE20K, Context-59)."""
    out = label - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out


def read_voc(root: Path, split: str) -> list[SampleRef]:
    """VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs, 255 = border), ImageSets/Segmentation/<split>.txt."""
    ids = _read_ids(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    return _paired(ids, _need_dir(root / "JPEGImages", "image folder"),
                       _need_dir(root / "SegmentationClass", "label folder"), ".jpg", ".png")


def _read_context(root: Path, split: str, transform) -> list[SampleRef]:
    ids = _read_ids(root / "ImageSets" / "SegmentationContext" / f"{split}.txt")
    return _paired(ids, _need_dir(root / "JPEGImages", "image folder"),
                       _need_dir(root / "SegmentationClassContext", "label folder"), ".jpg", ".png",
                       transform)


def read_context59(root: Path, split: str) -> list[SampleRef]:
    """Pascal Context as converted by mmsegmentation (labels 0 = background, 1..59): background ignored."""
    return _read_context(root, split, reduce_zero_label)


def read_context60(root: Path, split: str) -> list[SampleRef]:
    """Pascal Context with background as class 0."""
    return _read_context(root, split, None)


def _sorted_files(directory: Path, suffix: str) -> list[str]:
    return sorted(p.name[:-len(suffix)] for p in directory.iterdir() if p.name.endswith(suffix))


def read_ade(root: Path, split: str) -> list[SampleRef]:
    """ADEChallengeData2016: images/validation/*.jpg, annotations/validation/*.png (0 = ignore)."""
    sub = "validation" if split == "val" else split
    labels = _need_dir(root / "annotations" / sub, "label folder")
    return _paired(_sorted_files(labels, ".png"), _need_dir(root / "images" / sub, "image folder"),
                       labels, ".jpg", ".png", reduce_zero_label)


def read_coco_object(root: Path, split: str) -> list[SampleRef]:
    """COCO-Object: images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png
    (0 = background, 1..80 = the things of COCO, 255 = ignore), as converted from COCO-Stuff 164k."""
    sub = f"{split}2017" if split in ("val", "train") else split
    suffix = "_instanceTrainIds.png"
    labels = _need_dir(root / "annotations" / sub, "label folder")
    return _paired(_sorted_files(labels, suffix), _need_dir(root / "images" / sub, "image folder"),
                       labels, ".jpg", suffix)


def folder_classes(root: Path) -> list[tuple[str, ...]]:
    """classes.txt: line i names label i; `a | b` gives class i several query names."""
    path = root / "classes.txt"
    if not path.is_file():
        raise GemError(f"{path} not found: a folder dataset needs classes.txt (one class per line, "
                       f"line i = label value i)")
    classes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        names = tuple(n.strip() for n in line.split("|") if n.strip())
        if not names:
            raise GemError(f"{path}:{number}: empty class name")
        classes.append(names)
    if not classes:
        raise GemError(f"{path} lists no classes")
    return classes


def read_folder(root: Path, split: str = "") -> list[SampleRef]:
    """images/<name>.<jpg|png|...> and masks/<name>.png with label values (255 = ignore)."""
    images = _need_dir(root / "images", "image folder")
    masks = _need_dir(root / "masks", "mask folder")
    by_stem = {}
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"):
            by_stem.setdefault(path.stem, path)
    names = _sorted_files(masks, ".png")
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise GemError(f"masks without an image in {images}: {', '.join(missing[:5])}")
    return [SampleRef(name, by_stem[name], masks / f"{name}.png") for name in names]


def read_voc20(root: Path, split: str) -> list[SampleRef]:
    """VOC 2012 without its background: 0 and the 255 border ignored, the 20 objects 0..19."""
    return [SampleRef(r.name, r.image_path, r.label_path, reduce_zero_label) for r in read_voc(root, split)]


def read_cityscapes(root: Path, split: str) -> list[SampleRef]:
    """Cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/
    *_gtFine_labelTrainIds.png (19 classes, 255 ignored; written by cityscapesscripts' or
    mmsegmentation's conversion)."""
    images = _need_dir(root / "leftImg8bit" / split, "image folder")
    labels = _need_dir(root / "gtFine" / split, "label folder")
    suffix = "_gtFine_labelTrainIds.png"
    refs = []
    for label in sorted(labels.glob(f"*/*{suffix}")):
        stem = label.name[:-len(suffix)]
        refs.append(SampleRef(f"{label.parent.name}/{stem}",
                              images / label.parent.name / f"{stem}_leftImg8bit.png", label))
    return refs


def _with_background(names: Sequence[str]) -> list[tuple[str, ...]]:
    return [BACKGROUND_WORDS] + [(n,) for n in names]


def protocol_classes(spec: "DatasetSpec", names: str = "project") -> list[tuple[str, ...]]:
    """The query names of each class of `spec` under a protocol's naming ("project", or the
    authors' lists: "clearclip", "naclip"); the project's where the authors list nothing."""
    if names == "project":
        return list(spec.classes)
    if names not in ("clearclip", "naclip"):
        raise GemError(f"class names must be project, clearclip or naclip, got {names!r}")
    changes = _AUTHORS_NAMES.get((names, spec.key))
    if changes is None:
        return list(spec.classes)
    out = []
    for i, query in enumerate(spec.classes):
        key = "background" if i == spec.background else query[0]
        if changes == "join":
            out.append(tuple(n.replace(" ", "") for n in query))
        else:
            out.append(tuple(changes.get(key, query)))
    return out


DATASETS = {
    "voc": DatasetSpec("voc", "PASCAL VOC 2012 (21 classes with background)",
                       _with_background(VOC_CLASSES), read_voc, background=0),
    "context": DatasetSpec("context", "PASCAL Context (59 classes, background ignored)",
                           [(n,) for n in CONTEXT59_CLASSES], read_context59),
    "context60": DatasetSpec("context60", "PASCAL Context (60 classes with background)",
                             _with_background(CONTEXT59_CLASSES), read_context60, background=0),
    "ade": DatasetSpec("ade", "ADE20K (150 classes)", [(n,) for n in ADE_CLASSES], read_ade),
    "coco-object": DatasetSpec("coco-object", "COCO-Object (81 classes with background)",
                               _with_background(COCO_OBJECT_CLASSES), read_coco_object, background=0),
    "voc20": DatasetSpec("voc20", "PASCAL VOC 2012 (20 classes, background ignored)",
                         [(n,) for n in VOC_CLASSES], read_voc20),
    "cityscapes": DatasetSpec("cityscapes", "Cityscapes (19 classes)", [(n,) for n in CITYSCAPES_CLASSES],
                              read_cityscapes),
}


def get_dataset(key: str, root: str | os.PathLike) -> DatasetSpec:
    """The spec of a named benchmark, or of a folder dataset read from `root`."""
    root = Path(root)
    if key == "folder":
        classes = folder_classes(root)
        background = next((i for i, names in enumerate(classes) if names[0].lower() == "background"), None)
        return DatasetSpec("folder", f"folder {root}", classes, read_folder, background=background)
    if key not in DATASETS:
        raise GemError(f"unknown dataset {key!r}; known: {', '.join([*DATASETS, 'folder'])}")
    return DATASETS[key]
