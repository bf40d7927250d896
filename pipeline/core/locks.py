"""Writer locks: one writer per artifact, on one machine or many sharing a disk.

    with locks.locked(out_dir), io.atomic_dir(out_dir) as tmp:   # a folder artifact
        ...write into tmp...
    with locks.locked(path), io.atomic_path(path) as tmp:        # a file artifact
        tmp.write_text(...)

`locked(target)` holds the lock file `.<name>.lock` beside the target (created with
O_CREAT|O_EXCL, holding the JSON {pid, host, since}, so it works on shared disks where
flock does not); a second writer stops at once with one line naming the holder, and a
lock whose process is gone (same host) is taken over with a warning, the temporaries it
left removed. Readers take no lock: they only ever see renamed, complete files.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError
from pipeline.core.io import crash_point, no_space_error

LOCK_WAIT_UNWRITTEN = 5.0   # seconds a just-created lock may stay empty (its taker writing it)
_held: dict[tuple[int, Path], int] = {}  # (pid, lock file) this process holds -> depth (re-entrant;
                                         # the pid keeps a forked child from taking it for its own)
# temporaries of a target `name`: atomic_path's `.name.XXXXXXXX.tmp<suffix>`, atomic_dir's
# `.name.XXXXXXXX.tmp` (mkstemp's 8 random characters) and `.name.old`
_TEMPORARY = r"\.{name}\.(?:[a-z0-9_]{{8}}\.tmp.*|old)"


def lock_path(target: str | Path) -> Path:
    """The lock file of an artifact: `.<name>.lock` beside it (outside a folder that is
    swapped whole)."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from /proc; None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    """Is the lock's process still running? Another host's process cannot be seen: yes."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():  # our own pid, yet not held by us: a previous life
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True                      # it exists, and /proc tells no more
    state, start = stat
    if state in ("Z", "X"):
        return False                     # killed, not yet reaped by its parent
    return holder.get("start") in (None, start)  # another start time: the pid was reused


def _read_lock(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except FileNotFoundError:
        return None


def _parse_holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _break_stale(lock: Path, stale: str) -> bool:
    """Remove `lock` if it still holds exactly `stale`. Two takers of one stale lock could
    otherwise both remove it, the second removing the first one's fresh lock: a guard file
    (O_EXCL too) lets one compare-and-remove at a time."""
    guard = lock.with_name(lock.name + ".break")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > 10 * LOCK_WAIT_UNWRITTEN:  # its breaker died
                guard.unlink()
        time.sleep(0.01)
        return False
    try:
        if _read_lock(lock) == stale:
            lock.unlink()
            return True
        return False
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def describe_holder(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def _acquire(lock: Path, what: str, wait: float = 0.0) -> str:
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "start": (_proc_stat(os.getpid()) or (None, None))[1]})
    lock.parent.mkdir(parents=True, exist_ok=True)
    patience = time.time() + wait
    deadline = max(time.time() + 4 * LOCK_WAIT_UNWRITTEN, patience)
    while time.time() < deadline:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            text = _read_lock(lock)
            if text is None:
                continue                      # released meanwhile: try again
            holder = _parse_holder(text)
            if holder is None:                # created, not yet written by its taker
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - lock.stat().st_mtime < LOCK_WAIT_UNWRITTEN:
                        time.sleep(0.02)
                        continue
                holder = {"pid": "?", "host": "?", "since": "?"}   # its taker died before writing it
            elif _holder_alive(holder):
                if time.time() < patience:    # a short critical section (the ledger): wait
                    time.sleep(0.05)
                    continue
                same_host = holder.get("host") == socket.gethostname()
                raise PipelineError(
                    f"{what} is locked by {describe_holder(holder)}: another writer is at work on it "
                    f"(wait for it or stop it{'' if same_host else f'; if that process is gone, delete {lock}'})")
            if _break_stale(lock, text):
                warnings.warn(f"{what}: took over the lock of {describe_holder(holder)}, "
                              "whose process is gone")
            continue
        try:
            os.write(fd, mine.encode())
        except OSError as exc:   # a full disk: no empty lock may stay behind
            lock.unlink(missing_ok=True)
            raise no_space_error(exc, lock) or exc from None
        finally:
            os.close(fd)
        return mine
    raise PipelineError(f"{what}: could not take its lock {lock} (it kept changing hands)")


def remove_temporaries(target: str | Path) -> None:
    """Clean up after a killed writer of `target`: its temporaries beside it and, for a
    folder, the temporary files in it; a folder caught mid-swap is put back. Only the
    lock holder may call this."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():  # killed between atomic_dir's two renames: put it back
        os.replace(old, target)
    beside = re.compile(_TEMPORARY.format(name=re.escape(target.name)))
    inside = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp.*")
    for folder, pattern in ((target.parent, beside), (target, inside)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if pattern.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(target: str | Path, what: str | None = None, wait: float = 0.0) -> Iterator[None]:
    """Hold the write lock of `target` (a file or folder artifact) for the block.

        with locks.locked(paths.FOLDS):           # one line, around everything that writes it
            ...

    A second writer (any process, any machine on a shared disk) stops at once with a
    PipelineError: "<what> is locked by pid P on HOST since T". A lock left by a process
    that is gone (same host) is taken over with a warning, and the temporaries it left are
    removed. Re-entrant within a process; `what` (default: the target's path) names it.
    `wait` > 0: a live holder is waited for that many seconds first (for artifacts written
    in a short read-modify-write, such as the submissions ledger, where a second writer
    should queue rather than stop).
    """
    lock = lock_path(target)
    key = (os.getpid(), lock)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    mine = _acquire(lock, what or str(target), wait)
    _held[key] = 1
    try:
        crash_point("locked")
        remove_temporaries(target)
        yield
    finally:
        del _held[key]
        if _read_lock(lock) == mine:
            lock.unlink(missing_ok=True)


