"""What each training-free mode costs here: ms per image, ViT-B/16, random weights.

    python -m bench.bench_modes                 # prints the table
    python -m bench.bench_modes --write docs/GEM.md   # and replaces the block between
                                                      # <!-- bench:modes:begin/end --> there
    python -m bench.bench_modes --device cuda

Contenders alternate inside one loop; medians of `--repeats` runs are reported (the machine may be
shared; the load average is printed with the figures). Speed does not depend on the weights' values.
Rows:
  image path at 448x448 for gem / clearclip / naclip (one image, batch 1)
  gem with sliding windows (448 crops, stride 224) on a 448x672 input (2 windows)
  PAMR, 10 iterations, dilations 1-24, on 21 class maps at 448x448 (the VOC evaluation's cost)
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def run(device_name: str, repeats: int, threads: int) -> str:
    from gem_model.factory import load_clip, resolve_device
    from gem_model.model import GemModel
    from gem_model.pamr import pamr

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    clip, tokenizer = load_clip("ViT-B-16", None)
    clip = clip.to(device).eval()
    models = {mode: GemModel(clip, tokenizer, mode=mode).eval() for mode in ("gem", "clearclip", "naclip")}
    slide = GemModel(clip, tokenizer, slide_crop=448, slide_stride=224).eval()
    square = torch.randn(1, 3, 448, 448, device=device)
    wide = torch.randn(1, 3, 448, 672, device=device)
    maps = torch.randn(1, 21, 448, 448, device=device)

    cases = {f"image path, {mode}, 448x448": (lambda m=m: m.encode_image(square)) for mode, m in models.items()}
    cases["image path, gem, 448x672 plain"] = lambda: models["gem"].encode_image(wide)
    cases["image path, gem, 448x672 slide 448/224 (2 windows)"] = lambda: slide.encode_image(wide)
    cases["PAMR 10 iterations, 21 maps, 448x448"] = lambda: pamr(square, maps, iterations=10)
    for fn in cases.values():       # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn, device))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [f"ViT-B/16, random weights, {device.type} ({what}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, median of {repeats} (min), load average {load:.1f}",
             "", "| case | ms |", "|---|---|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.0f} ({min(values):.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_modes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--write", default=None, help="markdown file with a bench:modes block to replace")
    args = parser.parse_args(argv)
    table = run(args.device, args.repeats, args.threads)
    print(table)
    if args.write:
        path = Path(args.write)
        tag = f"bench:modes:{args.device.split(':')[0]}"
        text = path.read_text()
        block = f"<!-- {tag}:begin -->\n{table}\n<!-- {tag}:end -->"
        pattern = re.compile(rf"<!-- {re.escape(tag)}:begin -->.*?<!-- {re.escape(tag)}:end -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no <!-- {tag}:begin/end --> block")
        path.write_text(pattern.sub(lambda _: block, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
