"""Throughput of `python -m backend.prelabel`, and where each task's time goes.

    python -m bench.bench_prelabel                        # in-process fake Label Studio, 24 tasks, CPU
    python -m bench.bench_prelabel --tasks 48 --device cuda
    python -m bench.bench_prelabel --ls-url http://localhost:8080 --token <legacy token>   # a real LS

ViT-B/16 with random weights (speed does not depend on the weights' values), 640x480 PNG tasks,
the usual rectangle + polygon + brush config with 3 labels. The run is the command's own
`run_prelabel` with the model loaded beforehand (load time is not throughput). Stages:

  ls_read   listing the project and its tasks (pages of 100)
  fetch     image download (in the fetch threads, overlapped with the model)
  decode    image decoding (same threads)
  model     GEM forward passes (image path + prompts)
  post      heatmaps -> regions -> Label Studio result items
  ls_check  asking Label Studio, before each upload, whether the task got a prediction meanwhile
  upload    storing predictions, 100 per call

"Outside model and post-processing" is wall time minus model and post time: what the
command adds per task beyond the work itself (fetch overlaps the model, so it counts only
where it makes the model wait). With a real LS the project is created and filled first.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = ("circle", "square", "triangle")
CONFIG = ('<View><Image name="image" value="$image"/>'
          + "".join(f'<{tag} name="{name}" toName="image">'
                    + "".join(f'<Label value="{label}"/>' for label in LABELS) + f"</{tag}>"
                    for tag, name in (("RectangleLabels", "rect"), ("PolygonLabels", "poly"),
                                      ("BrushLabels", "brush")))
          + "</View>")


def _png(seed: int, width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(seed)
    image = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
    big = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    return buffer.getvalue()


def _fake_project(n: int):
    from fake_label_studio import FakeLabelStudio

    ls = FakeLabelStudio(token="bench-token-0123456789", label_config=CONFIG)
    ls.add_tasks([{"image": ls.add_file(f"{i:04d}.png", _png(i))} for i in range(n)])
    return ls, ls.url, ls.token, 1


def _real_project(url: str, token: str, n: int) -> int:
    import requests

    headers = {"Authorization": f"Token {token}"}
    reply = requests.post(f"{url}/api/projects/", json={"title": "bench prelabel", "label_config": CONFIG},
                          headers=headers, timeout=60)
    reply.raise_for_status()
    project = reply.json()["id"]
    for start in range(0, n, 10):
        files = {f"f{i}": (f"{i:04d}.png", _png(i), "image/png") for i in range(start, min(n, start + 10))}
        requests.post(f"{url}/api/projects/{project}/import", files=files, headers=headers,
                      timeout=120).raise_for_status()
    return project


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ls-url", help="a real Label Studio (else an in-process fake)")
    parser.add_argument("--token", help="legacy token of the real Label Studio")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--no-model", action="store_true",
                        help="a stand-in model that costs nothing (tests/backend_fixtures.py): what the command "
                             "itself costs per task, the ceiling when the model is fast (GPU)")
    args = parser.parse_args(argv)

    from backend.ls_client import LabelStudioClient
    from backend.pipeline import PredictionPipeline
    from backend.prelabel import run_prelabel
    from backend.settings import Settings

    fake = None
    if args.ls_url:
        url, token = args.ls_url.rstrip("/"), args.token or ""
        project = _real_project(url, token, args.tasks)
        where = f"real Label Studio at {url}"
    else:
        fake, url, token, project = _fake_project(args.tasks)
        where = "in-process fake Label Studio (tests/fake_label_studio.py, HTTP on loopback)"

    model_dir = os.path.join("/tmp", f"bench-prelabel-{os.getpid()}")
    settings = Settings(model_name="ViT-B-16", pretrained="none", device=args.device, batch_size=args.batch_size,
                        label_studio_url=url, label_studio_api_key=token, model_dir=model_dir, learn=False,
                        allowed_hosts=("127.0.0.1",))
    t0 = time.perf_counter()
    if args.no_model:
        from backend_fixtures import FakePredictor, fake_extract_regions
        pipeline = PredictionPipeline(settings, FakePredictor(), region_extractor=fake_extract_regions)
    else:
        pipeline = PredictionPipeline.from_settings(settings)
    load = time.perf_counter() - t0
    client = LabelStudioClient(url, token)
    summary = run_prelabel(settings, project, client=client, pipeline=pipeline, progress=True)
    if fake is not None:
        fake.close()
    if summary.failed:
        print("failed tasks:", summary.failed, file=sys.stderr)

    t = summary.timings
    n = max(summary.done, 1)
    wall = summary.seconds
    stages = {"ls_read": t.get("ls_read", 0.0), "fetch": t.get("fetch", 0.0), "decode": t.get("preprocess", 0.0),
              "model": t.get("model", 0.0), "post": t.get("postprocess", 0.0) + t.get("encode", 0.0),
              "ls_check": t.get("ls_check", 0.0), "upload": t.get("upload", 0.0)}
    outside = max(0.0, wall - stages["model"] - stages["post"])
    figures = {
        "where": where, "device": args.device, "tasks": summary.done, "failed": len(summary.failed),
        "load_s": round(load, 1), "wall_s": round(wall, 2), "tasks_per_min": round(summary.done / wall * 60, 1),
        "s_per_task": round(wall / n, 3),
        "stage_s_per_task": {k: round(v / n, 4) for k, v in stages.items()},
        "outside_model_and_post_per_task_s": round(outside / n, 4),
        "outside_share": round(outside / wall, 4) if wall else 0.0,
        "load_average": os.getloadavg()[0],
    }
    model_name = "stand-in model (no cost)" if args.no_model else "ViT-B/16 random weights"
    figures["model"] = model_name
    print(f"\nprelabel benchmark: {model_name}, {args.tasks} tasks of 640x480, {args.device}, "
          f"batch {args.batch_size}; {where}")
    print(f"  {figures['tasks_per_min']} tasks/min ({figures['s_per_task']} s per task), model load "
          f"{figures['load_s']} s (not counted), load average {figures['load_average']:.1f}")
    print("  | stage | s per task | share of wall |")
    print("  |---|---:|---:|")
    for stage, seconds in stages.items():
        print(f"  | {stage} | {seconds / n:.4f} | {seconds / wall:.1%} |")
    print(f"  | outside model + post (wall - model - post) | {outside / n:.4f} | {outside / wall:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if not summary.failed else 1


if __name__ == "__main__":
    sys.exit(main())
