"""The maths of GEM's self-self attention, as small pure functions.

Notation follows the paper (Bousselham et al., "Grounding Everything", CVPR 2024, Sec. 3):
tokens z in {q, k, v} of one head, n(z) = z / ||z||_2 over the head dimension, temperature t.

    iteration (Eq. 4, repeated `iterations` times):   z <- softmax(t * n(z) n(z)^T) n(z)
    self-self attention output (Eq. 5):               o_z = softmax(t * n(z) n(z)^T) v
    ensemble over the three paths (Eq. 6):            o = (o_q + o_k + o_v) / 3
    adaptive temperature (Sec. 3.3):                  t = mean_n ||y_n||_2 * d^-1/2

Layout, chosen so that nothing is copied that need not be (see docs/PERFORMANCE.md): the block's
in-projection gives [B, N, 3*H*d] = q | k | v, which *is* a [B, N, 3H, d] tensor. Read that way
the three paths are just 3H heads of one attention, so each attention product of Eqs. 4-5 is a
single `scaled_dot_product_attention` call over all three paths (and, in the final product, the
block's original softmax(q k^T / sqrt(d)) v as H more heads: it has the same values v). SDPA picks
a fused kernel (flash on CPU and CUDA) that never materialises the N x N attention matrix.
The temperature is folded into the query (softmax((t a) b^T) == softmax(t a b^T)) so that one
call can carry a different t per image.

bf16 on CPU takes another road (`lowp_cpu`): torch's CPU flash kernel gains nothing from bf16
without AMX (measured: 36 heads at 785 tokens, 74 ms in bf16 against 59 ms in fp32), while bf16
matrix products run ~2.6x faster than fp32 on CPUs with AVX512-BF16. So the attention is computed
explicitly, softmax(scale q k^T) v, a few heads at a time: each chunk's score matrices stay within
~3 MiB (L2/L3), the two products go to oneDNN's bf16 GEMM, the softmax reads and writes bf16
(accumulating in fp32 inside). 30 ms for the same 36 heads at one thread. In GEM's final product
the three paths share the values v (laid out once, three times over), and the softmax's row sums
come out of the value product itself (docs/PERFORMANCE.md, "bf16 on CPU").
"""
from __future__ import annotations

from typing import Optional, Union

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
    # In fp32 whatever y's precision: a bf16 norm of 768 values is off by up to ~0.4%.
    return torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).mean(dim=-1) * head_dim ** -0.5


def _temperature_tensor(temperature: Union[float, torch.Tensor], batch: int,
                        like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"temperature must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t


# Score bytes the CPU bf16 path materialises at once at one torch thread: two heads of one 448x448
# image (785 tokens, 2.4 MB) measured fastest (1 head: 34 ms, 2: 30 ms, 4: 35 ms, 8: 128 ms for 36
# heads), i.e. as long as a chunk's scores stay in cache.
CPU_SCORE_BYTES = 3 * 2**20
# At 2+ threads: the whole call in one chunk up to this (36 heads at 785 tokens: 44 MB). Each
# operator is an OpenMP parallel region that ends when every thread has run its share; on a host
# busier than its cores a descheduled thread makes each region wait ~10-20 ms (measured: 100 tiny
# exp calls, 23 ms at 1 thread, 1.4 s at 2 threads under a load of 17 on 2 cores), so at 2+
# threads fewer, larger operators win over cache-sized ones (docs/PERFORMANCE.md, "bf16 on CPU").
CPU_SCORE_BYTES_THREADED = 64 * 2**20
# Which of the two at 2+ threads: "cache" (default: measured best on a machine whose cores are
# free, bf16 0.37x fp32 at 2 threads against 0.56x with whole calls) or "whole" (a host with more
# busy threads than cores: 0.80-0.89x against 1.99x). `set_cpu_chunking`; GEM_BF16_CHUNKS.
CPU_CHUNKINGS = ("cache", "whole")
_cpu_chunking = "cache"


def set_cpu_chunking(mode: str) -> None:
    """How the CPU bf16 attention splits its heads at 2+ torch threads: "cache" (cache-sized
    chunks, as at one thread) or "whole" (each call one chunk up to CPU_SCORE_BYTES_THREADED)."""
    global _cpu_chunking
    if mode not in CPU_CHUNKINGS:
        raise ValueError(f"CPU chunking must be one of {CPU_CHUNKINGS}, got {mode!r}")
    _cpu_chunking = mode


def lowp_cpu(x: torch.Tensor) -> bool:
    """True where attention takes the explicit, chunked bf16 road (see the module docstring)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _heads_per_chunk(batch: int, n_query: int, n_key: int, element_size: int, heads: int,
                     threads: Optional[int] = None) -> int:
    """Heads whose scores are materialised at once: a cache-sized chunk (`CPU_SCORE_BYTES`), or,
    at 2+ torch threads with `set_cpu_chunking("whole")`, as few chunks as
    `CPU_SCORE_BYTES_THREADED` allows."""
    threads = threads or torch.get_num_threads()
    whole = threads > 1 and _cpu_chunking == "whole"
    budget = CPU_SCORE_BYTES_THREADED if whole else CPU_SCORE_BYTES
    per_head = batch * n_query * n_key * element_size
    return max(1, min(heads, budget // max(per_head, 1)))


# exp(80) ~ 5.5e34: with scores at most this, unnormalised exp(scores) and their row sums over
# thousands of tokens stay far below bf16's (= fp32's) largest value, 3.4e38.
_EXP_SAFE_BOUND = 80.0


def _heads_major(x: torch.Tensor, scale: float = 1.0, extra_ones: bool = False, repeat: int = 1) -> torch.Tensor:
    """[B, N, heads, d] (any strides) -> a contiguous [B, repeat * heads, N, d] copy (the heads
    `repeat` times over), times `scale`, in one pass; extra_ones: a last column of ones,
    [..., d + 1] (see `_chunked_attention`)."""
    b, n, heads, d = x.shape
    out = x.new_empty(b, repeat, heads, n, d + 1 if extra_ones else d)
    body = out[..., :d] if extra_ones else out
    src = x.transpose(1, 2).unsqueeze(1).expand(b, repeat, heads, n, d)
    if scale != 1.0:
        torch.mul(src, scale, out=body)
    else:
        body.copy_(src)
    if extra_ones:
        out[..., d] = 1
    return out.flatten(1, 2)


def _chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       bias: Optional[torch.Tensor] = None,
                       score_bound: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * query key^T + bias) value, explicitly, a few heads at a time.

    query, key: [B, N, heads, d]; value: [B, N, heads / r, dv], its heads shared by r groups of
    query heads (GEM's three paths share v); bias: [N, N] or None.
    score_bound: a known upper bound of every score (GEM's self-self scores t cos <= t). Up to
    `_EXP_SAFE_BOUND` the softmax's max pass is skipped: the output is exp(S) v / rowsum(exp(S)),
    and the row sums come out of the same product as a last column of v made of ones
    (exp(S) [v | 1] = [exp(S) v | rowsum], accumulated in fp32 by the GEMM), so the [N, N]
    weights are read once, by the product.
    Returns [B, N, heads, dv] (a heads-major tensor seen tokens-major: not contiguous).

    Every operator here is one OpenMP parallel region; q, k, v are laid out heads-major once (one
    copy each) so that a chunk is a contiguous slice, and per chunk there are four operators (two
    GEMMs, exp, the division) writing into the output in place. Fewer operators matter at 2+
    threads on a busy host, where each region waits for every thread to be scheduled
    (docs/PERFORMANCE.md, "bf16 on CPU").
    """
    b, n, heads, _ = query.shape
    dv = value.shape[-1]
    if heads % value.shape[2]:
        raise ValueError(f"{heads} query heads cannot share {value.shape[2]} value heads")
    unnormalised = bias is None and score_bound is not None and score_bound <= _EXP_SAFE_BOUND
    q = _heads_major(query, scale)                                            # [B, heads, N, d]
    k = _heads_major(key) if key is not query or scale != 1.0 else q
    v = _heads_major(value, extra_ones=unnormalised, repeat=heads // value.shape[2])  # [B, heads, N, dv(+1)]
    out = value.new_empty(b, heads, n, dv)
    step = _heads_per_chunk(b, n, key.shape[1], query.element_size(), heads)
    with torch.profiler.record_function(ATTENTION_LABEL):     # bench/profile_gem.py --breakdown
        _chunk_loop(q, k, v, out, bias, unnormalised, dv, step)
    return out.transpose(1, 2)


# The profiler label of the chunked products (free when no profiler runs).
ATTENTION_LABEL = "gem::bf16_attention_chunks"


def _chunk_loop(q, k, v, out, bias, unnormalised, dv, step):
    heads = q.shape[1]
    for start in range(0, heads, step):
        chunk = slice(start, start + step)
        scores = torch.matmul(q[:, chunk], k[:, chunk].transpose(-1, -2))    # [B, h, N, N]
        if unnormalised:
            o = torch.matmul(scores.exp_(), v[:, chunk])                     # [B, h, N, dv + 1]
            torch.div(o[..., :dv], o[..., dv:], out=out[:, chunk])
        else:
            if bias is not None:
                scores += bias
            torch.matmul(torch.softmax(scores, dim=-1), v[:, chunk], out=out[:, chunk])


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale * query key^T) value per head, tokens-major layout in and out.

    query, key, value: [B, N, heads, d] (any strides with a contiguous last dim: the transposes
    below are views, and the fused kernels read strided inputs). Returns [B, N, heads, d]; with
    the CPU and CUDA flash kernels that result is contiguous, so merging heads is free.
    scale: None = 1/sqrt(d), as SDPA.
    """
    if lowp_cpu(query):
        return _chunked_attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                         value.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def multi_head_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """A ViT block's own attention, softmax(q k^T / sqrt(d)) v, from its in-projection output.

    qkv: [B, N, 3*H*d] (q | k | v). Returns [B, N, H*d], heads merged (before out_proj).
    """
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).unbind(2)                     # [B, N, H, d] views
    return attend(q, k, v).reshape(b, n, -1)


def self_self_attention(qkv: torch.Tensor, heads: int, temperature: Union[float, torch.Tensor],
                        iterations: int = 1, original: bool = False
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """GEM's q-q, k-k and v-v attention, averaged (Eqs. 4-6), from a block's in-projection output.

    qkv: [B, N, 3*H*d] (q | k | v, as nn.MultiheadAttention's in_proj lays them out).
    temperature: a float or a [B] tensor (one value per image).
    original: also return the block's own attention output (shares the final product's values).
    Returns (o [B, N, H*d], original attention [B, N, H*d] or None), heads merged.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    b, n, width3 = qkv.shape
    d = width3 // (3 * heads)
    t = _temperature_tensor(temperature, b, qkv).view(b, 1, 1, 1)
    z = qkv.reshape(b, n, 3 * heads, d)       # the q, k and v paths as 3H heads, a view
    q, k, v = z.split(heads, dim=2)           # [B, N, H, d] views

    if lowp_cpu(qkv):
        t32 = _temperature_tensor(temperature, b, qkv.new_empty(0, dtype=torch.float32))
        return _self_self_attention_lowp(z, q, k, v, heads, t32, iterations, original)
    for _ in range(iterations):               # Eq. 4
        zn = l2_normalize(z)
        z = attend(zn * t, zn, zn, scale=1.0)
    zn = l2_normalize(z)
    query, key, paths = zn * t, zn, 3
    if original:
        # The block's softmax(q k^T / sqrt(d)) v has the same values: H more heads of this call.
        query = torch.cat((query, q * d ** -0.5), dim=2)
        key = torch.cat((key, k), dim=2)
        paths = 4
    values = v.repeat(1, 1, paths, 1)                                        # [B, N, paths*H, d]
    out = attend(query, key, values, scale=1.0).unflatten(2, (paths, heads))  # Eq. 5, [B, N, paths, H, d]
    gem = out[:, :, :3].mean(dim=2).flatten(2)                                # Eq. 6, [B, N, H*d]
    return gem, (out[:, :, 3].flatten(2) if original else None)


def _self_self_attention_lowp(z: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              heads: int, t: torch.Tensor, iterations: int, original: bool):
    """`self_self_attention` on the CPU bf16 road: the same sums, each attention product chunked
    (`_chunked_attention`), per image. The scores t n(z_i) . n(z_j) are at most t (equality on the
    diagonal), which lets the softmax skip its max pass."""
    images = []
    for i in range(z.shape[0]):
        zi, ti = z[i:i + 1], float(t[i])
        for _ in range(iterations):                                          # Eq. 4
            zn = l2_normalize(zi)
            zi = _chunked_attention(zn, zn, zn, ti, score_bound=ti)
        zn = l2_normalize(zi)
        out = _chunked_attention(zn, zn, v[i:i + 1], ti, score_bound=ti)     # Eq. 5 (3 paths share v)
        gem = out.unflatten(2, (3, heads)).mean(dim=2).flatten(2)            # Eq. 6, [1, N, H*d]
        own = attend(q[i:i + 1], k[i:i + 1], v[i:i + 1]).flatten(2) if original else None
        images.append((gem, own))
    if len(images) == 1:                      # no copy (one operator less per block)
        return images[0]
    gem = torch.cat([g for g, _ in images])
    return gem, (torch.cat([o for _, o in images]) if original else None)


def query_query_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """ClearCLIP's self-self attention: softmax(q q^T / sqrt(d)) v per head.

    qkv: [B, N, 3*H*d]. Returns [B, N, H*d], heads merged (before out_proj).
    """
    b, n, _ = qkv.shape
    q, _, v = qkv.reshape(b, n, 3, heads, -1).unbind(2)
    return attend(q, q, v).reshape(b, n, -1)


def gaussian_neighbourhood_bias(grid: tuple[int, int], sigma: float, prefix: int = 1,
                                device=None, dtype=torch.float32) -> torch.Tensor:
    """NACLIP's spatial prior: [N, N] with exp(-|p_i - p_j|^2 / (2 sigma^2)) between patch tokens
    i and j at grid positions p (in patches), and 0 in the rows and columns of the `prefix`
    tokens (the class token) that have no position."""
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    n = prefix + h * w
    bias = torch.zeros(n, n, device=device, dtype=torch.float64)
    bias[prefix:, prefix:] = torch.exp(-dist2 / (2.0 * sigma ** 2))
    return bias.to(dtype)


def neighbourhood_attention(qkv: torch.Tensor, heads: int, bias: torch.Tensor) -> torch.Tensor:
    """NACLIP's attention: softmax(k k^T / sqrt(d) + bias) v per head, bias from
    `gaussian_neighbourhood_bias`. qkv: [B, N, 3*H*d]. Returns [B, N, H*d]."""
    b, n, _ = qkv.shape
    _, k, v = qkv.reshape(b, n, 3, heads, -1).unbind(2)
    if lowp_cpu(qkv):
        return _chunked_attention(k, k, v, k.shape[-1] ** -0.5, bias=bias.to(k.dtype)).reshape(b, n, -1)
    out = F.scaled_dot_product_attention(k.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias.to(dtype=k.dtype, device=k.device))
    return out.transpose(1, 2).reshape(b, n, -1)
