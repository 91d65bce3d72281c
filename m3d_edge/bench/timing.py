"""GPU timing shared by the benchmarks: CUDA events around each call, warm-up first, median in milliseconds."""

from __future__ import annotations

import statistics
from typing import Callable


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
