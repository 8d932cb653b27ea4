"""Preparation workers that run only where the forward pass leaves a core idle.

On a CPU build the forward pass's threads fill every core, and a preparation worker that wakes
up takes a core from one of them: its partner then waits at the next barrier, so a worker's
time costs the forward more than itself (measured on 2 cores: the build's own process spent
22.1-22.4 ms of CPU per image where the same forward alone spent 19.8-20.1, beside the workers'
1.6). At Linux's SCHED_IDLE policy a worker never preempts the forward; it runs where the
forward leaves a core idle and whenever the parent waits for it. docs/benchmarks.md has the
builds side by side.

The risk is starvation: beside any other busy process, a worker at idle policy gets a fraction
of a percent of a core, and a build that waits for it waits almost forever (measured: a
1,000-image build beside two busy loops had not ended after 80 s at idle policy; 28 s at normal
policy). So a parent that waits for its workers watches the CPU they get, and where they get
less than a tenth of a core for half a second, it starts them again at normal policy for the
rest of the build (only root may take a process back from idle policy; forked children of the
parent start at its own, normal one).
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("umr.retrieval")

WINDOW_S = 0.5  # how long a parent waits before it asks whether its idle workers are running
STARVED_BELOW = 0.1  # cores among all workers: below this over a window, they are starved


def make_idle(pid: int) -> bool:
    """Put process `pid` at SCHED_IDLE; False where the platform has no such policy or refuses."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def make_normal(pid: int) -> bool:
    """Put process `pid` back at the normal policy; False where this process may not (only
    root, or CAP_SYS_NICE, may leave SCHED_IDLE) or the platform has no policies."""
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def cpu_seconds(pids: list[int]) -> float | None:
    """User and system CPU seconds the processes have used, from /proc; None where any cannot be
    read (gone, or no /proc), which the watch counts as starved: nothing shows they run."""
    ticks = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the name before ')' may hold spaces
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


class StarvationWatch:
    """Measures, over windows of WINDOW_S while the parent waits, whether its idle-policy
    workers get a CPU; made afresh for each wait, so time the parent spends in the forward
    pass (when starving the workers is the point) never counts."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.since, self.used = time.monotonic(), cpu_seconds(pids)

    def starved(self) -> bool:
        now = time.monotonic()
        if now - self.since < WINDOW_S:
            return False
        used = cpu_seconds(self.pids)
        cores = None if used is None or self.used is None else (used - self.used) / (now - self.since)
        self.since, self.used = now, used
        if cores is None or cores < STARVED_BELOW:
            log.info("image preparation workers at idle priority got %s of a core in %.1f s while the build "
                     "waited for them (other work on this machine): they run at normal priority from here",
                     "none" if cores is None else f"{cores:.2f}", WINDOW_S)
            return True
        return False
