"""Soak: does a long-running backend stay flat? N distinct images, one request after another.

    python -m bench.soak                                   # ViT-B-16 random weights, 448 px, 2,000 images, dev + gunicorn + background
    python -m bench.soak --model tiny --n 300 --servers dev            # a cheap run (tiny random model)
    python -m bench.soak --model vit-b-16 --image-size 112 --n 600 --servers dev,gunicorn
    python -m bench.soak --broken 0.1                      # every 10th image broken (truncated / empty / 40k x 40k header)
    python -m bench.soak --server-env MALLOC_ARENA_MAX=8   # any setting for the server under test
    python -m bench.soak --inprocess --tracemalloc 200,600 # diagnosis: Python-object growth between two requests

Paths ("servers"):
  dev         `python -m backend`, the development server; one /predict per image
  gunicorn    `gunicorn -c backend/gunicorn.conf.py backend.wsgi:app` (the Docker image's command), 1 worker
  background  a real Label Studio (LS_VENV, as in the e2e suite) with a project of N tasks; one Retrieve
              Predictions with a tiny GEM_PREDICT_BUDGET, so the background finisher predicts them and
              stores them through Label Studio's API

Images are 800x600 JPEG "photos" (smooth random fields plus shapes; `--photo-size`), each one distinct,
generated on request by a loopback http server (so the client holds no image). Each request carries 3
labels x (brush, polygon) like the issue's measurement. Printed and written (`--json`, `--png`): RSS
of the serving process after request 1, 50 and every N/10, the feature cache's bytes (from /metrics),
glibc's heap statistics when the server exposes them, request times (first and last 20), and the
growth over the second half, which the issue wants <= 0.05 GiB at N = 2,000.

The machine matters: state its load next to any figure (the script prints the load average).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.load_test import LOOPBACK, GunicornServer, ImageServer, free_port, rss_mib  # noqa: E402

LABELS = ("car", "sky", "person")
CONFIG = ("<View><Image name=\"image\" value=\"$image\"/>"
          "<BrushLabels name=\"brush\" toName=\"image\">" + "".join(f'<Label value="{l}"/>' for l in LABELS) +
          "</BrushLabels><PolygonLabels name=\"poly\" toName=\"image\">" +
          "".join(f'<Label value="{l}"/>' for l in LABELS) + "</PolygonLabels></View>")
BROKEN_KINDS = ("truncated", "empty", "huge_header")


# ---------------------------------------------------------------------------------------
# Images


def photo(seed: int, width: int, height: int) -> bytes:
    """A distinct JPEG: a smooth random field (upsampled noise) with a few shapes on it."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(2, height // 40), max(2, width // 40), 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def huge_header_png() -> bytes:
    """A PNG whose header claims 40,000 x 40,000 pixels (a decompression bomb by its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def image_bytes(index: int, width: int, height: int, broken_every: int) -> tuple[bytes, str]:
    """(bytes, kind) of image `index`; every `broken_every`-th one is broken (0: none)."""
    if broken_every and index % broken_every == broken_every - 1:
        kind = BROKEN_KINDS[(index // broken_every) % len(BROKEN_KINDS)]
        if kind == "empty":
            return b"", kind
        if kind == "huge_header":
            return huge_header_png(), kind
        return photo(index, width, height)[:2000], kind   # truncated: a JPEG cut after 2 kB
    return photo(index, width, height), "ok"


class PhotoServer(ImageServer):
    """GET /img/<i>.jpg: image i, generated on request on 127.0.0.1 (nothing held in memory)."""

    def __init__(self, width: int, height: int, broken_every: int):
        def photo_at(path: str) -> bytes | None:
            match = re.fullmatch(r"/img/(\d+)\.(jpg|png)", path.split("?")[0])
            return image_bytes(int(match.group(1)), width, height, broken_every)[0] if match else None

        super().__init__(photo_at, content_type="image/jpeg")


# ---------------------------------------------------------------------------------------
# Models and servers


def model_env(model: str, workdir: Path, image_size: int | None) -> dict[str, str]:
    """Environment selecting the model: `tiny` (random, written into workdir), or an open_clip
    architecture with random weights (`vit-b-16` -> ViT-B-16, GEM_PRETRAINED=none)."""
    env: dict[str, str] = {}
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import TINY_MODEL_NAME, write_tiny_model
        config_path, checkpoint_path = write_tiny_model(workdir / "tiny")
        env.update(GEM_MODEL=TINY_MODEL_NAME, GEM_MODEL_CONFIG=str(config_path), GEM_PRETRAINED=str(checkpoint_path))
        image_size = image_size or 64
    else:
        env.update(GEM_MODEL={"vit-b-16": "ViT-B-16"}.get(model.lower(), model), GEM_PRETRAINED="none")
    if image_size:
        env["GEM_IMAGE_SIZE"] = str(image_size)
    return env


def server_env(args, workdir: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(model_env(args.model, workdir, args.image_size))
    env.update({
        "GEM_DEVICE": "cpu", "HOST": LOOPBACK, "PORT": str(free_port()), "WORKERS": "1", "THREADS": "4",
        "MODEL_DIR": str(workdir / f"data-{name}"), "LOG_LEVEL": "WARNING",
        # random weights give maps of noise: let every label through so post-processing runs fully
        "GEM_MIN_SIMILARITY": "-1", "GEM_ALLOWED_HOSTS": LOOPBACK,
        # every image predicted in its request: on a slow machine the default budget would defer tasks
        "GEM_PREDICT_BUDGET": "0",
        "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK,
    })
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   GEM_TORCH_THREADS=str(args.threads))
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


class DevServer(GunicornServer):
    """`python -m backend`: same life cycle as the gunicorn wrapper; the process itself serves."""

    def start(self) -> "DevServer":
        self.log = open(self.log_path, "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "backend"], cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def worker_pids(self) -> list[int]:
        return [self.process.pid]


# ---------------------------------------------------------------------------------------
# Measuring


@dataclass
class Sample:
    request: int
    rss_gib: float
    anon_gib: float | None = None          # RssAnon: RSS less file-backed pages (library code the kernel may drop)
    feature_cache_mib: float | None = None
    heap_free_mib: float | None = None     # glibc: free bytes inside the heaps (fragmentation)
    heap_used_mib: float | None = None     # glibc: bytes handed out (malloc'ed, not yet freed)


@dataclass
class SoakResult:
    path: str
    model: str
    image_size: int | None
    photo: str
    n: int
    broken_every: int
    server_env: list[str]
    samples: list[Sample] = field(default_factory=list)
    request_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    wall_s: float = 0.0

    def reached(self) -> int:
        """Requests sampled so far: N when the soak ran to its end, less when it was stopped early."""
        return self.samples[-1].request if self.samples else 0

    def growth_second_half_gib(self) -> float | None:
        """RSS at the last sample less RSS at the first sample of the second half of what was reached."""
        half = [s for s in self.samples if s.request >= self.reached() // 2]
        if len(half) < 2:
            return None
        return round(half[-1].rss_gib - half[0].rss_gib, 3)

    def summary(self) -> dict:
        first, last = self.request_s[:20], self.request_s[-20:]
        return {
            "path": self.path, "model": self.model, "image_size": self.image_size, "n": self.n,
            "n_reached": self.reached(),
            "rss_gib": {s.request: s.rss_gib for s in self.samples},
            "anon_gib": {s.request: s.anon_gib for s in self.samples},
            "end_rss_gib": self.samples[-1].rss_gib if self.samples else None,
            "growth_second_half_gib": self.growth_second_half_gib(),
            "request_s_first20_median": round(float(np.median(first)), 3) if first else None,
            "request_s_last20_median": round(float(np.median(last)), 3) if last else None,
            "errors": self.errors, "load_before": self.load_before, "load_after": self.load_after,
        }


def checkpoints(n: int) -> list[int]:
    step = max(1, n // 10)
    return sorted({1, min(50, n), *range(step, n + 1, step), n})


def metric(text: str, name: str, **labels: str) -> float | None:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name) and all(w in line for w in want) and (line[len(name)] in " {"):
            return float(line.rsplit(" ", 1)[1])
    return None


def read_metrics(session: requests.Session, url: str) -> str:
    try:
        return session.get(f"{url}/metrics", timeout=30).text
    except requests.RequestException:
        return ""


def anon_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return None


def sample(session, url: str, pid: int, request: int) -> Sample:
    text = read_metrics(session, url)
    mib = lambda v: None if v is None else round(v / 2**20, 1)  # noqa: E731
    return Sample(request, round(rss_mib(pid) / 1024, 3), anon_gib(pid),
                  mib(metric(text, "gem_cache_bytes", cache="features")),
                  mib(metric(text, "gem_malloc_bytes", kind="free")),
                  mib(metric(text, "gem_malloc_bytes", kind="in_use")))


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def predict_body(image_url: str, task_id: int) -> dict:
    return {"tasks": [{"id": task_id, "data": {"image": image_url}}], "label_config": CONFIG,
            "project": "1.1700000000", "params": {"context": None}}


def save_partial(args, result: SoakResult) -> None:
    """After each checkpoint: the samples so far, next to --json (a long soak stopped early keeps them)."""
    if args.json:
        path = args.json.with_name(f"{args.json.stem}.{result.path}.partial.json")
        path.write_text(json.dumps(asdict(result) | {"summary": result.summary()}, indent=1))


def soak_http(args, name: str, workdir: Path, photos: PhotoServer, log=print) -> SoakResult:
    env = server_env(args, workdir, name)
    cls = DevServer if name == "dev" else GunicornServer
    server = cls(env, workdir / f"{name}.log").start()
    result = SoakResult(name, args.model, args.image_size, f"{args.photo_size}", args.n, args.broken_every,
                        list(args.server_env), load_before=load_average())
    started = time.monotonic()
    try:
        server.wait_ready(600)
        (pid,) = server.worker_pids()
        session = requests.Session()
        session.trust_env = False
        marks = set(checkpoints(args.n))
        for i in range(1, args.n + 1):
            t0 = time.perf_counter()
            reply = session.post(f"{server.url}/predict", json=predict_body(f"{photos.url}/img/{i}.jpg", i),
                                 timeout=600)
            result.request_s.append(round(time.perf_counter() - t0, 4))
            outcome = "http_%d" % reply.status_code
            if reply.ok:
                preds = reply.json().get("results") or []
                outcome = "ok" if preds and preds[0].get("result") else "empty"
            result.errors[outcome] = result.errors.get(outcome, 0) + 1
            if i in marks:
                result.samples.append(sample(session, server.url, pid, i))
                s = result.samples[-1]
                log(f"  [{name}] after {i:5d}: RSS {s.rss_gib:.3f} GiB (anon {s.anon_gib}), feature cache {s.feature_cache_mib} MiB, "
                    f"heap free {s.heap_free_mib} MiB, last request {result.request_s[-1]:.2f} s")
                save_partial(args, result)
    finally:
        server.stop()
        result.wall_s = round(time.monotonic() - started, 1)
        result.load_after = load_average()
    return result


def soak_background(args, workdir: Path, photos: PhotoServer, log=print) -> SoakResult:
    """Retrieve Predictions on a whole project of N tasks in a real Label Studio; the backend's
    budget is tiny, so the background finisher does (nearly) all of them."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import secrets as pysecrets

    from e2e_support import LabelStudioAPI, ServerProcess, child_env, find_label_studio, http_ok

    executable = find_label_studio()
    if executable is None:
        raise SystemExit("background path: set LS_VENV to a venv with label-studio (see docs/E2E.md)")
    ls_dir = workdir / "ls"
    (ls_dir / "data").mkdir(parents=True)
    (ls_dir / "files" / "soak").mkdir(parents=True)
    token = pysecrets.token_hex(20)
    port = free_port()
    ls_env = child_env({
        "LABEL_STUDIO_BASE_DATA_DIR": ls_dir / "data", "LABEL_STUDIO_USERNAME": "soak@example.com",
        "LABEL_STUDIO_PASSWORD": pysecrets.token_urlsafe(12), "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": ls_dir / "files"}, drop_python=True)
    ls = ServerProcess(name="Label Studio", env=ls_env, url=f"http://{LOOPBACK}:{port}",
                       log_path=ls_dir / "label-studio.log", cwd=ls_dir,
                       argv=[str(executable), "start", "--no-browser", "--internal-host", LOOPBACK,
                             "--port", str(port)])
    ls.start()
    env = server_env(args, workdir, "background")
    env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=token, GEM_PREDICT_BUDGET="0.01",
               GEM_BACKGROUND_QUEUE=str(max(args.n, 1000)))
    backend = GunicornServer(env, workdir / "background.log").start()
    result = SoakResult("background", args.model, args.image_size, f"{args.photo_size}", args.n,
                        args.broken_every, list(args.server_env), load_before=load_average())
    started = time.monotonic()
    try:
        api = LabelStudioAPI.with_legacy_token(ls.url, token)
        ls.wait_ready(lambda: http_ok(f"{ls.url}/health/") and api.get("/api/current-user/whoami").ok, 600)
        backend.wait_ready(600)
        (pid,) = backend.worker_pids()
        # Label Studio reads the images from its local-files root, written here once.
        for i in range(1, args.n + 1):
            data, _ = image_bytes(i, *args.photo_wh, args.broken_every)
            (ls_dir / "files" / "soak" / f"{i:05d}.jpg").write_bytes(data)
        project = api.create_project("soak", CONFIG)
        api.add_local_storage(project, ls_dir / "files" / "soak")
        for start in range(1, args.n + 1, 500):
            api.import_tasks(project, [{"image": f"/data/local-files/?d=soak/{i:05d}.jpg"}
                                       for i in range(start, min(args.n, start + 499) + 1)])
        api.add_ml_backend(project, backend.url, is_interactive=False).raise_for_status()
        session = requests.Session()
        session.trust_env = False
        api.retrieve_predictions(project)
        marks, done, last_t, last_done = checkpoints(args.n), 0, time.perf_counter(), 0
        deadline = time.monotonic() + args.max_hours * 3600
        while done < args.n and time.monotonic() < deadline:
            # stored in Label Studio (one cheap call), plus what the finisher gave up on
            text = read_metrics(session, backend.url)
            stored = api.get(f"/api/projects/{project}/").json().get("total_predictions_number") or 0
            done = int(stored + (metric(text, "gem_background_tasks_total", outcome="failed") or 0))
            if done > last_done:
                now = time.perf_counter()
                result.request_s.extend([round((now - last_t) / (done - last_done), 4)] * (done - last_done))
                last_t, last_done = now, done
            while marks and done >= marks[0]:
                result.samples.append(sample(session, backend.url, pid, marks.pop(0)))
                s = result.samples[-1]
                log(f"  [background] after {s.request:5d}: RSS {s.rss_gib:.3f} GiB (anon {s.anon_gib}), feature cache "
                    f"{s.feature_cache_mib} MiB, heap free {s.heap_free_mib} MiB")
            time.sleep(1.0)
        text = read_metrics(session, backend.url)
        for outcome in ("done", "failed", "skipped", "dropped"):
            result.errors[outcome] = int(metric(text, "gem_background_tasks_total", outcome=outcome) or 0)
    finally:
        backend.stop()
        ls.stop()
        result.wall_s = round(time.monotonic() - started, 1)
        result.load_after = load_average()
    return result


def soak_inprocess(args, workdir: Path, photos: PhotoServer, log=print) -> SoakResult:
    """Diagnosis: the app in this process (Flask test client), with tracemalloc snapshots diffed
    between two requests and glibc's statistics; slower, not a figure for the docs."""
    import tracemalloc

    os.environ.update({k: v for k, v in server_env(args, workdir, "inprocess").items()})
    from backend import memory
    from backend.server import create_app
    from backend.settings import Settings

    if not args.no_tune:
        print("allocator:", memory.tune_allocator())
    app = create_app(Settings.from_env())
    model = app.extensions["gem"].model
    model.wait_until_ready(600)
    client = app.test_client()
    marks = set(checkpoints(args.n))
    snaps = {}
    frames = 12
    if args.tracemalloc:
        tracemalloc.start(frames)
    result = SoakResult("inprocess", args.model, args.image_size, f"{args.photo_size}", args.n, args.broken_every,
                        list(args.server_env), load_before=load_average())
    for i in range(1, args.n + 1):
        t0 = time.perf_counter()
        body = predict_body(f"{photos.url}/img/{i}.jpg", i)
        if args.fresh_threads:   # as the development server does: one new thread per request
            box = []
            worker = threading.Thread(target=lambda: box.append(client.post("/predict", json=body)))
            worker.start()
            worker.join()
            reply = box[0]
        else:
            reply = client.post("/predict", json=body)
        result.request_s.append(round(time.perf_counter() - t0, 4))
        key = f"http_{reply.status_code}"
        if reply.status_code == 200:
            preds = (reply.get_json() or {}).get("results") or []
            key = "ok" if preds and preds[0].get("result") else "empty"
        result.errors[key] = result.errors.get(key, 0) + 1
        if i in args.tracemalloc:
            import gc
            gc.collect()
            snaps[i] = tracemalloc.take_snapshot()
        if i in marks:
            stats = memory.malloc_stats()
            cache = model.pipeline.predictor.cache.nbytes / 2**20 if model.pipeline else None
            result.samples.append(Sample(i, round(rss_mib(os.getpid()) / 1024, 3), anon_gib(os.getpid()),
                                         round(cache or 0, 1),
                                         round(stats["free"] / 2**20, 1) if stats else None,
                                         round(stats["in_use"] / 2**20, 1) if stats else None))
            s = result.samples[-1]
            traced = tracemalloc.get_traced_memory()[0] / 2**20 if args.tracemalloc else 0
            log(f"  [inprocess] after {i:5d}: RSS {s.rss_gib:.3f} GiB (anon {s.anon_gib}), cache {s.feature_cache_mib} MiB, heap "
                f"in use {s.heap_used_mib} MiB, free {s.heap_free_mib} MiB, mmapped "
                f"{(stats or {}).get('mmapped', 0) / 2**20:.1f} MiB, python traced {traced:.1f} MiB")
    import atexit
    finisher = app.extensions["gem"].finisher
    finisher.close()   # now, while its MODEL_DIR (a temporary folder) still exists, not at exit
    atexit.unregister(finisher.close)
    if len(snaps) >= 2:
        a, b = (snaps[k] for k in sorted(snaps)[:2])
        log(f"tracemalloc: top growth between requests {sorted(snaps)[0]} and {sorted(snaps)[1]}")
        for stat in b.compare_to(a, "traceback")[:args.top]:
            log(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+7d} blocks")
            for line in stat.traceback.format()[-2 * frames:]:
                log("      " + line)
    return result


# ---------------------------------------------------------------------------------------
# Output


def plot(results: list[SoakResult], path: Path, notes: list[str] | None = None) -> None:
    """The RSS curves as a PNG, drawn with Pillow (no plotting library needed). `notes`: a few
    words per result for the legend (what the file does not say, e.g. an old default)."""
    width, height, left, right, top, bottom = 800, 450, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(s.request, s.rss_gib) for r in results for s in r.samples]
    if not points:
        return
    x_max = max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    pad = max(0.05, (y_hi - y_lo) * 0.1)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    sx = lambda x: left + (width - left - right) * x / max(1, x_max)  # noqa: E731
    sy = lambda y: height - bottom - (height - top - bottom) * (y - y_lo) / (y_hi - y_lo)  # noqa: E731
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for k in range(6):
        y = y_lo + (y_hi - y_lo) * k / 5
        draw.line((left - 4, sy(y), left, sy(y)), fill="black")
        draw.text((4, sy(y) - 6), f"{y:.2f}", fill="black")
        x = x_max * k / 5
        draw.text((sx(x) - 10, height - bottom + 6), f"{int(x)}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    r0 = results[0]
    draw.text((left, 8), f"RSS (GiB) per request: {r0.model}, photos {r0.photo}, one request after another",
              fill="black")
    draw.text((width // 2 - 60, height - 20), "requests (distinct images)", fill="black")
    for i, r in enumerate(results):
        colour = colours[i % len(colours)]
        xy = [(sx(s.request), sy(s.rss_gib)) for s in r.samples]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        label = f"-- {r.path}, input {r.image_size or 'default'} px, {r.reached()} of {r.n} " + " ".join(r.server_env)
        if r.broken_every:
            label += f" every {r.broken_every}th image broken"
        if notes and i < len(notes) and notes[i]:
            label += f" ({notes[i]})"
        # the legend in the lower right, where the curves (rising, then flat near the top) leave room
        draw.text((left + 200, height - bottom - 14 * (len(results) - i) - 6), label, fill=colour)
    image.save(path)


def load_results(paths: list[Path]) -> list[SoakResult]:
    """Results written by --json (a list) or by a checkpoint (one result, `.partial.json`)."""
    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for item in data if isinstance(data, list) else [data]:
            item = {k: v for k, v in item.items() if k != "summary"}
            item["samples"] = [Sample(**s) for s in item["samples"]]
            results.append(SoakResult(**item))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="distinct images per path (default 2000)")
    parser.add_argument("--model", default="vit-b-16",
                        help="`tiny` (random tiny open_clip) or an open_clip name with random weights (default vit-b-16)")
    parser.add_argument("--image-size", type=int, default=None, help="GEM_IMAGE_SIZE (default: the backend's)")
    parser.add_argument("--photo-size", default="800x600", help="WxH of the generated photos")
    parser.add_argument("--servers", default="dev,gunicorn,background", help="paths to soak, comma-separated")
    parser.add_argument("--inprocess", action="store_true", help="diagnosis: the app in this process instead")
    parser.add_argument("--tracemalloc", default="", help="inprocess: two request numbers to snapshot and diff")
    parser.add_argument("--no-tune", action="store_true", help="inprocess: leave glibc's malloc as it starts")
    parser.add_argument("--fresh-threads", action="store_true", help="inprocess: each request on a new thread")
    parser.add_argument("--top", type=int, default=15, help="tracemalloc: entries to print")
    parser.add_argument("--broken", type=float, default=0.0, help="share of broken images (0.1: every 10th)")
    parser.add_argument("--threads", type=int, default=0, help="torch/OMP threads in the server (0: its default)")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--max-hours", type=float, default=12.0, help="background: give up after this long")
    parser.add_argument("--json", type=Path, default=None, help="write the samples here")
    parser.add_argument("--png", type=Path, default=None, help="save the RSS curve here")
    parser.add_argument("--replot", type=Path, nargs="+", default=None,
                        help="no soak: draw --png from these --json or .partial.json files and print their summaries")
    parser.add_argument("--notes", nargs="+", default=None,
                        help="replot: a few words per result for the legend, in order ('' for none)")
    args = parser.parse_args(argv)
    # `kill PID` (SIGTERM) ends the run the way Ctrl-C does: the servers it started are stopped
    # (their `finally`), not left running as orphans.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.replot:
        results = load_results(args.replot)
        for r in results:
            print(json.dumps(r.summary()))
        if args.png:
            plot(results, args.png, args.notes)
        return 0
    args.broken_every = int(round(1 / args.broken)) if args.broken > 0 else 0
    args.photo_wh = tuple(int(v) for v in args.photo_size.lower().split("x"))
    args.tracemalloc = [int(v) for v in args.tracemalloc.split(",") if v.strip()]

    print(f"soak: model {args.model}, GEM_IMAGE_SIZE {args.image_size or 'default'}, photos {args.photo_size}, "
          f"N {args.n}, broken every {args.broken_every or '-'}; load average {load_average()}, "
          f"{os.cpu_count()} CPUs")
    results: list[SoakResult] = []
    with tempfile.TemporaryDirectory(prefix="gem-soak-") as tmp:
        photos = PhotoServer(*args.photo_wh, args.broken_every)
        try:
            if args.inprocess:
                results.append(soak_inprocess(args, Path(tmp), photos))
            else:
                for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
                    if name == "background":
                        results.append(soak_background(args, Path(tmp), photos))
                    elif name in ("dev", "gunicorn"):
                        results.append(soak_http(args, name, Path(tmp), photos))
                    else:
                        parser.error(f"unknown path {name!r}")
        finally:
            photos.close()
    for r in results:
        print(json.dumps(r.summary()))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"summary": r.summary()} for r in results], indent=1))
    if args.png and results:
        plot(results, args.png)
        print(f"curve: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
