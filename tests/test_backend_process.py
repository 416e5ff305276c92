"""The production entry point: gunicorn with backend/gunicorn.conf.py and backend.wsgi:app.

One real process, so the settings -> gunicorn config -> wsgi -> background model load path is
exercised as a deployment runs it, including /health answering before the model is ready.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from backend_fixtures import BRUSH_CONFIG, data_uri, square_image

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gunicorn_server(tiny_model_files, tmp_path):
    name, config_path, checkpoint_path = tiny_model_files
    port = _free_port()
    env = dict(os.environ, GEM_MODEL=name, GEM_MODEL_CONFIG=str(config_path), GEM_PRETRAINED=str(checkpoint_path),
               GEM_DEVICE="cpu", GEM_IMAGE_SIZE="64", MODEL_DIR=str(tmp_path), HOST="127.0.0.1", PORT=str(port),
               WORKERS="1", THREADS="4", GEM_MIN_SIMILARITY="-1", GEM_BACKGROUND_THRESHOLD="0",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    log = open(tmp_path / "gunicorn.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield f"http://127.0.0.1:{port}", process, log
    os.killpg(process.pid, signal.SIGINT)   # gunicorn's quick shutdown
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def test_gunicorn_serves_health_then_predictions(gunicorn_server):
    url, process, log = gunicorn_server
    deadline = time.monotonic() + 120
    health = None
    latencies = []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            t0 = time.perf_counter()
            health = requests.get(f"{url}/health", timeout=10)
            if health.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                if health.json()["model_ready"]:
                    break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    log.seek(0)
    assert health is not None and health.json()["model_ready"], log.read()[-3000:]
    # While the weights load in the background, /health keeps answering inside Label Studio's
    # 1 s timeout (the first answer may wait for the worker to boot; a busy CI box adds spikes).
    during_load = sorted(latencies[1:]) or [0.0]
    assert during_load[len(during_load) // 2] < 0.5, latencies

    reply = requests.post(f"{url}/predict", timeout=30, json={
        "tasks": [{"id": 1, "data": {"image": data_uri(square_image())}}], "label_config": BRUSH_CONFIG})
    assert reply.status_code == 200
    (prediction,) = reply.json()["results"]
    assert prediction["result"] and prediction["model_version"].startswith(health.json()["model_version"] + "+c")
    assert requests.get(f"{url}/versions", timeout=5).json() == {"versions": [health.json()["model_version"]]}
