"""Large photos through /predict: time and peak memory against a small image with the same model input.

    python -m bench.bench_large_images [--repeats 3] [--write docs/PERFORMANCE.md]

A ViT-B-16 with random weights (the timings do not depend on the weights; independent mode with a
similarity floor of -1 makes every label produce a region, often of several parts, so
post-processing and encoding do their full work for every label and output) behind the
real Flask app; 10 labels x 3 outputs (brush, polygon, rectangle); each task's JPEG is served over
local HTTP, so a request does what it does in production: download, decode, GEM, regions, encoding.

* Time: requests of every size are interleaved (distinct images, no cache hits), median of
  `--repeats` each; the stage split comes from the backend's /metrics. Wall time on a shared
  machine swings with other jobs; the CPU time this process spent on the request (all threads,
  the image server's included) does not, so its ratio is the steadier comparison.
* Memory: each size runs in a fresh process: after a warm-up request at 800x600 the kernel's peak
  RSS counter is reset (/proc/self/clear_refs), and the growth is VmHWM after one request minus
  VmRSS before it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_gem import (_ImageServer, _peak_rss_bytes, _reset_peak_rss, _rss_bytes,  # noqa: E402
                             _stage_sums, cpu_name, photo_like, write_report)

SIZES = {"800x600": (800, 600), "1920x1080": (1920, 1080), "12 MP": (4000, 3000), "50 MP": (8160, 6120)}
LABELS = ["cat", "dog", "car", "person", "tree", "building", "sky", "road", "bicycle", "bird"]


def label_config(labels) -> str:
    tags = "".join(f'<Label value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/>'
            f'<BrushLabels name="brush" toName="image">{tags}</BrushLabels>'
            f'<PolygonLabels name="poly" toName="image">{tags}</PolygonLabels>'
            f'<RectangleLabels name="rect" toName="image">{tags}</RectangleLabels></View>')


def jpeg(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    photo_like(height, width, seed=seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Backend:
    """The Flask app with a random-weight ViT-B-16, and a local server for the task images."""

    def __init__(self, threads: int):
        from backend.server import create_app
        from backend.settings import Settings

        self._dir = tempfile.TemporaryDirectory()
        self.settings = Settings.from_env({
            "GEM_MODEL": "ViT-B-16", "GEM_PRETRAINED": "none", "GEM_DEVICE": "cpu", "MODEL_DIR": self._dir.name,
            "GEM_REMEMBER_PROMPTS": "false", "GEM_MIN_SIMILARITY": "-1", "GEM_ALLOWED_HOSTS": "127.0.0.1",
            "GEM_MODE": "independent", "GEM_TORCH_THREADS": str(threads), "LOG_LEVEL": "WARNING"})
        self.app = create_app(self.settings)
        self.app.extensions["gem"].model.wait_until_ready(600)
        self.client = self.app.test_client()
        self.files: dict[str, bytes] = {}
        self.server = _ImageServer(self.files).__enter__()
        self.count = 0

    def predict(self, data: bytes, labels=LABELS) -> dict:
        self.count += 1
        name = f"task{self.count}.jpg"
        self.files[name] = data
        before = _stage_sums(self.client.get("/metrics").get_data(as_text=True))
        started, started_cpu = time.perf_counter(), time.process_time()
        reply = self.client.post("/predict", json={
            "tasks": [{"id": self.count, "data": {"image": f"{self.server.url}/{name}"}}],
            "label_config": label_config(labels), "project": "bench"})
        total, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        after = _stage_sums(self.client.get("/metrics").get_data(as_text=True))
        del self.files[name]
        prediction = reply.get_json()["results"][0]
        if reply.status_code != 200 or "result" not in prediction:
            raise RuntimeError(f"/predict failed: {reply.status_code} {prediction}")
        kinds: dict[str, int] = {}
        for item in prediction["result"]:
            kinds[item["type"]] = kinds.get(item["type"], 0) + 1
        return {"total": total, "cpu": cpu, "stages": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
                "results": kinds}

    def close(self):
        self.server.__exit__(None, None, None)
        self.app.extensions["gem"].model.close()
        self._dir.cleanup()


def time_sizes(args) -> dict:
    backend = Backend(args.threads)
    images = {name: [jpeg(w, h, seed=10 * r + i) for r in range(args.repeats + 1)]
              for i, (name, (w, h)) in enumerate(SIZES.items()) if name in args.sizes}
    runs: dict[str, list] = {name: [] for name in images}
    for r in range(args.repeats + 1):                  # round 0 warms up
        for name in images:
            result = backend.predict(images[name][r])
            if r:
                runs[name].append(result)
    backend.close()
    return runs


def memory_probe(name: str, num_labels: int, threads: int) -> dict:
    """In a fresh process: peak RSS one request of size `name` adds to a warmed-up server."""
    backend = Backend(threads)
    labels = LABELS if num_labels == len(LABELS) else [f"label {i}" for i in range(num_labels)]
    backend.predict(jpeg(800, 600, seed=1), labels)    # pages in code and one-time buffers
    data = jpeg(*SIZES[name], seed=2)
    rss_before = _rss_bytes()
    reset = _reset_peak_rss()
    result = backend.predict(data, labels)
    peak = _peak_rss_bytes()
    backend.close()
    return {"size": name, "labels": num_labels, "rss_before_mb": rss_before / 2**20,
            "peak_growth_mb": (peak - rss_before) / 2**20, "peak_reset": reset, "total": result["total"],
            "stages": result["stages"], "results": result["results"], "jpeg_mb": len(data) / 2**20}


def memory(args) -> list[dict]:
    rows = []
    for name, labels in args.memory:
        command = [sys.executable, "-m", "bench.bench_large_images", "--probe", name, str(labels),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                    {"size": name, "labels": labels, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
    return rows


def post_seconds(stages: dict) -> float:
    """Everything after the model: regions and Label Studio encoding."""
    return stages.get("postprocess", 0.0) + stages.get("encode", 0.0)


def render(runs: dict, mem: list[dict], args) -> str:
    lines = [f"<!-- bench:large-images:begin (generated by `python -m bench.bench_large_images --write "
             f"docs/PERFORMANCE.md`) -->",
             f"CPU: {cpu_name()}, {args.threads} torch threads; ViT-B-16 (random weights), 448 px input, "
             f"{len(LABELS)} labels x 3 outputs, median of {args.repeats} requests.", "",
             "| Image | /predict (s) | vs 800x600 | CPU (s) | CPU vs 800x600 | fetch | decode | model | "
             "post-processing | results |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = statistics.median(r["total"] for r in runs["800x600"]) if "800x600" in runs else None
    base_cpu = statistics.median(r["cpu"] for r in runs["800x600"]) if "800x600" in runs else None
    for name, results in runs.items():
        total = statistics.median(r["total"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        cpu_ratio = f"{cpu / base_cpu:.2f}x" if base_cpu else "-"
        stage = {k: statistics.median(r["stages"].get(k, 0.0) for r in results)
                 for k in ("fetch", "preprocess", "model")}
        post = statistics.median(post_seconds(r["stages"]) for r in results)
        ratio = f"{total / base:.2f}x" if base else "-"
        share = f" ({100 * post / stage['model']:.1f} % of model)" if stage["model"] else ""
        kinds = ", ".join(f"{v} {k.replace('labels', '')}" for k, v in sorted(results[0]["results"].items()))
        lines.append(f"| {name} | {total:.2f} | {ratio} | {cpu:.2f} | {cpu_ratio} | {stage['fetch']:.3f} | {stage['preprocess']:.3f} | "
                     f"{stage['model']:.2f} | {post:.3f}{share} | {kinds} |")
    if mem:
        lines += ["", "| Image | labels | JPEG (MiB) | RSS before (MiB) | peak RSS growth of one request (MiB) | "
                      "/predict (s) |", "|---|---|---|---|---|---|"]
    for row in mem:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['labels']} | - | - | failed: {row['error']} | - |")
            continue
        lines.append(f"| {row['size']} | {row['labels']} | {row['jpeg_mb']:.1f} | {row['rss_before_mb']:.0f} | "
                     f"{row['peak_growth_mb']:.0f} | {row['total']:.2f} |")
    lines.append("<!-- bench:large-images:end -->")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--memory", nargs="*", type=lambda s: (s.split(":")[0], int(s.split(":")[1])),
                        default=[("800x600", 10), ("12 MP", 10), ("50 MP", 10), ("50 MP", 128)],
                        help="size:labels pairs measured in fresh processes, e.g. '12 MP:10'")
    parser.add_argument("--probe", nargs=2, metavar=("SIZE", "LABELS"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help="put the tables into this Markdown file")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(args.probe[0], int(args.probe[1]), args.threads)))
        return 0
    runs = time_sizes(args) if args.sizes else {}
    block = render(runs, memory(args), args)
    print(block)
    if args.write:
        write_report(args.write, block, "large-images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
