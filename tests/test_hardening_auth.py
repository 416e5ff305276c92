"""Basic auth on every endpoint Label Studio calls with credentials, and the optional webhook secret.

Open by design (docs/BACKEND.md, Endpoints): /health and / (probes, no data), and /webhook
(Label Studio sends annotation webhooks without basic auth) unless GEM_WEBHOOK_SECRET is set.
"""
from __future__ import annotations

import base64
import hmac

import pytest

from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, data_uri, fake_extract_regions, square_image

USER, PASSWORD = "label-studio", "pw-\u00e9-S3cret"
PREDICT = {"tasks": [{"id": 1, "data": {"image": data_uri(square_image())}}], "label_config": BRUSH_CONFIG}
EVENT = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 2}, "annotation": {"id": 3}}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


GOOD = basic(USER, PASSWORD)


def make_client(tmp_path, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
                                  **env})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    return create_app(settings, model, load=False).test_client()


# (method, path, json body) of every endpoint Label Studio calls with the backend's credentials
PROTECTED = [("POST", "/setup", {"project": "1.1", "schema": BRUSH_CONFIG}), ("POST", "/predict", PREDICT),
             ("GET", "/versions", None), ("POST", "/versions", None), ("GET", "/metrics", None)]


@pytest.mark.parametrize("method,path,payload", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_every_credentialed_endpoint_requires_basic_auth(tmp_path, method, path, payload):
    client = make_client(tmp_path)
    wrong = [None, basic(USER, "wrong"), basic("someone", PASSWORD), basic(USER, PASSWORD + "x"),
             basic(USER.upper(), PASSWORD), {"Authorization": "Bearer " + PASSWORD},
             {"Authorization": "Basic !!!not-base64!!!"}, {"Authorization": "Basic " + "A" * 10000},
             basic("", ""), {"Authorization": "Basic " + base64.b64encode(PASSWORD.encode()).decode()}]
    for headers in wrong:
        reply = client.open(path, method=method, json=payload, headers=headers or {})
        assert reply.status_code == 401, (headers, reply.status_code)
        assert reply.headers["WWW-Authenticate"].startswith("Basic") and reply.get_json()["error"]
    assert client.open(path, method=method, json=payload, headers=GOOD).status_code == 200


def test_probes_stay_open_and_reveal_no_data(tmp_path):
    client = make_client(tmp_path)
    for path in ("/health", "/"):
        reply = client.get(path)
        assert reply.status_code == 200
        assert set(reply.get_json()) <= {"status", "model_class", "model_ready", "model_version"}


def test_webhook_is_open_without_a_secret(tmp_path):
    assert make_client(tmp_path).post("/webhook", json=EVENT).get_json()["status"] == "recorded"


def test_webhook_secret_in_query_or_header(tmp_path):
    client = make_client(tmp_path, GEM_WEBHOOK_SECRET="hook-S3cret")
    for headers, query in [({}, ""), ({}, "?secret=nope"), ({"X-Webhook-Secret": "nope"}, ""),
                           ({}, "?token=hook-S3cret"), ({"X-Webhook-Secret": ""}, "?secret=")]:
        reply = client.post("/webhook" + query, json=EVENT, headers=headers)
        assert reply.status_code == 401 and "webhook secret required" in reply.get_json()["error"]
    assert client.post("/webhook?secret=hook-S3cret", json=EVENT).status_code == 200
    assert client.post("/webhook", json=EVENT, headers={"X-Webhook-Secret": "hook-S3cret"}).status_code == 200
    # START_TRAINING comes with the backend's basic auth, which is enough.
    assert client.post("/webhook", json={"action": "START_TRAINING"}, headers=GOOD).status_code == 200
    # Without basic auth configured, the secret alone decides.
    open_client = make_client(tmp_path, BASIC_AUTH_USER="", BASIC_AUTH_PASS="", GEM_WEBHOOK_SECRET="s3cret-2")
    assert open_client.post("/webhook", json=EVENT).status_code == 401
    assert open_client.post("/webhook?secret=s3cret-2", json=EVENT).status_code == 200
    assert open_client.post("/predict", json=PREDICT).status_code == 200     # basic auth is off


def test_credentials_are_compared_in_constant_time(tmp_path, monkeypatch):
    """Both fields are always compared (a wrong user does not short-cut the password check), with
    hmac.compare_digest over equal-length digests, so timing reveals neither field nor length."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = make_client(tmp_path)
    client.get("/versions", headers=basic("wrong-user", "x"))
    assert len(calls) == 2 and all(a == b == 32 for a, b in calls)
    calls.clear()
    client.get("/versions", headers=GOOD)
    assert len(calls) == 2


def test_non_ascii_credentials(tmp_path):
    client = make_client(tmp_path)
    assert client.get("/versions", headers=GOOD).status_code == 200
    latin1 = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode("latin-1")).decode()}
    assert client.get("/versions", headers=latin1).status_code == 401     # not a 500
