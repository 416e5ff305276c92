"""Benchmarks of the GEM backend: `python -m bench.bench_gem` (see docs/PERFORMANCE.md)."""
