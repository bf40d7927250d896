"""Which floating-point precision a net computes in, decided in one place for training and inference.

`train.precision` and `infer.precision` (and `predict --precision`) take `auto`, `bf16`,
`fp16` or `fp32`; `choose(name, device, net)` turns one into a `Precision`: the autocast
dtype, whether a gradient scaler is needed (fp16 training), and the reason, which stage 02
prints and writes to log.csv.

`auto` picks what the hardware runs natively and fastest (docs/speed.md has the figures):
- CUDA, compute capability >= 8.0 (A100, H100, RTX 30xx/40xx): bf16 (fp32's range, no scaler).
- CUDA below 8.0 (Kaggle's P100 and T4, Colab's T4): fp16, with `torch.amp.GradScaler`
  in training (fp16's range is too small for gradients without it).
- CPU with AMX (`amx_bf16`: Xeon Sapphire Rapids and later): bf16; its tile unit runs bf16
  matrix products and convolutions several times faster than fp32.
- CPU with AVX512-BF16 but no AMX (AMD Zen 4/5, Cooper Lake): bf16 too (faster training and
  convolution inference), with one exception: the inference of the window transformers ran
  no faster in bf16 than in fp32 there, and bf16 moves their SSIM, so at inference a net
  holding a SwinIR or a HAT stays in fp32.
- any other CPU (AVX2 only, ...) and other devices: fp32 (bf16 would be emulated, 10-90x slower).
An explicit name is honoured where the device runs it, with these exceptions and notes:
`bf16` on a device without native bf16 trains in fp32 (emulated bf16 is 10-90x slower;
inference honours it with a warning, as before), and `fp16` on a CPU runs (autocast and
GradScaler work there, which is how the GPU path is tested) but is emulated and slow.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from pipeline.core.config import PRECISIONS
from pipeline.core.errors import PipelineError
from pipeline.nets import window_transformer

NAMES = PRECISIONS                 # the names `train.precision` and `infer.precision` take
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Hardware:
    """What decides the precision: the device and, on CPU, its bf16 support; on CUDA its
    compute capability. Built by `hardware(device)`; tests build it by hand."""
    device_type: str                            # cpu | cuda | mps | ...
    cuda_capability: tuple[int, int] | None = None
    cpu_bf16: str = "none"                      # none | avx512_bf16 | amx


@dataclass(frozen=True)
class Precision:
    name: str                 # what runs: bf16 | fp16 | fp32
    asked: str                # what the config asked: auto | bf16 | fp16 | fp32
    reason: str               # one line: why this one
    emulated: bool = False    # the device has no native unit for it (slow)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return DTYPES[self.name]

    @property
    def scaler(self) -> bool:
        """Training needs a GradScaler (fp16's range)."""
        return self.name == "fp16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> str:
    flags = cpu_flags()
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "none"      # oneDNN's own test: no bf16 instructions it can use
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    # no /proc/cpuinfo (macOS, Windows) but oneDNN has bf16: AMX if torch can enable it
    return "amx" if not flags and torch._C._cpu._init_amx() else "avx512_bf16"


def hardware(device: torch.device | str) -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        return Hardware("cuda", cuda_capability=tuple(torch.cuda.get_device_capability(device)))
    if device.type == "cpu":
        return Hardware("cpu", cpu_bf16=_cpu_bf16())
    return Hardware(device.type)


def native(name: str, hw: Hardware) -> bool:
    """Whether `hw` computes `name` in hardware."""
    if name == "fp32":
        return True
    if hw.device_type == "cuda":
        major = hw.cuda_capability[0] if hw.cuda_capability else 0
        return major >= 8 if name == "bf16" else major >= 6      # fp16: Pascal (P100) and later
    if hw.device_type == "cpu":
        return name == "bf16" and hw.cpu_bf16 != "none"
    return False


def choose(name: str, device: torch.device | str, net: nn.Module | None = None, *,
           training: bool = True, hw: Hardware | None = None) -> Precision:
    """The precision `name` resolves to for `net` on `device` (see the module docstring).
    `net` (a module, or a ModuleList of an ensemble's nets) matters in one rule: inference
    of a window transformer on a CPU with AVX512-BF16 and no AMX stays fp32."""
    if name not in NAMES:
        raise PipelineError(f"precision '{name}' unknown (choose {', '.join(NAMES)})")
    hw = hw or hardware(device)
    where = _describe(hw)
    if name == "auto":
        return _auto(hw, net, where, training)
    if name == "fp32":
        return Precision("fp32", name, "asked")
    if native(name, hw):
        return Precision(name, name, f"asked; native on {where}")
    if name == "bf16" and training:
        return Precision("fp32", name, f"bf16 asked but {where} has no native bf16 (emulated: far "
                                       "slower than fp32), so fp32")
    return Precision(name, name, f"asked; emulated on {where} (slow: use it to test, not to train)",
                     emulated=True)


def _auto(hw: Hardware, net: nn.Module | None, where: str, training: bool) -> Precision:
    if hw.device_type == "cuda":
        if native("bf16", hw):
            return Precision("bf16", "auto", f"auto: {where}: native bf16 (compute capability >= 8.0)")
        if native("fp16", hw):
            return Precision("fp16", "auto", f"auto: {where}: no bf16 below compute capability 8.0, "
                                             "so fp16 (with a gradient scaler in training)")
        return Precision("fp32", "auto", f"auto: {where}: neither bf16 nor fast fp16")
    if hw.device_type == "cpu":
        if hw.cpu_bf16 == "amx":
            return Precision("bf16", "auto", "auto: this CPU has AMX (native bf16 matrix units)")
        if hw.cpu_bf16 == "avx512_bf16":
            transformer = "" if training else window_transformer(net)
            if transformer:
                return Precision("fp32", "auto", f"auto: this CPU has AVX512-BF16 but no AMX, where {transformer}'s "
                                                 "inference measured no faster in bf16 than in fp32")
            return Precision("bf16", "auto", "auto: this CPU has AVX512-BF16 (no AMX), where bf16 "
                                             "measured faster than fp32 (convolutions and attention)")
        return Precision("fp32", "auto", "auto: this CPU has no native bf16 (needs AVX512-BF16 or AMX)")
    return Precision("fp32", "auto", f"auto: no mixed precision on {where}")


def _describe(hw: Hardware) -> str:
    if hw.device_type == "cuda":
        cc = hw.cuda_capability
        return f"cuda (compute capability {cc[0]}.{cc[1]})" if cc else "cuda"
    if hw.device_type == "cpu":
        return {"amx": "this CPU (AMX)", "avx512_bf16": "this CPU (AVX512-BF16)"}.get(hw.cpu_bf16, "this CPU")
    return hw.device_type


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """CUDA matrix products and convolutions in TF32 (`allowed`) or in full float32, in the block.

    The policy: a training step allows TF32 on the GPUs that have it (compute capability 8.0
    and later: several times fp32's throughput, within training's own noise); every forward
    whose output is scored (validation, out of fold, ensemble, predict) runs in full float32,
    so a "fp32" answer is float32 and a GPU's answer matches the CPU's. No effect on the CPU."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
