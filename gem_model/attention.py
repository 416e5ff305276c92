"""The maths of GEM's self-self attention, as small pure functions.

Notation follows the paper (Bousselham et al., "Grounding Everything", CVPR 2024, Sec. 3):
tokens z in {q, k, v} of one head, n(z) = z / ||z||_2 over the head dimension, temperature t.

    iteration (Eq. 4, repeated `iterations` times):   z <- softmax(t * n(z) n(z)^T) n(z)
    self-self attention output (Eq. 5):               o_z = softmax(t * n(z) n(z)^T) v
    ensemble over the three paths (Eq. 6):            o = (o_q + o_k + o_v) / 3
    adaptive temperature (Sec. 3.3):                  t = mean_n ||y_n||_2 * d^-1/2

All attention products go through `scaled_dot_product_attention`, which picks a fused kernel
when torch has one for the device and dtype. The temperature is folded into the query
(softmax((t a) b^T) == softmax(t a b^T)) so that one call can carry a different t per image.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

# Guards the L2 normalisation of an all-zero token (never seen with real weights, possible
# with padded inputs); small enough not to move any real value.
_NORM_EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=_NORM_EPS)


def adaptive_temperature(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-image temperature from the block's normalised input tokens.

    y: [B, N, C] tokens after the block's first LayerNorm. Returns [B].
    """
    return y.norm(dim=-1).mean(dim=-1) * head_dim ** -0.5


def _temperature_tensor(temperature: Union[float, torch.Tensor], batch: int,
                        like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"temperature must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t


def self_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        temperature: Union[float, torch.Tensor], iterations: int = 1) -> torch.Tensor:
    """GEM's q-q, k-k and v-v attention, averaged (Eqs. 4-6).

    q, k, v: [B, H, N, d] per-head projections of the block input.
    temperature: a float or a [B] tensor (one value per image).
    Returns o: [B, H, N, d].
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    batch = q.shape[0]
    t = _temperature_tensor(temperature, batch, q).view(1, batch, 1, 1, 1)
    # The three paths are independent and share shapes: stack them and run each attention
    # product once for all three, [3, B, H, N, d].
    z = torch.stack((q, k, v))
    for _ in range(iterations):
        zn = l2_normalize(z)
        z = _normalized_attention(zn, t, zn)
    out = _normalized_attention(l2_normalize(z), t, v.unsqueeze(0).expand_as(z))
    return out.mean(dim=0)


def _normalized_attention(zn: torch.Tensor, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(t * zn zn^T) values, for zn, values [3, B, H, N, d] and t [1, B, 1, 1, 1]."""
    out = F.scaled_dot_product_attention(
        (zn * t).flatten(0, 1), zn.flatten(0, 1), values.flatten(0, 1), scale=1.0)
    return out.view_as(values)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]"""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
