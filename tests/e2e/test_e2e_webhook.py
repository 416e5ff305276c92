"""6. Webhook: an annotation created in Label Studio reaches the backend's /webhook, answered 200.

Connecting a backend makes Label Studio register `<backend url>/webhook` for the project; the
backend counts what it receives in /metrics (backend/metrics.py).
"""
import json

from e2e_support import check, encode_png, labeling_config, metric_value, pattern_image, wait_until

CONFIG = labeling_config()


def _webhooks_answered_200(backend) -> float:
    return metric_value(backend.metrics(), "gem_http_requests_total", endpoint="/webhook", status="200")


def _annotation_events(backend) -> float:
    return metric_value(backend.metrics(), "gem_webhook_events_total", action="ANNOTATION_CREATED")


def test_annotation_created_in_label_studio_reaches_backend_webhook(ls, backend):
    project = ls.create_project("e2e webhook", CONFIG)
    ls.upload_files(project, {"img": ("webhook.png", encode_png(pattern_image(64, 64, seed=12)), "image/png")})
    task = ls.tasks(project)[0]
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)
    hooks = check(ls.get("/api/webhooks/", params={"project": project}), 200).json()
    assert [h["url"] for h in hooks] == [f"{backend.url}/webhook"], hooks

    answered, events = _webhooks_answered_200(backend), _annotation_events(backend)
    check(ls.post(f"/api/tasks/{task['id']}/annotations/", json={"result": [{
        "from_name": "rect", "to_name": "image", "type": "rectanglelabels",
        "original_width": 64, "original_height": 64,
        "value": {"x": 10, "y": 10, "width": 30, "height": 30, "rotation": 0, "rectanglelabels": ["disc"]},
    }]}), 201)

    # Label Studio may deliver webhooks after answering; give it a few seconds.
    assert wait_until(lambda: _annotation_events(backend) > events, timeout=15), (
        f"no ANNOTATION_CREATED event reached the backend:\n{backend.metrics()}")
    assert _webhooks_answered_200(backend) > answered
    # The backend records annotation events in MODEL_DIR/feedback.jsonl (backend/model.py).
    feedback = [json.loads(line) for line in (backend.model_dir / "feedback.jsonl").read_text().splitlines()]
    assert any(r["action"] == "ANNOTATION_CREATED" and r["task"] == task["id"] for r in feedback), feedback
