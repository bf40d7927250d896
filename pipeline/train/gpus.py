"""One job per GPU: claim free GPUs of a list for one command, then run it on them.

    python -m pipeline.train.gpus --gpus "0 1 2 3" [--count N] -- COMMAND [ARG ...]

`make -j4 train-all GPUS="0 1 2 3"` starts every training job through this, so each job
gets a GPU of its own in CUDA_VISIBLE_DEVICES (inside the job it is `cuda:0`).

How a claim works: every GPU of the list has a lock file in one folder per machine
(`SR_GPU_LOCK_DIR`, default `<tmp>/sr-pipeline-gpus`). A job takes an exclusive `flock`
on `count` free ones (all or none, in list order; while too few are free it waits), sets
CUDA_VISIBLE_DEVICES to them and replaces itself (exec) with the command, which inherits
the locked descriptors. So a claim
- is held exactly as long as the command runs, and the kernel drops it when the process
  ends in any way (exit, Ctrl-C, crash, SIGKILL): no stale lock to clean up;
- does not depend on make's job slots, fold numbers or the order jobs start in: with any
  -j (more jobs than GPUs wait for one to free up), two experiments, or two checkouts on
  one machine, two jobs never land on one GPU by accident.
A GPU named twice (GPUS="0 0") is two slots of it: sharing on purpose. Where a scheduler
already set CUDA_VISIBLE_DEVICES (SLURM, Kubernetes), the Makefile's GPUS defaults to those
GPUs and a claim of any other is refused. Nothing here needs
a GPU or torch (ids are strings passed to CUDA_VISIBLE_DEVICES), so it is tested on CPU.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import PipelineError

POLL_SECONDS = 0.5


def lock_dir() -> Path:
    return Path(os.environ.get("SR_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "sr-pipeline-gpus")


def slots(gpus: list[str]) -> list[tuple[str, str]]:
    """(gpu id, lock file name) per entry of the list; a repeated id gets a slot per mention."""
    seen: dict[str, int] = {}
    out = []
    for gpu in gpus:
        k = seen.get(gpu, 0)
        seen[gpu] = k + 1
        out.append((gpu, f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.{k}.lock"))
    return out


@dataclass
class Claim:
    """GPUs held by this process: the open, flock-ed lock files."""
    gpus: list[str]
    fds: list[int] = field(default_factory=list)

    @property
    def visible_devices(self) -> str:
        return ",".join(self.gpus)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)    # closing the last descriptor drops the flock
        self.fds = []


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:   # another user's lock file: a read-only descriptor locks as well
        return os.open(path, os.O_RDONLY)


def _note_holder(fd: int, what: str) -> None:
    """Who holds the lock, for the message of a job that waits (best effort)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%H:%M:%S')}: {what}\n".encode(), 0)
    except OSError:
        pass


def holders(gpus: list[str], folder: Path | None = None) -> list[str]:
    """'gpu: holder' for every held slot of the list (for messages)."""
    folder = folder or lock_dir()
    out = []
    for gpu, name in slots(gpus):
        try:
            text = (folder / name).read_text().strip()
        except OSError:
            continue
        if text and not _is_free(folder / name):
            out.append(f"GPU {gpu}: {text}")
    return out


def _is_free(path: Path) -> bool:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def try_claim(gpus: list[str], count: int = 1, folder: Path | None = None, what: str = "") -> Claim | None:
    """`count` distinct free GPUs of the list, locked, in list order; None (nothing held) if fewer are free."""
    if not gpus:
        raise PipelineError("gpus: no GPU ids given")
    if count > len(set(gpus)):
        raise PipelineError(f"gpus: {count} GPUs asked for one job, but only {len(set(gpus))} listed "
                            f"({' '.join(gpus)})")
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        folder.chmod(0o1777)  # one folder per machine, shared by every user's jobs
    except OSError:
        pass
    claim = Claim([])
    for gpu, name in slots(gpus):
        if gpu in claim.gpus:
            continue
        fd = _open_lock(folder / name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _note_holder(fd, what)
        claim.gpus.append(gpu)
        claim.fds.append(fd)
        if len(claim.gpus) == count:
            return claim
    claim.release()
    return None


def claim(gpus: list[str], count: int = 1, folder: Path | None = None, what: str = "",
          poll: float = POLL_SECONDS) -> Claim:
    """Like try_claim, waiting (with one message) until enough GPUs are free."""
    said = False
    while True:
        got = try_claim(gpus, count, folder, what)
        if got is not None:
            return got
        if not said:
            held = "; ".join(holders(gpus, folder)) or "all held"
            print(f"gpus: waiting for {count} free GPU(s) of {' '.join(gpus)} ({held})",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(poll)


def run_on_claimed(gpus: list[str], count: int, command: list[str]) -> None:
    """Claim, then exec `command` with CUDA_VISIBLE_DEVICES set; the command holds the claim."""
    if not command:
        raise PipelineError("gpus: no command given (python -m pipeline.train.gpus --gpus '0 1' -- COMMAND)")
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(",", " ").split()
    outside = [g for g in gpus if given and g not in given]
    if outside:     # a scheduler (SLURM, Kubernetes) gave this job those GPUs and no others
        raise PipelineError(f"gpus: GPU {outside[0]} is not among the GPUs this job was given "
                            f"(CUDA_VISIBLE_DEVICES={','.join(given)}); name GPUs of that list in GPUS")
    got = claim(gpus, count, what=" ".join(command))
    for fd in got.fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": got.visible_devices}
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")   # ids as nvidia-smi numbers them
    print(f"gpus: GPU {got.visible_devices} for: {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise PipelineError(f"gpus: cannot run {command[0]} ({exc.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.gpus", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", required=True, help="GPU ids, space- or comma-separated (\"0 1 2 3\")")
    parser.add_argument("--count", type=int, default=1, help="GPUs for this job (torchrun: NPROC)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.count < 1:
            raise PipelineError(f"gpus: --count must be >= 1, got {args.count}")
        run_on_claimed(args.gpus.replace(",", " ").split(), args.count, command)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0   # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
