"""Throughput (img/s) and latency (ms) of a callable, measured with warm-up and median of repeats.

Speed is compared in benchmark scripts (pruned vs unpruned in one run, as ratios), never in
unit tests.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch


@contextmanager
def torch_threads(threads: int):
    """Temporarily set ``torch.set_num_threads``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def time_call(fn: Callable, x: torch.Tensor, warmup: int = 3, repeats: int = 10) -> list[float]:
    """Seconds per call of ``fn(x)`` for ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def interleaved(fns: dict, x: torch.Tensor, repeats: int, warmup: int = 2, progress: bool = True) -> dict:
    """Seconds per call of each callable of ``fns`` (name -> fn) on ``x``: ``warmup`` calls of each, then
    ``repeats`` rounds that call every fn once (the order reversed every other round), so that load
    from other processes hits all of them alike. Returns name -> ``repeats`` seconds."""
    from tqdm.auto import tqdm

    for fn in fns.values():
        time_call(fn, x, warmup, 0)
    times = {k: [] for k in fns}
    names = list(fns)
    for i in tqdm(range(repeats), desc=f"batch {x.shape[0]}", leave=False, disable=not progress):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k] += time_call(fns[k], x, 0, 1)
    return times


def throughput(fn: Callable, batch_size: int = 32, threads: int = 2, image_shape=(3, 224, 224),
               warmup: int = 2, repeats: int = 5) -> float:
    """Images per second of ``fn`` on random ``[batch_size, *image_shape]`` input, median of repeats."""
    x = torch.randn(batch_size, *image_shape)
    with torch_threads(threads):
        return batch_size / statistics.median(time_call(fn, x, warmup, repeats))


def latency(fn: Callable, threads: int = 2, image_shape=(3, 224, 224), warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds per call of ``fn`` at batch 1."""
    x = torch.randn(1, *image_shape)
    with torch_threads(threads):
        return 1000.0 * statistics.median(time_call(fn, x, warmup, repeats))
