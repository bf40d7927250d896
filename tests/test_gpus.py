"""One job per GPU (pipeline/train/gpus.py and the Makefile's GPUS=), tested without a GPU: the
ids are only strings handed to CUDA_VISIBLE_DEVICES, the claims are flock-ed files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.train import gpus


def test_claims_never_share_a_gpu(tmp_path):
    a = gpus.try_claim(["0", "1"], folder=tmp_path)
    b = gpus.try_claim(["0", "1"], folder=tmp_path)
    assert (a.gpus, b.gpus) == (["0"], ["1"]) and a.visible_devices == "0"
    assert gpus.try_claim(["0", "1"], folder=tmp_path) is None       # both held: none
    a.release()
    c = gpus.try_claim(["0", "1"], folder=tmp_path)
    assert c.gpus == ["0"]                                           # the freed one
    b.release(), c.release()


def test_several_gpus_for_one_job_are_all_or_nothing(tmp_path):
    held = gpus.try_claim(["0", "1", "2"], folder=tmp_path)          # GPU 0
    pair = gpus.try_claim(["0", "1", "2"], 2, folder=tmp_path)
    assert pair.visible_devices == "1,2"
    pair.release()
    one = gpus.try_claim(["1"], folder=tmp_path)                     # 0 and 1 held: 2 alone is too few
    assert gpus.try_claim(["0", "1", "2"], 2, folder=tmp_path) is None
    assert gpus.try_claim(["2"], folder=tmp_path).gpus == ["2"]      # ...and was not kept
    with pytest.raises(PipelineError, match=r"3 GPUs asked for one job, but only 2 listed \(0 0 1\)"):
        gpus.try_claim(["0", "0", "1"], 3, folder=tmp_path)
    held.release(), one.release()


def test_a_gpu_named_twice_is_two_slots(tmp_path):
    claims = [gpus.try_claim(["0", "0"], folder=tmp_path) for _ in range(2)]
    assert [c.gpus for c in claims] == [["0"], ["0"]]
    assert gpus.try_claim(["0", "0"], folder=tmp_path) is None


def _wrapped(tmp_path, gpu_list: str, code: str) -> subprocess.Popen:
    env = {**os.environ, "SR_GPU_LOCK_DIR": str(tmp_path), "PYTHONPATH": str(paths.ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train.gpus", "--gpus", gpu_list, "--",
                             sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


ECHO_AND_WAIT = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); sys.stdin.read()"


def test_the_command_holds_its_gpu_until_it_ends_even_by_sigkill(tmp_path):
    proc = _wrapped(tmp_path, "0 1", ECHO_AND_WAIT)
    assert proc.stdout.readline().strip() == "0"                      # CUDA_VISIBLE_DEVICES
    assert gpus.try_claim(["0"], folder=tmp_path) is None             # held by the running command
    assert gpus.holders(["0", "1"], tmp_path)[0].startswith(f"GPU 0: pid {proc.pid} ")  # exec: same pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    freed = gpus.try_claim(["0"], folder=tmp_path)                    # the kernel dropped the lock
    assert freed is not None
    freed.release()
    failing = _wrapped(tmp_path, "0", "raise SystemExit(3)")
    assert failing.wait() == 3                                       # the command's exit code


def test_a_job_waits_while_every_gpu_is_held(tmp_path):
    held = [gpus.try_claim(["0", "1"], folder=tmp_path) for _ in range(2)]
    proc = _wrapped(tmp_path, "0 1", ECHO_AND_WAIT)
    line = proc.stderr.readline()
    assert line.startswith("gpus: waiting for 1 free GPU(s) of 0 1 (GPU 0: pid ")
    held[1].release()
    assert proc.stdout.readline().strip() == "1"
    proc.communicate("")
    held[0].release()


FAKE_PIPELINE = """
import json, os, sys, time
record = {"argv": sys.argv[1:], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "threads": os.environ.get("OMP_NUM_THREADS"), "start": time.time()}
time.sleep(0.4)
record["end"] = time.time()
args = dict(zip(sys.argv[2:8:2], sys.argv[3:8:2]))          # the run folder, as stage 02 leaves it
os.makedirs(f"models/{args['--exp']}/seed{args['--seed']}/fold{args['--fold']}", exist_ok=True)
with open(sys.argv[0] + ".log", "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


def test_make_j_train_all_gives_every_job_its_own_gpu(tmp_path):
    """`make -j5 train-all GPUS="0 1 2 3"` for 5 folds (the real Makefile, a fake stage 02 that
    records its environment): every job on one GPU, no GPU with two jobs at once, one job
    waits; ARGS reach stage 02; cores split between jobs; stamps only for runs without ARGS."""
    fake = tmp_path / "fake_pipeline.py"
    fake.write_text(FAKE_PIPELINE)
    for i, name in enumerate(["requirements.txt", "data/raw/train.zip", "data/raw/evaluation.zip",
                              "data/interim/manifest.csv", "data/folds.csv"]):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (1e9 + i, 1e9 + i))                # in make's order, older than .venv
    (tmp_path / "Makefile").symlink_to(paths.ROOT / "Makefile")      # its sub-makes read ./Makefile
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT), "SR_GPU_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MAKEFLAGS", None)

    def make(*args):
        proc = subprocess.run(["make", "-C", str(tmp_path), "-j5",
                               "train-all", "EXP=demo", 'GPUS=0 1 2 3', f"VENV={paths.ROOT / '.venv'}",
                               f"PIPE={sys.executable} {fake}", *args],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        log = fake.with_name(fake.name + ".log")
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return records

    stamps = [tmp_path / f"models/demo/seed0/fold{f}/.trained" for f in range(5)]
    for args, stamped in ((["ARGS=--set train.steps=3 --set loss.sobel=0.1"], False), ([], True)):
        records = make(*args)
        assert sorted(r["argv"][r["argv"].index("--fold") + 1] for r in records) == list("01234")
        assert all(r["argv"][0] == "train" and r["argv"][7:] == args[0][5:].split() for r in records) \
            if args else all(len(r["argv"]) == 7 for r in records)
        assert all(r["gpu"] in {"0", "1", "2", "3"} for r in records)
        for a in records:                 # no two jobs on one GPU at the same time
            for b in records:
                if a is not b and a["gpu"] == b["gpu"]:
                    assert a["end"] <= b["start"] or b["end"] <= a["start"]
        assert len({r["gpu"] for r in records}) == 4    # 5 jobs on 4 GPUs: all used, one job waited
        cores = len(os.sched_getaffinity(0))
        assert {r["threads"] for r in records} == {str(max(1, cores // 5))}
        assert all(s.exists() == stamped for s in stamps)
    assert make() == []                                # a no-op rerun starts no stage 02


def test_oof_and_ensemble_claim_a_gpu_too(make_dry_run):
    """Stages 03 and 04 (and a blend's stage 04) claim one GPU of GPUS, as training claims NPROC."""
    lines = make_dry_run("oof", "ensemble", "train", "GPUS=0 1", "NPROC=2", "CUDA_VISIBLE_DEVICES=")
    claims = {line.split("-m pipeline ", 1)[1].split()[0]: line.split(" -- ", 1)[0].split("-m pipeline.train.gpus ", 1)[1]
              for line in lines if "-m pipeline.train.gpus" in line}
    assert claims == {"oof": '--gpus "0 1" --count 1', "ensemble": '--gpus "0 1" --count 1',
                      "train": '--gpus "0 1" --count 2'}
    blend = [line for line in make_dry_run("blend-submission", "GPUS=0", "CUDA_VISIBLE_DEVICES=") if "ensemble" in line]
    assert blend and blend[0].split(" -- ", 1)[0].endswith('-m pipeline.train.gpus --gpus "0" --count 1')
    assert not any("pipeline.train.gpus" in line for line in make_dry_run("oof", "GPUS=", "CUDA_VISIBLE_DEVICES="))


def test_a_schedulers_gpus_are_the_default_and_the_only_ones_claimed(make_dry_run, monkeypatch, capsys):
    """Where a scheduler set CUDA_VISIBLE_DEVICES, GPUS defaults to those GPUs, and a claim of
    another is refused with one line (before: nvidia-smi's list, and CUDA_VISIBLE_DEVICES overwritten)."""
    train = [line for line in make_dry_run("train", "CUDA_VISIBLE_DEVICES=2,3") if "pipeline train " in line]
    assert '-m pipeline.train.gpus --gpus "2 3" --count 1 -- ' in train[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpus.main(["--gpus", "1 2", "--", "true"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: gpus: GPU 1 is not among the GPUs this job was given (CUDA_VISIBLE_DEVICES=2,3); "
        "name GPUs of that list in GPUS")
