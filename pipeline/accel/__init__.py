"""Device-specific speed-ups, behind one switch, outside the device-independent code.

Everything here makes the CPU faster and changes no result beyond float rounding; nothing
below this layer imports it. Its parts, each kept because it measurably pays on the default
recipe's training or on inference (docs/speed.md has the figures):
- `shards`: a training step's batch cut into one shard per core, each on a thread of its own
  (`train.cpu_shards`; `cpu/shards.py`);
- `memory`: glibc keeps freed memory for the next step instead of faulting it in afresh
  (`cpu/memory.py`);
- `attention`: SwinIR's window attention at inference through a compiled C kernel
  (`cpu/attention.py`, built on first use by `cpu/native.py`);
- `jobs`: window-transformer inference in cache-sized jobs on worker threads (`cpu/jobs.py`).

The switch is `SR_CPU_ACCEL`: unset or `1`, every part; `0`, none; a comma list (`shards,memory`),
those parts. The entry points sit at the outside edges: `enable()` once per process (the
command line calls it) for the process-wide parts, and `training_gradients()` in the training
loop, which wraps the device-independent step's gradients in shards.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from pipeline.accel.cpu import native
from pipeline.accel.cpu.attention import NativeWindowAttention
from pipeline.accel.cpu.jobs import CpuJobs
from pipeline.accel.cpu.memory import release_freed_memory, retain_freed_memory
from pipeline.accel.cpu.shards import ShardedGradients, plan
from pipeline.core.errors import PipelineError
from pipeline.nets.fast import windows

PARTS = ("shards", "memory", "attention", "jobs")
SWITCH = "SR_CPU_ACCEL"

_KERNEL = NativeWindowAttention()
_JOBS = CpuJobs()
_enabled: frozenset[str] = frozenset()


def parts() -> frozenset[str]:
    """The parts `SR_CPU_ACCEL` switches on."""
    value = os.environ.get(SWITCH, "1").strip().lower()
    if value in ("", "1", "all"):
        return frozenset(PARTS)
    if value in ("0", "none"):
        return frozenset()
    chosen = {p.strip() for p in value.split(",") if p.strip()}
    unknown = sorted(chosen - set(PARTS))
    if unknown:
        raise PipelineError(f"{SWITCH}={value}: unknown part(s) {', '.join(unknown)} "
                            f"(0, 1, or a comma list of {', '.join(PARTS)})")
    return frozenset(chosen)


def enable(which: frozenset[str] | set[str] | None = None) -> frozenset[str]:
    """Switch the process-wide parts (memory, attention, jobs) to exactly `which` (default:
    what `SR_CPU_ACCEL` says); returns the parts now on. Calling it again re-applies."""
    global _enabled
    which = parts() if which is None else frozenset(which)
    if "memory" in which:
        retain_freed_memory()
    elif "memory" in _enabled:
        release_freed_memory()
    if "attention" in which:
        windows.register_attention_kernel(_KERNEL)
    else:
        windows.unregister_attention_kernel(_KERNEL)
    windows.register_jobs("cpu", _JOBS if "jobs" in which else None)
    _enabled = which
    return which


def enabled() -> frozenset[str]:
    """The process-wide parts `enable` switched on ('shards' counts when `SR_CPU_ACCEL` has it)."""
    return _enabled | (parts() & {"shards"})


def describe() -> str:
    """One line: which parts are on, and which window attention CPU inference runs."""
    on = sorted(enabled(), key=PARTS.index)
    attention = f"; window attention: {native.status()}" if "attention" in _enabled else ""
    return f"CPU speed-ups ({SWITCH}): {', '.join(on) or 'none'}{attention}"


def training_gradients(gradients, net: nn.Module, setting: int | str, batch_size: int, world: int = 1,
                       compiled: bool = False) -> tuple:
    """(the gradients a training step calls, one line saying how): `gradients` itself, or on
    the CPU, with `shards` on, the same computed in shards on threads (`train.cpu_shards`)."""
    device = torch.device(gradients.device)
    if "shards" not in parts():
        return gradients, f"one shard: {SWITCH} leaves shards off"
    chosen = plan(setting, device, net, batch_size, world, compiled)
    if chosen.shards == 1:
        return gradients, chosen.reason
    return ShardedGradients(gradients, chosen.shards), chosen.reason
