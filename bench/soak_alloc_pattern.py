"""python -m bench.soak_alloc_pattern untuned|tuned N -- Synthetic allocation pattern of one /predict (ViT-B/16, 448 px): activations of MiBs freed
within the request, one cache entry per image kept LRU up to 256 MiB. RSS every N/10."""
import os, sys, collections, random
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from backend import memory
if sys.argv[1] == "tuned":
    print("tuned", memory.tune_allocator())
torch.set_num_threads(1)
n = int(sys.argv[2]); rng = random.Random(0)
cache, cached = collections.OrderedDict(), 0
def rss(): return memory.resident_bytes() / 2**30
out = []
for i in range(1, n + 1):
    tokens = 28 * rng.randint(28, 45) + 1
    live = []
    for layer in range(12):          # residual, qkv, attention, mlp of one block, some kept a layer
        x = torch.empty(tokens, 768).fill_(1); qkv = torch.empty(tokens, 3 * 768).fill_(1)
        att = torch.empty(12, tokens, tokens).fill_(1); mlp = torch.empty(tokens, 3072).fill_(1)
        del qkv, att, mlp
        live.append(x)
        if len(live) > 2: live.pop(0)
    maps = [torch.empty(600, 800).fill_(0) for _ in range(3)]   # similarity maps at the photo size
    junk = [bytes(rng.randint(100, 5000)) for _ in range(200)]   # request-sized Python objects
    entry = torch.empty(1, 28, (tokens - 1) // 28, 512).fill_(1)
    cache[i] = entry; cached += entry.nbytes
    while cached > 256 * 2**20:
        _, old = cache.popitem(last=False); cached -= old.nbytes
    del live, maps, junk, x, entry
    if i in (1, 50) or i % (n // 10) == 0:
        st = memory.malloc_stats()
        out.append((i, round(rss(), 3)))
        print(f"{sys.argv[1]} after {i}: RSS {rss():.3f} GiB, cache {cached/2**20:.0f} MiB, heap in use {st['in_use']/2**20:.0f} MiB, free {st['free']/2**20:.0f} MiB, mmapped {st['mmapped']/2**20:.0f} MiB", flush=True)
half = [r for i, r in out if i >= n // 2]
print(sys.argv[1], "second-half growth GiB", round(half[-1] - half[0], 3))
