"""Load test of the production server: concurrent /predict clients against gunicorn.

    .venv/bin/python -m bench.load_test                          # 16 threads x 10 requests
    .venv/bin/python -m bench.load_test --threads 8 --requests 4 --json out.json

What it does, all on loopback and bounded in count and time:
  1. writes the tiny random model (tests/tiny_model.py) and serves a few test images from a
     local http server on 127.0.0.1;
  2. starts the PRODUCTION command, `gunicorn -c backend/gunicorn.conf.py backend.wsgi:app`,
     with GEM_MODEL=gem-test-tiny, GEM_DEVICE=cpu, a small GEM_IMAGE_SIZE and a small feature
     cache (GEM_FEATURE_CACHE_MB) so the cache evicts under load;
  3. sends every distinct request once, one at a time: the isolated answers;
  4. runs THREADS clients x REQUESTS requests each, a fixed mix of batch (3 tasks, data: URIs and
     http:// images) and interactive (1 task, a typed prompt) requests over distinct images and
     prompts, and compares every answer with the isolated answer to the same request (result
     ids, which are random, removed): equal means no request saw another's model state;
  5. samples the worker's RSS throughout and checks it stays under the baseline after warm-up
     plus the feature-cache bound plus a stated allowance for requests in flight.

Prints requests/s and latency percentiles; exits 1 if any request failed, any answer differed,
or memory went over the bound. `run()` is what tests/test_hardening_load.py calls with small counts.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <BrushLabels name="brush" toName="image"><Label value="Car" prompts="car; automobile"/><Label value="Sky"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Car" prompts="car; automobile"/><Label value="Sky"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="Car" prompts="car; automobile"/><Label value="Sky"/></RectangleLabels>
</View>"""
PROMPTS = ["a red car", "the sky", "dog; cat", "猫と犬", "🐶 a puppy", "a tree on the left", "road", "person"]

# Memory a worker may add on top of its warmed-up baseline and the feature cache: request and
# response buffers of THREADS requests in flight, decoded images, similarity maps, allocator slack.
RSS_ALLOWANCE_MIB = 96.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def test_image(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = (rng.random((max(1, height // 8), max(1, width // 8), 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    """Serves /img/<k>.png from memory on 127.0.0.1. `images`: path -> bytes, or a function of the
    path that gives the bytes (None: 404), for images made on request."""

    def __init__(self, images: Mapping[str, bytes] | Callable[[str], bytes | None],
                 content_type: str = "image/png"):
        self.images = images
        lookup = images if callable(images) else images.get

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                data = lookup(self.path)
                status, data = (200, data) if data is not None else (404, b"missing")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------
# The production server


def tiny_model_env(model_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for gunicorn with the tiny random model (written into model_dir)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import TINY_MODEL_NAME, write_tiny_model
    config_path, checkpoint_path = write_tiny_model(model_dir / "tiny")
    env = dict(os.environ)
    env.update({
        "GEM_MODEL": TINY_MODEL_NAME, "GEM_MODEL_CONFIG": str(config_path), "GEM_PRETRAINED": str(checkpoint_path),
        "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "GEM_MIN_SIMILARITY": "0", "MODEL_DIR": str(model_dir / "data"),
        "HOST": LOOPBACK, "WORKERS": "1", "THREADS": "8", "LOG_LEVEL": "INFO",
        # one intra-op thread: the box is shared, and results are then bit-for-bit reproducible
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK,
    })
    env.update(extra)
    return env


class GunicornServer:
    """`gunicorn -c backend/gunicorn.conf.py backend.wsgi:app` in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = int(env.get("PORT") or free_port())
        self.env = dict(env, PORT=str(self.port))
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "GunicornServer":
        self.log = open(self.log_path, "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Until /health says model_ready; raises with the log tail if the server dies or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                health = requests.get(f"{self.url}/health", timeout=2).json()
                if health.get("model_ready"):
                    return health
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready after {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(entry.name))
        return sorted(pids)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGINT)      # gunicorn's quick shutdown
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        self.log.close()
        return self.process.returncode


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pids_fn, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pids_fn, self.interval = pids_fn, interval
        self.peak = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max([self.peak] + [rss_mib(p) for p in self.pids_fn()])
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join(5)
        return self.peak


# ---------------------------------------------------------------------------------------
# Requests


def build_requests(image_server: ImageServer, images: dict[str, bytes]) -> list[tuple[str, dict]]:
    """(name, body): batch requests of 3 tasks and interactive requests of 1 task and a prompt."""
    paths = sorted(images)
    def source(k: int) -> str:   # alternate http:// and data: images
        path = paths[k % len(paths)]
        return f"{image_server.url}{path}" if k % 2 == 0 else \
            "data:image/png;base64," + base64.b64encode(images[path]).decode()
    out = []
    for r in range(len(paths) // 2):
        tasks = [{"id": 100 * r + j, "data": {"image": source(3 * r + j)}} for j in range(3)]
        out.append((f"batch-{r}", {"tasks": tasks, "label_config": CONFIG, "project": "1.1700000000",
                                   "params": {"context": None}}))
    for r, prompt in enumerate(PROMPTS):
        context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                               "value": {"text": [prompt]}}]}
        # Interactive calls use another project, so the prompt they leave in memory never joins
        # the batch requests' prompts (which would make the answer depend on order, by design).
        out.append((f"interactive-{r}", {"tasks": [{"id": 900 + r, "data": {"image": source(r + 1)}}],
                                         "label_config": CONFIG, "project": "2.1700000000",
                                         "params": {"context": context}}))
    return out


def comparable(answer: dict) -> list:
    """The answer's results without the random result ids."""
    results = answer["results"]
    return [{k: ([{ik: iv for ik, iv in item.items() if ik != "id"} for item in v] if k == "result" else v)
             for k, v in r.items()} for r in results]


@dataclass
class LoadReport:
    threads: int
    requests_per_thread: int
    distinct_requests: int
    distinct_answers: int = 0        # different isolated answers: a mix-up between requests would show
    regions_per_answer: float = 0.0
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    isolated_latency_ms: dict[str, float] = field(default_factory=dict)
    isolated_requests_per_s: float = 0.0
    rss_baseline_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_bound_mib: float = 0.0
    feature_cache_mib: float = 0.0
    stopped_early: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches and self.rss_peak_mib <= self.rss_bound_mib and \
            self.completed == self.threads * self.requests_per_thread


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 1), "p90": round(float(np.percentile(a, 90)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1)}


def run(threads: int = 16, requests_per_thread: int = 10, max_seconds: float = 240.0, n_images: int = 12,
        feature_cache_mb: float = 0.05, workdir: Path | None = None, log=print) -> LoadReport:
    """Start everything, run the load, stop everything; the report says what happened."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gem-load-", dir=workdir) as tmp:
        tmp = Path(tmp)
        images = {f"/img/{k}.png": test_image(k, 64 + 8 * (k % 5), 48 + 8 * (k % 3)) for k in range(n_images)}
        image_server = ImageServer(images)
        env = tiny_model_env(tmp, GEM_ALLOWED_HOSTS=LOOPBACK, GEM_FEATURE_CACHE_MB=str(feature_cache_mb))
        server = GunicornServer(env, tmp / "gunicorn.log").start()
        report = LoadReport(threads, requests_per_thread, 0, feature_cache_mib=feature_cache_mb)
        try:
            server.wait_ready(min(120.0, max_seconds))
            session = requests.Session()
            session.trust_env = False
            catalogue = build_requests(image_server, images)
            report.distinct_requests = len(catalogue)

            # Isolated answers, one request at a time (the first round also warms the worker up).
            reference, isolated = {}, []
            for round_ in range(2):
                for name, body in catalogue:
                    t0 = time.perf_counter()
                    reply = session.post(f"{server.url}/predict", json=body, timeout=60)
                    if round_ == 1:
                        isolated.append(time.perf_counter() - t0)
                    if reply.status_code != 200:
                        raise RuntimeError(f"isolated {name}: HTTP {reply.status_code} {reply.text[:300]}")
                    if round_ == 0:
                        reference[name] = comparable(reply.json())
                    elif comparable(reply.json()) != reference[name]:
                        report.mismatches.append(f"{name}: differs between two isolated runs")
            report.isolated_latency_ms = percentiles(isolated)
            report.isolated_requests_per_s = round(len(isolated) / sum(isolated), 2)
            report.distinct_answers = len({json.dumps(a, sort_keys=True) for a in reference.values()})
            report.regions_per_answer = round(float(np.mean(
                [sum(len(r.get("result", ())) for r in a) for a in reference.values()])), 1)
            (worker,) = server.worker_pids()
            report.rss_baseline_mib = round(rss_mib(worker), 1)
            report.rss_bound_mib = round(report.rss_baseline_mib + feature_cache_mb + RSS_ALLOWANCE_MIB, 1)
            log(f"worker {worker}: RSS {report.rss_baseline_mib} MiB after warm-up; "
                f"{len(catalogue)} distinct requests; load: {threads} threads x {requests_per_thread}")

            sampler = RssSampler(server.worker_pids)
            sampler.start()
            deadline = time.monotonic() + max(1.0, max_seconds - (time.monotonic() - started))
            latencies: list[float] = []
            lock = threading.Lock()

            def client(t: int) -> None:
                with requests.Session() as s:
                    s.trust_env = False
                    for j in range(requests_per_thread):
                        if time.monotonic() > deadline:
                            with lock:
                                report.stopped_early = True
                            return
                        name, body = catalogue[(t * 7 + j * 5) % len(catalogue)]
                        # Each send names its own tasks: two requests for the same task at once are
                        # answered with a result by one of them only (backend/claims.py), by design.
                        body = {**body, "tasks": [{**task, "id": task["id"] + 100_000 * (1 + t * requests_per_thread + j)}
                                                  for task in body["tasks"]]}
                        t0 = time.perf_counter()
                        try:
                            reply = s.post(f"{server.url}/predict", json=body, timeout=60)
                        except requests.RequestException as exc:
                            with lock:
                                report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                            continue
                        seconds = time.perf_counter() - t0
                        with lock:
                            report.completed += 1
                            latencies.append(seconds)
                            if reply.status_code != 200:
                                report.errors.append(f"{name}: HTTP {reply.status_code} {reply.text[:200]}")
                            elif comparable(reply.json()) != reference[name]:
                                report.mismatches.append(f"{name}: differs from its isolated answer")

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(client, range(threads)))
            report.wall_s = round(time.perf_counter() - t0, 2)
            report.rss_peak_mib = round(max(sampler.stop(), rss_mib(worker)), 1)
            report.requests_per_s = round(report.completed / report.wall_s, 2) if report.wall_s else 0.0
            report.latency_ms = percentiles(latencies)
            if "Traceback" in server.log_text():
                report.errors.append("a traceback in the server log")
        finally:
            server.stop()
            image_server.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="requests per thread")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop sending after this long")
    parser.add_argument("--images", type=int, default=12, help="distinct images")
    parser.add_argument("--cache-mb", type=float, default=0.05, help="GEM_FEATURE_CACHE_MB (small: evictions)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if not (1 <= args.threads <= 64 and 1 <= args.requests <= 1000 and 10 <= args.max_seconds <= 900):
        parser.error("keep it bounded: 1-64 threads, 1-1000 requests each, 10-900 s")
    report = run(args.threads, args.requests, args.max_seconds, args.images, args.cache_mb)
    load = os.getloadavg()[0]
    print(f"{report.completed}/{report.threads * report.requests_per_thread} requests in {report.wall_s} s: "
          f"{report.requests_per_s} req/s; latency ms {report.latency_ms}")
    print(f"isolated, one at a time: {report.isolated_requests_per_s} req/s; latency ms {report.isolated_latency_ms}")
    print(f"RSS: baseline {report.rss_baseline_mib} MiB, peak {report.rss_peak_mib} MiB, bound "
          f"{report.rss_bound_mib} MiB (baseline + cache {report.feature_cache_mib} + allowance {RSS_ALLOWANCE_MIB})")
    print(f"errors {len(report.errors)}, mismatches {len(report.mismatches)}; load average {load:.2f}; "
          f"{os.cpu_count()} CPUs")
    for line in (report.errors + report.mismatches)[:10]:
        print("  " + line)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
