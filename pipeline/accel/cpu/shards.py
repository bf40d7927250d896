"""One training step's batch split across the CPU cores (`train.cpu_shards`).

A super-resolution net's training step is thousands of small operations: 50-channel
convolutions on 32x32 crops, SwinIR's 64-token windows with 10-dimensional heads. Split
across the cores inside each operation (torch's intra-op threads) they scale poorly. So on
the CPU the batch is cut into one shard per core instead: each shard's forward and
backward run on a thread of their own with one intra-op thread (data parallelism inside
one process), and the shards' gradients are summed in a fixed order into `.grad`.

What it computes: the loss is a mean over the batch's images, so shard i's loss counts
n_i / N and the summed gradients are the whole batch's (up to float rounding: the sums
are grouped differently). The same shards give the same bits every time, whichever thread
finishes first (in bf16 too: each shard casts its weights to bf16 uncached, see
`shard_gradients`). Random numbers drawn inside the net (stochastic depth) come from a generator per shard
(nets/drop_path.py) seeded from torch's global generator in shard order, so a run stays a
function of its seed and resumes exactly.

Measured (AMD EPYC, 2 cores, avx512_bf16, torch 2.14.1; 2 shards of one thread against one
batch on 2 intra-op threads): RLFN batch 16 fp32 0.353 -> 0.271 s a step, bf16 0.272 ->
0.217 s; SwinIR-S batch 24 fp32 2.99 -> 2.24 s, bf16 2.46 -> 1.68 s (BENCHMARKS.md has
the bench rows).

Threads or processes. Threads of one process share Python's lock: a SwinIR-S shard, whose
step runs thousands of small operations from Python, ran 6-15 % slower beside its twin than
alone (BENCHMARKS.md, training round 5). So for a net holding a SwinIR, on Linux, the shards
after the first run in forked processes: the parameters are moved (in place) into memory
shared with them, so the optimizer's updates here are what they compute with; each writes its
gradients into shared memory of its own, which is summed here in shard order as before;
crops, seeds and losses go by a pipe. The same bits as threads. Whole
steps, in one process alternating the two (AMD EPYC, 2 shards; BENCHMARKS.md, round 6):
SwinIR-S (batch 24) 0.864 -> 0.832 s and 0.853 -> 0.805 s in bf16, 1.187 -> 1.136 s in fp32;
but HAT-S (batch 2 of 64 x 64 crops: one image a shard, far larger operations) 2.548 -> 2.470 s
in bf16 and 4.351 -> 4.676 s in fp32, and RLFN 3-5 % slower, so those keep threads. A shard
process ends with the run (with its parent, even a killed one); one that dies stops the step
with its cause.

`auto` is one shard per torch thread on the CPU, and one shard (the plain step) where
sharding cannot serve, each with its reason: on CUDA (one device runs one stream of
kernels), under DDP (the ranks already split the batch, and DDP's gradient hooks need
backward()), with torch.compile, and when the net draws random numbers from torch's global
generator in training (Dropout with p > 0): threads would take them in no fixed order.
"""
from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pipeline.accel.cpu.memory import peak_rss_mb
from pipeline.core.errors import PipelineError
from pipeline.nets import window_transformer
from pipeline.nets.drop_path import DropPath, thread_generator

_PR_SET_PDEATHSIG = 1   # prctl option, from linux/prctl.h


@dataclass(frozen=True)
class ShardPlan:
    shards: int
    reason: str
    processes: bool = False     # shards 1.. in forked processes instead of threads


def plan(setting: int | str, device: torch.device, net: nn.Module, batch_size: int,
         world: int = 1, compiled: bool = False) -> ShardPlan:
    """How many shards `train.cpu_shards` means for this run, and why."""
    if setting != "auto" and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise PipelineError(f"train.cpu_shards must be 'auto' or an integer >= 1, got {setting!r}")
    if setting == 1:
        return ShardPlan(1, "cpu_shards 1: the whole batch on this thread")
    blocker = (f"on {device.type} the batch runs as one" if device.type != "cpu" else
               f"DDP over {world} processes splits the batch already" if world > 1 else
               "torch.compile runs the batch as one" if compiled else
               _global_randomness(net))
    if blocker:
        return ShardPlan(1, f"one shard: {blocker}")
    wanted = torch.get_num_threads() if setting == "auto" else setting
    if wanted == 1:
        return ShardPlan(1, "one shard: one torch thread")
    if batch_size == 1:
        return ShardPlan(1, "one shard: a batch of one image")
    shards = min(wanted, batch_size)
    per = threads_per_shard(shards)
    why = "auto: one per torch thread" if setting == "auto" else f"cpu_shards {setting}"
    each = f"{per} torch thread{'s' * (per > 1)} each ({why})"
    # processes where they measured faster: SwinIR's steps (see the module docstring)
    swinir, no_fork = window_transformer(net) == "SwinIR", processes_reason()
    if swinir and not no_fork:
        return ShardPlan(shards, f"{shards} shards of the batch in {shards} processes (this one and {shards - 1} "
                                 f"forked: SwinIR's many small operations from Python would share one lock "
                                 f"as threads), {each}", processes=True)
    why_threads = f"; {no_fork}" if swinir else ""
    return ShardPlan(shards, f"{shards} shards of the batch on {shards} threads, {each}{why_threads}")


def threads_per_shard(shards: int) -> int:
    """The torch threads each shard's thread runs its operations on: the process's, shared out."""
    return max(1, torch.get_num_threads() // shards)


def _global_randomness(net: nn.Module) -> str:
    """Why the net's training forward cannot be sharded deterministically ('' if it can)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or 'the net'} is Dropout(p={m.p}), drawn from torch's global generator"
        if getattr(m, "drop_prob", 0) and not isinstance(m, DropPath):
            return f"{name or 'the net'} ({type(m).__name__}) draws from torch's global generator"
    return ""


class ShardedStep:
    """Forward and backward of one batch in `shards` shards (1: on the caller's thread).

    `step(lr, hr, scaler)` returns (the batch's loss, detached; its unweighted terms) and
    adds the gradients of the loss (scaled by `scaler`, as `scaler.scale(loss).backward()`
    would) to the parameters' `.grad`. Shard 0 runs on a thread of this process, the others
    in forked processes (`processes=True`, see `processes_reason`) or on threads of their own
    (the same bits). Use it as a context manager: the threads and processes end with it.
    """

    def __init__(self, model: nn.Module, loss_fn, shards: int, amp_dtype: torch.dtype | None,
                 device: torch.device, processes: bool = False):
        self.model, self.loss_fn, self.shards = model, loss_fn, shards
        self.amp_dtype, self.device = amp_dtype, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pool, self.workers = None, []
        if shards > 1:
            threads = threads_per_shard(shards)
            try:
                if processes:
                    _share_parameters(self.params)
                    for _ in range(shards - 1):
                        self.workers.append(_ShardProcess(self, threads))
                self.pool = ThreadPoolExecutor(shards - len(self.workers), thread_name_prefix="cpu-shard",
                                               initializer=torch.set_num_threads, initargs=(threads,))
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> "ShardedStep":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for worker in self.workers:
            worker.close()
        self.workers = []

    def peak_growth_mb(self) -> float:
        """The shard processes' peak resident memory over what each had when it was forked
        (MB, summed): the step's memory outside this process."""
        return sum(worker.peak_growth_mb for worker in self.workers)

    def _loss(self, lr: torch.Tensor, hr: torch.Tensor, cache_casts: bool = True
              ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=cache_casts):
            sr = self.model(lr)
        return self.loss_fn.evaluate(sr, hr)

    def shard_gradients(self, lr: torch.Tensor, hr: torch.Tensor, seed: int, scale: torch.Tensor,
                        weight: float) -> tuple[torch.Tensor, dict[str, float], tuple]:
        """One shard's (loss x weight, detached; terms x weight; gradients of loss x scale x weight),
        stochastic depth drawn from a generator seeded with `seed`."""
        with thread_generator(torch.Generator(self.device).manual_seed(seed)):
            # autocast's cache of cast weights is shared by the process's threads, and a thread
            # leaving autocast empties it while another is inside: shards on threads then took a
            # weight used twice (SwinIR's shifted blocks) through one cast or two, in no fixed
            # order, and bf16 gradients varied in their last bits from run to run (7 runs in 8).
            # Uncached, every use casts its weight: the same bits every run, threads or processes.
            loss, terms = self._loss(lr, hr, cache_casts=False)
            grads = torch.autograd.grad(loss * (scale * weight), self.params, allow_unused=True)
        return loss.detach() * weight, {k: v * weight for k, v in terms.items()}, grads

    def step(self, lr: torch.Tensor, hr: torch.Tensor, scaler: torch.amp.GradScaler
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.pool is None:
            loss, terms = self._loss(lr, hr)
            scaler.scale(loss).backward()
            return loss.detach(), terms
        n = lr.shape[0]
        shards = min(self.shards, n)       # never an empty shard
        bounds = [round(i * n / shards) for i in range(shards + 1)]
        # drawn here, in shard order, from the global generator: each shard's own random source
        seeds = torch.randint(0, 2 ** 62, (shards,)).tolist()
        scale = scaler.scale(torch.ones((), device=self.device))   # the fp16 loss scale (1 otherwise)

        def job(i: int) -> tuple:
            a, e = bounds[i], bounds[i + 1]
            return lr[a:e], hr[a:e], seeds[i], scale, (e - a) / n

        in_processes = min(len(self.workers), shards - 1)     # shards 1.. go to the processes first
        for i in range(1, 1 + in_processes):
            self.workers[i - 1].submit(*job(i))
        on_threads = [0] + list(range(1 + in_processes, shards))
        parts = list(self.pool.map(lambda i: self.shard_gradients(*job(i)), on_threads))
        parts[1:1] = [worker.result() for worker in self.workers[:in_processes]]
        for j, p in enumerate(self.params):
            grads = [part[2][j] for part in parts if part[2][j] is not None]
            if not grads:
                continue
            # a process's gradient lives in memory it writes again next step: never keep it
            total = grads[0] if parts[0][2][j] is not None else grads[0].clone()
            for g in grads[1:]:
                total = total.add_(g)
            p.grad = total if p.grad is None else p.grad.add_(total)
        loss = parts[0][0]
        for part in parts[1:]:
            loss = loss + part[0]
        terms = {k: sum(part[1][k] for part in parts) for k in parts[0][1]}
        return loss, terms


# --- shards in processes ---------------------------------------------------------------------

def processes_reason() -> str:
    """Why shards cannot run in processes here ('' if they can): they are forked, so they need
    Linux (fork elsewhere is unsafe with the system's frameworks, or missing)."""
    if not sys.platform.startswith("linux"):
        return f"shard processes are forked, which this pipeline does on Linux only (this is {sys.platform})"
    return ""


def _shared_memory(nbytes: int) -> torch.Tensor:
    """Bytes that a process forked later shares with this one: an anonymous shared mapping,
    not a file in /dev/shm (which containers often keep small)."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)


def _span(t: torch.Tensor) -> int:
    """Elements of storage that `t`'s sizes and strides reach (numel for a dense tensor)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _offsets(tensors: list[torch.Tensor]) -> list[int]:
    """Where each tensor starts in one block of bytes holding them all (cache-line aligned),
    then the block's size."""
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + -(-_span(t) * t.element_size() // 64) * 64)
    return offsets


def _shared_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors of `tensors`' dtypes, sizes and strides, all in one block of shared memory."""
    offsets = _offsets(tensors)
    memory = _shared_memory(offsets[-1])
    return [memory[a:a + _span(t) * t.element_size()].view(t.dtype).as_strided(t.shape, t.stride())
            for t, a in zip(tensors, offsets)]


def _share_parameters(params: list[torch.Tensor]) -> None:
    """Move the parameters into shared memory, in place (same objects, sizes and strides): the
    optimizer's updates in this process are what the shard processes compute with."""
    with torch.no_grad():
        for p, shared in zip(params, _shared_like(params)):
            shared.copy_(p)
            p.data = shared


def _die_with_parent(parent: int) -> None:
    """Ask Linux to end this process when its parent ends (even by SIGKILL): a killed run
    leaves no shard process behind. (Linux sends it when the thread that forked ends: the
    shards are forked by the thread that trains.)"""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass    # the closed pipe still ends the loop
    if os.getppid() != parent:      # the parent ended before the request was in place
        os._exit(0)


class _ShardProcess:
    """A forked process that computes one shard's gradients a step, with the parameters in
    memory shared with this process and its gradients written into memory of its own that
    this process reads. Jobs and results (small: the shard's crops, the loss) go by a pipe."""

    def __init__(self, owner: ShardedStep, threads: int):
        self.grads = _shared_like(owner.params)
        self.peak_growth_mb = 0.0
        here, there = multiprocessing.Pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:                                   # the child: serve, then leave without cleanup
            code = 0
            try:
                here.close()
                _serve(owner, there, self.grads, threads, parent)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        there.close()
        self.pid, self.conn = pid, here

    def submit(self, lr: torch.Tensor, hr: torch.Tensor, seed: int, scale: torch.Tensor, weight: float) -> None:
        try:
            _send(self.conn, (lr, hr, seed, scale, weight))
        except OSError:
            raise self._ended() from None

    def result(self) -> tuple[torch.Tensor, dict[str, float], list]:
        try:
            reply = _receive(self.conn)
        except (EOFError, OSError):
            raise self._ended() from None
        if reply[0] == "error":
            raise PipelineError(f"train: shard process: {reply[1]}")
        _, loss, terms, missing, peak_growth_mb = reply
        self.peak_growth_mb = max(self.peak_growth_mb, peak_growth_mb)
        missing = set(missing)
        return loss, terms, [None if j in missing else g for j, g in enumerate(self.grads)]

    def _ended(self) -> PipelineError:
        return PipelineError(f"train: the shard process {self.pid} ended in the middle of a step "
                             f"({self._exit_status()}); cpu_shards: 1 runs without it")

    def _exit_status(self) -> str:
        try:
            pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "exit status unknown"
        self.pid = None
        return (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                else f"exit code {os.WEXITSTATUS(status)}")

    def close(self) -> None:
        """End the process (after the job it may be running) and reap it."""
        if self.pid is not None:
            try:
                _send(self.conn, None)
            except OSError:
                pass
        self.conn.close()
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            self.pid = None


def _serve(owner: ShardedStep, conn, grads: list[torch.Tensor], threads: int, parent: int) -> None:
    """The shard process's loop: a job in, its gradients into `grads`, (loss, terms, the
    parameters without a gradient, peak memory growth) out; None or a closed pipe ends it."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's to handle
    torch.set_num_threads(threads)
    forked_mb = peak_rss_mb()
    while True:
        try:
            job = _receive(conn)
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            loss, terms, shard_grads = owner.shard_gradients(*job)
            missing = []
            for j, (shared, g) in enumerate(zip(grads, shard_grads)):
                if g is None:
                    missing.append(j)
                else:
                    shared.copy_(g)
            _send(conn, ("ok", loss, terms, missing, peak_rss_mb() - forked_mb))
        except Exception as exc:        # reported in the parent, which stops the run
            _send(conn, ("error", f"{type(exc).__name__}: {exc}"))


# Tensors cross the pipe as numpy arrays in plain pickle: a Connection's own pickler, once
# torch.multiprocessing is imported, passes tensors as file descriptors through a server
# thread, and a tensor's own pickling goes through torch.save (milliseconds for a batch).
class _Array:
    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype                 # numpy has no bfloat16: its bits travel as int16
        self.array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach().numpy()

    def tensor(self) -> torch.Tensor:
        t = torch.from_numpy(self.array)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t


def _pack(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _Array(obj)
    return tuple(_pack(o) for o in obj) if isinstance(obj, tuple) else obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, _Array):
        return obj.tensor()
    return tuple(_unpack(o) for o in obj) if isinstance(obj, tuple) else obj


def _send(conn, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(_pack(obj), protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn) -> Any:
    return _unpack(pickle.loads(conn.recv_bytes()))
