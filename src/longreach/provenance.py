"""Where a measured row came from: code, versions, CPU and threads, recorded in every eval row and benchmark.

Speed ratios differ by up to 3x between the machines we run on (an AVX2 EPYC and an AVX-512 Xeon), so a
row without its machine cannot be compared with another. ``provenance()`` is read once per process.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

from .machine import cpu_flags, cpu_model

# fields that decide whether two rows' timings can be compared (same code, same machine, same threads)
MACHINE_FIELDS = ("cpu", "isa", "threads", "commit", "dirty", "torch")
_ROOT = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package runs from; (None, None) for an installed wheel.

    Dirty means the library's code or its build files differ from the commit (results folders don't count).
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    top = _git("rev-parse", "--show-toplevel")
    paths = [str(_ROOT)] + ([str(Path(top) / f) for f in ("pyproject.toml", "requirements")] if top else [])
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return commit, bool(changed) if changed is not None else None


def isa(flags: set[str]) -> str:
    """The widest vector extension the CPU has, as the speed issue names them: amx, avx512, avx2 or neither."""
    if "amx_tile" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine()


@functools.lru_cache(maxsize=1)
def _static() -> dict:
    from .version import __version__

    try:
        from importlib.metadata import version

        transformers = version("transformers")
    except Exception:
        transformers = None
    commit, dirty = code_state()
    flags = cpu_flags()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"commit": commit, "dirty": dirty, "longreach": __version__, "torch": torch.__version__,
            "transformers": transformers, "python": platform.python_version(), "cpu": cpu_model(),
            "isa": isa(flags), "torch_isa": capability, "cores": os.cpu_count(), "host": platform.node()}


def provenance() -> dict:
    """The row's origin; ``threads`` is read each call (a run may change torch's thread count)."""
    return {**_static(), "threads": torch.get_num_threads()}


def machine_key(row: dict) -> tuple:
    """What must match for two rows' timings to be compared; rows from before provenance fall back to host."""
    prov = row.get("provenance")
    if isinstance(prov, dict):
        return tuple(prov.get(f) for f in MACHINE_FIELDS)
    return ("host", row.get("host"), row.get("version"))


def describe(prov: dict) -> str:
    """One line for a table title: CPU, ISA, threads, versions, commit."""
    commit = (prov.get("commit") or "no git")[:10] + ("+dirty" if prov.get("dirty") else "")
    return (f"{prov.get('cpu')} ({prov.get('isa')}), {prov.get('threads')} threads, torch {prov.get('torch')}, "
            f"transformers {prov.get('transformers')}, longreach {prov.get('longreach')} @ {commit}")
