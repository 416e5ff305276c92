"""The annotator first: typed-prompt latency on new images while a 40-task Retrieve is worked.

    python bench/bench_priority.py [--tasks 40] [--prompts 5] [--size 448] [--bulk-images 0]

One process, one pipeline (as one backend worker): a thread runs the bulk `/predict` of `--tasks`
new images (what Label Studio's Retrieve Predictions sends); meanwhile typed prompts on NEW images
(never encoded, so each pays a full encode) arrive one after another, as an annotator's would.
The same kind of prompt is timed on the idle backend before and after the bulk job. It prints the
idle median, each prompt's latency under load, the worst of them and worst / idle (the target is
<= 2.5). `--bulk-images` sets GEM_BULK_MODEL_IMAGES (0: 1 on CPU). `--batch-cost` only times one
8-image model call against eight 1-image calls. The model is a random-weight ViT-B-16
(pretrained=None, seeded): the speed is that of the real architecture.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Disc"/><Label value="Square"/></BrushLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
</View>"""


def image_uri(seed: int, size=(640, 480)) -> str:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    picture = Image.fromarray(low).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def typed(pipeline, seed: int, text: str) -> float:
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}]}
    started = time.perf_counter()
    predictions, _ = pipeline.predict([{"id": seed, "data": {"image": image_uri(seed)}}],
                                      pipeline.prepare(CONFIG, context=context))
    assert "result" in predictions[0], predictions[0]
    return time.perf_counter() - started


def make_pipeline(size: int, bulk_images: int, workdir: str):
    import torch

    from backend.pipeline import PredictionPipeline
    from backend.settings import Settings

    torch.manual_seed(0)
    settings = Settings(model_dir=workdir, model_name="ViT-B-16", pretrained="none", image_size=size,
                        device="cpu", bulk_model_images=bulk_images, predict_budget=0)
    return PredictionPipeline.from_settings(settings)


def batch_cost(pipeline, images: int = 8) -> None:
    pictures = [Image.open(io.BytesIO(base64.b64decode(image_uri(500 + k).split(",", 1)[1]))) for k in range(images)]
    predictor = pipeline.predictor
    predictor.cache.clear()
    started = time.perf_counter()
    predictor.encode(pictures, batch_size=images)
    one_call = time.perf_counter() - started
    predictor.cache.clear()
    started = time.perf_counter()
    for picture in pictures:
        predictor.encode([picture], batch_size=1)
    single = time.perf_counter() - started
    print(f"{images} images: one {images}-image model call {one_call:.2f} s, {images} one-image calls {single:.2f} s "
          f"({single / one_call:.2f}x)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=5, help="typed prompts timed while the bulk job runs")
    parser.add_argument("--idle", type=int, default=3, help="typed prompts timed on the idle backend")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--bulk-images", type=int, default=0)
    parser.add_argument("--batch-cost", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = make_pipeline(args.size, args.bulk_images, tmp)
        if args.batch_cost:
            batch_cost(pipeline)
            return
        typed(pipeline, 10_000, "warm up")
        idle = [typed(pipeline, 10_001 + k, f"a disc {k}") for k in range(args.idle)]
        tasks = [{"id": k, "data": {"image": image_uri(k)}} for k in range(args.tasks)]
        bulk_seconds = []

        def bulk():
            started = time.perf_counter()
            pipeline.predict(tasks, pipeline.prepare(CONFIG))
            bulk_seconds.append(time.perf_counter() - started)

        worker = threading.Thread(target=bulk)
        worker.start()
        time.sleep(2.0)
        loaded = []
        for k in range(args.prompts):
            if not worker.is_alive():
                break
            loaded.append(typed(pipeline, 20_000 + k, f"a square {k}"))
            time.sleep(1.0)      # the annotator looks at the answer
        worker.join()
        # Idle again after the bulk job: the machine's own load drifts, so idle is measured on both sides.
        idle += [typed(pipeline, 30_001 + k, f"a ring {k}") for k in range(args.idle)]
        base = statistics.median(idle)
        print(f"ViT-B-16 (random weights), image size {args.size}, bulk model call = "
              f"{pipeline.bulk_model_images} image(s), {args.tasks}-task bulk predict took {bulk_seconds[0]:.1f} s; "
              f"the bulk job yielded {pipeline.gate.yields} times")
        print(f"idle typed prompt on a new image: median {base:.2f} s of {[round(v, 2) for v in idle]}")
        print(f"during the bulk job: {[round(v, 2) for v in loaded]} s; worst {max(loaded):.2f} s = "
              f"{max(loaded) / base:.2f}x idle")


if __name__ == "__main__":
    main()
