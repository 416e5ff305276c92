"""Logs: one structured line per request, and never a token, password or signature.

Requests carry every kind of secret the backend meets (legacy token, personal access token and
the access tokens refreshed from it, basic auth, /setup's access_token, the webhook secret,
credentials inside image URLs, signed query strings) and fail in the ways that produce error
messages; the captured log lines and the answers must not contain any of them.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import time

import pytest

from backend.model import GemBackendModel
from backend.server import RedactingFormatter, configure_logging, create_app, redact_text
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, LocalServer, fake_extract_regions, make_jwt, square_image
from bad_inputs import MisbehavingServer

PNG = square_image()


pytestmark = pytest.mark.usefixtures("loopback_only_guard")


@pytest.fixture
def production_logging():
    """configure_logging as the entry points call it; the global logger state is restored after."""
    root, urllib3_logger = logging.getLogger(), logging.getLogger("urllib3")
    saved = (root.level, urllib3_logger.level, list(root.handlers), [h.formatter for h in root.handlers])
    yield
    root.setLevel(saved[0])
    urllib3_logger.setLevel(saved[1])
    for handler, formatter in zip(saved[2], saved[3]):
        handler.setFormatter(formatter)
    for handler in list(root.handlers):
        if handler not in saved[2]:
            root.removeHandler(handler)


@pytest.fixture
def servers():
    ls, web, slow = LocalServer(), LocalServer(), MisbehavingServer()
    yield ls, web, slow
    for server in (ls, web, slow):
        server.close()


def test_no_secret_reaches_the_logs_or_the_answers(tmp_path, servers, production_logging, caplog):
    ls, web, slow = servers
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600, "jti": "pat-s3kr1t-1"})
    accesses = []

    def refresh(seen):
        accesses.append(make_jwt({"token_type": "access", "exp": time.time() + 300, "jti": f"acc-s3kr1t-{len(accesses)}"}))
        return 200, {}, json.dumps({"access": accesses[-1]}).encode()

    ls.routes[("POST", "/api/token/refresh/")] = refresh
    ls.image("/data/upload/1/a.png", PNG)
    ls.routes[("GET", "/data/upload/1/denied.png")] = lambda seen: (401, {}, b"")
    ls.routes[("GET", "/data/upload/1/broken.png")] = lambda seen: (500, {}, b"Traceback ... token=tok-s3kr1t-in-body")
    web.image("/signed.png?X-Amz-Signature=sig-s3kr1t&X-Amz-Credential=cred-s3kr1t", PNG)
    web.routes[("GET", "*")] = lambda seen: (403, {}, b"")

    settings_env = dict(MODEL_DIR=str(tmp_path), LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=pat,
                        BASIC_AUTH_USER="ls-user", BASIC_AUTH_PASS="basic-s3kr1t", GEM_WEBHOOK_SECRET="hook-s3kr1t",
                        GEM_ALLOWED_HOSTS="127.0.0.1", GEM_FETCH_TIMEOUT="1", LOG_LEVEL="DEBUG")
    settings = Settings.from_env(settings_env)
    configure_logging("DEBUG", secrets=(settings.label_studio_api_key, settings.basic_auth_pass, settings.webhook_secret))
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls-user:basic-s3kr1t").decode()}
    web_port = web.url.rsplit(":", 1)[1]
    images = [
        "/data/upload/1/a.png",                                                   # PAT -> access token
        "/data/upload/1/denied.png",                                              # 401: refresh once, give up
        "/data/upload/1/broken.png",                                              # 500
        f"http://user:userinfo-s3kr1t@127.0.0.1:{web_port}/private.png",          # credentials in the URL
        f"{web.url}/x.png?X-Amz-Signature=sig2-s3kr1t&token=qtok-s3kr1t",        # signed query, 403
        "http://user:userinfo2-s3kr1t@10.0.0.1/x.png?sig=sig3-s3kr1t",          # refused by the guard
        f"{slow.url}/sleep/3?signature=sig4-s3kr1t",                              # timed out
        "s3://bucket/key.png?X-Amz-Signature=sig5-s3kr1t",                        # presign: LS answers 404
    ]
    answers = []
    with caplog.at_level(logging.DEBUG):
        client.post("/setup", json={"project": "1.1", "schema": BRUSH_CONFIG, "hostname": ls.url,
                                    "access_token": "setup-s3kr1t"}, headers=auth)
        reply = client.post("/predict", headers=auth, json={
            "tasks": [{"id": k + 1, "data": {"image": url}} for k, url in enumerate(images)],
            "label_config": BRUSH_CONFIG, "project": "1.1"})
        answers.append(reply.get_data(as_text=True))
        answers.append(client.post("/webhook?secret=hook-s3kr1t", json={"action": "ANNOTATION_CREATED"}).get_data(as_text=True))
        answers.append(client.post("/webhook?secret=wrong-s3kr1t", json={"action": "X"}).get_data(as_text=True))
        answers.append(client.post("/predict", headers={"Authorization": "Basic " + base64.b64encode(
            b"ls-user:wrong-basic-s3kr1t").decode()}, json={"tasks": []}).get_data(as_text=True))
        answers.append(client.get("/metrics", headers=auth).get_data(as_text=True))

    results = json.loads(answers[0])["results"]
    assert [("result" in r) for r in results] == [True] + [False] * 7
    errors = [r["error"] for r in results[1:]]
    assert "HTTP 401" in errors[0] and "HTTP 500" in errors[1] and "HTTP 403" in errors[3]
    assert "refusing to fetch" in errors[4] and "timed out" in errors[5]
    assert len(accesses) == 2                       # the 401 cost exactly one more refresh

    text = caplog.text + "\n".join(answers)
    secrets = ["s3kr1t", pat, *accesses, "basic-s3kr1t", "setup-s3kr1t", "hook-s3kr1t"]
    assert not [s for s in secrets if s in text], [line for line in text.splitlines() if "s3kr1t" in line][:5]

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "backend.requests"]
    assert [line["path"] for line in lines] == ["/setup", "/predict", "/webhook", "/webhook", "/predict", "/metrics"]
    predict_line = lines[1]
    assert predict_line["task_ids"] == list(range(1, 9)) and predict_line["outcome"] == "partial"
    assert predict_line["status"] == 200 and predict_line["ms"] > 0 and set(predict_line["timings_ms"]) >= {"fetch", "model"}
    assert [f["task"] for f in predict_line["failed"]] == list(range(2, 9))
    assert {f["reason"] for f in predict_line["failed"]} == {"http_4xx", "http_5xx", "blocked", "timeout"}
    assert [line["status"] for line in lines[2:5]] == [200, 401, 401]


def test_redacting_formatter_masks_what_slips_through():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s", secrets=("my-legacy-token-1234",)))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    jwt = make_jwt({"token_type": "refresh"})
    try:
        logger.warning("GET http://127.0.0.1:8080/data/x.png?X-Amz-Signature=abc123&X-Amz-Date=1 HTTP/1.1")
        logger.warning("Authorization: Token my-legacy-token-1234 / Bearer %s / Basic dXNlcjpwYXNzd29yZA==", jwt)
        logger.warning("fetching https://admin:hunter2@minio:9000/bucket/a.png?token=t0k3n&x=1")
        logger.warning('"POST /webhook?secret=hook-value HTTP/1.1" 200 -')
        try:
            raise ValueError("bad url https://u:p4ss@h/?sig=zzz")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for secret in ("abc123", "my-legacy-token-1234", jwt, "dXNlcjpwYXNzd29yZA", "hunter2", "t0k3n", "hook-value",
                   "p4ss", "zzz"):
        assert secret not in out, (secret, out)
    assert "X-Amz-Date=1" in out and "x=1" in out and "/data/x.png" in out      # the rest stays readable


def test_redact_text_keeps_ordinary_messages():
    for text in ("task 3 not predicted: HTTP 404 from http://ls:8080/data/upload/1/a.png",
                 "model ready (version gem-ViT-B-16-openai-448-1a2b3c4d) after 3.1 s",
                 '{"request_id": "abc", "path": "/predict", "task_ids": [1, 2]}',
                 "Token refreshed for project 3; Basic auth required"):
        assert redact_text(text) == text
