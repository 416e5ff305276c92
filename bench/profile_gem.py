"""Where does a GEM forward spend its time? torch.profiler over one call, ours and the plain version.

    python -m bench.profile_gem [--image-size 448] [--threads 2] [--device cpu] [--top 15]
    python -m bench.profile_gem --precision bf16 --breakdown --threads 1   # op-by-op table of one precision

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


# Finer kinds for the op-by-op table of one precision (--breakdown); first match wins.
BREAKDOWN = (
    ("interpolation", ("upsample", "interpolate")),      # before "linear": upsample_bilinear2d
    ("attention: SDPA kernel", ("scaled_dot_product", "flash_attention")),
    ("attention: SDPA-free products (bmm)", ("bmm", "baddbmm")),
    ("attention: softmax / exp / row sums", ("softmax", "aten::exp", "aten::sum")),
    ("linear layers (qkv, out, MLP, proj)", ("addmm", "aten::mm", "linear", "matmul")),
    ("patch embedding (conv)", ("convolution",)),
    ("layer norms", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("L2 norms (GEM's n(z), temperature)", ("vector_norm", "aten::norm", "aten::div", "clamp")),
    ("dtype conversions (their data movement is in copy_)", ("_to_copy", "aten::to")),
    ("copies: copy_ (contiguous chunks, dtype widening), cat, repeat", ("copy_", "cat", "repeat", "index",
                                                                       "clone", "contiguous")),
)


# Inside the CPU bf16 road's chunked attention (gem_model.attention.ATTENTION_LABEL), by operator.
IN_ATTENTION = (
    ("attention: score and value products (bf16 GEMM)", ("bmm", "matmul", "mm")),
    ("attention: exp / softmax", ("exp", "softmax")),
    ("attention: normalisation (output / row sums)", ("div",)),
)


def _in_attention(event) -> bool:
    from gem_model.attention import ATTENTION_LABEL

    parent = event.cpu_parent
    while parent is not None:
        if parent.name == ATTENTION_LABEL:
            return True
        parent = parent.cpu_parent
    return False


def breakdown(prof, label: str) -> float:
    events = [e for e in prof.events() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    kinds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        if _in_attention(e):
            kind = next((k for k, needles in IN_ATTENTION if any(n in e.name for n in needles)),
                        "attention: other (copies, bias)")
        else:
            kind = next((k for k, needles in BREAKDOWN if any(n in e.name for n in needles)),
                        "other element-wise (add, mul, ...)")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total
        counts[kind] = counts.get(kind, 0) + 1
    print(f"\n{label}: {total / 1e3:.0f} ms of operator self time, {len(events)} operator calls")
    print("| kind | calls | ms | share |\n|---|---:|---:|---:|")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {counts[kind]} | {t / 1e3:.0f} | {t / total:.0%} |")
    return total


def main_breakdown(args) -> int:
    """One precision, three phases profiled apart: the image path, the text side (3 new prompts),
    the similarity with the text cached (einsum + bilinear upsampling to the input size)."""
    import gem_model

    torch.manual_seed(0)
    model = gem_model.create_gem_model("ViT-B-16", None, device=args.device, precision=args.precision)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    prompts = ["cat", "remote control", "a red car"]
    print(f"ViT-B/16 random weights, {args.precision}, {args.image_size}x{args.image_size}, 1 image, 3 prompts, "
          f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load {os.getloadavg()[0]:.2f}")
    device = torch.device(args.device)
    counter = iter(range(10**9))
    features = model.encode_image(x)
    totals = {"image path (encode_image)": breakdown(profile_call(lambda: model.encode_image(x), device),
                                                     "image path (encode_image)")}
    totals["text side (3 new prompts)"] = breakdown(
        profile_call(lambda: model.encode_text([f"{p} {next(counter)}" for p in prompts]), device),
        "text side (3 new prompts, fp32 compute)")
    totals["similarity (text cached)"] = breakdown(
        profile_call(lambda: model.similarity(features, prompts), device), "similarity (text cached)")
    print("\n| phase | ms |\n|---|---:|")
    for phase, t in totals.items():
        print(f"| {phase} | {t / 1e3:.0f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--breakdown", action="store_true",
                        help="one precision only: time per kind of operator, image path / text / similarity apart")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.breakdown:
        return main_breakdown(args)
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
