"""Shared test fixtures: a temporary work folder per test and access to ../shared."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import paths

_ORIGINAL_WORKDIR = paths.WORKDIR


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Point every artifact path (data/, models/, submissions/) at a fresh temp folder."""
    monkeypatch.setenv("SR_WORKDIR", str(tmp_path))
    paths.set_workdir(tmp_path)
    yield tmp_path
    paths.set_workdir(_ORIGINAL_WORKDIR)


def missing(what: str) -> None:
    """Skip the test for lack of `what` (../shared, a C compiler, Chromium) where it may be
    missing, but fail under CI=true: CI is meant to have it, and a skip there would hide an area."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what}")
    pytest.skip(what)


@pytest.fixture
def shared():
    """The ../shared folder; the test is skipped when it is absent (fails under CI=true)."""
    if not paths.SHARED.is_dir():
        missing(f"{paths.SHARED} absent (weights, fixtures and real data live there)")
    return paths.SHARED


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test: when other jobs share the machine's cores, two
    spinning intra-op threads make small convolutions ~50x slower (measured); one does not."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=paths.ROOT,
                          env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {args}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


def _make_dry_run(*args: str) -> list[str]:
    """The commands `make -n` would run (sub-makes included), from the project root, whatever
    artifacts the checkout holds (-B: every target out of date)."""
    proc = subprocess.run(["make", "-n", "-B", "--no-print-directory", *args, "SETUP="], cwd=paths.ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture
def make_dry_run():
    return _make_dry_run


@pytest.fixture
def config_file(tmp_path):
    """Write an experiment YAML in the temp folder and return its path (for `--exp PATH`):
    config_file("x5", data={"scale": 5}); no sections = all defaults."""
    import yaml

    def write(name: str = "comp", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sections) if sections else "{}\n")
        return path

    return write


@pytest.fixture(scope="session")
def swinir_fixture():
    """The SwinIR-S x4 checkpoint in the official release layout and the reference inputs and
    outputs the official implementation produced from it (../shared/fixtures); skip when absent."""
    import torch

    ckpt = paths.SHARED_FIXTURES / "swinir_s_x4_official_layout.pth"
    io = paths.SHARED_FIXTURES / "swinir_s_x4_official_layout_io.pt"
    if not (ckpt.is_file() and io.is_file()):
        missing(f"{paths.SHARED_FIXTURES}: SwinIR fixtures absent")
    return ckpt, torch.load(io, map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def hat_fixture():
    """The HAT checkpoint (HAT-S settings, 2 groups) in the official release layout and the
    reference inputs and outputs the official implementation produced (../shared/fixtures)."""
    import torch

    ckpt = paths.SHARED_FIXTURES / "hat_s2g_x4_official_layout.pth"
    io = paths.SHARED_FIXTURES / "hat_s2g_x4_official_layout_io.pt"
    if not (ckpt.is_file() and io.is_file()):
        missing(f"{paths.SHARED_FIXTURES}: HAT fixtures absent")
    return ckpt, torch.load(io, map_location="cpu", weights_only=False)
