"""Time the whole post-processing (similarity maps -> regions) on one 1920x1080 image with 10 labels.

    python bench/bench_regions.py [--repeats 5] [--height 1080 --width 1920 --labels 10] [--full-size]

Prints a Markdown table (wall time, median and best, and CPU time per configuration). The maps are synthetic
but shaped like GEM's: one value per 16 px patch of a 448 px-short-side input (a 28 x 50 grid for
16:9), bilinearly upsampled to the working resolution (`RegionConfig.work_scale` x the grid, as the
backend does) with the image reduced to it as the refinement guide, one object per label plus noise.
`--full-size` times the former path instead: maps and image at the original size.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem_model.regions import RegionConfig, extract_regions, working_size  # noqa: E402


def synthetic_inputs(height: int, width: int, num_labels: int, seed: int = 0, work=None):
    """(sims float32 [L, h, w], image uint8 [h, w, 3]) with one ellipse-shaped object per label, at the
    working size `work` = (h, w) (default: the image size)."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (width, height))
    pixels = (rng.normal(128, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(pixels))
    draw = ImageDraw.Draw(canvas)
    masks = []
    for _ in range(num_labels):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        rx, ry = rng.uniform(0.04, 0.12) * width, rng.uniform(0.05, 0.15) * height
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        mask_img = Image.new("L", (width, height))
        ImageDraw.Draw(mask_img).ellipse(box, fill=255)
        masks.append(np.asarray(mask_img) > 0)
    grid_h = 28
    grid_w = max(1, round(grid_h * width / height)) if width >= height else 28
    if height > width:
        grid_h = max(1, round(28 * height / width))
    h, w = work or (height, width)
    sims = np.empty((num_labels, h, w), dtype=np.float32)
    for index, mask in enumerate(masks):
        coarse = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((grid_w, grid_h), Image.BOX))
        coarse = 0.12 + 0.2 * coarse + rng.normal(0, 0.015, coarse.shape).astype(np.float32)
        sims[index] = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR))
    return sims, np.asarray(canvas.resize((w, h), Image.BOX) if (h, w) != (height, width) else canvas)


def time_call(fn, repeats: int) -> tuple[float, float, float]:
    """(median wall s, best wall s, median CPU s). CPU time is the steadier figure on a shared machine."""
    fn()  # warm-up: first-call imports and allocations
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-size", action="store_true", help="maps and image at the original size")
    args = parser.parse_args(argv)

    short = min(args.height, args.width)
    grid = (round(28 * args.height / short), round(28 * args.width / short))     # 448 px input, 16 px patches
    size = (args.height, args.width)
    labels = [f"label{i}" for i in range(args.labels)]
    base = RegionConfig()
    configs = [
        ("semantic", dataclasses.replace(base, mode="semantic")),
        ("semantic, instances", dataclasses.replace(base, mode="semantic", instances=True)),
        ("semantic + guided refine", dataclasses.replace(base, mode="semantic", refine="guided")),
        ("independent", dataclasses.replace(base, mode="independent")),
        ("independent + guided refine", dataclasses.replace(base, mode="independent", refine="guided")),
    ]
    print(f"{args.width}x{args.height}, {args.labels} labels, median / best of {args.repeats}")
    print("| Configuration | Maps | Regions | Wall, median (s) | Wall, best (s) | CPU, median (s) |")
    print("|---|---|---|---|---|---|")
    for name, config in configs:
        work = None if args.full_size else working_size(size, grid, config)
        sims, image = synthetic_inputs(args.height, args.width, args.labels, work=work)
        result = extract_regions(sims, labels, config, image=image, size=size)
        median, best, cpu = time_call(lambda: extract_regions(sims, labels, config, image=image, size=size),
                                      args.repeats)
        print(f"| {name} | {sims.shape[2]}x{sims.shape[1]} | {len(result.regions)} | {median:.3f} | {best:.3f} | "
              f"{cpu:.3f} |")

if __name__ == "__main__":
    main()
