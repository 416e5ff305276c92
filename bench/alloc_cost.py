"""What the allocator setting costs in CPU on the real model: glibc's mmap threshold at 256 KiB (the
default since issue 26) against 1 MiB (the earlier fixed value), interleaved in one process.

    python -m bench.alloc_cost                       # ViT-B-16 random weights, 448 px, 6 rounds x 2 x 5 images
    python -m bench.alloc_cost --image-size 224 --rounds 8 --block 10

A lower threshold sends more allocations to mmap/munmap (a system call and page faults each), which
costs CPU; a higher one leaves them in the heap, where they fragment (docs/PERFORMANCE.md, "Memory
over weeks"). The app runs in this process (Flask test client, the soak's requests: 800x600 photos,
each distinct, 3 labels x brush and polygon); the threshold is switched with mallopt() before each
block of `--block` requests, in ABBA order over the rounds so that drift (the feature cache
filling, the machine's load) falls on both settings alike. Printed: process CPU seconds (user +
system, all threads) and wall seconds per request, per setting, with the ratio 256 KiB / 1 MiB.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.soak import PhotoServer, load_average, predict_body, server_env  # noqa: E402

SETTINGS = {"256 KiB": 256 << 10, "1 MiB": 1 << 20}


def set_threshold(nbytes: int) -> None:
    from backend.memory import M_MMAP_THRESHOLD, _glibc

    libc = _glibc()
    if libc is None or libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(nbytes)) != 1:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) is not available here (glibc only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-b-16")
    parser.add_argument("--image-size", type=int, default=None, help="GEM_IMAGE_SIZE (default: the backend's)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each runs a block of both settings")
    parser.add_argument("--block", type=int, default=5, help="requests per block")
    parser.add_argument("--warmup", type=int, default=3, help="requests before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    args.server_env, args.broken_every = [], 0

    print(f"alloc_cost: model {args.model}, GEM_IMAGE_SIZE {args.image_size or 'default'}, {args.rounds} rounds x "
          f"{args.block} requests per setting; load average {load_average()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="gem-alloc-") as tmp:
        photos = PhotoServer(800, 600, 0)
        try:
            os.environ.update(server_env(args, Path(tmp), "alloc"))
            from backend.server import create_app
            from backend.settings import Settings

            app = create_app(Settings.from_env())
            app.extensions["gem"].model.wait_until_ready(600)
            client = app.test_client()
            counter = iter(range(1, 10**9))

            def one() -> None:
                i = next(counter)
                reply = client.post("/predict", json=predict_body(f"{photos.url}/img/{i}.jpg", i))
                if reply.status_code != 200:
                    raise SystemExit(f"request {i}: HTTP {reply.status_code}: {reply.get_data(as_text=True)[:300]}")

            set_threshold(SETTINGS["256 KiB"])
            for _ in range(args.warmup):
                one()
            cpu: dict[str, list[float]] = {k: [] for k in SETTINGS}
            wall: dict[str, list[float]] = {k: [] for k in SETTINGS}
            names = list(SETTINGS)
            for r in range(args.rounds):
                for name in (names if r % 2 == 0 else names[::-1]):     # ABBA
                    set_threshold(SETTINGS[name])
                    c0, w0 = time.process_time(), time.perf_counter()
                    for _ in range(args.block):
                        one()
                    cpu[name].append((time.process_time() - c0) / args.block)
                    wall[name].append((time.perf_counter() - w0) / args.block)
                print(f"  round {r + 1}: " + ", ".join(f"{k} cpu {cpu[k][-1]:.2f} s wall {wall[k][-1]:.2f} s"
                                                      for k in names), flush=True)
            import atexit
            finisher = app.extensions["gem"].finisher
            finisher.close()   # now, while its MODEL_DIR (a temporary folder) still exists, not at exit
            atexit.unregister(finisher.close)
        finally:
            photos.close()
    for k in names:
        print(f"{k:>8}: CPU {statistics.mean(cpu[k]):.3f} s per request (rounds {min(cpu[k]):.3f}-{max(cpu[k]):.3f}), "
              f"wall {statistics.mean(wall[k]):.3f} s")
    ratios = [a / b for a, b in zip(cpu["256 KiB"], cpu["1 MiB"])]
    print(f"CPU 256 KiB / 1 MiB: {statistics.mean(cpu['256 KiB']) / statistics.mean(cpu['1 MiB']):.3f} "
          f"(per round {min(ratios):.3f}-{max(ratios):.3f}); load average {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
