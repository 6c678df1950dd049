"""The prefill's allocator trim: what it gives back (measured in a fresh process) and when the runtime calls it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import longreach
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
ok = release_free_memory()
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
    the selector's scratch); a decode step never trims."""
    calls = []
    monkeypatch.setattr(layer, "release_free_memory", lambda: calls.append(1) or True)
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad(), longreach.apply(model, "quest:density=0.5"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 2 * 3


def test_trim_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("LONGREACH_TRIM", "0")
    allocator._malloc_trim.cache_clear()
    try:
        assert allocator.release_free_memory() is False
    finally:
        monkeypatch.delenv("LONGREACH_TRIM")
        allocator._malloc_trim.cache_clear()
