"""Keys only where they belong, played through the HTTP API as an attacker would.

/setup is open by default, so anyone who reaches the backend can name a host there. That host
must never receive LABEL_STUDIO_API_KEY, nor a token another /setup sent for another host.
"""
from __future__ import annotations

import logging

import pytest

from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, fake_extract_regions, square_image

PNG = square_image()
ENV_KEY = "env-secret-key-0123456789"
OWNER_TOKEN = "owner-token-0123456789"


def make_client(tmp_path, **env):
    # Loopback is allowed so the SSRF guard does not stop the attacker's host: what is tested
    # here is where the key goes, not which addresses may be fetched.
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "GEM_ALLOWED_HOSTS": "127.0.0.1", **env})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    return create_app(settings, model, load=False).test_client()


def predict(client, project, url="/data/upload/1/a.png"):
    task = {"id": 1, "data": {"image": url}, "annotations": [], "predictions": []}
    return client.post("/predict", json={"tasks": [task], "label_config": BRUSH_CONFIG, "project": project})


def secrets_seen(server) -> list[str]:
    return [f"{s.method} {s.path}: {name}" for s in server.seen for name, value in s.headers.items()
            if ENV_KEY in value or OWNER_TOKEN in value]


@pytest.mark.parametrize("with_url", [False, True], ids=["no LABEL_STUDIO_URL", "LABEL_STUDIO_URL set"])
def test_a_host_named_in_setup_never_sees_the_key(tmp_path, ls, other, with_url):
    attacker = other
    ls.image("/data/upload/1/a.png", PNG)
    attacker.image("/data/upload/1/a.png", PNG)
    env = {"LABEL_STUDIO_API_KEY": ENV_KEY, **({"LABEL_STUDIO_URL": ls.url} if with_url else {})}
    client = make_client(tmp_path, **env)
    # Label Studio connects project 1 with the owner's token.
    assert client.post("/setup", json={"project": "1.1", "schema": BRUSH_CONFIG, "hostname": ls.url,
                                       "access_token": OWNER_TOKEN}).status_code == 200
    assert predict(client, "1.1").status_code == 200
    # The attacker names its own host for a project of its own, for project 1, and as the
    # latest /setup (the fallback of projects that never sent one).
    for project in ("666.1", "1.1", None):
        body = {"schema": BRUSH_CONFIG, "hostname": attacker.url}
        if project:
            body["project"] = project
        assert client.post("/setup", json=body).status_code == 200
        for asked in ("666.1", "1.1", "2.2", None):
            assert predict(client, asked).status_code == 200
    assert secrets_seen(attacker) == []
    if with_url:   # every image still came from Label Studio, with the environment's key
        assert attacker.seen == [] and set(ls.auth_headers()) == {f"Token {ENV_KEY}"}
    else:          # Label Studio saw only the owner's token; the attacker got plain requests
        assert set(ls.auth_headers()) == {f"Token {OWNER_TOKEN}"} and attacker.seen


def test_key_without_url_is_a_warning_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.server"):
        make_client(tmp_path, LABEL_STUDIO_API_KEY=ENV_KEY)
    (warning,) = [r.getMessage() for r in caplog.records if "LABEL_STUDIO_API_KEY" in r.getMessage()]
    assert "LABEL_STUDIO_URL" in warning and ENV_KEY not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.server"):
        make_client(tmp_path, LABEL_STUDIO_API_KEY=ENV_KEY, LABEL_STUDIO_URL="http://label-studio:8080")
        make_client(tmp_path)
    assert not [r for r in caplog.records if "LABEL_STUDIO_API_KEY" in r.getMessage()]
