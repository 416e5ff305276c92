"""Faults: Label Studio down or refusing, a worker killed mid-request, weights missing or broken.

The first group runs in-process with the fake predictor; the rest start the production command
(gunicorn -c backend/gunicorn.conf.py backend.wsgi:app) with the tiny model, on loopback.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import bad_inputs as bad
from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, data_uri, fake_extract_regions, make_jwt
from bench.load_test import GunicornServer, free_port

ROOT = Path(__file__).resolve().parents[1]
PNG = bad.png_rgb()


def make_client(tmp_path, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "model_data"), **env})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    app = create_app(settings, model, load=False)
    return app.test_client(), model


def predict(client, tasks, **kwargs):
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG, "project": "1.1"}, **kwargs)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply.get_json()["results"]


def good_and(url):
    return [{"id": 1, "data": {"image": data_uri(PNG)}}, {"id": 2, "data": {"image": url}}]


# -- Label Studio misbehaving while images are fetched ------------------------------------------------


def test_label_studio_unreachable(tmp_path):
    with bad.loopback_only():
        client, model = make_client(tmp_path, LABEL_STUDIO_URL=f"http://127.0.0.1:{bad.closed_port()}",
                                    LABEL_STUDIO_API_KEY="tok")
        started = time.monotonic()
        good, failed = predict(client, good_and("/data/upload/1/a.png"))
    assert good["result"] and "result" not in failed
    assert failed["error"].startswith("image 'image': cannot connect to http://127.0.0.1:")
    assert time.monotonic() - started < 5
    assert model.metrics.task_errors.value(reason="connection") == 1


@pytest.mark.parametrize("status,reason,message", [
    (500, "http_5xx", "HTTP 500 from"), (502, "http_5xx", "HTTP 502 from"),
    (401, "http_4xx", r"HTTP 401 from .*\(check LABEL_STUDIO_API_KEY"),
    (403, "http_4xx", r"HTTP 403 from .*\(check LABEL_STUDIO_API_KEY"),
])
def test_label_studio_answering_errors(tmp_path, ls, status, reason, message):
    ls.routes[("GET", "*")] = lambda seen: (status, {"Content-Type": "text/html"}, b"<html>error</html>")
    with bad.loopback_only():
        client, model = make_client(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="legacy-token")
        good, failed = predict(client, good_and("/data/upload/1/a.png"))
    assert good["result"] and "result" not in failed
    assert re.search(message, failed["error"]), failed["error"]
    assert model.metrics.task_errors.value(reason=reason) == 1
    assert len(ls.seen) == 1                       # a legacy token is not retried


def test_pat_401_refreshes_once_then_gives_up(tmp_path, ls):
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    refreshes = []

    def refresh(seen):
        refreshes.append(json.loads(seen.body))
        access = make_jwt({"token_type": "access", "exp": time.time() + 300, "n": len(refreshes)})
        return 200, {}, json.dumps({"access": access}).encode()

    ls.routes[("POST", "/api/token/refresh/")] = refresh
    ls.routes[("GET", "/data/upload/1/a.png")] = lambda seen: (401, {}, b'{"detail":"token not valid"}')
    with bad.loopback_only():
        client, _ = make_client(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=pat)
        good, failed = predict(client, good_and("/data/upload/1/a.png"))
    assert good["result"] and "HTTP 401" in failed["error"]
    assert refreshes == [{"refresh": pat}, {"refresh": pat}]       # the first access token, then one renewal
    assert [s.method for s in ls.seen] == ["POST", "GET", "POST", "GET"]


def test_pat_refused_by_label_studio(tmp_path, ls):
    ls.routes[("POST", "/api/token/refresh/")] = lambda seen: (500, {}, b"")
    with bad.loopback_only():
        client, model = make_client(tmp_path, LABEL_STUDIO_URL=ls.url,
                                    LABEL_STUDIO_API_KEY=make_jwt({"token_type": "refresh"}))
        good, failed = predict(client, good_and("/data/upload/1/a.png"))
    assert "refused the personal access token (HTTP 500" in failed["error"]
    assert model.metrics.task_errors.value(reason="auth") == 1


def test_failed_model_load_is_an_error_on_health(tiny_model_files, tmp_path):
    name, config_path, _ = tiny_model_files
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    settings = Settings.from_env({"GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path),
                                  "GEM_PRETRAINED": str(broken), "GEM_DEVICE": "cpu", "MODEL_DIR": str(tmp_path)})
    seen = []
    app = create_app(settings, on_load_error=seen.append)
    model = app.extensions["gem"].model
    with pytest.raises(Exception, match="failed to load"):
        model.wait_until_ready(60)
    reply = app.test_client().get("/health")
    assert reply.status_code == 503
    body = reply.get_json()
    assert body["status"] == "ERROR" and body["model_ready"] is False
    assert "broken.pt" in body["model_error"] and body["error"].startswith("model failed to load")
    assert seen == [model.load_error]
    assert "gem_model_ready 0" in app.test_client().get("/metrics").get_data(as_text=True)
    model.close()


# -- the production command ----------------------------------------------------------------------------


def tiny_env(tiny_model_files, tmp_path, **extra):
    name, config_path, checkpoint_path = tiny_model_files
    env = dict(os.environ, GEM_MODEL=name, GEM_MODEL_CONFIG=str(config_path), GEM_PRETRAINED=str(checkpoint_path),
               GEM_DEVICE="cpu", GEM_IMAGE_SIZE="64", MODEL_DIR=str(tmp_path / "data"), HOST="127.0.0.1",
               WORKERS="1", THREADS="4", GEM_MIN_SIMILARITY="-1", GEM_BACKGROUND_THRESHOLD="0",
               OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.update(extra)
    return env


def start_command(argv, env, timeout=60):
    """Run a server command that is expected to stop by itself; (exit code, output, seconds)."""
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv} did not exit within {timeout} s: {exc.output}")
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"]
DEV_SERVER = [sys.executable, "-m", "backend"]


@pytest.mark.parametrize("make_file,message", [
    (None, "no such file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(os.urandom(4096)), "is not a PyTorch, safetensors or numpy checkpoint"),
    (lambda p: p.mkdir(), "is not a file"),
], ids=["missing", "empty", "garbage", "directory"])
def test_unusable_weights_stop_the_start_with_one_line(tiny_model_files, tmp_path, make_file, message,
                                                       command=GUNICORN):
    weights = tmp_path / "weights.pt"
    if make_file:
        make_file(weights)
    env = tiny_env(tiny_model_files, tmp_path, GEM_PRETRAINED=str(weights), PORT=str(free_port()))
    code, output, _ = start_command(command, env)
    assert code != 0
    lines = [line for line in output.splitlines() if "gem-backend: cannot start" in line]
    assert len(lines) == 1 and f"GEM_PRETRAINED='{weights}': {message}" in lines[0], output[-2000:]
    assert "Traceback" not in output


def test_missing_weights_stop_the_development_server_too(tiny_model_files, tmp_path):
    test_unusable_weights_stop_the_start_with_one_line(tiny_model_files, tmp_path, None, "no such file",
                                                       command=DEV_SERVER)


def test_truncated_checkpoint_is_caught_before_serving(tiny_model_files, tmp_path):
    _, _, checkpoint = tiny_model_files
    weights = tmp_path / "cut.pt"
    weights.write_bytes(Path(checkpoint).read_bytes()[:4000])
    env = tiny_env(tiny_model_files, tmp_path, GEM_PRETRAINED=str(weights), PORT=str(free_port()))
    code, output, _ = start_command(GUNICORN, env)
    assert code == 1 and "truncated or damaged zip archive" in output and "Traceback" not in output


def test_weights_that_fail_to_load_stop_gunicorn_non_zero(tiny_model_files, tmp_path):
    """Passes the start-up checks (a whole torch archive), fails in the background load: the worker
    exits with gunicorn's app-load-error code, and the master stops with it."""
    import torch
    weights = tmp_path / "other-model.pt"
    torch.save({"state_dict": {"not_this_model": torch.zeros(3)}}, weights)
    env = tiny_env(tiny_model_files, tmp_path, GEM_PRETRAINED=str(weights), PORT=str(free_port()))
    code, output, seconds = start_command(GUNICORN, env, timeout=120)
    assert code == 4, output[-3000:]
    assert "model failed to load: WeightsNotFoundError" in output
    assert "stopping: the model cannot load" in output and "App failed to load" in output


def test_worker_killed_mid_request_is_replaced(tiny_model_files, tmp_path):
    slow = bad.MisbehavingServer()
    server = GunicornServer(tiny_env(tiny_model_files, tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1"),
                            tmp_path / "gunicorn.log").start()
    try:
        server.wait_ready()
        (worker,) = server.worker_pids()
        outcome = {}

        def in_flight():
            try:
                outcome["reply"] = requests.post(f"{server.url}/predict", timeout=30, json={
                    "tasks": [{"id": 1, "data": {"image": f"{slow.url}/sleep/8"}}], "label_config": BRUSH_CONFIG})
            except requests.RequestException as exc:
                outcome["error"] = exc

        client = threading.Thread(target=in_flight)
        t0 = time.monotonic()
        client.start()
        while not slow.requests and time.monotonic() - t0 < 20:   # the worker is now inside the request
            time.sleep(0.05)
        assert slow.requests, "the slow request never reached the image server"
        os.kill(worker, signal.SIGKILL)
        client.join(20)
        assert not client.is_alive()
        assert "error" in outcome, outcome            # the connection broke; the client was not left hanging
        assert time.monotonic() - t0 < 8              # well before the image server would have answered

        health = server.wait_ready()                  # the master respawned a worker, which loaded the model
        (respawned,) = server.worker_pids()
        assert respawned != worker and server.process.poll() is None
        reply = requests.post(f"{server.url}/predict", timeout=60, json={
            "tasks": [{"id": 2, "data": {"image": data_uri(PNG)}}], "label_config": BRUSH_CONFIG})
        assert reply.status_code == 200 and reply.json()["results"][0]["result"]
        assert reply.json()["model_version"].startswith(health["model_version"] + "+c")   # + the config's digest
        assert "was sent SIGKILL" in server.log_text()
    finally:
        server.stop()
        slow.close()
