"""Has the fp32 path grown slower? Current gem_model vs an older commit's vs bench/plain_gem.py.

    python -m bench.bench_plain_path                     # against 097c1f0 (before modes, sliding windows, PAMR)
    python -m bench.bench_plain_path --commit <sha> --threads 1 --repeats 5

The older commit's `gem_model/` is extracted with `git archive` into a temporary directory and
imported under another name, so both run in one process on the same weights (ViT-B/16 random,
448x448, 3 new prompts per call: image path + text + similarity). Contenders alternate, order
reversed every other round; ratios are medians of per-round ratios against the plain code, for wall
time and for this process's CPU time (the steadier one on a shared machine, at 1 thread).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPTS = ["cat", "remote control", "a red car"]


def import_old(commit: str, directory: str):
    archive = Path(directory) / "old.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "archive", commit, "gem_model"], cwd=ROOT, check=True, stdout=handle)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    (Path(directory) / "gem_model").rename(Path(directory) / "gem_model_old")
    sys.path.insert(0, directory)
    return importlib.import_module("gem_model_old.model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_plain_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="097c1f0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gem_model
    from bench.plain_gem import plain_gem_maps

    with tempfile.TemporaryDirectory() as directory:
        old_model = import_old(args.commit, directory)
        torch.manual_seed(0)
        new = gem_model.create_gem_model("ViT-B-16", None, device="cpu")
        old = old_model.GemModel(new.clip, new.tokenizer).eval()
        x = torch.randn(1, 3, 448, 448)
        counter = iter(range(10**9))

        def fresh():   # new prompts each call: the text is encoded, as in the plain code
            n = next(counter)
            return [f"{p} {n}" for p in PROMPTS]

        cases = {"current gem_model": lambda: new(x, fresh(), normalize=False),
                 f"gem_model at {args.commit}": lambda: old(x, fresh(), normalize=False),
                 "bench/plain_gem.py": lambda: plain_gem_maps(new.clip, new.tokenizer, x, PROMPTS)}
        with torch.inference_mode():
            a, b = new(x, PROMPTS, normalize=False), old(x, PROMPTS, normalize=False)
            p = plain_gem_maps(new.clip, new.tokenizer, x, PROMPTS)
            cpu = {k: [] for k in cases}
            wall = {k: [] for k in cases}
            for r in range(args.repeats):
                for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                    w0, c0 = time.perf_counter(), time.process_time()
                    cases[name]()
                    wall[name].append(time.perf_counter() - w0)
                    cpu[name].append(time.process_time() - c0)
    plain = "bench/plain_gem.py"
    print(f"ViT-B/16 random weights, 448x448, 3 new prompts, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds, load average after {os.getloadavg()[0]:.1f}; "
          f"max |current - {args.commit}| = {(a - b).abs().max().item():.1e}, "
          f"max |current - plain| = {(a - p).abs().max().item():.1e}\n")
    print("| implementation | CPU ms | vs plain (CPU) | wall ms | vs plain (wall) |\n|---|---:|---:|---:|---:|")
    for name in cases:
        rc = statistics.median(c / d for c, d in zip(cpu[name], cpu[plain]))
        rw = statistics.median(c / d for c, d in zip(wall[name], wall[plain]))
        print(f"| {name} | {statistics.median(cpu[name]) * 1000:.0f} | {rc:.2f}x | "
              f"{statistics.median(wall[name]) * 1000:.0f} | {rw:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
