"""Window-transformer inference in cache-sized jobs on worker threads (`CpuJobs`).

At inference the SwinIR and HAT fast paths run a block's windows as jobs
(`pipeline.nets.fast.windows`). On the CPU they are cut into jobs of about 8192 query tokens
(128 of SwinIR's 8x8 windows, 32 of HAT's 16x16 ones), so each job's intermediates stay in
the core's cache, and the jobs run on as many worker threads as torch has intra-op threads,
each job on one thread: two single-threaded jobs keep their windows in their own core's cache,
where every operation split across the cores would share them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

TOKENS_PER_JOB = 8192

_pool: tuple[int, ThreadPoolExecutor] | None = None


def _workers() -> ThreadPoolExecutor | None:
    """A pool of torch's intra-op thread count, each worker on one intra-op thread (None: one thread)."""
    global _pool
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    if _pool is None or _pool[0] != threads:
        if _pool is not None:
            _pool[1].shutdown(wait=False)
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="window-jobs",
                                             initializer=torch.set_num_threads, initargs=(1,)))
    return _pool[1]


def _forget_workers() -> None:   # a forked child has none of its parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


class CpuJobs:
    """`pipeline.nets.fast.windows.Jobs` for the CPU."""

    def windows_per_job(self, cells: int) -> int:
        return max(1, TOKENS_PER_JOB // cells)

    def run(self, run: Callable[[tuple], None], jobs: list[tuple], device: torch.device) -> None:
        """run(job) for every job on the worker threads; grad, inference and autocast modes are
        per thread in torch, so the workers take the caller's."""
        pool = _workers()
        if pool is None:
            for job in jobs:
                run(job)
            return
        inference = torch.is_inference_mode_enabled()
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type)

        def in_modes(job: tuple) -> None:
            with torch.inference_mode(inference), torch.no_grad(), \
                    torch.autocast(device.type, dtype=dtype, enabled=autocast):
                run(job)

        for _ in pool.map(in_modes, jobs):
            pass
