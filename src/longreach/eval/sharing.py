"""Whether a measured row had the machine's cores to itself.

Eval rows are often timed on shared machines: a background eval beside a test run, or a VM whose host takes CPU
time away (steal). Their times are then not speed results, and nothing in a row used to show it. So each row
records ``others_cpu``: the share of the machine's CPU time during the row that went to anything but this
process (other processes, and on a VM the time the hypervisor stole), read from Linux's ``/proc/stat``; None
elsewhere. The report and ``tune`` mark a speed ratio whose rows ran beside more than ``SHARED`` of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

SHARED = 0.1  # a row beside more than this share of the machine's CPU time is not a speed result
STAT = Path("/proc/stat")


@dataclass(frozen=True)
class Snapshot:
    wall: float  # time.perf_counter()
    mine: float  # this process's CPU seconds, every thread
    busy: float | None  # every CPU's busy seconds since boot, steal included (None: no /proc/stat)
    cpus: int  # CPUs the busy seconds are summed over


def parse_stat(text: str, ticks_per_second: float) -> tuple[float, int]:
    """Busy seconds and CPU count from ``/proc/stat``: the aggregate ``cpu`` line's user, nice, system, irq,
    softirq and steal (guest time is already inside user), and the number of ``cpuN`` lines."""
    lines = text.splitlines()
    fields = [int(x) for x in lines[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return (user + nice + system + irq + softirq + steal) / ticks_per_second, max(cpus, 1)


def snapshot() -> Snapshot:
    busy, cpus = None, os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError, IndexError):  # not Linux, or a /proc/stat it cannot read
        busy, cpus = parse_stat(STAT.read_text(), os.sysconf("SC_CLK_TCK"))
    return Snapshot(time.perf_counter(), time.process_time(), busy, cpus)


def others_share(before: Snapshot, after: Snapshot) -> float | None:
    """The share of the machine's CPU time between two snapshots spent outside this process (0 to 1)."""
    wall = after.wall - before.wall
    if before.busy is None or after.busy is None or wall <= 0:
        return None
    others = (after.busy - before.busy) - (after.mine - before.mine)
    return round(min(1.0, max(0.0, others / (wall * after.cpus))), 3)


def shared(row: dict) -> bool:
    return (row.get("others_cpu") or 0.0) > SHARED


def shared_count(rows: list[dict]) -> tuple[int, int]:
    """(rows that shared the cores, rows that recorded it): older rows have no ``others_cpu``."""
    recorded = [r for r in rows if r.get("others_cpu") is not None]
    return sum(shared(r) for r in recorded), len(recorded)
