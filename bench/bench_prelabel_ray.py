"""Throughput of `python -m backend.prelabel` with and without Ray, against a real Label Studio.

    LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=<token> \\
        python -m bench.bench_prelabel_ray --tasks 48 --workers 1 2 [--model tiny|vit-b16] [--json out.json]

For each runner (plain, then Ray with each --workers) it creates a fresh project with the same
`--tasks` tasks (generated JPEGs, 640x480 by default, served over http from this process), runs the
job, and prints tasks per second, the time Ray took to start, and where the workers' time went
(fetch, model, regions, result encoding, upload; summed over tasks). It also times the Label Studio
calls the job makes (listing a page of tasks, the per-task "already predicted?" check, storing a
chunk of predictions), which bound the throughput no number of GPUs can pass. Figures go to
docs/SCALING.md. `--model vit-b16` runs ViT-B-16 with random weights (the real model's cost).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<BrushLabels name="brush" toName="image"><Label value="disc"/><Label value="stripes"/></BrushLabels>'
          '<PolygonLabels name="poly" toName="image"><Label value="disc"/><Label value="stripes"/></PolygonLabels>'
          '</View>')


@dataclass
class RunFigures:
    runner: str
    workers: int
    tasks: int
    done: int
    seconds: float                       # the whole command: listing, Ray start, model load, work
    tasks_per_s: float
    startup_s: float = 0.0               # Ray start (local) or join
    first_s: float = 0.0                 # Ray: tasks in to first outcome (worker start, model load, a batch)
    steady_tasks_per_s: float = 0.0      # Ray: after the first outcome
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ApiFigures:
    list_page_s: float = 0.0             # GET one page of 100 tasks (fields=all)
    check_s: float = 0.0                 # GET /api/predictions/?task= (one task)
    store_chunk_s: float = 0.0           # POST import/predictions, a chunk
    chunk: int = 0


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer((LOOPBACK, 0), partial(_Quiet, directory=str(directory)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://{LOOPBACK}:{httpd.server_address[1]}"


def make_images(directory: Path, n: int, width: int, height: int) -> list[str]:
    names = []
    for i in range(n):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:height, 0:width]
        rgb = np.full((height, width, 3), rng.integers(0, 60, size=3), np.uint8)
        cx, cy, r = width * rng.uniform(0.2, 0.5), height * 0.5, min(width, height) * 0.25
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(150, 256, size=3)
        rgb[(xx > width * 0.65) & ((xx // 6) % 2 == 0)] = rng.integers(120, 256, size=3)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
        name = f"bench-{i}.jpg"
        (directory / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def model_env(kind: str, work: Path) -> dict[str, str]:
    if kind == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import TINY_MODEL_NAME, write_tiny_model
        config_path, checkpoint_path = write_tiny_model(work / "tiny")
        return {"GEM_MODEL": TINY_MODEL_NAME, "GEM_MODEL_CONFIG": str(config_path),
                "GEM_PRETRAINED": str(checkpoint_path), "GEM_IMAGE_SIZE": "64", "GEM_MIN_SIMILARITY": "0"}
    return {"GEM_MODEL": "ViT-B-16", "GEM_PRETRAINED": "none", "GEM_MIN_SIMILARITY": "0"}


def time_api(client, project: int, chunk: int, version: str) -> ApiFigures:
    """Median times of the three Label Studio calls the job is made of (on `project`)."""
    figures = ApiFigures(chunk=chunk)
    pages, checks = [], []
    for _ in range(3):
        started = time.perf_counter()
        next(iter(client.iter_tasks(project, page_size=100)), None)
        pages.append(time.perf_counter() - started)
    tasks = [t["id"] for t in client.iter_tasks(project, page_size=100)]
    for task in tasks[:10]:
        started = time.perf_counter()
        client.has_prediction(task, version)
        checks.append(time.perf_counter() - started)
    payload = [{"task": t, "result": [], "score": 0.0, "model_version": "bench-api-timing"} for t in tasks[:chunk]]
    started = time.perf_counter()
    client.create_predictions(project, payload, chunk=chunk)
    figures.store_chunk_s = time.perf_counter() - started
    figures.chunk = len(payload)
    figures.list_page_s, figures.check_s = statistics.median(pages), statistics.median(checks)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=("tiny", "vit-b16"), default="tiny")
    parser.add_argument("--size", default="640x480", help="image size WxH")
    parser.add_argument("--upload-chunk", type=int, default=8,
                        help="predictions per upload call (small: results arrive steadily, so the rate after "
                             "the first result is measurable)")
    parser.add_argument("--no-plain", action="store_true", help="skip the run without Ray")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        if not os.environ.get(var):
            parser.error(f"set {var} (a running Label Studio)")

    from backend.ls_client import LabelStudioClient
    from backend.prelabel import run_prelabel
    from backend.prelabel_ray import RayOptions, run_prelabel_on_ray
    from backend.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="bench-prelabel-"))
    (work / "images").mkdir()
    width, height = (int(v) for v in args.size.split("x"))
    names = make_images(work / "images", args.tasks, width, height)
    httpd, base = serve(work / "images")
    env = {**os.environ, **model_env(args.model, work), "GEM_DEVICE": "cpu", "GEM_ALLOWED_HOSTS": LOOPBACK,
           "MODEL_DIR": str(work / "model")}
    settings = Settings.from_env(env)
    client = LabelStudioClient.from_settings(settings)

    def new_project(title: str) -> int:
        project = client.request("POST", "api/projects/", json_body={"title": title, "label_config": CONFIG})["id"]
        client.request("POST", f"api/projects/{project}/import", json_body=[{"image": f"{base}/{n}"} for n in names])
        return project

    runs: list[RunFigures] = []
    plans = ([] if args.no_plain else [("plain", 0)]) + [("ray", w) for w in args.workers]
    for runner, workers in plans:
        project = new_project(f"bench {runner} {workers}")
        started = time.monotonic()
        if runner == "plain":
            summary = run_prelabel(settings, project, progress=False, client=client, upload_chunk=args.upload_chunk)
            startup = 0.0
        else:
            options = RayOptions.from_settings(settings, None, workers, upload_chunk=args.upload_chunk)
            summary = run_prelabel_on_ray(settings, project, options, progress=False, client=client)
            startup = summary.timings.get("ray_start", 0.0)
        seconds = time.monotonic() - started
        ray_run = getattr(summary, "ray", None)
        first = ray_run.first_s if ray_run else 0.0
        steady = (summary.done - 1) / (ray_run.run_s - first) if ray_run and ray_run.run_s > first else 0.0
        figures = RunFigures(runner=runner, workers=workers or 1, tasks=args.tasks, done=summary.done,
                             seconds=round(seconds, 2), tasks_per_s=round(summary.done / seconds, 3),
                             startup_s=round(startup, 2), first_s=round(first, 2),
                             steady_tasks_per_s=round(steady, 3),
                             timings={k: round(v, 2) for k, v in summary.timings.items()})
        runs.append(figures)
        print(f"{runner:5s} workers={figures.workers}: {figures.done}/{args.tasks} tasks in {seconds:.1f} s "
              f"= {figures.tasks_per_s:.2f} tasks/s"
              + (f" (first result after {first:.1f} s, then {steady:.2f} tasks/s)" if ray_run else "") + "; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in figures.timings.items()),
              flush=True)
    api = time_api(client, project, chunk=min(100, args.tasks), version=summary.model_version)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"Label Studio API: list a page of 100 tasks {api.list_page_s * 1000:.0f} ms, "
          f"'already predicted?' check {api.check_s * 1000:.0f} ms per task, "
          f"store {api.chunk} predictions {api.store_chunk_s * 1000:.0f} ms")
    httpd.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "size": args.size, "cpus": os.cpu_count(),
                                               "runs": [asdict(r) for r in runs], "api": asdict(api)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
