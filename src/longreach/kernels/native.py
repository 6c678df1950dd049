"""The compiled kernels, built once per machine with torch's extension API and cached: block-sparse attention
(``csrc/block_sparse.cpp``), decode's one-row linear layers (``row_linear.cpp``), decode over a float cache
(``dense_decode.cpp``) and over a kvquant cache's codes (``quant_decode.cpp``). The pure-PyTorch paths are the fallback.

Why compiled: at 32k the PyTorch path spends ~30% of its time outside the attention math (gathering
K/V copies, masks, merging the far and near parts); the fused kernel streams the same keys with one
online softmax. Set ``LONGREACH_NATIVE=0`` to force the fallback. The build needs a C++ compiler
(no network); ``make install`` builds it, otherwise the first use does (about 30 s).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from ..paths import cache_dir

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("block_sparse.cpp", "row_linear.cpp", "quant_decode.cpp", "dense_decode.cpp")]
# included by the sources (torch's own rebuild check does not look at headers; source_hash does)
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("fast_math.h", "decode.h")]
_module: ModuleType | None = None
_tried = False


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled module, or None (disabled, not an x86/ARM CPU build with sgemm, or no compiler)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("LONGREACH_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        flags = ["-O3", "-ffast-math", "-fopenmp"]
        if os.environ.get("LONGREACH_NATIVE_PORTABLE") != "1":
            flags.append("-march=native")  # built where it runs: the cache is per machine
        # one build folder per torch version (an extension built against another torch would not load) and per
        # kernel source: two checkouts of different versions (an upgrade, a git worktree) keep their own builds
        # instead of rebuilding over each other's under one lock
        where = cache_dir() / "kernels" / torch.__version__.replace("+", "_") / source_hash()
        where.mkdir(parents=True, exist_ok=True)
        with build_lock(where):
            _module = build(name="longreach_block_sparse", sources=staged_sources(where), extra_cflags=flags,
                            extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=verbose)
    except Exception as err:  # no compiler, no sgemm in this torch build, ...: the PyTorch path still works
        warnings.warn(f"longreach: compiled block-sparse kernel unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); using the PyTorch path",
                      RuntimeWarning, stacklevel=2)
        _module = None
    return _module


@contextlib.contextmanager
def build_lock(where: Path) -> Iterator[None]:
    """Hold the build folder for this process alone. torch's own lock is a plain file that outlives a build killed
    part-way (Ctrl-C, an out-of-memory kill), and every later build then waits on it forever, silently. An flock
    is released by the system when its process dies, so while we hold one a torch lock left in the folder is
    stale, and is removed."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's lock alone
        yield
        return
    with open(where / "longreach.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (where / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staged_sources(where: Path) -> list[str]:
    """The sources copied into the build folder, headers with them: torch's build file names its sources' paths,
    so two checkouts of the same sources (a git worktree) would otherwise rebuild over each other at each switch."""
    staged = where / "src"
    staged.mkdir(exist_ok=True)
    for path in (*SOURCES, *HEADERS):
        copy, text = staged / path.name, path.read_bytes()
        if not copy.exists() or copy.read_bytes() != text:
            partial = copy.with_name(copy.name + f".{os.getpid()}")
            partial.write_bytes(text)
            partial.replace(copy)  # atomic: a reader never sees half a file
    return [str(staged / path.name) for path in SOURCES]


@functools.cache
def source_hash() -> str:
    """The kernel sources and headers: names the build folder, and keys the measured path choice."""
    return hashlib.sha256(b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))).hexdigest()[:12]


def usable(q: torch.Tensor) -> bool:
    """The fused kernel serves float32 CPU inference (no autograd)."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return False
    if q.requires_grad and torch.is_grad_enabled():
        return False
    return load() is not None


def report() -> None:
    """Build now and say where the kernel lives (``make install`` calls this)."""
    mod = load()
    print(f"longreach compiled kernel: {mod.__file__ if mod else 'unavailable, the PyTorch path is used'}")
