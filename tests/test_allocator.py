"""The prefill's allocator trim: what it gives back (measured in a fresh process) and when the runtime calls it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach.compat import cache_kwargs, output_cache
from longreach.runtime import allocator, layer

FRAGMENT = """
import torch
from longreach.runtime.allocator import release_free_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
big = torch.ones(6_000_000); del big          # freeing a 24 MB block raises glibc's mmap threshold
parts = [torch.ones(1_000_000) for _ in range(64)]   # 64 x 4 MB now come from the heap
pin = torch.ones(250_000)                       # a long-lived 1 MB tensor above them (a layer's KV)
del parts
before = rss()
ok = release_free_memory(1 << 20)
print(ok, before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_release_gives_the_heaps_free_pages_back():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout.split()
    ok, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert ok, "glibc's malloc_trim was not found"
    assert before - after > 150, f"RSS {before} -> {after} MiB: the 256 MB freed below a live tensor stayed resident"


def test_the_runtime_trims_twice_per_layer_in_prefill_and_never_in_decode(monkeypatch):
    """Before each layer (what the previous one freed) and between its selector and kernel (the projections' and
    the selector's scratch); a decode step never trims. Each call says how many keys the forward attends."""
    calls = []
    monkeypatch.setattr(layer, "release_free_memory", lambda keys: calls.append(keys) or True)
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad(), longreach.apply(model, "quest:density=0.5"):
        out = model(ids[:, :24], use_cache=True)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       **cache_kwargs(model, output_cache(out)))
    assert calls == [24] * 6 + [40] * 6  # a later chunk counts the keys cached before it


def test_short_prompts_do_not_trim(monkeypatch):
    """A trim costs about the same at any length (refaulting what the next layer allocates): below MIN_KEYS it is
    not worth it, and nothing is trimmed."""
    trims = []
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: (lambda pad: trims.append(pad) or 1))
    assert allocator.release_free_memory(allocator.MIN_KEYS - 1) is False and not trims
    assert allocator.release_free_memory(allocator.MIN_KEYS) is True and trims == [0]


def test_trim_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LONGREACH_TRIM", "0")
    allocator._malloc_trim.cache_clear()
    try:
        assert allocator.release_free_memory(1 << 20) is False
    finally:
        monkeypatch.delenv("LONGREACH_TRIM")
        allocator._malloc_trim.cache_clear()
