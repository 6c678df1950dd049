"""Benchmarks: ratios measured in one run, hardware named (public API only)."""
