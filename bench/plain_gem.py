"""GEM written the straightforward way: the baseline the benchmark measures `gem_model` against.

The same equations as gem_model/attention.py (Bousselham et al., CVPR 2024, Eqs. 4-6), coded the
way one first writes them down: explicit q, k, v per block, explicit softmax(Q K^T) matmuls,
each of the q-q, k-k, v-v paths computed on its own, the original path run in full (last MLP
included) through open_clip's own blocks, and the text encoded on every call. No caching, no
fused kernels, no stacking. It shares only the weights with the optimised model.

It is also the second, independent implementation that tests/test_perf_equivalence.py holds the
optimised model to (fp32 results within 1e-4).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)    # [B, H, N, d]


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)                 # [B, N, H*d]


def _positional_embedding(visual, grid: tuple[int, int]) -> torch.Tensor:
    pos = visual.positional_embedding
    native = tuple(visual.grid_size)
    if grid == native:
        return pos
    patch = pos[1:].reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", antialias=True, align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], patch])


@torch.inference_mode()
def plain_gem_maps(clip, tokenizer, images: torch.Tensor, prompts: Sequence[str], gem_depth: int = 7,
                   ss_attn_iter: int = 1, ss_attn_temp: Optional[float] = None,
                   prompt_template: str = "a photo of a {}.", return_ori: bool = False) -> torch.Tensor:
    """[B, 3, H, W] preprocessed images -> raw cosine-similarity maps [B, P, H, W]."""
    visual = clip.visual
    weight = visual.conv1.weight
    images = images.to(device=weight.device, dtype=weight.dtype)
    b, _, height, width = images.shape

    # Patch embedding, class token, positional embedding (resampled to the grid), ln_pre.
    x = visual.conv1(images)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
    x = visual.ln_pre(x + _positional_embedding(visual, grid).to(x.dtype))

    blocks = visual.transformer.resblocks
    first = len(blocks) - (gem_depth - 1)
    batch_first = getattr(visual.transformer, "batch_first", True)
    for block in blocks[:first]:
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)

    g = x
    for block in blocks[first:]:
        attn = block.attn
        heads = attn.num_heads
        y = block.ln_1(x)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)   # [B, H, N, d]
        d = q.shape[-1]
        if ss_attn_temp is None:
            t = (y.norm(dim=-1).mean(dim=-1) / d ** 0.5).view(b, 1, 1, 1)
        else:
            t = ss_attn_temp

        outputs = []
        for z in (q, k, v):
            for _ in range(ss_attn_iter):                                              # Eq. 4
                zn = _unit(z)
                z = torch.softmax(t * (zn @ zn.transpose(-1, -2)), dim=-1) @ zn
            zn = _unit(z)
            outputs.append(torch.softmax(t * (zn @ zn.transpose(-1, -2)), dim=-1) @ v)  # Eq. 5
        o = (outputs[0] + outputs[1] + outputs[2]) / 3                                  # Eq. 6
        g = g + block.ls_1(attn.out_proj(_merge(o)))

        a = torch.softmax((q @ k.transpose(-1, -2)) / d ** 0.5, dim=-1) @ v
        x = x + block.ls_1(attn.out_proj(_merge(a)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))

    tokens = visual.ln_post((x if return_ori else g)[:, 1:])
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    tokens = _unit(tokens.float()).reshape(b, grid[0], grid[1], -1)

    text = tokenizer([prompt_template.format(p) for p in prompts]).to(weight.device)
    text = _unit(clip.encode_text(text).float())
    sims = torch.einsum("bhwd,pd->bphw", tokens, text)
    return F.interpolate(sims, size=(height, width), mode="bilinear", align_corners=False)
