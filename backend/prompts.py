"""Which text prompts each label control predicts, from the config, the UI and memory.

Rules (docs/BACKEND.md repeats them for users):

* Batch predictions (no free text in the request) predict every label of every control; a
  label's prompts are its `prompts` attribute or, without it, its value.
* Free text typed in a <TextArea> pointing at the image arrives in the interactive context.
  Each submitted text may hold several prompts separated by `;`. An interactive request
  predicts ONLY those prompts. A prompt that equals (ignoring case) a label's value or one of
  its prompts is predicted as that label, with the label's own prompts added; any other
  prompt is predicted as the FIRST label of each control (put a catch-all label such as
  "Object" first if you rely on free text).
* An interactive request (a `context` object is present) with no free text predicts NOTHING.
  Label Studio's UI sends one on Submit with Auto-Annotation on (`{"result": []}`); answering it
  with every label would show the just-submitted regions again as new suggestions.
* Example boxes and clicks (docs/INTERACTIVE.md): in an interactive call, a region of a smart
  `RectangleLabels` or of a `KeyPointLabels` in the context is an exemplar of its label (matched to
  the output controls' labels like free text: by value ignoring case, else the first label). The
  label is then predicted from those examples (and its typed text, if any). A keypoint with
  `is_positive` false, or a box of a label marked `negative="true"`, is a negative example.
  Regions already in the context (accepted suggestions, the example boxes themselves) are not
  suggested again in their control.
* Only when the project opts in (GEM_REMEMBER_PROMPTS, off by default) the last free text per
  project is remembered in MODEL_DIR/prompts.json; batch predictions for that project then add
  it, attached to a label by the same rule, on top of the config's labels.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from gem_model.exemplars import Exemplar

from .label_config import ControlSpec, PredictionPlan, normalize, split_prompts

try:  # cross-process lock for gunicorn workers sharing MODEL_DIR
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelPrompts:
    label: str                  # label value the results carry
    prompts: tuple[str, ...]    # prompts max-pooled into this label's heatmap


@dataclass(frozen=True)
class ControlPrompts:
    control: ControlSpec
    labels: tuple[LabelPrompts, ...]


@dataclass(frozen=True)
class PromptPlan:
    controls: tuple[ControlPrompts, ...]
    free_text: Mapping[str, tuple[str, ...]]   # image name -> free-text prompts applied to it
    interactive: bool                           # a context came with this request (the labeling UI)
    exemplars: Mapping[str, tuple[Exemplar, ...]] = field(default_factory=dict)   # image name -> examples
    present: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    # ^ output control name -> its regions already in the context: not suggested again

    def for_image(self, image_name: str) -> tuple[ControlPrompts, ...]:
        return tuple(c for c in self.controls if c.control.to_name == image_name)


def free_text_from_context(context: Any, plan: PredictionPlan) -> dict[str, tuple[str, ...]]:
    """Image name -> prompts typed in TextAreas, from `params.context` of an interactive /predict.

    Items whose to_name is not a predicted image apply to every image, so a TextArea that points
    elsewhere (or a client that leaves to_name out) still works for single-image configs.
    """
    if not isinstance(context, Mapping):
        return {}
    items = context.get("result")
    if not isinstance(items, list):
        return {}
    image_names = [i.name for i in plan.images]
    found: dict[str, list[str]] = {}
    for item in items:
        if not isinstance(item, Mapping) or str(item.get("type", "")).lower() != "textarea":
            continue
        value = item.get("value")
        texts = value.get("text") if isinstance(value, Mapping) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list):
            continue
        prompts = [p for t in texts if isinstance(t, str) for p in split_prompts(t)]
        targets = [item.get("to_name")] if item.get("to_name") in image_names else image_names
        for name in targets:
            found.setdefault(name, []).extend(prompts)
    return {name: _dedupe(prompts) for name, prompts in found.items() if prompts}


REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")


def _context_items(context: Any) -> list[Mapping[str, Any]]:
    items = context.get("result") if isinstance(context, Mapping) else None
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _percent(value: Mapping[str, Any], key: str) -> float | None:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        return None
    return float(number) / 100.0


def _resolve_label(plan: PredictionPlan, image: str, text: str) -> str | None:
    """The output label an example's label stands for: the first control label equal to it
    (ignoring case, prompts included), else the first label of the image's first control."""
    controls = [c for c in plan.controls if c.to_name == image]
    for control in controls:
        found = control.find_label(text)
        if found is not None:
            return found.value
    return controls[0].labels[0].value if controls else None


def exemplars_from_context(context: Any, plan: PredictionPlan) -> dict[str, tuple[Exemplar, ...]]:
    """Image name -> example boxes and clicks, from `params.context.result` of an interactive call.

    Items are Label Studio regions of the plan's exemplar inputs (percent coordinates, the label
    in `value[type]`); malformed ones are skipped with a log line, never raised."""
    image_names = [i.name for i in plan.images]
    found: dict[str, list[Exemplar]] = {}
    for item in _context_items(context):
        kind = str(item.get("type", "")).lower()
        source = plan.exemplar_input(str(item.get("from_name", "")))
        if source is None or kind not in ("rectanglelabels", "keypointlabels"):
            continue
        if item.get("origin") == "prediction":
            # Label Studio sends every region of a smart control, pre-annotations included: those
            # are the model's own guesses, not examples (they still count as present regions).
            continue
        value = item.get("value")
        labels = value.get(kind) if isinstance(value, Mapping) else None
        text = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
        x, y = (_percent(value, "x"), _percent(value, "y")) if isinstance(value, Mapping) else (None, None)
        if x is None or y is None:
            logger.info("exemplar item of %s skipped: no numeric value.x / value.y", source.name)
            continue
        targets = [item.get("to_name")] if item.get("to_name") in image_names else             [source.to_name] if source.to_name in image_names else image_names
        for image in targets:
            negative_label = text is not None and text in source.negatives
            label = None if negative_label or text is None else _resolve_label(plan, image, text)
            positive = not negative_label and item.get("is_positive", True) not in (False, 0, "false", "0")
            if label is None and positive:
                label = _resolve_label(plan, image, "")
            try:
                if source.kind == "point" or kind == "keypointlabels":
                    exemplar = Exemplar(label, positive, point=(x, y))
                else:
                    w, h = _percent(value, "width"), _percent(value, "height")
                    if w is None or h is None or w <= 0 or h <= 0:
                        logger.info("exemplar box of %s skipped: no positive width/height", source.name)
                        continue
                    exemplar = Exemplar(label, positive, box=(x, y, x + w, y + h))
            except ValueError as exc:
                logger.info("exemplar of %s skipped: %s", source.name, exc)
                continue
            found.setdefault(image, []).append(exemplar)
    return {name: tuple(dict.fromkeys(items)) for name, items in found.items()}


def present_regions(context: Any, plan: PredictionPlan) -> dict[str, tuple[Mapping[str, Any], ...]]:
    """Output control name -> the region items of that control already in the context."""
    names = {c.name for c in plan.controls}
    present: dict[str, list[Mapping[str, Any]]] = {}
    for item in _context_items(context):
        if str(item.get("type", "")).lower() in REGION_TYPES and item.get("from_name") in names:
            present.setdefault(str(item["from_name"]), []).append(item)
    return {name: tuple(items) for name, items in present.items()}


def label_prompts(control: ControlSpec, free_text: Iterable[str], include_config_labels: bool
                  ) -> tuple[LabelPrompts, ...]:
    """The labels one control predicts and each label's prompts (see the module rules)."""
    merged: dict[str, list[str]] = {}
    if include_config_labels:
        for label in control.labels:
            merged[label.value] = list(label.prompts)
    for text in free_text:
        label = control.find_label(text)
        if label is not None:
            prompts = merged.setdefault(label.value, list(label.prompts))
        else:
            prompts = merged.setdefault(control.labels[0].value, [])
        prompts.append(text)
    return tuple(LabelPrompts(label, _dedupe(prompts)) for label, prompts in merged.items() if prompts)


def plan_prompts(plan: PredictionPlan, context: Any, remembered: tuple[str, ...] = ()) -> PromptPlan:
    """What to predict. `context` is None for batch calls; any context object makes the call
    interactive, and an interactive call predicts only the text typed in it (possibly nothing)."""
    interactive = context is not None
    exemplars: dict[str, tuple[Exemplar, ...]] = {}
    present: dict[str, tuple[Mapping[str, Any], ...]] = {}
    if interactive:
        free_text = free_text_from_context(context, plan)
        exemplars = exemplars_from_context(context, plan)
        present = present_regions(context, plan)
    else:
        free_text = {i.name: remembered for i in plan.images} if remembered else {}
    controls = []
    for c in plan.controls:
        labels = list(label_prompts(c, free_text.get(c.to_name, ()), include_config_labels=not interactive))
        own = {lp.label for lp in labels}
        values = {label.value for label in c.labels}
        for exemplar in exemplars.get(c.to_name, ()):
            # A label with a positive example is predicted even when nothing was typed for it.
            if exemplar.positive and exemplar.label in values and exemplar.label not in own:
                labels.append(LabelPrompts(exemplar.label, ()))
                own.add(exemplar.label)
        controls.append(ControlPrompts(c, tuple(labels)))
    return PromptPlan(controls=tuple(c for c in controls if c.labels), free_text=free_text,
                      interactive=interactive, exemplars=exemplars, present=present)


def _dedupe(prompts: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for p in prompts:
        seen.setdefault(normalize(p), p)
    return tuple(seen.values())


def project_key(project: Any) -> str | None:
    """Label Studio sends project as "<id>.<timestamp>"; the id alone survives config edits."""
    if project is None or project == "":
        return None
    return str(project).split(".", 1)[0].strip() or None


class PromptMemory:
    """Last free-text prompts per project, in a JSON file shared by threads and worker processes."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def get(self, project: Any) -> tuple[str, ...]:
        key = project_key(project)
        if key is None:
            return ()
        with self._locked(shared=True):
            entry = self._read().get(key) or {}
        prompts = entry.get("prompts") if isinstance(entry, dict) else None
        return tuple(p for p in prompts if isinstance(p, str)) if isinstance(prompts, list) else ()

    def set(self, project: Any, prompts: Iterable[str]) -> None:
        key = project_key(project)
        if key is None:
            return
        prompts = list(prompts)
        with self._locked(shared=False):
            data = self._read()
            if prompts:
                data[key] = {"prompts": prompts, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            else:
                data.pop(key, None)
            self._write(data)

    @contextlib.contextmanager
    def _locked(self, shared: bool):
        with self._lock:
            if fcntl is None:
                yield
                return
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path + ".lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("prompt memory %s unreadable, starting empty: %s", self.path, exc)
            return {}
        projects = data.get("projects") if isinstance(data, dict) else None
        return projects if isinstance(projects, dict) else {}

    def _write(self, projects: dict) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        # Write-then-rename so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=".prompts-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"projects": projects}, handle, indent=1, ensure_ascii=False)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
