"""Show one, get them all: IoU of exemplar prompts against the text-only prompt, on generated scenes.

    python bench/bench_exemplars.py [--scenes 8] [--models tiny,vit-b-16] [--picture docs/img/exemplars.png]

Each scene: a mottled background with small clutter, 3-5 red discs (the label, "Disc"), two red
squares (look-alikes: same colour, other shape) and two blue discs (same shape, other colour), with
the true mask of the discs. Every prompt goes through the backend's own pipeline as Label Studio
sends it in an interactive call (`params.context.result`, percent coordinates):

  text          the typed prompt "red disc"
  1 exemplar    one smart box around one disc
  3 exemplars   boxes around three discs
  1 ex + neg    one box plus a negative click (Alt-click) on one red square
  text + 1 ex   the typed prompt and one box together

The score is the pixel IoU of the union of the returned brush regions with the true discs, averaged
over scenes. The models are the random-weight tiny ViT of the tests and a random-weight, seeded
ViT-B-16 (pretrained=None): their text towers know nothing, so the text row is chance and whatever
the exemplar rows gain comes from matching patch embeddings alone. It also times, on one image
already encoded, a new typed prompt against a new exemplar (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Disc"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Disc"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="Disc"/></BrushLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
</View>"""
ARMS = ("text", "1 exemplar", "3 exemplars", "1 ex + neg", "text + 1 ex")
CLUTTER = ((40, 160, 60), (150, 150, 150), (140, 60, 170), (90, 60, 30), (230, 230, 230), (230, 200, 30))


@dataclass
class Scene:
    image: Image.Image
    truth: np.ndarray                                 # bool [H, W]: the discs
    discs: list[tuple[float, float, float, float]]    # boxes (x0, y0, x1, y1) px
    lookalikes: list[tuple[float, float, float, float]]


def _jitter(rng, colour, spread=18):
    return tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, spread, 3), 0, 255))


def make_scene(rng: np.random.Generator, size: int = 224) -> Scene:
    # A muted, mottled ground (a table, a floor): grey levels with a little colour.
    grey = rng.integers(90, 190, (4, 4, 1))
    low = np.clip(grey + rng.integers(-20, 21, (4, 4, 3)), 0, 255).astype(np.uint8)
    background = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    background += rng.normal(0, 10, background.shape)
    canvas = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 14))):               # clutter, under the objects
        r = rng.uniform(0.02, 0.045) * size
        cx, cy = rng.uniform(0, size, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, CLUTTER[int(rng.integers(len(CLUTTER)))]))
    taken: list[tuple[float, float, float]] = []

    def place(r):
        for _ in range(200):
            cx, cy = rng.uniform(r + 2, size - r - 2, 2)
            if all(np.hypot(cx - x, cy - y) > r + q + 4 for x, y, q in taken):
                taken.append((cx, cy, r))
                return cx - r, cy - r, cx + r, cy + r
        return None

    truth = Image.new("L", (size, size))
    discs, lookalikes = [], []
    for kind, count in (("disc", int(rng.integers(3, 6))), ("square", 2), ("blue", 2)):
        for _ in range(count):
            box = place(rng.uniform(0.06, 0.09) * size)
            if box is None:
                continue
            if kind == "square":
                draw.rectangle(box, fill=_jitter(rng, (210, 35, 35)))
                lookalikes.append(box)
            elif kind == "blue":
                draw.ellipse(box, fill=_jitter(rng, (40, 70, 220)))
            else:
                draw.ellipse(box, fill=_jitter(rng, (210, 35, 35)))
                ImageDraw.Draw(truth).ellipse(box, fill=255)
                discs.append(box)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))
    return Scene(canvas, np.asarray(truth) > 0, discs, lookalikes)


def _box_item(box, size):
    x0, y0, x1, y1 = box
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "origin": "manual",
            "original_width": size, "original_height": size, "image_rotation": 0,
            "value": {"x": 100 * x0 / size, "y": 100 * y0 / size, "width": 100 * (x1 - x0) / size,
                      "height": 100 * (y1 - y0) / size, "rotation": 0, "rectanglelabels": ["Disc"]}}


def _point_item(box, size, positive):
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return {"type": "keypointlabels", "from_name": "point", "to_name": "image", "origin": "manual",
            "original_width": size, "original_height": size, "is_positive": positive,
            "value": {"x": 100 * x / size, "y": 100 * y / size, "width": 0.7, "keypointlabels": ["Disc"]}}


TEXT = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["red disc"]}}


def contexts(scene: Scene, size: int) -> dict[str, dict]:
    first = _box_item(scene.discs[0], size)
    return {
        "text": {"result": [TEXT]},
        "1 exemplar": {"result": [first]},
        "3 exemplars": {"result": [_box_item(b, size) for b in scene.discs[:3]]},
        "1 ex + neg": {"result": [first] + [_point_item(scene.lookalikes[0], size, False)] * bool(scene.lookalikes)},
        "text + 1 ex": {"result": [TEXT, first]},
    }


def _uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def predicted_mask(results, size) -> np.ndarray:
    from backend.decode import item_mask

    masks = [item_mask(r, size, size) for r in results if r.get("type") == "brushlabels"]
    masks = [m for m in masks if m is not None]
    return np.any(masks, axis=0) if masks else np.zeros((size, size), bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def make_pipeline(model: str, size: int, workdir: Path):
    import torch

    from backend.pipeline import PredictionPipeline
    from backend.settings import Settings

    torch.manual_seed(0)
    if model == "tiny":
        from tiny_model import TINY_MODEL_NAME, write_tiny_model

        config_path, checkpoint = write_tiny_model(workdir)
        settings = Settings(model_dir=str(workdir), model_name=TINY_MODEL_NAME, pretrained=str(checkpoint),
                            model_config=str(config_path), image_size=size)
    else:
        settings = Settings(model_dir=str(workdir), model_name="ViT-B-16", pretrained="none", image_size=size)
    return PredictionPipeline.from_settings(settings)


def run(model: str, scenes: list[Scene], size: int, workdir: Path):
    pipeline = make_pipeline(model, size, workdir)
    scores = {arm: [] for arm in ARMS}
    shown = {}
    for n, scene in enumerate(scenes):
        task = {"id": n + 1, "data": {"image": _uri(scene.image)}}
        for arm, context in contexts(scene, size).items():
            predictions, _ = pipeline.predict([task], pipeline.prepare(CONFIG, context=context))
            mask = predicted_mask(predictions[0]["result"], size)
            scores[arm].append(iou(mask, scene.truth))
            if n == 0:
                shown[arm] = mask
    timing = time_prompts(pipeline, scenes[0], size)
    pipeline.close()
    return {arm: float(np.mean(v)) for arm, v in scores.items()}, shown, timing


def time_prompts(pipeline, scene: Scene, size: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one interactive call on an image already encoded: a new typed prompt
    (a fresh text each time, so the text cache does not help) against a new exemplar box."""
    task = {"id": 1, "data": {"image": _uri(scene.image)}}
    pipeline.predict([task], pipeline.prepare(CONFIG, context={"result": [TEXT]}))   # encode once
    typed, boxed = [], []
    for k in range(repeats):
        text = dict(TEXT, value={"text": [f"red disc number {k}"]})
        started = time.perf_counter()
        pipeline.predict([task], pipeline.prepare(CONFIG, context={"result": [text]}))
        typed.append(time.perf_counter() - started)
        x0, y0, x1, y1 = scene.discs[k % len(scene.discs)]
        box = _box_item((x0 - k, y0, x1, y1 + k), size)
        started = time.perf_counter()
        pipeline.predict([task], pipeline.prepare(CONFIG, context={"result": [box]}))
        boxed.append(time.perf_counter() - started)
    return {"typed": float(np.median(typed)), "exemplar": float(np.median(boxed))}


def picture(scene: Scene, shown: dict[str, np.ndarray], path: Path, cell: int = 224) -> None:
    """Image with the example box, then each arm's answer (red) over the truth (green outline)."""
    panels = [("image + example box", None)] + [(arm, shown[arm]) for arm in ("text", "1 exemplar", "1 ex + neg")]
    out = Image.new("RGB", (cell * len(panels), cell + 18), "white")
    truth = Image.fromarray(scene.truth.astype(np.uint8) * 255).resize((cell, cell), Image.NEAREST)
    edge = np.asarray(truth.filter(ImageFilter.FIND_EDGES)) > 0
    for k, (title, mask) in enumerate(panels):
        base = scene.image.resize((cell, cell)).convert("RGB")
        array = np.asarray(base).astype(np.float32)
        if mask is not None:
            m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((cell, cell), Image.NEAREST)) > 0
            array[m] = 0.45 * array[m] + 0.55 * np.array([255, 0, 0])
            array[edge] = (0, 255, 0)
        panel = Image.fromarray(array.astype(np.uint8))
        draw = ImageDraw.Draw(panel)
        scale = cell / scene.image.width
        draw.rectangle([v * scale for v in scene.discs[0]], outline=(255, 255, 0), width=2)
        if mask is not None and title == "1 ex + neg" and scene.lookalikes:
            x0, y0, x1, y1 = (v * scale for v in scene.lookalikes[0])
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.line([cx - 6, cy - 6, cx + 6, cy + 6], fill=(0, 0, 0), width=3)
            draw.line([cx - 6, cy + 6, cx + 6, cy - 6], fill=(0, 0, 0), width=3)
        out.paste(panel, (k * cell, 18))
        ImageDraw.Draw(out).text((k * cell + 4, 3), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="scene side, px (also the model input side)")
    parser.add_argument("--models", default="tiny,vit-b-16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", type=Path, default=None, help="write a PNG of the first scene (ViT-B-16)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    scenes = [make_scene(rng, args.size) for _ in range(args.scenes)]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows, timings = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            started = time.perf_counter()
            rows[model], shown, timings[model] = run(model, scenes, args.size, Path(tmp) / model)
            print(f"{model}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            if args.picture and (model != "tiny" or len(models) == 1):
                picture(scenes[0], shown, args.picture)
    print(f"{args.scenes} generated scenes of {args.size} px (3-5 red discs, 2 red squares, 2 blue discs, "
          f"clutter); mean pixel IoU of the returned brush regions with the true discs")
    print()
    print("| model | " + " | ".join(ARMS) + " |")
    print("|---|" + "---|" * len(ARMS))
    for model, row in rows.items():
        print(f"| {model} | " + " | ".join(f"{row[arm]:.3f}" for arm in ARMS) + " |")
    print()
    print("Seconds per interactive call on an image already encoded (median of 5):")
    print()
    print("| model | new typed prompt | new exemplar box |")
    print("|---|---|---|")
    for model, t in timings.items():
        print(f"| {model} | {t['typed']:.3f} | {t['exemplar']:.3f} |")


if __name__ == "__main__":
    main()
