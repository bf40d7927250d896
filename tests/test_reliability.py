"""Crash-proof, concurrent-safe and bounded.

- crash consistency: every stage (00-05, training included) SIGKILLed at points spread
  over its run, then rerun to the end, leaves exactly the artifacts of an uninterrupted
  run and no temporary file (3 points per stage here, 20 with -m slow);
- locks: a second writer stops at once naming the holder; a dead holder's lock is taken
  over by exactly one of several takers; two concurrent trainers of one fold;
- an unreadable last.pt / best.pt: the remedy named, --force / --resume never start afresh;
- a zip bomb refused by name before decoding, in little memory;
- a full disk (a real EFBIG under RLIMIT_FSIZE, and ENOSPC) gives one line naming the file.
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from pipeline.__main__ import main as cli_main
from pipeline.core import io, locks, paths
from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.data import competition
from pipeline.tools import demo_data

TINY_CONFIG = """\
data: {n_folds: 2}
model: {name: espcn, args: {channels: [8, 8]}}
train: {steps: 8, batch_size: 4, lr_patch: 8, val_every: 4, ckpt_every: 2, lr: 1.0e-3, ema: 0.9,
        milestones: [0.5], lr_factors: [1.0, 0.5], precision: fp32}
infer: {tta: 8, tile: 0, precision: fp32}
"""
EXP = "tiny"


def stage_args(config: Path) -> dict[str, list[str]]:
    """Each stage's command line (training: fold 0, the other folds are not needed)."""
    return {"unzip": ["unzip", "--exp", str(config)], "folds": ["folds", "--exp", str(config)],
            "train": ["train", "--exp", str(config), "--fold", "0"], "oof": ["oof", "--exp", str(config)],
            "ensemble": ["ensemble", "--exp", str(config)], "submission": ["submission", "--exp", str(config)]}


STAGES = ["unzip", "folds", "train", "oof", "ensemble", "submission"]


def run_stage(argv: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "no best.pt for fold 1", lock take-overs: not the point here
        assert cli_main(argv) == 0, argv


def leftovers(root: Path) -> list[str]:
    """Temporaries, half-swapped folders and locks anywhere under the work folder."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if ".tmp" in p.name or p.name.endswith((".old", ".lock", ".break")))


# --- what each stage wrote, in comparable form ------------------------------------------

VOLATILE = {"seconds", "created"}   # wall-clock facts in ensemble.json / summary.json


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _json_without_clock(data: bytes) -> dict:
    return {k: v for k, v in json.loads(data).items() if k not in VOLATILE}


def _checkpoint_state(data: bytes) -> dict:
    import io as bytes_io
    return torch.load(bytes_io.BytesIO(data), map_location="cpu", weights_only=False)


def _board(folder: Path) -> dict:
    """The TensorBoard events of a run as TensorBoard shows them (a resumed run's purge marker
    applied): event file names hold the clock and the pid, so files cannot be compared."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    tags = board.Tags()
    return {**{t: [(e.step, e.value) for e in board.Scalars(t)] for t in tags["scalars"]},
            **{t: [(e.step, e.encoded_image_string) for e in board.Images(t)] for t in tags["images"]}}


def artifacts(stage: str, root: Path) -> dict:
    """The stage's artifacts under work folder `root`: bytes where the stage is
    deterministic, the decoded content where a file holds a clock reading."""
    if stage == "unzip":
        return _files(root / "data/interim")
    if stage == "folds":
        return {"folds.csv": (root / "data/folds.csv").read_bytes()}
    if stage == "train":
        run = root / "models" / EXP / "seed0" / "fold0"
        files = {k: v for k, v in _files(run).items() if not k.startswith("events.out.tfevents.")}
        files["tensorboard"] = _board(run)
        return files
    if stage == "oof":
        files = _files(root / "models" / EXP / "oof")
        files["summary.json"] = _json_without_clock(files["summary.json"])
        return files
    if stage == "ensemble":
        files = _files(root / "data/predictions" / EXP)
        files["ensemble.json"] = _json_without_clock(files["ensemble.json"])
        return files
    latest = (root / "submissions" / f"{EXP}-latest.txt").read_text().strip()
    with zipfile.ZipFile(root / "submissions" / latest) as zf:   # the zip's name holds the time
        return {info.filename: zf.read(info) for info in zf.infolist()}


def deep_equal(a, b) -> bool:
    """Equal content: tensors and arrays element for element, containers recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b or (a != a and b != b)   # NaN equals NaN here


def assert_same_artifacts(stage: str, got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected), stage
    for name, value in expected.items():
        if value == got[name]:
            continue
        # checkpoints: torch.save writes a random serialization id into every file, so equal
        # content is never equal bytes; everything in them must be equal, the full training
        # state of last.pt included (weights, EMA, optimizer, RNG states, log)
        assert name.endswith(".pt"), f"{stage}: {name} differs"
        assert deep_equal(_checkpoint_state(got[name]), _checkpoint_state(value)), f"{stage}: {name} differs"


# --- the reference run and the kills ------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of every stage on a tiny demo competition; the work folder as
    it was before and after each stage and the crash points each stage passes."""
    base = tmp_path_factory.mktemp("crash")
    ref = base / "ref"
    config = base / f"{EXP}.yaml"
    config.write_text(TINY_CONFIG)
    before = paths.WORKDIR
    paths.set_workdir(ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo_data.build_demo(exp=str(config), n_train=4, n_test=2, tile=32)
        states, points = {}, {}
        shutil.copytree(ref, base / "before-unzip", copy_function=shutil.copy2)
        for stage in STAGES:
            io.crash_points_passed = 0
            run_stage(stage_args(config)[stage])
            points[stage] = io.crash_points_passed
            states[stage] = base / f"after-{stage}"
            shutil.copytree(ref, states[stage], copy_function=shutil.copy2)
    finally:
        paths.set_workdir(before)
        torch.set_num_threads(threads)
    return {"base": base, "config": config, "states": states, "points": points,
            "before": {s: base / "before-unzip" if i == 0 else states[STAGES[i - 1]]
                       for i, s in enumerate(STAGES)}}


def killed_run(argv: list[str], crash_at: int | None = None, delay: float | None = None) -> tuple[bool, float]:
    """Run a stage in a forked child that is SIGKILLed at its `crash_at`-th crash point
    (SR_CRASH_AT, pipeline.core.io.crash_point) or after `delay` seconds. Returns whether it was
    killed and, if it was not, how long it ran."""
    began = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            torch.set_num_threads(1)
            io.crash_points_passed = 0
            if crash_at is not None:
                os.environ["SR_CRASH_AT"] = str(crash_at)
            run_stage(argv)
            code = 0
        finally:
            os._exit(code)
    done, status = 0, 0
    if delay is not None:
        while not done and time.perf_counter() - began < delay:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.001)
        if not done:
            os.kill(pid, signal.SIGKILL)
    if not done:
        _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - began
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"{argv}: the child failed before its kill"
        return False, seconds
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True, seconds


def kill_and_rerun(reference, stage: str, trial: Path, crash_at=None, delay=None) -> tuple[bool, float]:
    """From the state before `stage`: a killed run, then a rerun to the end; its artifacts
    are the uninterrupted run's and nothing is left behind. Returns killed_run's answer."""
    shutil.copytree(reference["before"][stage], trial, copy_function=shutil.copy2)
    before = paths.WORKDIR
    paths.set_workdir(trial)
    try:
        argv = stage_args(reference["config"])[stage]
        outcome = killed_run(argv, crash_at=crash_at, delay=delay)
        run_stage(argv)   # the rerun, to the end
    finally:
        paths.set_workdir(before)
    assert_same_artifacts(stage, artifacts(stage, trial), artifacts(stage, reference["states"][stage]))
    assert leftovers(trial) == [], f"{stage}: left behind after the rerun"
    return outcome


def spread(n_points: int, k: int) -> list[int]:
    """k crash points spread over 1..n_points, from early to the last one."""
    return sorted({round(1 + (n_points - 1) * (j + 0.5) / k) for j in range(k)})


@pytest.mark.parametrize("stage", STAGES)
def test_stage_killed_at_three_points_reruns_to_the_same_artifacts(reference, stage, tmp_path, torch_one_thread):
    n = reference["points"][stage]
    assert n >= 3, f"{stage} passes only {n} crash points"
    chosen = spread(n, 3)
    assert len(chosen) == 3
    for crash_at in chosen:
        assert kill_and_rerun(reference, stage, tmp_path / f"k{crash_at}", crash_at=crash_at)[0], crash_at


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_stage_killed_at_twenty_points_reruns_to_the_same_artifacts(reference, stage, tmp_path, torch_one_thread):
    """Up to 10 instrumented points over the run, then kills after a random delay within the
    duration of an uninterrupted run until 20 kills have landed (a delay that outlasts the
    run is a plain rerun and counts for nothing; the next delays stay inside that run's
    time). One torch thread, as the reference: float sums differ between thread counts."""
    n = reference["points"][stage]
    rng = random.Random(stage)
    landed = 0
    for crash_at in spread(n, 10):
        landed += kill_and_rerun(reference, stage, tmp_path / f"k{crash_at}", crash_at=crash_at)[0]
    assert landed == len(spread(n, 10))
    duration = float("inf")
    for attempt in range(60):
        if landed == 20:
            break
        killed, seconds = kill_and_rerun(reference, stage, tmp_path / f"t{attempt}",
                                         delay=rng.uniform(0, min(duration, 10.0)) if attempt else 1e9)
        landed += killed and attempt > 0   # the first run only measures the duration
        if not killed:
            duration = min(duration, seconds)
    assert landed == 20, f"{stage}: {landed} kills landed"


def test_kill_between_the_two_renames_of_a_folder_keeps_the_previous_one(workdir):
    """atomic_dir replaces a folder by two renames; killed between them, the next writer
    (holding the lock) puts the previous folder back before anything else."""
    target = workdir / "out"
    with locks.locked(target), io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("previous")
    pid = os.fork()
    if pid == 0:
        try:
            io.crash_points_passed = 0
            os.environ["SR_CRASH_AT"] = "3"   # locked, before swap, mid swap
            with locks.locked(target), io.atomic_dir(target) as tmp:
                (tmp / "a.txt").write_text("new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and not target.exists()
    with pytest.warns(UserWarning, match="took over the lock of pid .* whose process is gone"):
        with locks.locked(target):
            assert (target / "a.txt").read_text() == "previous"
    assert leftovers(workdir) == []


# --- locks -----------------------------------------------------------------------------

def test_a_waiting_writer_queues_behind_a_live_holder(workdir):
    """locked(wait=...) (the submissions ledger): a second writer waits for the holder to
    finish instead of stopping, and still stops, naming it, once its patience runs out."""
    target = workdir / "submissions" / "ledger.csv"
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:                       # the holder: takes the lock, waits for the word, lets go
        try:
            with locks.locked(target):
                os.write(ready[1], b"x")
                os.read(release[0], 1)
        finally:
            os._exit(0)
    os.read(ready[0], 1)
    released = threading.Event()

    def release_holder():
        released.set()
        os.write(release[1], b"x")

    try:
        with pytest.raises(PipelineError, match=f"is locked by pid {pid} "):
            with locks.locked(target, wait=0.3):
                pass
        threading.Timer(0.5, release_holder).start()
        with locks.locked(target, wait=30):
            assert released.is_set()           # acquired only after the holder was told to let go
            assert json.loads(locks.lock_path(target).read_text())["pid"] == os.getpid()
    finally:
        if not released.is_set():              # a failure above: never leave the holder waiting
            release_holder()
        os.waitpid(pid, 0)
    assert not locks.lock_path(target).exists()


def test_second_writer_stops_at_once_naming_the_holder(workdir):
    target = workdir / "models" / "x" / "seed0" / "fold0"
    with locks.locked(target):
        holder = json.loads(locks.lock_path(target).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        pid = os.fork()
        if pid == 0:
            try:
                with locks.locked(target):
                    os._exit(3)        # must not get here
            except PipelineError as exc:
                Path(workdir / "msg").write_text(str(exc))
                os._exit(0)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert (workdir / "msg").read_text() == (
            f"{target} is locked by pid {os.getpid()} on {socket.gethostname()} since {holder['since']}: "
            "another writer is at work on it (wait for it or stop it)")
        with locks.locked(target):   # re-entrant in the holding process
            pass
        assert locks.lock_path(target).exists()
    assert not locks.lock_path(target).exists()


def test_a_lock_held_on_another_host_is_never_taken_over(workdir):
    target = workdir / "data" / "folds.csv"
    lock = locks.lock_path(target)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "since": "2026-01-02T03:04:05Z"}))
    with pytest.raises(PipelineError, match=rf"folds.csv is locked by pid 1 on gpu-node-7 since "
                                            rf"2026-01-02T03:04:05Z: .*if that process is gone, delete {lock}"):
        with locks.locked(target):
            pass
    assert lock.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_by_exactly_one_of_several_takers(workdir):
    """Five processes find the lock of a dead process at the same moment: one takes it
    over (one warning), the four others stop naming that one, never two holders."""
    target = workdir / "data" / "interim"
    for trial in range(3):
        lock = locks.lock_path(target)
        lock.parent.mkdir(parents=True, exist_ok=True)
        dead = _dead_pid()
        lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": "then", "start": "1"}))
        start_at = time.time() + 0.3
        children = []
        for k in range(5):
            pid = os.fork()
            if pid == 0:
                code = 9
                try:
                    time.sleep(max(0.0, start_at - time.time()))
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        outcome = {"pid": os.getpid()}
                        try:
                            with locks.locked(target):
                                outcome["held"] = True
                                time.sleep(1.0)
                            code = 0
                        except PipelineError as exc:
                            outcome["refused"] = str(exc)
                            code = 1
                    outcome["warnings"] = [str(w.message) for w in caught]
                    (workdir / f"outcome{trial}.{os.getpid()}").write_text(json.dumps(outcome))
                finally:
                    os._exit(code)
            children.append(pid)
        codes = [os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in children]
        assert sorted(codes) == [0, 1, 1, 1, 1], codes
        outcomes = [json.loads(p.read_text()) for p in workdir.glob(f"outcome{trial}.*")]
        winner = next(o["pid"] for o in outcomes if o.get("held"))
        # one process broke the stale lock (with the one warning); it may then lose the
        # O_EXCL race to another taker, which is fine: there is only ever one holder
        took_over = [w for o in outcomes for w in o["warnings"]]
        assert len(took_over) == 1 and f"took over the lock of pid {dead} " in took_over[0]
        for outcome in outcomes:
            if not outcome.get("held"):
                assert f"is locked by pid {winner} on" in outcome["refused"]
        assert not lock.exists() and not lock.with_name(lock.name + ".break").exists()


def test_two_concurrent_trainers_of_one_fold(workdir, capsys):
    """The first fault: the second trainer of models/<exp>/seed0/fold0 stops at once
    (well before the first ends) with one line naming the first, whose log is one writer's;
    once the first is killed, its lock is taken over with a warning."""
    config = workdir / f"{EXP}.yaml"
    config.write_text(TINY_CONFIG.replace("steps: 8", "steps: 4000").replace("ckpt_every: 2", "ckpt_every: 10"))
    paths.set_workdir(workdir)
    demo_data.build_demo(exp=str(config), n_train=4, n_test=2, tile=32)
    run_stage(stage_args(config)["unzip"])
    run_stage(stage_args(config)["folds"])
    env = {**os.environ, "SR_WORKDIR": str(workdir), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--exp", str(config), "--fold", "0"],
                             cwd=paths.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = paths.run_dir(EXP, 0, 0)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    capsys.readouterr()
    assert cli_main(stage_args(config)["train"]) == 1   # the second trainer (this process)
    assert first.poll() is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {run} is locked by pid {first.pid} on {socket.gethostname()} since ")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = read_checkpoint(run / "last.pt")["step"]
    log_before = pd.read_csv(run / "log.csv")
    assert list(log_before["step"]) == list(range(killed_at + 1))   # one writer's log, no interleaving
    # the dead trainer's lock is taken over (with a warning) and a (short) run goes through
    with pytest.warns(UserWarning, match=f"took over the lock of pid {first.pid} on "):
        assert cli_main(stage_args(config)["train"] + ["--steps", "10", "--force"]) == 0
    assert leftovers(workdir) == []


# --- unreadable checkpoints ---------------------------------------------------------------

@pytest.fixture
def trained(workdir):
    config = workdir / f"{EXP}.yaml"
    config.write_text(TINY_CONFIG)
    demo_data.build_demo(exp=str(config), n_train=4, n_test=2, tile=32)
    for stage in ("unzip", "folds", "train"):
        run_stage(stage_args(config)[stage])
    return config


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_truncated_checkpoint_names_the_remedy_and_force_or_resume_never_start_afresh(trained, workdir, capsys,
                                                                                     name):
    """The second fault (the CLI's own handler, in-process: the one line on stderr)."""
    run = paths.run_dir(EXP, 0, 0)
    train = stage_args(trained)["train"]
    for flags in (["--force"], ["--resume", "never"]):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:len(data) // 2])
        capsys.readouterr()
        assert cli_main(train) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"error: {run / name}: not a readable checkpoint \(\w+\); rerun with --force "
            r"\(or --resume never\) to start this run afresh over it", lines[0]), lines
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cli_main(train + flags) == 0
        said = [str(w.message) for w in caught if "starting afresh" in str(w.message)]
        if flags == ["--force"] and name == "best.pt":
            assert said == []     # --force does not even read the old run
        else:
            assert len(said) == 1 and f"{name}: not a readable checkpoint" in said[0] and flags[0] in said[0]
        out = capsys.readouterr().out
        assert "best val SSIM" in out and ", resumed at" not in out
        assert read_checkpoint(run / "last.pt")["finished"] and read_checkpoint(run / "best.pt")
        assert list(pd.read_csv(run / "log.csv")["step"]) == list(range(9))


# --- input bounds ----------------------------------------------------------------------------

def zero_bomb_member(height: int, width: int, scratch: Path) -> tuple[bytes, int, int]:
    """A deflated uint8 RGB TIFF of zeros made by tifffile, built without compressing its
    gigabytes: after a full flush every 1 MiB block of zeros deflates to the same bytes.
    Returns the deflate stream, the uncompressed size and its CRC-32."""
    sparse = scratch / "bomb.tif"   # tifffile writes the header, then seeks over the (zero) data
    tifffile.imwrite(sparse, shape=(height, width, 3), dtype=np.uint8, photometric="rgb")
    with tifffile.TiffFile(sparse) as tif:
        offset = tif.pages.first.dataoffsets[0]
    data_size = sparse.stat().st_size - offset
    assert data_size == height * width * 3     # everything after the header is the pixels
    with open(sparse, "rb") as fh:
        header = fh.read(offset)
    sparse.unlink()
    block = 1 << 20
    n_blocks, rest = divmod(data_size, block)
    parts = []
    for data, flush in ((header, zlib.Z_FULL_FLUSH), (bytes(block), zlib.Z_FULL_FLUSH)):
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts.append(deflate.compress(data) + deflate.flush(flush))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = parts[0] + parts[1] * n_blocks + deflate.compress(bytes(rest)) + deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header)
    zeros = bytes(block)
    for _ in range(n_blocks):
        crc = zlib.crc32(zeros, crc)
    return stream, offset + data_size, zlib.crc32(bytes(rest), crc)


def write_zip_with_deflated(path: Path, name: str, stream: bytes, size: int, crc: int,
                            extra_members: dict[str, bytes]) -> None:
    """A zip holding one pre-deflated member (then ordinary ones appended by zipfile)."""
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                          len(name), 0, 0, 0, 0, 0o644 << 16, 0)
    body = local + name.encode() + stream
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name), len(body), 0)
    path.write_bytes(body + central + name.encode() + end)
    with zipfile.ZipFile(path, "a") as zf:
        for member, data in extra_members.items():
            zf.writestr(member, data)


BOMB_SCRIPT = textwrap.dedent("""
    import json, re, time
    import pipeline.stages.s00_unzip   # imported first: the time is the stage's, not pandas' import
    from pipeline.__main__ import main
    began = time.perf_counter()
    code = main(["unzip"])
    # VmHWM: this process's peak RSS (ru_maxrss would carry the forking test process's over exec)
    peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    print(json.dumps({"code": code, "seconds": time.perf_counter() - began, "peak_mb": peak_kb / 1024}))
""")


def test_zip_bomb_refused_by_name_before_decoding(workdir, tmp_path_factory):
    """The third fault: a train.zip whose high-res TIFF is a 24000x30000 image of
    zeros (2.2 GB decoded) is refused with one line, nothing extracted, and never
    decoded: the process's peak stays under 500 MB (measured inside the process)."""
    stream, size, crc = zero_bomb_member(24000, 30000, tmp_path_factory.mktemp("bomb"))
    small = competition.tif_bytes(np.zeros((4, 5, 3), np.uint8))
    paths.RAW.mkdir(parents=True)
    write_zip_with_deflated(paths.TRAIN_ZIP, "train_0_high.tif", stream, size, crc, {"train_0_low.tif": small})
    paths.EVAL_ZIP.write_bytes(competition.zip_bytes([("test_0_low.tif", small)]))
    assert paths.TRAIN_ZIP.stat().st_size < 3_000_000
    with zipfile.ZipFile(paths.TRAIN_ZIP) as zf, zf.open("train_0_high.tif") as fh:   # a real TIFF
        with tifffile.TiffFile(__import__("io").BytesIO(fh.read(1 << 16))) as tif:
            assert tif.pages.first.shape == (24000, 30000, 3)
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], cwd=paths.ROOT, capture_output=True, text=True,
                          env={**os.environ, "SR_WORKDIR": str(workdir)}, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {paths.TRAIN_ZIP}:train_0_high.tif: 24000x30000 image (720.0 Mpx, 2.2 GB uncompressed, "
        f"{len(stream) / 1e6:.1f} MB in the zip) exceeds data.max_pixels = 28800000 (28.8 Mpx); refused before "
        "decoding, nothing extracted (raise data.max_pixels if the image is genuine)"]
    assert result["peak_mb"] < 500, result
    assert not paths.INTERIM.exists() and leftovers(workdir) == []


def test_image_over_max_pixels_and_extraction_over_free_space_refused(workdir, config_file, monkeypatch):
    from pipeline.stages import s00_unzip
    rng = np.random.default_rng(0)
    high = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    members = [("train_0_high.tif", competition.tif_bytes(high)),
               ("train_0_low.tif", competition.tif_bytes(high[::4, ::4]))]
    paths.RAW.mkdir(parents=True)
    paths.TRAIN_ZIP.write_bytes(competition.zip_bytes(members))
    paths.EVAL_ZIP.write_bytes(competition.zip_bytes([("test_0_low.tif", members[1][1])]))
    small = config_file("small", data={"max_pixels": 1000})
    with pytest.raises(PipelineError, match=r"train.zip:train_0_high.tif: 40x48 image \(0.0 Mpx, 6.0 KB "
                                            r"uncompressed, .*\) exceeds data.max_pixels = 1000"):
        cli_main_raising(["unzip", "--exp", str(small)])
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(PipelineError, match=r"data/interim: extracting needs 18.8 KB but only 5.0 KB is free "
                                            r"on its disk .*nothing extracted"):
        s00_unzip.extract(s00_unzip.load_config("demo")["data"])
    assert not paths.INTERIM.exists()


def cli_main_raising(argv: list[str]) -> None:
    """A stage's main() as the CLI calls it, letting the PipelineError through."""
    import argparse
    import importlib

    from pipeline.__main__ import COMMANDS
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    module.main(parser.parse_args(argv[1:]))


# --- a full disk ---------------------------------------------------------------------------

def full_disk_run(limit: int, *argv, workdir: Path) -> subprocess.CompletedProcess:
    """The CLI in a forked child whose files may not grow past `limit` bytes (RLIMIT_FSIZE,
    SIGXFSZ ignored so that a write past it fails with EFBIG: unprivileged, so it runs in
    CI, where mounting a small tmpfs does not)."""
    err = workdir / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            torch.set_num_threads(1)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                code = cli_main([str(a) for a in argv])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    text = err.read_text()
    err.unlink()
    return subprocess.CompletedProcess(argv, os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, "", text)


def test_full_disk_during_unzip_and_training_one_line_previous_intact(workdir):
    """The fourth fault: out of space mid-way through stage 00 (re-extracting over a
    previous data/interim) and while training writes a checkpoint."""
    config = workdir / f"{EXP}.yaml"
    config.write_text(TINY_CONFIG)
    demo_data.build_demo(exp=str(config), n_train=4, n_test=2, tile=32)
    run_stage(stage_args(config)["unzip"])
    previous = _files(paths.INTERIM)
    demo_data.build_demo(exp=str(config), n_train=4, n_test=2, tile=32, seed=1)   # other zips
    proc = full_disk_run(2000, "unzip", "--exp", config, workdir=workdir)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {paths.INTERIM}/train/train_0_") and lines[0].endswith(
        ".tif: no space left on device (file size limit exceeded) (nothing was replaced, the temporary was "
        "removed; free some space and rerun)")
    assert _files(paths.INTERIM) == previous and leftovers(workdir) == []

    run_stage(stage_args(config)["unzip"])
    run_stage(stage_args(config)["folds"])
    proc = full_disk_run(6000, "train", "--exp", config, "--fold", 0, workdir=workdir)
    lines = proc.stderr.strip().splitlines()
    run = paths.run_dir(EXP, 0, 0)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {run}/") and "no space left on device" in lines[0]
    assert leftovers(workdir) == []
    run_stage(stage_args(config)["train"])   # space again: the run picks up and ends


def test_enospc_inside_an_atomic_write_names_the_file_keeps_the_previous(workdir, monkeypatch):
    """ENOSPC itself (errno 28), as a full disk raises it, in a file and in a folder write."""
    import errno
    target = workdir / "data" / "folds.csv"
    io_path = target.parent
    io_path.mkdir(parents=True)
    target.write_text("previous")

    def full(self, data):   # as on a full disk: the file is created, its write() fails
        open(self, "w").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(io.NoSpaceError, match=rf"^{target}: no space left on device \(nothing was replaced"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("new")
    folder = workdir / "data" / "predictions" / "x"
    with pytest.raises(io.NoSpaceError, match=rf"^{folder}/ensemble.json: no space left on device"):
        with io.atomic_dir(folder) as tmp:
            (tmp / "ensemble.json").write_text("{}")
    monkeypatch.undo()
    assert target.read_text() == "previous" and not folder.exists() and leftovers(workdir) == []


def test_out_of_space_outside_the_atomic_writers_is_one_line_too(monkeypatch, capsys):
    """The CLI's last resort: an ENOSPC from a write no atomic writer wrapped."""
    import errno

    from pipeline.stages import s01_folds

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/some.file")

    monkeypatch.setattr(s01_folds, "main", full)
    assert cli_main(["folds"]) == 1
    assert capsys.readouterr().err == "error: /data/some.file: no space left on device\n"
