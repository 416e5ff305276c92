"""8. The annotator's clicks, in a real browser: headless Chromium on Label Studio's labeling page.

Label Studio is connected to the backend through a recording proxy, so every call the UI makes
Label Studio send to the backend is checked, and written with what the browser sent to Label
Studio to `<artifacts>/browser/calls-<test>.json` (docs/E2E.md, "What the labeling UI sends").
A screenshot of each state goes to the same folder.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_support import (CONTROL_TYPES, RecordingProxy, check, encode_png, labeling_config, pattern_image,
                         wait_until)

CONFIG = labeling_config()
PROMPT = "a bright round disc"
# Tall enough for the regions panel, which only renders the rows in view, to list every region.
# The regions panel renders only the rows in view: tall enough for the ~25 rows of a task here
# (one box and one polygon per object), or accepted regions would exist without a row to count.
VIEWPORT = {"width": 1280, "height": 2600}
UI_TIMEOUT_MS = 60_000
SUGGESTIONS = re.compile(r"^\s*(\d+) suggestions?\s*$")

# Selectors that work on Label Studio 1.23.2 (docs/E2E.md lists them)
REGION = ".lsf-tree__node"
REGION_TYPES = {"brush": "lsf-tree__node_type_brushregion", "poly": "lsf-tree__node_type_polygonregion",
                "rect": "lsf-tree__node_type_rectangleregion"}
AUTO_ANNOTATION = "input[data-testid=bottombar-auto-annotation-toggle]"
PROMPT_BOX = "textarea[name=prompt]"
ADD_PROMPT = "[data-testid=textarea-add-button]"
ACCEPT = ".lsf-auto-accept__action_type_accept"
REJECT = ".lsf-auto-accept__action_type_reject"
SUBMIT = "[data-testid=bottombar-submit-button]"


@pytest.fixture(scope="module")
def proxy(backend):
    with RecordingProxy(backend.url) as recording:
        yield recording


@pytest.fixture(scope="module")
def project(ls, proxy) -> dict:
    """A project with two uploaded images, the backend connected (interactive) through the proxy."""
    project_id = ls.create_project("e2e browser", CONFIG)
    ls.upload_files(project_id, {
        "accept": ("accept.png", encode_png(pattern_image(320, 240, seed=3)), "image/png"),
        "reject": ("reject.png", encode_png(pattern_image(320, 240, seed=4)), "image/png"),
    })
    tasks = sorted(ls.tasks(project_id), key=lambda t: t["id"])
    ml = check(ls.add_ml_backend(project_id, proxy.url, is_interactive=True), 201).json()
    return {"id": project_id, "tasks": [t["id"] for t in tasks], "ml": ml["id"]}


@pytest.fixture(scope="module")
def ui_calls() -> list[tuple]:
    """(monotonic time, method, path, JSON body) of every write the browser sends to Label Studio's API."""
    return []


@pytest.fixture(scope="module")
def page(chromium, label_studio, project, ui_calls):
    """A logged-in labeling page."""
    context = chromium.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)

    def on_request(request) -> None:
        path = "/" + request.url.split("://", 1)[-1].split("/", 1)[-1]
        if path.startswith("/api/") and request.method != "GET":
            ui_calls.append((time.monotonic(), request.method, path, _json(request.post_data)))
    tab.on("request", on_request)

    tab.goto(f"{label_studio.url}/user/login/")
    tab.fill("input[name=email]", label_studio.account.email)
    tab.fill("input[name=password]", label_studio.account.password)
    tab.click("button[type=submit]")
    tab.wait_for_url(lambda url: "/user/login" not in url)
    try:
        yield tab
    finally:
        context.close()


class Steps:
    """Screenshots and, per step, what the UI sent to Label Studio and Label Studio to the backend."""

    def __init__(self, name: str, page, ui_calls: list[tuple], proxy: RecordingProxy, folder: Path):
        self.name, self.page, self.ui_calls, self.proxy, self.folder = name, page, ui_calls, proxy, folder
        self.log: list[dict] = []
        self._since = time.monotonic()

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.page.screenshot(path=str(self.folder / f"{self.name}-{len(self.log) + 1:02d}-{step}.png"))
        self.log.append({
            "step": step,
            "ui_to_label_studio": [{"method": m, "path": p, "body": _trim(b)}
                                   for t, m, p, b in self.ui_calls if self._since <= t < now],
            "label_studio_to_backend": [_summary(e) for e in self.proxy.exchanges if self._since <= e.at < now],
        })
        self._since = now
        (self.folder / f"calls-{self.name}.json").write_text(json.dumps(self.log, indent=1))


def open_task(page, label_studio, project: dict, task: int) -> None:
    page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={task}")
    page.wait_for_selector(REGION)


def regions(page) -> dict[str, list[str]]:
    """Control name -> the texts of its rows in the regions panel."""
    found: dict[str, list[str]] = {}
    for row in page.locator(REGION).all():
        classes = row.get_attribute("class") or ""
        control = next((c for c, css in REGION_TYPES.items() if css in classes.split()), "other")
        found.setdefault(control, []).append(row.inner_text())
    return found


def wait_for_rows(page, count: int, timeout: float = 15) -> dict[str, list[str]]:
    """The regions panel once it lists `count` rows (it draws them over a moment), or as it is
    when `timeout` runs out."""
    def drawn():
        shown = regions(page)
        return shown if sum(map(len, shown.values())) == count else None

    return wait_until(drawn, timeout=timeout) or regions(page)


def suggestion_count(page) -> int:
    """The "N suggestions" counter of the bottom bar; 0 when it is not shown."""
    counter = page.get_by_text(SUGGESTIONS)
    if counter.count() == 0 or not counter.first.is_visible():
        return 0
    return int(SUGGESTIONS.match(counter.first.inner_text()).group(1))


def ask(page, proxy: RecordingProxy, text: str) -> tuple[int, list[dict]]:
    """Auto-Annotation on, type `text`, Add: the suggestions shown and the backend's regions."""
    if not page.locator(AUTO_ANNOTATION).is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    assert page.locator(AUTO_ANNOTATION).is_checked()
    before = len(proxy.calls())
    page.fill(PROMPT_BOX, text)
    page.click(ADD_PROMPT)
    page.get_by_text(SUGGESTIONS).first.wait_for()
    calls = wait_until(lambda: proxy.calls()[before:], timeout=30)
    assert len(calls) == 1, f"one interactive /predict expected, got {[c.body for c in calls]}"
    context = calls[0].body["params"]["context"]
    typed = [item["value"]["text"] for item in context["result"] if item["type"] == "textarea"]
    assert typed == [[text]], context
    (answer,) = calls[0].answer["results"]
    return suggestion_count(page), answer["result"]


def test_pre_annotations_prompt_accept_submit_without_ghost_suggestions(
        page, ui_calls, label_studio, ls, proxy, project, backend, browser_artifacts, browser_timing):
    steps = Steps("accept", page, ui_calls, proxy, browser_artifacts)
    task = project["tasks"][0]

    # Opening a task without predictions: Label Studio asks the backend (a batch call, no
    # context) and shows the answer as regions, with their scores.
    open_task(page, label_studio, project, task)
    shown = wait_until(lambda: (r := regions(page)) and set(CONTROL_TYPES) <= set(r) and r, timeout=30)
    assert set(CONTROL_TYPES) <= set(shown), f"regions panel: {shown}"
    (stored,) = ls.predictions(task)
    shown = wait_for_rows(page, len(stored["result"]))
    assert sum(len(rows) for rows in shown.values()) == len(stored["result"]), shown
    assert all(re.search(r"\d\.\d\d", row) for rows in shown.values() for row in rows), shown
    loads = [c for c in proxy.calls() if task in [t["id"] for t in c.body["tasks"]]]
    assert loads and all(c.body["params"]["context"] is None for c in loads)
    steps.done("pre-annotations")

    # Auto-Annotation on, a typed prompt: suggestions for that prompt only, in under the timeout.
    shown_suggestions, suggested = ask(page, proxy, PROMPT)
    assert suggested and shown_suggestions == len(suggested)
    # "a bright round disc" is no label of the config: it is predicted as each control's first label.
    assert {(i["from_name"], i["value"][i["type"]][0]) for i in suggested} <= {(c, "disc") for c in CONTROL_TYPES}
    steps.done("suggestions")

    page.click(ACCEPT)
    wait_until(lambda: suggestion_count(page) == 0, timeout=10)
    assert suggestion_count(page) == 0
    # The panel draws the accepted rows over a moment after the counter goes.
    expected_rows = len(stored["result"]) + len(suggested)
    after_accept = wait_for_rows(page, expected_rows)
    assert sum(map(len, after_accept.values())) == expected_rows, after_accept
    steps.done("accepted")

    # Submit with Auto-Annotation still on: the UI asks the backend once more with an empty
    # context; the backend answers no regions, so no suggestion appears.
    calls_before = len(proxy.calls())
    page.click(SUBMIT)
    annotations = wait_until(lambda: check(ls.get(f"/api/tasks/{task}/annotations/"), 200).json(), timeout=30)
    assert len(annotations) == 1, annotations
    empty = wait_until(lambda: [c for c in proxy.calls()[calls_before:] if c.body["params"]["context"] is not None],
                       timeout=15)
    assert [c.body["params"]["context"] for c in empty] == [{"result": []}]
    assert [r["result"] for r in empty[0].answer["results"]] == [[]]
    time.sleep(2)   # the UI shows whatever came back
    assert suggestion_count(page) == 0
    steps.done("submitted")

    # The stored annotation: the pre-annotations, the prompt, and exactly the accepted regions.
    (annotation,) = annotations
    result = annotation["result"]
    accepted = [i for i in result if i["type"] != "textarea" and i.get("origin") != "prediction"]
    assert _comparable(accepted) == _comparable(suggested)
    assert [i["value"]["text"] for i in result if i["type"] == "textarea"] == [[PROMPT]]
    assert len([i for i in result if i.get("origin") == "prediction"]) == len(stored["result"])
    assert annotation.get("parent_prediction") == stored["id"]

    # The webhook names that prediction; the feedback log links the annotation to it.
    def feedback():
        path = backend.model_dir / "feedback.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [r for r in map(json.loads, lines) if r.get("annotation") == annotation["id"]]
    (record,) = wait_until(feedback, timeout=15)
    assert record["prediction"] == stored["id"]


def test_rejected_suggestions_leave_the_regions_as_they_were(
        page, ui_calls, label_studio, proxy, project, browser_artifacts, browser_timing):
    steps = Steps("reject", page, ui_calls, proxy, browser_artifacts)
    task = project["tasks"][1]
    open_task(page, label_studio, project, task)
    before = wait_until(lambda: (r := regions(page)) and set(CONTROL_TYPES) <= set(r) and r, timeout=30)
    steps.done("pre-annotations")

    shown_suggestions, suggested = ask(page, proxy, "stripes")
    # A prompt equal to a label is predicted as that label.
    assert suggested and shown_suggestions == len(suggested)
    assert {i["value"][i["type"]][0] for i in suggested} == {"stripes"}
    steps.done("suggestions")

    calls_before, ui_before = len(proxy.exchanges), len(ui_calls)
    page.click(REJECT)
    wait_until(lambda: suggestion_count(page) == 0, timeout=10)
    assert suggestion_count(page) == 0
    time.sleep(1)
    assert regions(page) == before
    # Rejecting is the browser's business only: no call to the backend, none to the ML API.
    assert proxy.exchanges[calls_before:] == []
    assert not [c for c in ui_calls[ui_before:] if "/api/ml/" in c[2]]
    steps.done("rejected")


def _comparable(items: list[dict]) -> list[tuple]:
    """Result items as (control, type, labels, geometry rounded), sorted: ids and origin left out."""
    rows = []
    for item in items:
        value = dict(item["value"])
        labels = tuple(value.pop(item["type"]))
        geometry = json.dumps(_rounded(value), sort_keys=True)
        rows.append((item["from_name"], item["type"], labels, geometry))
    return sorted(rows)


def _rounded(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(float(value), 3)     # Label Studio stores 30.0 as 30
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _summary(exchange) -> dict:
    """One call Label Studio made to the backend, for the record."""
    body = exchange.body if isinstance(exchange.body, dict) else {}
    row: dict[str, Any] = {"method": exchange.method, "path": exchange.path, "status": exchange.status}
    if exchange.path.startswith("/predict"):
        row.update(tasks=[t.get("id") for t in body.get("tasks", [])], params=_trim(body.get("params")))
    elif exchange.path.startswith("/webhook"):
        annotation = body.get("annotation") or {}
        row.update(action=body.get("action"), annotation={
            "id": annotation.get("id"), "parent_prediction": annotation.get("parent_prediction"),
            "prediction": annotation.get("prediction"), "result_items": len(annotation.get("result") or [])})
    elif exchange.path.startswith("/setup"):
        row.update(project=body.get("project"))
    row["answer"] = _trim(exchange.answer)
    return row


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _trim(value: Any, depth: int = 0) -> Any:
    """Bodies for the record: long lists (brush RLE, polygon points) shortened, schemas cut."""
    if isinstance(value, list):
        if len(value) > 8 and all(isinstance(v, (int, float, list)) for v in value):
            return [_trim(v, depth + 1) for v in value[:4]] + [f"... {len(value)} items"]
        return [_trim(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _trim(v, depth + 1) for k, v in value.items()}
    if isinstance(value, str) and len(value) > 200:
        return value[:120] + f"... ({len(value)} characters)"
    return value


# -- example boxes and clicks (smart tools) ----------------------------------------------------------

SMART_CONFIG = (
    '<View>'
    '<Image name="image" value="$image"/>'
    '<RectangleLabels name="rect" toName="image" smart="true" smartOnly="true"><Label value="disc"/><Label value="stripes"/>'
    '<Label value="not this" negative="true"/></RectangleLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true" smartOnly="true"><Label value="disc"/><Label value="stripes"/>'
    '</KeyPointLabels>'
    '<BrushLabels name="brush" toName="image"><Label value="disc"/><Label value="stripes"/></BrushLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="disc"/><Label value="stripes"/></PolygonLabels>'
    '</View>'
)
SCENE_SIZE = (320, 240)
SCENE_DISCS = [(30, 30, 100, 100), (200, 20, 270, 90), (120, 140, 190, 210)]   # three like objects
SCENE_SQUARES = [(230, 150, 290, 210), (20, 150, 80, 210)]                      # unlike (blue)
SCENE_LOOKALIKE = (140, 40, 190, 90)                                            # orange: like the discs


def smart_scene():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", SCENE_SIZE, (20, 20, 30))
    draw = ImageDraw.Draw(image)
    for box in SCENE_DISCS:
        draw.ellipse(box, fill=(240, 220, 40))
    for box in SCENE_SQUARES:
        draw.rectangle(box, fill=(40, 80, 230))
    draw.rectangle(SCENE_LOOKALIKE, fill=(250, 170, 40))
    return image


@pytest.fixture(scope="module")
def smart_backend(start_backend, _label_studio_process):
    # 160 px model input: the tiny test model's 8 px patches then resolve 70 px objects.
    return start_backend("smart", LABEL_STUDIO_API_KEY=_label_studio_process[1].legacy_token, GEM_IMAGE_SIZE="160")


@pytest.fixture(scope="module")
def smart_proxy(smart_backend):
    with RecordingProxy(smart_backend.url) as recording:
        yield recording


@pytest.fixture(scope="module")
def smart_project(ls, smart_proxy) -> dict:
    project_id = ls.create_project("e2e exemplars", SMART_CONFIG)
    ls.upload_files(project_id, {
        "box": ("box.png", encode_png(smart_scene()), "image/png"),
        "click": ("click.png", encode_png(smart_scene()), "image/png"),
        "negative-box": ("negative-box.png", encode_png(smart_scene()), "image/png"),
    })
    tasks = sorted(ls.tasks(project_id), key=lambda t: t["id"])
    ml = check(ls.add_ml_backend(project_id, smart_proxy.url, is_interactive=True), 201).json()
    return {"id": project_id, "tasks": [t["id"] for t in tasks], "ml": ml["id"]}


def _image_point(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel (x, y): the labeling canvas is the image, scaled to fit."""
    stage = page.locator(".konvajs-content").first.bounding_box()
    scale = stage["width"] / SCENE_SIZE[0]
    return stage["x"] + x * scale, stage["y"] + y * scale


def _interactive_calls(proxy, since: int, kind: str) -> list:
    return [c for c in proxy.calls()[since:]
            if (c.body["params"].get("context") or {}).get("result")
            and any(i.get("type") == kind for i in c.body["params"]["context"]["result"])]


def _covers(results: list[dict], box, kind="brushlabels") -> float:
    from backend.decode import item_mask

    width, height = SCENE_SIZE
    masks = [item_mask(i, height, width) for i in results if i["type"] == kind]
    mask = np.any(masks, axis=0) if masks else np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    return float(mask[y0 + 15:y1 - 15, x0 + 15:x1 - 15].mean())


def _open_smart_task(page, label_studio, project, task) -> None:
    page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={task}")
    page.wait_for_selector(".konvajs-content")
    if not page.locator(AUTO_ANNOTATION).is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    assert page.locator(AUTO_ANNOTATION).is_checked()


def test_one_example_box_suggests_every_like_object(
        page, ui_calls, label_studio, ls, smart_proxy, smart_project, browser_artifacts, browser_timing):
    steps = Steps("exemplar-box", page, ui_calls, smart_proxy, browser_artifacts)
    task = smart_project["tasks"][0]
    _open_smart_task(page, label_studio, smart_project, task)
    time.sleep(2)
    regions_before = sum(map(len, regions(page).values()))
    steps.done("opened")

    # The rectangle control's "disc" label, the Auto-Detect tool (hotkey M: its first smart tool,
    # the rectangle), then a box drawn around the first disc.
    page.get_by_text("disc", exact=True).first.click()
    page.keyboard.press("m")
    before = len(smart_proxy.calls())
    x0, y0, x1, y1 = SCENE_DISCS[0]
    start, end = _image_point(page, x0 - 4, y0 - 4), _image_point(page, x1 + 4, y1 + 4)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=5)
    page.mouse.move(*end, steps=5)
    page.mouse.up()
    (call,) = wait_until(lambda: _interactive_calls(smart_proxy, before, "rectanglelabels"), timeout=60)[:1]
    # Label Studio sends every region of the smart control: the pre-annotation boxes
    # (origin "prediction") and the one just drawn (origin "manual").
    items = call.body["params"]["context"]["result"]
    (box,) = [i for i in items if i["type"] == "rectanglelabels" and i.get("origin") != "prediction"]
    assert box["from_name"] == "rect" and box["value"]["rectanglelabels"] == ["disc"]
    assert {"x", "y", "width", "height"} <= set(box["value"]) and box["original_width"] == SCENE_SIZE[0]
    (answer,) = call.answer["results"]
    suggested = answer["result"]
    # Every disc, the example's own included, in the brush and polygon controls; boxes for the others.
    assert all(_covers(suggested, d) > 0.8 for d in SCENE_DISCS), suggested
    assert all(_covers(suggested, d, "polygonlabels") > 0.8 for d in SCENE_DISCS)
    assert all(_covers(suggested, s) == 0 for s in SCENE_SQUARES)
    # The rectangle control already holds a box on every disc (the pre-annotations, sent back in
    # the context): none is suggested again.
    assert not [i for i in suggested if i["type"] == "rectanglelabels"]
    page.get_by_text(SUGGESTIONS).first.wait_for()
    assert suggestion_count(page) == len(suggested)
    steps.done("suggestions")

    page.click(ACCEPT)
    wait_until(lambda: suggestion_count(page) == 0, timeout=10)
    steps.done("accepted")
    page.click(SUBMIT)
    annotations = wait_until(lambda: check(ls.get(f"/api/tasks/{task}/annotations/"), 200).json(), timeout=30)
    (annotation,) = annotations
    stored = [i for i in annotation["result"] if i["type"] in ("brushlabels", "polygonlabels", "rectanglelabels")]
    assert all(_covers(stored, d) > 0.8 for d in SCENE_DISCS)
    assert len(stored) >= regions_before + len(suggested)
    steps.done("submitted")


# Selectors of the smart tools on Label Studio 1.23.2: the Auto-Detect button of the toolbar
# shows the smart tools (one per smart control's kind) while hovered; the label groups are in
# the config's order (rect, kp, brush, poly in SMART_CONFIG).
AUTO_DETECT = ".lsf-tool_smart"
HIDE_ALL_REGIONS = "button[aria-label='Hide all regions']"
LABEL_GROUPS = {"rect": 0, "kp": 1}


def _pick_label(page, control: str, label: str) -> None:
    page.locator(".lsf-labels").nth(LABEL_GROUPS[control]).get_by_text(label, exact=True).click()


def _label_selected(page, control: str, label: str) -> bool:
    chosen = page.locator(".lsf-labels").nth(LABEL_GROUPS[control]).locator(".lsf-label_selected")
    return label in chosen.all_inner_texts()


def _pick_smart_tool(page, tool: str) -> None:
    """Hover Auto-Detect, click one of its tools (aria-label `rectangle-tool`, `key-point-tool`)."""
    page.locator(AUTO_DETECT).first.hover()
    page.locator(f"[aria-label={tool}]").click()
    assert page.locator(f".lsf-tool_active[aria-label={tool}]").count() == 1


def _click_image(page, x: float, y: float, alt: bool = False) -> None:
    position = _image_point(page, x, y)
    if alt:
        page.keyboard.down("Alt")
    try:
        page.mouse.click(*position)
    finally:
        if alt:
            page.keyboard.up("Alt")


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_a_negative_click_removes_the_lookalike_and_keeps_the_like_objects(
        page, ui_calls, label_studio, ls, smart_proxy, smart_backend, smart_project, browser_artifacts,
        browser_timing):
    steps = Steps("negative-click", page, ui_calls, smart_proxy, browser_artifacts)
    task = smart_project["tasks"][1]
    _open_smart_task(page, label_studio, smart_project, task)
    time.sleep(2)
    # The pre-annotations cover every object, and a rectangle or polygon region takes a click
    # made on it (it selects the region): the annotator hides them to click under them.
    page.click(HIDE_ALL_REGIONS)
    steps.done("opened")

    # One click on the first disc with the keypoint control's "disc" and Auto-Detect's key point.
    _pick_label(page, "kp", "disc")
    _pick_smart_tool(page, "key-point-tool")
    before = len(smart_proxy.calls())
    _click_image(page, *_centre(SCENE_DISCS[0]))
    (first,) = wait_until(lambda: _interactive_calls(smart_proxy, before, "keypointlabels"), timeout=60)[:1]
    (click,) = first.body["params"]["context"]["result"]
    assert (click["type"], click["from_name"], click["to_name"]) == ("keypointlabels", "kp", "image")
    assert click["is_positive"] is True and click["value"]["keypointlabels"] == ["disc"]
    assert (click["original_width"], click["original_height"]) == SCENE_SIZE
    assert abs(click["value"]["x"] * SCENE_SIZE[0] / 100 - _centre(SCENE_DISCS[0])[0]) < 15
    suggested = first.answer["results"][0]["result"]
    # Every disc, and the orange look-alike with them; the blue squares not.
    assert all(_covers(suggested, d) > 0.8 for d in SCENE_DISCS), suggested
    assert _covers(suggested, SCENE_LOOKALIKE) > 0.8
    assert all(_covers(suggested, s) == 0 for s in SCENE_SQUARES)
    page.get_by_text(SUGGESTIONS).first.wait_for()
    assert suggestion_count(page) == len(suggested)
    steps.done("positive-click")

    # Label Studio unselects the label once a region is made: without choosing it again, a
    # second click makes no region and calls nobody (why a second example "never arrived").
    assert not _label_selected(page, "kp", "disc")
    _pick_label(page, "kp", "disc")
    before = len(smart_proxy.calls())
    _click_image(page, *_centre(SCENE_LOOKALIKE), alt=True)
    (second,) = wait_until(lambda: _interactive_calls(smart_proxy, before, "keypointlabels"), timeout=60)[:1]
    context = second.body["params"]["context"]
    # Both clicks of that label, each with its sign.
    assert [(i["id"], i["is_positive"]) for i in context["result"]] == [(click["id"], True), (context["result"][1]["id"], False)]
    negative = context["result"][1]
    assert negative["value"]["keypointlabels"] == ["disc"]
    assert abs(negative["value"]["x"] * SCENE_SIZE[0] / 100 - _centre(SCENE_LOOKALIKE)[0]) < 15
    answered = second.answer["results"][0]["result"]
    assert all(_covers(answered, d) > 0.8 for d in SCENE_DISCS), answered
    assert _covers(answered, SCENE_LOOKALIKE) == 0
    for kind in ("brushlabels", "polygonlabels"):
        assert all(_covers(answered, d, kind) > 0.8 for d in SCENE_DISCS)
        assert _covers(answered, SCENE_LOOKALIKE, kind) == 0
    # The suggestions shown are the new answer's (they replace the first ones).
    wait_until(lambda: suggestion_count(page) == len(answered), timeout=10)
    assert suggestion_count(page) == len(answered) < len(suggested)
    steps.done("negative-click")

    # The negative is what removed it: the backend asked directly with the same context less the
    # negative click covers the look-alike again; with the whole context it answers as the UI got.
    body = second.body
    without = smart_backend.predict(body["tasks"], body["label_config"], body["project"],
                                    context={"result": [i for i in context["result"] if i["is_positive"]]})
    assert _covers(without[0]["result"], SCENE_LOOKALIKE) > 0.8
    again = smart_backend.predict(body["tasks"], body["label_config"], body["project"], context=context)
    assert _comparable(again[0]["result"]) == _comparable(answered)

    # Accept and Submit: the stored annotation holds the discs' regions and nothing on the
    # look-alike; the example clicks themselves are dropped by Label Studio on Accept.
    page.click(ACCEPT)
    wait_until(lambda: suggestion_count(page) == 0, timeout=10)
    steps.done("accepted")
    page.click(SUBMIT)
    (annotation,) = wait_until(lambda: check(ls.get(f"/api/tasks/{task}/annotations/"), 200).json(), timeout=30)
    accepted = [i for i in annotation["result"] if i.get("origin") != "prediction"]
    assert _comparable(accepted) == _comparable(answered)
    assert all(_covers(accepted, d) > 0.8 for d in SCENE_DISCS) and _covers(accepted, SCENE_LOOKALIKE) == 0
    steps.done("submitted")


def test_a_negative_label_box_reaches_the_backend_alone(
        page, ui_calls, label_studio, smart_proxy, smart_project, browser_artifacts, browser_timing):
    """Label Studio 1.23.2 sends, with a new smart region, only the regions of the same kind and
    the same label: a box of the `negative="true"` label never travels with the positive box.
    The backend has nothing to find then, and the suggestions go (docs/INTERACTIVE.md)."""
    steps = Steps("negative-box", page, ui_calls, smart_proxy, browser_artifacts)
    task = smart_project["tasks"][2]
    _open_smart_task(page, label_studio, smart_project, task)
    time.sleep(2)
    page.click(HIDE_ALL_REGIONS)

    def draw(box) -> None:
        start, end = _image_point(page, box[0] - 4, box[1] - 4), _image_point(page, box[2] + 4, box[3] + 4)
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=5)
        page.mouse.move(*end, steps=5)
        page.mouse.up()

    _pick_label(page, "rect", "disc")
    _pick_smart_tool(page, "rectangle-tool")
    before = len(smart_proxy.calls())
    draw(SCENE_DISCS[0])
    (first,) = wait_until(lambda: _interactive_calls(smart_proxy, before, "rectanglelabels"), timeout=60)[:1]
    assert _covers(first.answer["results"][0]["result"], SCENE_LOOKALIKE) > 0.8
    page.get_by_text(SUGGESTIONS).first.wait_for()
    steps.done("positive-box")

    _pick_label(page, "rect", "not this")
    before = len(smart_proxy.calls())
    draw(SCENE_LOOKALIKE)
    (second,) = wait_until(lambda: _interactive_calls(smart_proxy, before, "rectanglelabels"), timeout=60)[:1]
    items = second.body["params"]["context"]["result"]
    assert [i["value"]["rectanglelabels"] for i in items] == [["not this"]], items
    assert second.answer["results"][0]["result"] == []
    wait_until(lambda: suggestion_count(page) == 0, timeout=10)
    assert suggestion_count(page) == 0
    steps.done("negative-box")
