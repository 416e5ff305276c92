"""fp32 against bf16 (and int8) on the product's path: speed ratio, pixel agreement, mask IoU.

    python -m bench.bench_precision                  # ViT-B/16 random weights, 448 px, 3 prompts
    python -m bench.bench_precision --repeats 5 --threads 1 --no-int8

The path timed is what a /predict runs per image: `HeatmapPredictor.encode` (feature cache off)
+ `similarity` for 3 prompts (text cache warm, as in a running server). Contenders alternate
inside one loop (order reversed every other round); each round records wall time and this
process's CPU time, and ratios are medians of per-round ratios. On a shared machine the CPU-time
ratio at 1 thread is the steadier figure: waiting for a core does not count in it.

Agreement, against fp32, on synthetic scenes (a textured shape on a busy background, the
scenes of tests/test_refine.py rendered at 448-640 px):
  pixels  share of pixels whose best prompt (argmax over the 3 maps) is the same
  IoU     per prompt, IoU of the product's region masks (`extract_regions`, min_similarity -1 so
          that every prompt gets regions from these random-weight maps); mean and minimum over
          prompts x scenes, and pooled (all intersections / all unions: big masks weigh more)

int8: `torch.ao.quantization.quantize_dynamic` of the image tower's Linear modules (MLPs and
attention out-projections; the qkv in-projection is a bare parameter and stays fp32, as does the
text tower), weights int8, activations quantised per call.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["cat", "remote control", "a red car"]


def _scene_module():
    spec = importlib.util.spec_from_file_location("refine_scenes", ROOT / "tests" / "test_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scenes(count: int) -> list[np.ndarray]:
    """RGB uint8 images: one-shape scenes at 448 px, two-shape scenes at 640 px (model input 448x448)."""
    module = _scene_module()
    images = []
    for seed in range(count):
        if seed % 2 == 0:
            images.append(module.make_scene(seed, size=448, patch=16)[0])
        else:
            images.append(module.make_two_label_scene(seed, size=640, patch=16)[0])
    return images


def build_models(int8: bool):
    """{name: GemModel} sharing one set of random weights (seed 0)."""
    from gem_model.factory import load_clip
    from gem_model.model import GemModel

    torch.manual_seed(0)
    clip, tokenizer = load_clip("ViT-B-16", None)
    clip = clip.eval()
    models = {"fp32": GemModel(clip, tokenizer).eval(),
              "bf16": GemModel(copy.deepcopy(clip), tokenizer).to(torch.bfloat16).eval()}
    if int8:
        from torch.ao.quantization import quantize_dynamic
        from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

        # The image tower only: open_clip's text tower reads its MLP weight's dtype, which a
        # quantised Linear does not have, and the text side is cached anyway.
        quantised = copy.deepcopy(clip)
        quantised.visual = quantize_dynamic(quantised.visual, {torch.nn.Linear, NonDynamicallyQuantizableLinear},
                                            dtype=torch.qint8)
        models["int8"] = GemModel(quantised, tokenizer).eval()
    return models


def masks_of(maps: np.ndarray, config) -> list[np.ndarray]:
    from gem_model.regions import extract_regions

    found = extract_regions(maps, PROMPTS, config)
    out = []
    for label in PROMPTS:
        mask = np.zeros(maps.shape[-2:], dtype=bool)
        for region in found.regions:
            if region.label == label:
                mask |= region.mask
        out.append(mask)
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, union = overlap(a, b)
    return 1.0 if union == 0 else inter / union


def run(repeats: int, threads: int, scene_count: int, int8: bool) -> str:
    import gem_model
    from gem_model.regions import RegionConfig

    if threads:
        torch.set_num_threads(threads)
    models = build_models(int8)
    predictors = {name: gem_model.HeatmapPredictor(m, image_size=448, cache_bytes=0) for name, m in models.items()}
    images = scenes(scene_count)

    def path(predictor, image):
        encoded = predictor.encode([image])[0]
        return predictor.similarity(encoded, PROMPTS)

    # Agreement (and warm-up: text caches, first-call costs).
    config = RegionConfig(min_similarity=-1.0)
    reference = [path(predictors["fp32"], image) for image in images]
    ref_masks = [masks_of(maps, config) for maps in reference]
    quality = {}
    for name in predictors:
        if name == "fp32":
            continue
        agree, ious, pooled = [], [], np.zeros(2)
        for image, ref, ref_m in zip(images, reference, ref_masks):
            maps = path(predictors[name], image)
            agree.append(float((maps.argmax(0) == ref.argmax(0)).mean()))
            for a, b in zip(masks_of(maps, config), ref_m):
                ious.append(iou(a, b))
                pooled += overlap(a, b)
        quality[name] = (agree, ious, pooled[0] / max(pooled[1], 1))

    wall = {name: [] for name in predictors}
    cpu = {name: [] for name in predictors}
    order = list(predictors)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            for image in images:
                path(predictors[name], image)
            wall[name].append((time.perf_counter() - w0) / len(images))
            cpu[name].append((time.process_time() - c0) / len(images))

    def ratio(values, name):
        if not values[name]:
            return float("nan")
        return statistics.median(a / b for a, b in zip(values[name], values["fp32"]))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"ViT-B/16 random weights, HeatmapPredictor encode (no feature cache) + similarity, "
             f"3 prompts, {len(images)} scenes (448x448 and 640x640 -> 448x448), "
             f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
             f"median of {repeats} interleaved rounds, load average after {load:.1f}",
             "",
             "| precision | wall ms/image | vs fp32 (wall) | CPU ms/image | vs fp32 (CPU) | best prompt = fp32 "
             "| mask IoU mean (min) | mask IoU pooled |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in predictors:
        w = statistics.median(wall[name]) * 1000 if wall[name] else float("nan")
        c = statistics.median(cpu[name]) * 1000 if cpu[name] else float("nan")
        if name == "fp32":
            lines.append(f"| fp32 | {w:.0f} | 1.00x | {c:.0f} | 1.00x | - | - | - |")
            continue
        agree, ious, pooled = quality[name]
        lines.append(f"| {name} | {w:.0f} | {ratio(wall, name):.2f}x | {c:.0f} | {ratio(cpu, name):.2f}x | "
                     f"{100 * statistics.mean(agree):.2f}% (min {100 * min(agree):.2f}%) | "
                     f"{statistics.mean(ious):.3f} ({min(ious):.3f}) | {pooled:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (0 = agreement only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 contender")
    args = parser.parse_args(argv)
    print(run(args.repeats, args.threads, args.scenes, not args.no_int8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
