"""3. Interactive: a prompt typed in the TextArea comes back as regions, through Label Studio."""
from e2e_support import CONTROL_TYPES, brush_masks, check, encode_png, labeling_config, pattern_image, without_ids

CONFIG = labeling_config()


def _prompt_context(text: str) -> dict:
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}


def test_interactive_prompt_returns_regions_for_that_prompt(ls, backend):
    project = ls.create_project("e2e interactive", CONFIG)
    ls.upload_files(project, {"img": ("interactive.png", encode_png(pattern_image(96, 64, seed=5)), "image/png")})
    task = ls.tasks(project)[0]
    ml = check(ls.add_ml_backend(project, backend.url, is_interactive=True), 201).json()

    reply = check(ls.post(f"/api/ml/{ml['id']}/interactive-annotating",
                          json={"task": task["id"], "context": _prompt_context("a dog")}), 200).json()
    assert not reply.get("errors"), reply
    answer = reply["data"]
    result = answer["result"]
    assert result, f"no regions for 'a dog': {reply}"

    # "a dog" is no label of the config, so (backend/prompts.py) it is predicted as the FIRST
    # label of every control, and only that prompt is predicted.
    assert {item["from_name"] for item in result} == set(CONTROL_TYPES)
    for item in result:
        assert item["value"][item["type"]] == ["disc"], item
    masks = brush_masks(result)
    assert masks and all(mask.any() and not mask.all() for _, mask in masks), "expected a partial mask"

    # Same regions as the backend computes for this prompt when asked directly...
    # (The task as listed: GET /api/tasks/<id>/ would make Label Studio fetch and store a prediction.)
    direct = backend.predict([task], CONFIG, project, context=_prompt_context("a dog"))[0]
    assert without_ids(direct["result"]) == without_ids(result)
    # ...which depend on the prompt: another prompt draws other masks (same random model).
    other = backend.predict([task], CONFIG, project, context=_prompt_context("a red car"))[0]["result"]
    assert [m.tobytes() for _, m in brush_masks(other)] != [m.tobytes() for _, m in brush_masks(result)]
    # ...and the interactive answer is shown to the annotator, not stored.
    assert ls.predictions(task["id"]) == []
