"""Which device a command computes on (`device: auto | cpu | cuda[:N]`), and never a silent CPU run.

`pick_device(setting)`:
- `cpu`: the CPU;
- `cuda` / `cuda:N`: that GPU, or one line saying why torch cannot use it;
- `auto` (the default): the first GPU torch can use; the CPU on a machine without GPUs; and
  when `nvidia-smi` lists GPUs that torch cannot use (its CUDA build needs a newer driver, or
  lacks the card's compute capability, as a CUDA 12/13 build lacks a P100's sm_60), it stops
  with one line naming the GPU, its capability, torch's CUDA version and arch list, and the
  fix, instead of training for hours on the CPU.
`gpu_problem()` is that diagnosis alone (None when torch can use every GPU listed).
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

from pipeline.core.errors import PipelineError

SETTINGS = "auto, cpu, cuda or cuda:N"
FIX_INDEX = "make setup TORCH_INDEX=https://download.pytorch.org/whl/cu118"   # CUDA 11.8: sm_37..sm_90
FIX_SYSTEM = "make setup TORCH=system"


@dataclass(frozen=True)
class ListedGpu:
    """A GPU as nvidia-smi lists it."""
    index: int
    name: str
    capability: tuple[int, int] | None     # None when the driver does not report compute_cap
    driver: str


@functools.lru_cache(maxsize=1)
def listed_gpus() -> tuple[ListedGpu, ...]:
    """The GPUs `nvidia-smi` lists (none where it is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        cap = tuple(int(x) for x in parts[2].split(".")) if parts[2].replace(".", "").isdigit() else None
        gpus.append(ListedGpu(int(parts[0]), parts[1], cap if cap and len(cap) == 2 else None, parts[3]))
    return tuple(gpus)


def _arch(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def _runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether torch's CUDA build has kernels for `capability`: its own sm, or PTX (compute_XY)
    of a lower one that the driver compiles for it."""
    if _arch(capability) in arch_list:
        return True
    value = capability[0] * 10 + capability[1]
    return any(a.startswith("compute_") and int(a.split("_")[1]) <= value for a in arch_list)


def gpu_problem() -> str | None:
    """Why torch cannot use the GPUs nvidia-smi lists, in one line; None when it can (or none is listed)."""
    import torch

    gpus = listed_gpus()
    if not gpus:
        return None
    first = gpus[0]
    cap = f"compute capability {first.capability[0]}.{first.capability[1]}" if first.capability else "compute capability ?"
    what = f"{first.name} (GPU {first.index}, {cap}, driver {first.driver})"
    cuda = torch.version.cuda
    if cuda is None:
        return (f"nvidia-smi lists {what} but torch {torch.__version__} is a CPU-only build: "
                f"`{FIX_SYSTEM}` uses the machine's own torch, or `{FIX_INDEX}` installs a CUDA build")
    if not torch.cuda.is_available():
        return (f"nvidia-smi lists {what} but torch {torch.__version__} (CUDA {cuda}) cannot use it: "
                f"the driver is older than CUDA {cuda} needs; `{FIX_SYSTEM}` uses the machine's own torch, "
                f"or `{FIX_INDEX}` a build for an older CUDA")
    arch_list = torch.cuda.get_arch_list()
    if first.capability and not _runs_on(first.capability, arch_list):
        return (f"{what} is {_arch(first.capability)}, which torch {torch.__version__} (CUDA {cuda}) has no "
                f"kernels for (its arch list: {' '.join(arch_list)}); `{FIX_INDEX}` installs a build that "
                f"has them, or `{FIX_SYSTEM}` uses the machine's own torch")
    return None


def pick_device(setting: str | None = "auto"):
    """The torch.device of `setting` (see the module docstring); an error names what is wrong."""
    import torch

    setting = "auto" if setting is None else str(setting).strip().lower()
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "auto":
        problem = gpu_problem()
        if problem is not None:
            raise PipelineError(f"device auto: {problem}; or set device: cpu to run on the CPU on purpose")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" or setting.startswith("cuda:") and setting[5:].isdigit():
        problem = gpu_problem() if listed_gpus() else None
        if not torch.cuda.is_available():
            raise PipelineError(f"device {setting}: {problem or 'no GPU that torch can use on this machine'}")
        if problem is not None:
            raise PipelineError(f"device {setting}: {problem}")
        index = int(setting[5:]) if ":" in setting else 0
        if index >= torch.cuda.device_count():
            raise PipelineError(f"device {setting}: torch sees {torch.cuda.device_count()} GPU(s) "
                                f"(CUDA_VISIBLE_DEVICES narrows them)")
        return torch.device(setting)
    raise PipelineError(f"device '{setting}' unknown ({SETTINGS})")
