"""Timing shared by the benchmarks: CUDA events around GPU calls (warm-up first, median in ms), and how much CPU
other processes took while a benchmark ran."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


class OtherCpu:
    """CPU time used by processes other than this one and its finished children, in cores, between construction
    and `cores()`: (busy jiffies of the whole machine - our own CPU time) / wall time. The load average cannot
    tell a benchmark's own load from another job's, nor the previous benchmark's lingering average from now.
    Linux only (/proc/stat); children count once they have been waited for."""

    def __init__(self) -> None:
        self._busy, self._own, self._wall = _machine_busy_s(), _own_cpu_s(), time.monotonic()

    def cores(self) -> float:
        wall = time.monotonic() - self._wall
        other = (_machine_busy_s() - self._busy) - (_own_cpu_s() - self._own)
        return round(max(other, 0.0) / wall, 2) if wall > 0 else 0.0


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cuda_time_ms(fn: Callable[[], object], runs: int, warmup: int = 10) -> float:
    """Median wall time of fn on the GPU in ms (synchronised before the clock is read)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
