"""Does learning from corrections help? Mean IoU on held-out images after 0, 1, 2, 4, 8 corrected images.

    python bench/bench_learning.py [--repeats 3] [--heldout 24] [--size 160] [--plot docs/img/learning.png]
    python bench/bench_learning.py --churn 32 --repeats 2 --heldout 12    # publishing policies

A synthetic project the code generates: photos of three kinds of shapes (the labels) in clutter,
with their true masks. The model is the random-weight open_clip ViT of the tests, so its text
tower knows nothing about "disc" or "square": at 0 corrections the predictions are chance, and
anything better comes from learning. An annotator is simulated: each image in turn is predicted
with what was learned so far, then "corrected" to the truth (the true masks become the
annotation; predicted regions with no overlap with the truth of their label count as deleted).
Two arms: calibration only (per-label floors + minimum area), and calibration + visual prototypes.
It prints a Markdown table, the rank correlation between the task score and the IoU, and writes
a PNG plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gem_model import HeatmapPredictor, create_gem_model  # noqa: E402
from gem_model.learning import (  # noqa: E402
    Calibration, CalibrationSample, build_bank, calibrate, grid_coverage, learned_heatmaps, task_examples,
)
from gem_model.regions import RegionConfig, extract_regions  # noqa: E402

LABELS = ("Disc", "Square", "Triangle")
# Each kind has a typical colour (with jitter) and shape; clutter takes other colours and is smaller.
KIND_COLOURS = {"Disc": (210, 40, 40), "Square": (40, 70, 220), "Triangle": (230, 200, 30)}
CLUTTER_COLOURS = ((40, 160, 60), (150, 150, 150), (140, 60, 170), (90, 60, 30), (230, 230, 230), (20, 20, 20))
STEPS = (0, 1, 2, 4, 8)


@dataclasses.dataclass
class SyntheticTask:
    image: Image.Image
    masks: dict[str, np.ndarray]      # label -> bool [H, W]; only the labels present


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "Disc":
        draw.ellipse(box, fill=fill)
    elif kind == "Square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_task(rng: np.random.Generator, size: int = 160) -> SyntheticTask:
    """One image: a mottled background, 6-10 small clutter shapes, 1-2 labelled shapes on top."""
    low = rng.integers(60, 200, (4, 4, 3)).astype(np.uint8)
    background = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    background += rng.normal(0, 12, background.shape)
    canvas = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 11))):
        side = rng.uniform(0.06, 0.12) * size
        cx, cy = rng.uniform(0, size, 2)
        colour = CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))]
        _draw_shape(draw, LABELS[int(rng.integers(3))], (cx - side, cy - side, cx + side, cy + side),
                    tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, 15, 3), 0, 255)))
    present = rng.choice(len(LABELS), size=int(rng.integers(1, 3)), replace=False)
    masks = {}
    taken = np.zeros((size, size), dtype=bool)
    for index in present:
        label = LABELS[int(index)]
        for _ in range(20):   # place without overlapping the other labelled shape
            side = rng.uniform(0.14, 0.24) * size
            cx, cy = rng.uniform(side, size - side, 2)
            box = (cx - side, cy - side, cx + side, cy + side)
            layer = Image.new("L", (size, size))
            _draw_shape(ImageDraw.Draw(layer), label, box, 255)
            mask = np.asarray(layer) > 0
            if not (mask & taken).any():
                break
        colour = np.clip(np.array(KIND_COLOURS[label]) + rng.normal(0, 20, 3), 0, 255)
        _draw_shape(draw, label, box, tuple(int(c) for c in colour))
        masks[label] = mask
        taken |= mask
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))
    return SyntheticTask(image=canvas, masks=masks)


def make_project(count: int, seed: int, size: int = 160) -> list[SyntheticTask]:
    rng = np.random.default_rng(seed)
    return [make_task(rng, size) for _ in range(count)]


# ----------------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Learner:
    """What a project has learned: examples and calibration samples of the corrected images."""
    use_prototypes: bool
    config: RegionConfig
    prior: float = 0.25
    max_examples: int = 32
    examples: list = dataclasses.field(default_factory=list)
    samples: list = dataclasses.field(default_factory=list)
    calibration: Optional[Calibration] = None

    def bank(self):
        return build_bank(self.examples, self.max_examples) if self.use_prototypes and self.examples else None

    def learn(self, key: str, features: np.ndarray, text_maps: np.ndarray, truth: dict[str, np.ndarray],
              deleted: dict[str, list[np.ndarray]]) -> None:
        grid = features.shape[:2]
        coverage = {label: grid_coverage(mask, grid) for label, mask in truth.items()}
        deleted_cov = {label: [grid_coverage(m, grid) for m in masks] for label, masks in deleted.items()}
        self.examples.append(task_examples(key, features, coverage, deleted_cov))
        full = np.stack([coverage.get(label, np.zeros(grid, np.float32)) for label in LABELS])
        self.samples.append(CalibrationSample(key, features, text_maps, full))
        self.calibration = calibrate(self.samples, LABELS, self.config, self.examples,
                                     use_prototypes=self.use_prototypes, prior=self.prior,
                                     max_examples=self.max_examples)


def encode(predictor: HeatmapPredictor, task: SyntheticTask):
    encoded = predictor.encode([task.image])[0]
    features = predictor.patch_embeddings(encoded)                                   # [h, w, D]
    text = predictor.text_embeddings([label.lower() for label in LABELS])            # [L, D]
    text_maps = np.einsum("hwd,ld->lhw", features, text)                             # [L, h, w]
    return encoded, features, text_maps


def predict(predictor, learner: Learner, encoded, features, text_maps):
    maps = learned_heatmaps(features, text_maps, LABELS, learner.bank(), learner.calibration,
                            floor=learner.config.min_similarity, prior=learner.prior)
    full = predictor.upsample(maps, encoded)
    config = learner.calibration.region_config(learner.config) if learner.calibration else learner.config
    return extract_regions(full, list(LABELS), config)


def image_iou(result, truth: dict[str, np.ndarray], shape) -> float:
    """Mean over labels present in the truth or the prediction of the mask IoU; 1 when both are empty."""
    predicted = {label: np.zeros(shape, bool) for label in LABELS}
    for region in result.regions:
        predicted[region.label] |= region.mask
    values = []
    for label in LABELS:
        t = truth.get(label, np.zeros(shape, bool))
        p = predicted[label]
        union = (p | t).sum()
        if union:
            values.append((p & t).sum() / union)
    return float(np.mean(values)) if values else 1.0


def deleted_regions(result, truth: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Predicted regions an annotator would delete: no overlap with the truth of their label."""
    out: dict[str, list[np.ndarray]] = {}
    for region in result.regions:
        t = truth.get(region.label)
        if t is None or not (region.mask & t).any():
            out.setdefault(region.label, []).append(region.mask)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def run(predictor, config: RegionConfig, repeats: int, heldout: int, size: int, seed: int = 0,
        prior: float = 0.25):
    """Mean IoU per arm and step, and the score/IoU rank correlation, over `repeats` projects."""
    arms = {"calibration": False, "calibration + prototypes": True}
    ious = {arm: {k: [] for k in STEPS} for arm in arms}
    pairs = {arm: {k: ([], []) for k in STEPS} for arm in arms}
    for repeat in range(repeats):
        pool = make_project(max(STEPS), seed=1000 * repeat + seed + 1, size=size)
        test = make_project(heldout, seed=1000 * repeat + seed + 2, size=size)
        test_encoded = [encode(predictor, t) for t in test]
        pool_encoded = [encode(predictor, t) for t in pool]
        for arm, use_prototypes in arms.items():
            learner = Learner(use_prototypes=use_prototypes, config=config, prior=prior)
            done = 0
            for step in STEPS:
                while done < step:   # the annotator corrects the next image of the pool
                    task, (encoded, features, text_maps) = pool[done], pool_encoded[done]
                    before = predict(predictor, learner, encoded, features, text_maps)
                    learner.learn(f"{repeat}-{done}", features, text_maps, task.masks,
                                  deleted_regions(before, task.masks))
                    done += 1
                for task, (encoded, features, text_maps) in zip(test, test_encoded):
                    result = predict(predictor, learner, encoded, features, text_maps)
                    iou = image_iou(result, task.masks, (size, size))
                    ious[arm][step].append(iou)
                    pairs[arm][step][0].append(result.score)
                    pairs[arm][step][1].append(iou)
    return ious, pairs


def churn(predictor, config: RegionConfig, annotations: int, heldout: int, size: int, seed: int = 0,
          prior: float = 0.25, project_tasks: int = 10000, repeats: int = 1):
    """The publishing policies (GEM_LEARN_PUBLISH) on one stream of annotations: how many new model
    versions each makes (each marks every stored prediction of the project stale), and the held-out
    IoU of the state predictions use after each annotation. `every` publishes after each one;
    `doubling` when a label's new examples reach its published ones (gem_model.learning.publish_due)."""
    from gem_model.learning import publish_due

    out = {policy: {"versions": 0, "curve": np.zeros(annotations + 1)} for policy in ("every", "doubling")}
    for repeat in range(repeats):
        pool = make_project(annotations, seed=5000 + 1000 * repeat + seed, size=size)
        test = make_project(heldout, seed=5001 + 1000 * repeat + seed, size=size)
        test_encoded = [encode(predictor, t) for t in test]
        pool_encoded = [encode(predictor, t) for t in pool]
        for policy in out:
            working = Learner(use_prototypes=True, config=config, prior=prior)
            used = Learner(use_prototypes=True, config=config, prior=prior)    # the published state
            counts: dict[str, int] = {}
            pending: dict[str, int] = {}

            def held_out_iou() -> float:
                return float(np.mean([image_iou(predict(predictor, used, *enc), t.masks, (size, size))
                                      for t, enc in zip(test, test_encoded)]))
            iou = held_out_iou()
            curve = [iou]
            for i in range(annotations):
                task, (encoded, features, text_maps) = pool[i], pool_encoded[i]
                before = predict(predictor, used, encoded, features, text_maps)   # what the annotator corrects
                grid = features.shape[:2]
                coverage = {label: grid_coverage(mask, grid) for label, mask in task.masks.items()}
                deleted = {label: [grid_coverage(m, grid) for m in ms]
                           for label, ms in deleted_regions(before, task.masks).items()}
                working.examples.append(task_examples(f"{repeat}-{i}", features, coverage, deleted))
                full = np.stack([coverage.get(label, np.zeros(grid, np.float32)) for label in LABELS])
                working.samples.append(CalibrationSample(f"{repeat}-{i}", features, text_maps, full))
                for label in task.masks or {"": None}:
                    pending[label] = pending.get(label, 0) + 1
                if policy == "every" or publish_due(counts, pending):
                    for label, n in pending.items():
                        counts[label] = counts.get(label, 0) + n
                    pending = {}
                    used.examples, used.samples = list(working.examples), list(working.samples)
                    used.calibration = calibrate(used.samples, LABELS, config, used.examples, use_prototypes=True,
                                                 prior=prior, max_examples=used.max_examples)
                    out[policy]["versions"] += 1
                    iou = held_out_iou()
                curve.append(iou)
            out[policy]["curve"] += np.asarray(curve)
    for policy in out:
        out[policy]["versions"] /= repeats
        out[policy]["curve"] /= repeats
        out[policy]["stale"] = out[policy]["versions"] * project_tasks
    return out


def print_churn(out, annotations: int, project_tasks: int) -> None:
    every = out["every"]["curve"]
    print(f"| Policy (GEM_LEARN_PUBLISH) | New versions in {annotations} annotations | Stale marks, "
          f"{project_tasks:,}-task project | Mean held-out IoU over the stream | IoU after the last | "
          f"IoU below `every`, mean / worst step |")
    print("|---|---|---|---|---|---|")
    for policy, row in out.items():
        gap = every - row["curve"]
        print(f"| {policy} | {row['versions']:.1f} | {row['stale']:,.0f} | {row['curve'].mean():.3f} | "
              f"{row['curve'][-1]:.3f} | {gap.mean():.3f} / {gap.max():.3f} |")
    print()
    steps = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    steps = [k for k in steps if k <= annotations]
    print("| Annotations | " + " | ".join(str(k) for k in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for policy, row in out.items():
        print(f"| IoU, {policy} | " + " | ".join(f"{row['curve'][k]:.3f}" for k in steps) + " |")


def cost(grid=(28, 50), dim=512, cases=((3, 8), (3, 32), (10, 8), (10, 32)), seed=0) -> None:
    """Time calibration and the learned heatmaps at ViT-B/16 sizes (a 448 x 800 input: 28 x 50 patches,
    512-d embeddings) on random features: what one annotation event and one prediction cost."""
    rng = np.random.default_rng(seed)
    print(f"Cost at ViT-B/16 sizes ({grid[0]} x {grid[1]} patches, {dim}-d), random features, one CPU thread:")
    print()
    print("| Labels | Annotated images | Calibration (s, per annotation event) | Learned heatmaps (ms, per image) |")
    print("|---|---|---|---|")
    for num_labels, count in cases:
        labels = [f"label{i}" for i in range(num_labels)]
        samples, examples = [], []
        for i in range(count):
            features = rng.normal(size=grid + (dim,)).astype(np.float32)
            features /= np.linalg.norm(features, axis=-1, keepdims=True)
            truth = np.zeros((num_labels,) + grid, np.float32)
            for index in range(num_labels):
                if rng.random() < 0.5:
                    r, c = rng.integers(0, grid[0] - 6), rng.integers(0, grid[1] - 8)
                    truth[index, r:r + 6, c:c + 8] = 1
            text = rng.normal(0.2, 0.03, truth.shape).astype(np.float32)
            samples.append(CalibrationSample(str(i), features, text, truth))
            examples.append(task_examples(str(i), features, {labels[j]: truth[j] for j in range(num_labels)
                                                             if truth[j].any()}))
        started = time.perf_counter()
        calibrate(samples, labels, RegionConfig(), examples)
        seconds = time.perf_counter() - started
        bank = build_bank(examples)
        started = time.perf_counter()
        for _ in range(5):
            learned_heatmaps(samples[0].features, samples[0].text_maps, labels, bank, None, floor=0.2)
        per_image = (time.perf_counter() - started) / 5 * 1000
        print(f"| {num_labels} | {count} | {seconds:.1f} | {per_image:.0f} |")


def plot(table: dict[str, list[float]], path: Path, title: str) -> None:
    """A small line plot drawn with PIL (no plotting library needed)."""
    width, height, margin = 560, 340, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x_of = {k: margin + i * (width - 2 * margin) / (len(STEPS) - 1) for i, k in enumerate(STEPS)}

    def y_of(v: float) -> float:
        return height - margin - v * (height - 2 * margin)

    draw.line([(margin, y_of(0)), (width - margin, y_of(0))], fill="black")
    draw.line([(margin, y_of(0)), (margin, y_of(1))], fill="black")
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.line([(margin - 4, y_of(v)), (width - margin, y_of(v))], fill=(225, 225, 225))
        draw.text((margin - 30, y_of(v) - 6), f"{v:.1f}", fill="black")
    for k in STEPS:
        draw.text((x_of[k] - 3, height - margin + 6), str(k), fill="black")
    draw.text((width / 2 - 70, height - margin + 22), "corrected images", fill="black")
    draw.text((margin, 12), title, fill="black")
    colours = [(200, 60, 40), (30, 110, 200)]
    for (arm, values), colour in zip(table.items(), colours):
        points = [(x_of[k], y_of(v)) for k, v in zip(STEPS, values)]
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        index = list(table).index(arm)
        draw.line([(width - 250, 34 + 16 * index), (width - 226, 34 + 16 * index)], fill=colour, width=3)
        draw.text((width - 220, 28 + 16 * index), f"mean IoU, {arm}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def main(argv=None) -> None:
    from tiny_model import TINY_MODEL_NAME, write_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="independent projects averaged")
    parser.add_argument("--heldout", type=int, default=24, help="held-out images per project")
    parser.add_argument("--size", type=int, default=160, help="image side, px (also the model input side)")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG plot here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", type=float, default=0.25, help="text pseudo-count against the examples")
    parser.add_argument("--cost", action="store_true", help="only time calibration at ViT-B/16 sizes")
    parser.add_argument("--churn", type=int, default=0, metavar="N",
                        help="compare the publishing policies on a stream of N annotations instead")
    parser.add_argument("--project-tasks", type=int, default=10000,
                        help="--churn: tasks of the project each new version makes stale")
    args = parser.parse_args(argv)
    if args.cost:
        import torch

        torch.set_num_threads(1)
        cost()
        return

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config_path, checkpoint = write_tiny_model(Path(tmp))
        model = create_gem_model(TINY_MODEL_NAME, str(checkpoint), device="cpu", model_config=str(config_path))
    predictor = HeatmapPredictor(model, image_size=args.size, cache_bytes=0)
    config = RegionConfig()
    started = time.perf_counter()
    if args.churn:
        out = churn(predictor, config, args.churn, args.heldout, args.size, args.seed, args.prior,
                    args.project_tasks, args.repeats)
        print(f"Publishing policies: {args.churn} annotations one by one, {args.repeats} project(s) x "
              f"{args.heldout} held-out images, {args.size} px, random-weight tiny ViT, "
              f"{time.perf_counter() - started:.0f} s")
        print()
        print_churn(out, args.churn, args.project_tasks)
        return
    ious, pairs = run(predictor, config, args.repeats, args.heldout, args.size, args.seed, args.prior)
    seconds = time.perf_counter() - started

    print(f"Synthetic project: {len(LABELS)} labels ({', '.join(LABELS)}), {args.size} px images, "
          f"random-weight tiny ViT ({TINY_MODEL_NAME}), {args.repeats} projects x {args.heldout} held-out images, "
          f"{seconds:.0f} s")
    print()
    print("| Corrected images | " + " | ".join(str(k) for k in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    table = {}
    for arm in ious:
        means = [float(np.mean(ious[arm][k])) for k in STEPS]
        table[arm] = means
        print(f"| mean IoU, {arm} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    print()
    print("Rank correlation (Spearman) between the task score and its IoU, held-out images:")
    print()
    print("| Corrected images | " + " | ".join(str(k) for k in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for arm in pairs:
        rhos = [spearman(*pairs[arm][k]) for k in STEPS]
        print(f"| {arm} | " + " | ".join("n/a" if math.isnan(r) else f"{r:+.2f}" for r in rhos) + " |")
    arm = "calibration + prototypes"
    scores, values = pairs[arm][max(STEPS)]
    order = np.argsort(scores)
    quarter = max(1, len(order) // 4)
    print()
    print(f"{arm}, {max(STEPS)} corrected: mean IoU of the lowest-scored quarter of held-out images "
          f"{np.mean(np.asarray(values)[order[:quarter]]):.3f}, of the highest-scored quarter "
          f"{np.mean(np.asarray(values)[order[-quarter:]]):.3f}")
    if args.plot:
        plot(table, args.plot, "Held-out mean IoU, random-weight ViT (text knows nothing)")
        print(f"plot: {args.plot} ({args.plot.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
