"""Where does a GEM forward spend its time? torch.profiler over one call, ours and the plain version.

    python -m bench.profile_gem [--image-size 448] [--threads 2] [--device cpu] [--top 15]

Prints, for each implementation, the time per kind of work (attention, matrix products,
element-wise and copies) and the top operators by self time.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

KINDS = {
    "attention (SDPA, bmm, softmax)": ("scaled_dot_product", "flash_attention", "efficient_attention",
                                       "bmm", "softmax", "baddbmm", "multi_head_attention"),
    "matrix products (linear, mm)": ("addmm", "aten::mm", "matmul", "linear", "convolution"),
}


def kind_of(name: str) -> str:
    for kind, needles in KINDS.items():
        if any(n in name for n in needles):
            return kind
    return "element-wise, norms, copies"


def profile_call(fn, device: torch.device):
    fn()   # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def summarize(prof, label: str, top: int, device: torch.device) -> None:
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + getattr(e, attr)
    print(f"\n## {label}: {total / 1e3:.0f} ms of operator self time")
    print("| kind | ms | share |\n|---|---:|---:|")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t / 1e3:.0f} | {t / total:.0%} |")
    print("\n| top operators | calls | ms | input shapes |\n|---|---:|---:|---|")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        shapes = str(e.input_shapes)[:70].replace("|", "/")
        print(f"| {e.key} | {e.count} | {getattr(e, attr) / 1e3:.0f} | {shapes} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import gem_model
    from bench.plain_gem import plain_gem_maps

    torch.manual_seed(0)
    model = gem_model.create_gem_model("ViT-B-16", None, device=str(device), precision=args.precision)
    x = torch.randn(1, 3, args.image_size, args.image_size).to(device)
    prompts = ["cat", "remote control", "a red car"]
    print(f"ViT-B/16 random weights, {args.image_size}x{args.image_size}, 1 image, 3 prompts, "
          f"{device.type}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    counter = iter(range(10**9))

    def ours():   # a new set of prompts each call: the text is encoded too, as in the plain version
        n = next(counter)
        return model(x, [f"{p} {n}" for p in prompts], normalize=False)

    summarize(profile_call(ours, device), "ours (gem_model)", args.top, device)
    summarize(profile_call(lambda: plain_gem_maps(model.clip, model.tokenizer, x, prompts), device),
              "plain (bench/plain_gem.py)", args.top, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
