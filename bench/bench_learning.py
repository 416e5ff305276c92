"""Does learning from corrections help? Mean IoU on held-out images after 0, 1, 2, 4, 8 corrected images.

    python bench/bench_learning.py [--repeats 3] [--heldout 24] [--size 160] [--plot docs/img/learning.png]
    python bench/bench_learning.py --churn 32 --repeats 2 --heldout 12    # publishing policies
    python bench/bench_learning.py --curve --repeats 8 --pool 48 --heldout 16 \
        --plot docs/img/learning_curve_select.png                        # orders of correcting
    python bench/bench_learning.py --curve --duplicates 4 ... \
        --plot docs/img/learning_curve_duplicates.png                    # ... on a redundant pool

A synthetic project the code generates: photos of three kinds of shapes (the labels) in clutter,
with their true masks. The model is the random-weight open_clip ViT of the tests, so its text
tower knows nothing about "disc" or "square": at 0 corrections the predictions are chance, and
anything better comes from learning. An annotator is simulated: each image in turn is predicted
with what was learned so far, then "corrected" to the truth (the true masks become the
annotation; predicted regions with no overlap with the truth of their label count as deleted).
Two arms: calibration only (per-label floors + minimum area), and calibration + visual prototypes.
It prints a Markdown table, the rank correlation between the task score and the IoU (and, per
task-score variant of gem_model/uncertainty.py, Spearman and the IoU of the lowest- vs the
highest-scored quarter after 0, 2, 4, 8 corrections), and writes a PNG plot. `--curve` compares
three orders of correcting a pool of unlabeled images instead: random, lowest task score first,
and `gem_model.selection.select_diverse` (what `python -m backend.select` does); `--duplicates K`
makes that pool redundant (each scene drawn K times with small jitter, as video frames or burst photos).
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
    Calibration, CalibrationSample, LearnedMaps, build_bank, calibrate, grid_coverage, learned_heatmaps,
    task_examples,
)
from gem_model.regions import RegionConfig, extract_regions  # noqa: E402
from gem_model.selection import image_embedding, select_diverse  # noqa: E402
from gem_model.uncertainty import combine_scores, committee_agreement, margin_score  # noqa: E402

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


@dataclasses.dataclass
class Scene:
    """What one generated image shows, before it is drawn: re-drawing it with jitter gives near-duplicates."""
    low: np.ndarray                   # [4, 4, 3] uint8, the background's coarse colours
    noise: np.ndarray                 # [H, W, 3] the background's pixel noise
    clutter: list                     # (kind, box, fill) of the small unlabelled shapes
    shapes: list                      # (label, box, fill) of the labelled shapes


def make_scene(rng: np.random.Generator, size: int = 160) -> Scene:
    """A mottled background, 6-10 small clutter shapes, 1-2 labelled shapes that do not overlap."""
    low = rng.integers(60, 200, (4, 4, 3)).astype(np.uint8)
    noise = rng.normal(0, 12, (size, size, 3))
    clutter = []
    for _ in range(int(rng.integers(6, 11))):
        side = rng.uniform(0.06, 0.12) * size
        cx, cy = rng.uniform(0, size, 2)
        colour = CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))]
        kind = LABELS[int(rng.integers(3))]
        fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, 15, 3), 0, 255))
        clutter.append((kind, (cx - side, cy - side, cx + side, cy + side), fill))
    present = rng.choice(len(LABELS), size=int(rng.integers(1, 3)), replace=False)
    shapes = []
    taken = np.zeros((size, size), dtype=bool)
    for index in present:
        label = LABELS[int(index)]
        for _ in range(20):   # place without overlapping the other labelled shape
            side = rng.uniform(0.14, 0.24) * size
            cx, cy = rng.uniform(side, size - side, 2)
            box = (cx - side, cy - side, cx + side, cy + side)
            mask = _shape_mask(label, box, size)
            if not (mask & taken).any():
                break
        colour = np.clip(np.array(KIND_COLOURS[label]) + rng.normal(0, 20, 3), 0, 255)
        shapes.append((label, box, tuple(int(c) for c in colour)))
        taken |= mask
    return Scene(low=low, noise=noise, clutter=clutter, shapes=shapes)


def _shape_mask(label: str, box, size: int) -> np.ndarray:
    layer = Image.new("L", (size, size))
    _draw_shape(ImageDraw.Draw(layer), label, box, 255)
    return np.asarray(layer) > 0


def render_scene(scene: Scene, size: int = 160, jitter: Optional[np.random.Generator] = None,
                 shift: float = 3.0, brightness: float = 0.08) -> SyntheticTask:
    """Draw `scene`. With a `jitter` generator: a near-duplicate, as a burst photo or the next video
    frame would be: every shape moved by up to `shift` px (labelled shapes kept apart), brightness
    scaled by up to +-`brightness`, fresh pixel noise."""
    def moved(box):
        if jitter is None:
            return box
        dx, dy = jitter.uniform(-shift, shift, 2)
        return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)

    noise = scene.noise if jitter is None else jitter.normal(0, 12, scene.noise.shape)
    background = np.asarray(Image.fromarray(scene.low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    background += noise
    canvas = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for kind, box, fill in scene.clutter:
        _draw_shape(draw, kind, moved(box), fill)
    masks = {}
    taken = np.zeros((size, size), dtype=bool)
    for label, box, fill in scene.shapes:
        mask = _shape_mask(label, box, size)
        if jitter is not None:
            for _ in range(5):
                candidate = moved(box)
                candidate_mask = _shape_mask(label, candidate, size)
                if not (candidate_mask & taken).any():
                    box, mask = candidate, candidate_mask
                    break
        _draw_shape(draw, label, box, fill)
        masks[label] = mask
        taken |= mask
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))
    if jitter is not None:
        factor = 1.0 + jitter.uniform(-brightness, brightness)
        canvas = Image.fromarray((np.asarray(canvas, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8))
    return SyntheticTask(image=canvas, masks=masks)


def make_task(rng: np.random.Generator, size: int = 160) -> SyntheticTask:
    """One image: a mottled background, 6-10 small clutter shapes, 1-2 labelled shapes on top."""
    return render_scene(make_scene(rng, size), size)


def make_project(count: int, seed: int, size: int = 160) -> list[SyntheticTask]:
    rng = np.random.default_rng(seed)
    return [make_task(rng, size) for _ in range(count)]


def make_redundant_project(count: int, duplicates: int, seed: int, size: int = 160) -> list[SyntheticTask]:
    """`count` images from ceil(count / duplicates) distinct scenes, each drawn `duplicates` times as
    jittered near-duplicates (the redundancy of video frames or burst photos), in a shuffled order."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, size) for _ in range(math.ceil(count / duplicates))]
    jitter = np.random.default_rng(seed + 500)
    tasks = [render_scene(scene, size, jitter) for scene in scenes for _ in range(duplicates)][:count]
    return [tasks[i] for i in jitter.permutation(len(tasks))]


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


def predict(predictor, learner: Learner, encoded, features, text_maps, parts: Optional[dict] = None,
            want: Sequence[str] = ("regions", "margin", "agreement")):
    """The learner's regions of one image; with `parts` (a dict), also fills in the task score's
    parts named in `want` (gem_model/uncertainty.py): regions, margin, agreement (None before any
    example)."""
    bank = learner.bank()
    maps = learned_heatmaps(features, text_maps, LABELS, bank, learner.calibration,
                            floor=learner.config.min_similarity, prior=learner.prior)
    full = predictor.upsample(maps, encoded)
    config = learner.calibration.region_config(learner.config) if learner.calibration else learner.config
    result = extract_regions(full, list(LABELS), config)
    if parts is not None:
        parts["regions"] = result.score
        if "margin" in want:
            parts["margin"] = margin_score(full, config)
    if parts is not None and "agreement" in want:
        # The committee: the text maps alone and the prototypes alone, both calibrated.
        parts["agreement"] = committee_agreement(features, text_maps, LABELS,
                                                 LearnedMaps(bank, learner.calibration, learner.prior), config)
    return result


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
    """Mean IoU per arm and step, and per held-out image the task score's parts and its IoU, over
    `repeats` projects: `pairs[arm][step] = ([parts dict per image], [IoU per image])`."""
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
                    parts: dict = {}
                    result = predict(predictor, learner, encoded, features, text_maps, parts)
                    iou = image_iou(result, task.masks, (size, size))
                    ious[arm][step].append(iou)
                    pairs[arm][step][0].append(parts)
                    pairs[arm][step][1].append(iou)
    return ious, pairs


# The task scores compared (gem_model/uncertainty.py): the parts each averages.
SCORE_VARIANTS = {
    "regions (before)": ("regions",),
    "margin": ("margin",),
    "agreement": ("agreement",),
    "regions + margin": ("regions", "margin"),
    "regions + agreement": ("regions", "agreement"),
    "regions + margin + agreement": ("regions", "margin", "agreement"),
}
SCORE_STEPS = (0, 2, 4, 8)


def task_scores(parts: Sequence[dict], use: Sequence[str]) -> list[float]:
    return [combine_scores(p, use) for p in parts]


def quarters(scores: Sequence[float], ious: Sequence[float]) -> tuple[float, float]:
    """Mean IoU of the lowest-scored and of the highest-scored quarter of the images."""
    order = np.argsort(np.asarray(scores), kind="stable")
    quarter = max(1, len(order) // 4)
    values = np.asarray(ious)
    return float(values[order[:quarter]].mean()), float(values[order[-quarter:]].mean())


def print_score_variants(pairs_of_arm, images: int) -> None:
    """Per task-score variant and number of corrections: Spearman(score, IoU), and the mean IoU of
    the lowest- vs the highest-scored quarter of held-out images (calibration + prototypes)."""
    print(f"Task score variants, calibration + prototypes, {images} held-out images per cell: "
          "Spearman(score, IoU); mean IoU of the lowest-scored quarter / of the highest-scored quarter")
    print()
    print("| Score | " + " | ".join(f"{k} corrected" for k in SCORE_STEPS) + " |")
    print("|---|" + "---|" * len(SCORE_STEPS))
    for name, use in SCORE_VARIANTS.items():
        cells = []
        for k in SCORE_STEPS:
            parts, ious = pairs_of_arm[k]
            scores = task_scores(parts, use)
            rho = spearman(scores, ious)
            low, high = quarters(scores, ious)
            cells.append(("n/a" if math.isnan(rho) else f"{rho:+.2f}") + f"; {low:.2f} / {high:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


CURVE_STEPS = (0, 2, 4, 8, 12, 16)
ORDERS = ("random", "lowest score first", "select")


def learning_curves(predictor, config: RegionConfig, repeats: int, pool_size: int, heldout: int, size: int,
                    seed: int = 0, prior: float = 0.25, steps: Sequence[int] = CURVE_STEPS,
                    use: Sequence[str] = ("regions",), pool_factor: float = 4.0, pooling: str = "mean",
                    duplicates: int = 1):
    """Mean held-out IoU against the number of corrected images, for three orders of correcting a
    pool of unlabeled images: random, lowest task score first, and `select_diverse` (score +
    diversity of the pooled GEM embeddings). Between two steps the annotator corrects a batch
    (steps[i+1] - steps[i] images) chosen with what was learned so far, as a team using
    `python -m backend.select` between publications would. `duplicates` > 1: the pool is redundant,
    `make_redundant_project` (pool_size / duplicates scenes, each drawn `duplicates` times); the
    held-out images stay independent. Returns {order: [[IoU per step] per repeat]}."""
    out = {order: [] for order in ORDERS}
    for repeat in range(repeats):
        if duplicates > 1:
            pool = make_redundant_project(pool_size, duplicates, seed=7000 + 1000 * repeat + seed, size=size)
        else:
            pool = make_project(pool_size, seed=7000 + 1000 * repeat + seed, size=size)
        test = make_project(heldout, seed=7001 + 1000 * repeat + seed, size=size)
        pool_encoded = [encode(predictor, t) for t in pool]
        test_encoded = [encode(predictor, t) for t in test]
        embeddings = np.stack([image_embedding(features, pooling) for _, features, _ in pool_encoded])
        for order in ORDERS:
            rng = np.random.default_rng(9000 + 1000 * repeat + seed)
            learner = Learner(use_prototypes=True, config=config, prior=prior)
            left = list(range(pool_size))
            curve = []
            done = 0
            for step in steps:
                batch = step - done
                if batch > 0:
                    if order == "random":
                        picked = [left[i] for i in rng.choice(len(left), size=batch, replace=False)]
                    else:
                        scores = []
                        for i in left:
                            parts: dict = {}
                            predict(predictor, learner, *pool_encoded[i], parts, want=use)
                            scores.append(combine_scores(parts, use))
                        if order == "lowest score first":
                            chosen = list(np.argsort(scores, kind="stable")[:batch])
                        else:
                            chosen = select_diverse(scores, embeddings[left], batch, pool_factor)
                        picked = [left[int(i)] for i in chosen]
                    for i in picked:   # the annotator corrects each picked image
                        encoded, features, text_maps = pool_encoded[i]
                        before = predict(predictor, learner, encoded, features, text_maps)
                        learner.learn(f"{repeat}-{i}", features, text_maps, pool[i].masks,
                                      deleted_regions(before, pool[i].masks))
                        left.remove(i)
                    done = step
                curve.append(float(np.mean([image_iou(predict(predictor, learner, *enc), t.masks, (size, size))
                                            for t, enc in zip(test, test_encoded)])))
            out[order].append(curve)
    return out


def print_curves(out, steps: Sequence[int]) -> None:
    print("| Corrected images | " + " | ".join(str(k) for k in steps) + " | mean over steps |")
    print("|---|" + "---|" * (len(steps) + 1))
    for order, curves in out.items():
        arr = np.asarray(curves)
        print(f"| {order} | " + " | ".join(f"{m:.3f}" for m in arr.mean(axis=0)) + f" | {arr.mean():.3f} |")
    print()
    # Paired by project: the three orders share the pool, the held-out images and the model.
    base = np.asarray(out["select"])
    for other in ("random", "lowest score first"):
        diff = (base - np.asarray(out[other]))[:, 1:].mean(axis=1)     # per project, over steps after 0
        print(f"select minus {other}: mean held-out IoU over steps after 0, per project: "
              + ", ".join(f"{d:+.3f}" for d in diff) + f"; mean {diff.mean():+.3f}, "
              f"standard error {diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float('nan'):.3f}")


def plot_curves(out, steps: Sequence[int], path: Path, title: str) -> None:
    """The three orders' mean curves with their standard error over projects (drawn with PIL, like `plot`)."""
    table, errors = {}, {}
    for order, curves in out.items():
        arr = np.asarray(curves)
        table[order] = list(arr.mean(axis=0))
        errors[order] = list(arr.std(axis=0, ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else np.zeros(len(steps)))
    plot(table, path, title, steps=steps, errors=errors, legend="")


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


def plot(table: dict[str, list[float]], path: Path, title: str, steps: Sequence[int] = STEPS,
         errors: Optional[dict[str, list[float]]] = None, legend: str = "mean IoU, ") -> None:
    """A small line plot drawn with PIL (no plotting library needed); `errors`: +- bars per point."""
    width, height, margin = 560, 340, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    span = max(steps) - min(steps) or 1
    x_of = {k: margin + (k - min(steps)) * (width - 2 * margin) / span for k in steps}

    def y_of(v: float) -> float:
        return height - margin - v * (height - 2 * margin)

    draw.line([(margin, y_of(0)), (width - margin, y_of(0))], fill="black")
    draw.line([(margin, y_of(0)), (margin, y_of(1))], fill="black")
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.line([(margin - 4, y_of(v)), (width - margin, y_of(v))], fill=(225, 225, 225))
        draw.text((margin - 30, y_of(v) - 6), f"{v:.1f}", fill="black")
    for k in steps:
        draw.text((x_of[k] - 3, height - margin + 6), str(k), fill="black")
    draw.text((width / 2 - 70, height - margin + 22), "corrected images", fill="black")
    draw.text((margin, 12), title, fill="black")
    colours = [(200, 60, 40), (30, 110, 200), (40, 150, 60)]
    for index, ((arm, values), colour) in enumerate(zip(table.items(), colours)):
        points = [(x_of[k], y_of(v)) for k, v in zip(steps, values)]
        draw.line(points, fill=colour, width=3)
        for j, (x, y) in enumerate(points):
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
            if errors is not None:
                e = errors[arm][j] * (height - 2 * margin)
                draw.line([(x, y - e), (x, y + e)], fill=colour, width=1)
                draw.line([(x - 3, y - e), (x + 3, y - e)], fill=colour)
                draw.line([(x - 3, y + e), (x + 3, y + e)], fill=colour)
        draw.line([(width - 250, 34 + 16 * index), (width - 226, 34 + 16 * index)], fill=colour, width=3)
        draw.text((width - 220, 28 + 16 * index), f"{legend}{arm}", fill="black")
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
    parser.add_argument("--curve", action="store_true",
                        help="learning curves of three orders of correcting (random, lowest score, select)")
    parser.add_argument("--pool", type=int, default=48, help="--curve: unlabeled images to choose from")
    parser.add_argument("--duplicates", type=int, default=1, metavar="K",
                        help="--curve: a redundant pool, pool/K scenes each drawn K times as near-duplicates")
    parser.add_argument("--pool-factor", type=float, default=4.0, help="--curve: select's pool, x the batch")
    parser.add_argument("--pooling", default="mean", help="--curve: select's image embedding (mean, distinct)")
    parser.add_argument("--score", default="regions",
                        help="--curve: the task score's parts (comma-separated: regions, margin, agreement)")
    parser.add_argument("--project-tasks", type=int, default=10000,
                        help="--churn: tasks of the project each new version makes stale")
    args = parser.parse_args(argv)
    if args.curve and args.pool < CURVE_STEPS[-1]:
        parser.error(f"--curve corrects up to {CURVE_STEPS[-1]} images of the pool: --pool must be at least that")
    if args.duplicates < 1:
        parser.error("--duplicates must be >= 1")
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
    if args.curve:
        use = tuple(p.strip() for p in args.score.split(",") if p.strip())
        out = learning_curves(predictor, config, args.repeats, args.pool, args.heldout, args.size, args.seed,
                              args.prior, CURVE_STEPS, use, args.pool_factor, args.pooling, args.duplicates)
        redundancy = (f" ({math.ceil(args.pool / args.duplicates)} scenes x {args.duplicates} near-duplicates)"
                      if args.duplicates > 1 else "")
        print(f"Learning curves: {args.repeats} project(s), pool of {args.pool} unlabeled images{redundancy}, "
              f"{args.heldout} held-out images, {args.size} px, random-weight tiny ViT, score {'+'.join(use)}, "
              f"select pool factor {args.pool_factor:g}, {args.pooling} pooling, {time.perf_counter() - started:.0f} s")
        print()
        print_curves(out, CURVE_STEPS)
        if args.plot:
            title = ("Held-out mean IoU by order of correcting " if args.duplicates <= 1 else
                     f"Held-out IoU by order, pool of {args.duplicates} near-duplicates a scene ")
            plot_curves(out, CURVE_STEPS, args.plot, title + f"({args.repeats} projects, random-weight ViT)")
            print(f"plot: {args.plot} ({args.plot.stat().st_size // 1024} KiB)")
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
    print("Rank correlation (Spearman) between the task score and its IoU, held-out images "
          "(score: regions, the area-weighted mean region confidence):")
    print()
    print("| Corrected images | " + " | ".join(str(k) for k in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for arm in pairs:
        rhos = [spearman(task_scores(pairs[arm][k][0], ("regions",)), pairs[arm][k][1]) for k in STEPS]
        print(f"| {arm} | " + " | ".join("n/a" if math.isnan(r) else f"{r:+.2f}" for r in rhos) + " |")
    print()
    print_score_variants(pairs["calibration + prototypes"], args.repeats * args.heldout)
    if args.plot:
        plot(table, args.plot, "Held-out mean IoU, random-weight ViT (text knows nothing)")
        print(f"plot: {args.plot} ({args.plot.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
