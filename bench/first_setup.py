"""How fast the FIRST /setup after a start answers, while the model is still loading.

    .venv/bin/python -m bench.first_setup                 # 3 starts of gunicorn, ViT-B-16, random weights
    .venv/bin/python -m bench.first_setup --starts 5 --server dev

Label Studio gives /setup 3 s; a first /setup that has to import and warm up the label-config
parser while the model loads in the background can miss that on a busy machine. Each start:
  1. starts the production command (`gunicorn -c backend/gunicorn.conf.py backend.wsgi:app`, or
     `python -m backend` with --server dev) with GEM_PRETRAINED=none (random weights: nothing to
     download, but building and warming a ViT-B-16 on the CPU takes seconds, so the model is
     still loading when the server starts answering);
  2. polls /health until it answers (the app exists; model_ready is normally still false);
  3. sends the first /setup, as Label Studio does when a model is connected, with a labeling
     config, a hostname and a token, and times it;
  4. sends a second /setup for comparison, then stops the server.

Prints each start's figures and the worst first /setup; exits 1 if any first /setup took longer
than --bound seconds (default 3, Label Studio's timeout) or failed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.load_test import LOOPBACK, CONFIG, GunicornServer, free_port

ROOT = Path(__file__).resolve().parents[1]


def start_server(kind: str, model_dir: Path, log_path: Path, extra_env: dict[str, str]) -> GunicornServer:
    env = dict(os.environ)
    env.update({"GEM_PRETRAINED": "none", "GEM_DEVICE": "cpu", "MODEL_DIR": str(model_dir), "HOST": LOOPBACK,
                "PORT": str(free_port()), "WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "INFO",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK})
    env.update(extra_env)
    server = GunicornServer(env, log_path)
    if kind == "dev":
        server.log = open(log_path, "w+")
        server.process = subprocess.Popen([sys.executable, "-m", "backend"], cwd=ROOT, env=server.env,
                                          stdout=server.log, stderr=subprocess.STDOUT, start_new_session=True)
        return server
    return server.start()


def wait_for_health(server: GunicornServer, timeout: float) -> tuple[float, dict]:
    """Seconds from start until /health answered, and its body."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            response = requests.get(f"{server.url}/health", timeout=2)
            if response.status_code in (200, 503):
                return time.monotonic() - started, response.json()
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no /health after {timeout:.0f} s:\n{server.log_text()[-3000:]}")


def timed_setup(server: GunicornServer, project: str) -> tuple[float, int]:
    body = {"project": project, "schema": CONFIG, "hostname": "http://localhost:8080", "access_token": "t" * 40}
    started = time.perf_counter()
    response = requests.post(f"{server.url}/setup", json=body, timeout=30)
    return time.perf_counter() - started, response.status_code


def one_start(kind: str, workdir: Path, index: int, extra_env: dict[str, str]) -> dict:
    server = start_server(kind, workdir / f"data{index}", workdir / f"server{index}.log", extra_env)
    try:
        health_s, health = wait_for_health(server, timeout=180)
        first_s, first_status = timed_setup(server, "1.1")
        second_s, second_status = timed_setup(server, "2.1")
        loading = not requests.get(f"{server.url}/health", timeout=5).json().get("model_ready")
    finally:
        server.stop()
    return {"health_after_s": health_s, "ready_at_health": bool(health.get("model_ready")),
            "first_setup_s": first_s, "first_status": first_status, "second_setup_s": second_s,
            "second_status": second_status, "still_loading_after": loading}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--server", choices=("gunicorn", "dev"), default="gunicorn")
    parser.add_argument("--model", default="ViT-B-16", help="GEM_MODEL (random weights)")
    parser.add_argument("--bound", type=float, default=3.0, help="fail above this many seconds")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="gem-first-setup-") as tmp:
        for i in range(args.starts):
            run = one_start(args.server, Path(tmp), i, {"GEM_MODEL": args.model})
            runs.append(run)
            print(f"start {i + 1}: /health after {run['health_after_s']:.2f} s "
                  f"(model ready: {run['ready_at_health']}), first /setup {run['first_setup_s'] * 1000:.0f} ms "
                  f"(HTTP {run['first_status']}), second {run['second_setup_s'] * 1000:.0f} ms, "
                  f"model still loading afterwards: {run['still_loading_after']}", flush=True)
    firsts = [r["first_setup_s"] for r in runs]
    print(f"first /setup over {len(runs)} starts ({args.server}, {args.model}, cpu {os.cpu_count()} cores): "
          f"median {statistics.median(firsts) * 1000:.0f} ms, worst {max(firsts) * 1000:.0f} ms")
    failed = [r for r in runs if r["first_status"] != 200 or r["first_setup_s"] > args.bound]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
