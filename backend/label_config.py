"""Labeling config XML -> what to predict: images, label controls, their labels and prompts.

Parsing goes through label-studio-sdk's `LabelInterface`, so tag and attribute handling
matches what Label Studio itself accepts.

Per-label prompts: `<Label value="Car" prompts="car; automobile; pickup truck"/>`.
Prompts are separated by `;` (commas occur inside natural phrases such as "a red, rusty car").
Without the attribute a label's prompt is its `value`. The label's heatmap is the maximum over
its prompts' similarity maps.

Exemplar inputs (docs/INTERACTIVE.md): a `<RectangleLabels smart="true">` or any `<KeyPointLabels>`
pointing at a predicted image takes example boxes and clicks in interactive calls. A label with
`negative="true"` in such a control is an example of what NOT to find (for every label of the
call); it is never predicted.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .settings import OUTPUT_KINDS

PROMPTS_ATTRIBUTE = "prompts"
PROMPT_SEPARATOR = ";"

# Control tag -> (output kind, result type). Only these can be filled from a heatmap.
CONTROL_KINDS = {
    "brushlabels": ("brush", "brushlabels"),
    "polygonlabels": ("polygon", "polygonlabels"),
    "rectanglelabels": ("rectangle", "rectanglelabels"),
}
SUPPORTED_TEXT = "BrushLabels, PolygonLabels or RectangleLabels with toName pointing at an <Image>"
EXEMPLAR_TAGS = {"rectanglelabels": "box", "keypointlabels": "point"}   # smart tags whose regions are examples
NEGATIVE_ATTRIBUTE = "negative"


class LabelConfigError(ValueError):
    """The labeling config cannot be used; the message says why and what is supported."""


@dataclass(frozen=True)
class LabelSpec:
    value: str                  # the label as Label Studio stores it in results (alias if set)
    prompts: tuple[str, ...]    # text prompts whose similarity maps are max-pooled into its heatmap


@dataclass(frozen=True)
class ImageSpec:
    name: str                   # <Image name=...>, the results' to_name
    value: str                  # <Image value=...>, e.g. "$image"

    @property
    def data_key(self) -> str | None:
        """Key of the task's data holding the image URL; None when the config names a fixed URL."""
        return self.value[1:] if self.value.startswith("$") else None


@dataclass(frozen=True)
class ControlSpec:
    name: str                   # results' from_name
    tag: str                    # e.g. "BrushLabels"
    kind: str                   # brush | polygon | rectangle
    result_type: str            # brushlabels | polygonlabels | rectanglelabels
    to_name: str                # the Image it predicts on
    labels: tuple[LabelSpec, ...]

    def find_label(self, text: str) -> LabelSpec | None:
        """The label whose value or one of whose prompts equals `text`, ignoring case."""
        key = normalize(text)
        for label in self.labels:
            if normalize(label.value) == key or any(normalize(p) == key for p in label.prompts):
                return label
        return None


@dataclass(frozen=True)
class ExemplarInput:
    """A control whose regions are examples in interactive calls (smart RectangleLabels, KeyPointLabels)."""
    name: str                   # the context items' from_name
    kind: str                   # box | point
    to_name: str
    negatives: frozenset[str]   # values of its labels marked negative="true"


@dataclass(frozen=True)
class PredictionPlan:
    images: tuple[ImageSpec, ...]        # the images some control predicts on
    controls: tuple[ControlSpec, ...]
    prompt_inputs: tuple[str, ...]       # names of <TextArea>s pointing at one of those images
    skipped: tuple[str, ...] = ()        # why other controls are not predicted (for logs)
    config: str = field(default="", repr=False, compare=False)
    exemplar_inputs: tuple[ExemplarInput, ...] = ()

    def exemplar_input(self, name: str) -> ExemplarInput | None:
        return next((e for e in self.exemplar_inputs if e.name == name), None)


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


# Every tag the parser handles, for warm_up().
_WARM_UP_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <BrushLabels name="brush" toName="image"><Label value="a" prompts="b; c"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="a"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="a"/></RectangleLabels>
</View>"""


def warm_up() -> None:
    """Import label-studio-sdk's parser and parse one config. Importing it takes 1-2 s of CPU
    (more on a busy machine); done at app creation, before the server accepts connections, it
    keeps the first /setup within Label Studio's 3 s timeout while the model loads."""
    parse_label_config(_WARM_UP_CONFIG)


def split_prompts(text: str) -> tuple[str, ...]:
    """'car; automobile;;car' -> ('car', 'automobile'): trimmed, non-empty, first occurrence kept."""
    seen: dict[str, str] = {}
    for part in text.split(PROMPT_SEPARATOR):
        part = " ".join(part.split())
        if part and normalize(part) not in seen:
            seen[normalize(part)] = part
    return tuple(seen.values())


def parse_label_config(config: str, outputs: tuple[str, ...] = OUTPUT_KINDS) -> PredictionPlan:
    """Raise LabelConfigError when the config gives nothing to predict."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError(f"labeling config is empty; this backend predicts {SUPPORTED_TEXT}")
    if len(config) > _CACHED_CONFIG_CHARS:   # the cache holds its keys: keep huge configs out of it
        return _parse_cached.__wrapped__(config, tuple(outputs))
    return _parse_cached(config, tuple(outputs))


_CACHED_CONFIG_CHARS = 256 * 1024


@functools.lru_cache(maxsize=64)
def _parse_cached(config: str, outputs: tuple[str, ...]) -> PredictionPlan:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several types for malformed XML
        raise LabelConfigError(f"labeling config cannot be parsed: {exc}") from None

    objects = {o.name: o for o in (interface.objects or [])}
    images: dict[str, ImageSpec] = {}
    controls: list[ControlSpec] = []
    skipped: list[str] = []

    def image_for(target: str, owner: str) -> ImageSpec | None:
        obj = objects.get(target)
        if obj is None:
            skipped.append(f"{owner}: toName '{target}' names no object tag")
            return None
        if obj.tag.lower() != "image":
            skipped.append(f"{owner}: toName '{target}' is a <{obj.tag}>, not an <Image>")
            return None
        if "valueList" in obj.attr or not obj.attr.get("value"):
            skipped.append(f"{owner}: <Image name='{target}'> uses valueList (multi-image), not supported")
            return None
        return ImageSpec(name=target, value=obj.attr["value"])

    exemplar_inputs: list[ExemplarInput] = []
    for control in interface.controls or []:
        tag = control.tag.lower()
        negatives = _negative_labels(control)
        if tag in EXEMPLAR_TAGS and (tag == "keypointlabels" or _is_smart(control)):
            exemplar_inputs.extend(ExemplarInput(control.name, EXEMPLAR_TAGS[tag], target, negatives)
                                   for target in control.to_name)
        if tag not in CONTROL_KINDS:
            continue
        kind, result_type = CONTROL_KINDS[tag]
        owner = f"<{control.tag} name='{control.name}'>"
        if kind not in outputs:
            skipped.append(f"{owner}: {kind} is not in GEM_OUTPUTS ({','.join(outputs)})")
            continue
        labels = tuple(label for label in _labels_of(control) if label.value not in negatives)
        if not labels:
            skipped.append(f"{owner}: has no static <Label> children")
            continue
        for target in control.to_name:
            image = image_for(target, owner)
            if image is None:
                continue
            images.setdefault(image.name, image)
            controls.append(ControlSpec(name=control.name, tag=control.tag, kind=kind,
                                        result_type=result_type, to_name=image.name, labels=labels))

    if not controls:
        reasons = ("; ".join(skipped)) if skipped else "it has no such control"
        raise LabelConfigError(
            f"nothing to predict in this labeling config: this backend predicts {SUPPORTED_TEXT} "
            f"({reasons})")

    prompt_inputs = tuple(
        c.name for c in interface.controls
        if c.tag.lower() == "textarea" and c.attr.get("perRegion", "false") != "true"
        and any(t in images for t in c.to_name))

    return PredictionPlan(images=tuple(images.values()), controls=tuple(controls),
                          prompt_inputs=prompt_inputs, skipped=tuple(skipped), config=config,
                          exemplar_inputs=tuple(e for e in exemplar_inputs if e.to_name in images))


def _is_true(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _is_smart(control) -> bool:
    """Label Studio sends a RectangleLabels region to the backend when the control, or one of its
    labels, is smart (`smart="true"`, or `smartOnly`)."""
    if _is_true(control.attr.get("smart")) or _is_true(control.attr.get("smartOnly")):
        return True
    return any(_is_true(tag.attr.get("smart")) for tag in (control.labels_attrs or {}).values())


def _negative_labels(control) -> frozenset[str]:
    return frozenset(value for value, tag in (control.labels_attrs or {}).items()
                     if _is_true(tag.attr.get(NEGATIVE_ATTRIBUTE)))


def _labels_of(control) -> tuple[LabelSpec, ...]:
    out = []
    for value, tag in (control.labels_attrs or {}).items():
        # Results carry alias-or-value (as LS stores it); the text prompt defaults to the
        # human-readable value because that is what CLIP understands.
        attrs = tag.attr
        prompts = split_prompts(attrs.get(PROMPTS_ATTRIBUTE, "")) or (" ".join((attrs.get("value") or value).split()),)
        out.append(LabelSpec(value=value, prompts=prompts))
    return tuple(out)
