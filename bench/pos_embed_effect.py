"""What the authors' positional-embedding resize changes against the antialiased one.

    python -m bench.pos_embed_effect [--images 4] [--seed 0]

For the patch grids each protocol meets with ViT-B/16 (native 14 x 14), it prints:
  shift:   the largest distance, in source patches, between where the two resizes sample
           ((i + 0.5) g0 / g - 0.5 against (i + 0.5) g0 / (g + 0.1) - 0.5);
  smooth:  the relative L2 difference of the two resized embeddings for a smooth embedding
           (2-D sinusoids of periods 3-14 patches; trained CLIP embeddings are smooth);
  random:  the same for open_clip's random-init embedding (white noise: the worst case);
  maps:    ViT-B/16 with random weights, the protocol's method: relative L2 difference of the
           cosine maps of 21 random prompts-embeddings, and the share of pixels whose best of them
           changes, over `--images` synthetic images.
No published weights can be loaded here, so the map figures show what the code path does to an
untrained network, not what the published figures move by.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

# (label, method, input height, input width): the grids of each protocol's windows / inputs
CASES = [
    ("clearclip window 448x448", "clearclip", 448, 448),
    ("naclip VOC whole image 336x448", "naclip", 336, 448),
    ("naclip window 224x224 (native grid)", "naclip", 224, 224),
    ("gem 448x592", "gem", 448, 592),
    ("a 160x160 input (fewer patches than native)", "gem", 160, 160),
]


def sample_shift(g0: int, g: int) -> float:
    return max(abs(((i + 0.5) * g0 / g - 0.5) - ((i + 0.5) * g0 / (g + 0.1) - 0.5)) for i in range(g))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pos_embed_effect")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from gem_model.factory import load_clip
    from gem_model.model import GemModel, resize_patch_positions

    torch.manual_seed(args.seed)
    g0 = 14
    yy, xx = torch.meshgrid(torch.arange(g0, dtype=torch.float32), torch.arange(g0, dtype=torch.float32), indexing="ij")
    periods = torch.linspace(3, 14, 16)
    smooth = torch.stack([torch.sin(2 * math.pi * (yy * math.cos(k) + xx * math.sin(k)) / p + k)
                          for k, p in enumerate(periods.tolist())])[None]            # [1, 16, 14, 14]

    clip, tokenizer = load_clip("ViT-B-16", None)
    noise = clip.visual.positional_embedding[1:].detach().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    models = {}
    rng = np.random.default_rng(args.seed)
    print(f"| case | grid | shift (patches) | smooth pos. emb. | random pos. emb. | maps (rel. L2) | pixels changing best prompt |")
    print("|---|---|---|---|---|---|---|")
    for label, method, height, width in CASES:
        grid = (height // 16, width // 16)
        shift = max(sample_shift(g0, grid[0]), sample_shift(g0, grid[1])) if grid != (g0, g0) else 0.0
        pos = [relative(resize_patch_positions(e, grid, "authors"), resize_patch_positions(e, grid, "antialias"))
               if grid != (g0, g0) else 0.0 for e in (smooth, noise)]
        diffs, changed = [], []
        for how in ("antialias", "authors"):
            if (method, how) not in models:
                models[(method, how)] = GemModel(clip, tokenizer, mode=method, pos_embed_resize=how).eval()
        text = F.normalize(torch.randn(21, clip.visual.proj.shape[1]), dim=-1)
        for _ in range(args.images):
            image = torch.from_numpy(rng.normal(0, 1, (1, 3, height, width)).astype(np.float32))
            image = F.avg_pool2d(image, 9, stride=1, padding=4) * 3        # some spatial structure
            maps = [torch.einsum("bhwd,qd->bqhw", models[(method, how)].encode_image(image).gem, text)
                    for how in ("antialias", "authors")]
            diffs.append(relative(maps[1], maps[0]))
            changed.append(float((maps[0].argmax(1) != maps[1].argmax(1)).float().mean()))
        print(f"| {label} | {grid[0]}x{grid[1]} | {shift:.3f} | {100 * pos[0]:.2f} % | {100 * pos[1]:.2f} % | "
              f"{100 * np.mean(diffs):.2f} % | {100 * np.mean(changed):.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
