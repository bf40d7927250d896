"""Stage 00 (unzip): every bad input gives one clear message; extraction is all-or-nothing."""
from __future__ import annotations

import hashlib
import io as bytes_io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.core import artifacts, paths
from pipeline.core.config import DEFAULTS
from pipeline.core.errors import PipelineError
from pipeline.stages import s00_unzip

SCALE = 4
LOW_HW = (4, 5)


def tif(image: np.ndarray, **kwargs) -> bytes:
    buf = bytes_io.BytesIO()
    tifffile.imwrite(buf, image, **kwargs)
    return buf.getvalue()


def rand_image(rng, hw, channels=3, dtype=np.uint8) -> np.ndarray:
    shape = (*hw, channels) if channels else hw
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def make_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def good_members(n_train=3, n_test=2, scale=SCALE, seed=0):
    """Valid train/evaluation members (name -> tif bytes) and the images behind them."""
    rng = np.random.default_rng(seed)
    train, evaluation, images = {}, {}, {}
    for i in range(n_train):
        low = rand_image(rng, LOW_HW)
        high = rand_image(rng, (LOW_HW[0] * scale, LOW_HW[1] * scale))
        images[f"train_{i}_low.tif"], images[f"train_{i}_high.tif"] = low, high
        train[f"train_{i}_low.tif"], train[f"train_{i}_high.tif"] = tif(low), tif(high)
    for i in range(n_test):
        low = rand_image(rng, LOW_HW)
        images[f"test_{i}_low.tif"] = low
        evaluation[f"test_{i}_low.tif"] = tif(low)
    return train, evaluation, images


def build(train=None, evaluation=None, **kwargs):
    good_train, good_eval, images = good_members(**kwargs)
    make_zip(paths.TRAIN_ZIP, good_train if train is None else train)
    make_zip(paths.EVAL_ZIP, good_eval if evaluation is None else evaluation)
    return images


def run(data=None):
    return s00_unzip.extract(dict(DEFAULTS["data"], **(data or {})))


def refused(match: str, data=None):
    with pytest.raises(PipelineError, match=match) as info:
        run(data)
    assert not paths.INTERIM.exists(), "a refused input must leave no data/interim"
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- the good case

def test_extracts_both_zips_with_manifest(workdir):
    images = build()
    manifest = run()
    assert list(manifest.columns) == artifacts.MANIFEST_COLUMNS
    assert manifest["split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert manifest["id"].tolist() == [0, 1, 2, 0, 1]
    loaded = artifacts.load_manifest()
    for row in loaded.itertuples():
        low = tifffile.imread(row.low_path)
        assert low.dtype == np.uint8 and low.shape == (4, 5, 3)
        np.testing.assert_array_equal(low, images[row.low_path.name])
        assert hashlib.sha256(row.low_path.read_bytes()).hexdigest() == row.low_sha256
        assert (row.low_height, row.low_width) == (4, 5)
        if row.split == "train":
            assert row.high_path == paths.INTERIM / "train" / f"train_{row.id}_high.tif"
            np.testing.assert_array_equal(tifffile.imread(row.high_path), images[row.high_path.name])
            assert (row.high_height, row.high_width) == (16, 20)
        else:
            assert row.low_path.parent == paths.INTERIM / "evaluation" and row.high_path is None
    assert len(artifacts.load_manifest("test")) == 2
    # nothing but the extracted scenes, the manifest and the stamp; no temp folder beside it
    assert sorted(p.name for p in paths.INTERIM.iterdir()) == ["evaluation", "manifest.csv", "train", "zips.json"]
    assert [p.name for p in paths.DATA.iterdir() if p.name.startswith(".")] == []


def test_members_in_a_subfolder_are_flattened(workdir):
    train, evaluation, _ = good_members()
    build(train={f"train/{k}": v for k, v in train.items()})
    manifest = run()
    assert sorted(p.name for p in (paths.INTERIM / "train").iterdir()) == sorted(train)
    assert len(manifest) == 5


# ---------------------------------------------------------------- bad inputs, one message each

def test_missing_zip(workdir):
    make_zip(paths.TRAIN_ZIP, good_members()[0])
    message = refused("zip not found")
    assert message.startswith(str(paths.EVAL_ZIP))


def test_not_a_zip(workdir):
    build()
    paths.TRAIN_ZIP.write_bytes(b"this is a text file, not a zip" * 10)
    assert refused("not a zip file").startswith(str(paths.TRAIN_ZIP))


def test_crc_failure(workdir):
    train, _, _ = good_members()
    build()
    raw = bytearray(paths.TRAIN_ZIP.read_bytes())
    # flip one pixel byte of train_1_high.tif inside the (stored) zip
    start = raw.find(train["train_1_high.tif"])
    assert start > 0
    raw[start + len(train["train_1_high.tif"]) - 10] ^= 0xFF
    paths.TRAIN_ZIP.write_bytes(bytes(raw))
    message = refused("CRC check failed")
    assert "train.zip:train_1_high.tif" in message


def test_tiff_that_does_not_decode(workdir):
    train, _, _ = good_members()
    train["train_2_low.tif"] = b"II*\x00 definitely not a tiff body"
    build(train=train)
    assert "train.zip:train_2_low.tif: not a readable TIFF" in refused("not a readable TIFF")


def test_low_without_high(workdir):
    train, _, _ = good_members()
    del train["train_1_high.tif"]
    build(train=train)
    assert refused("has no matching").endswith("'train_1_low.tif' has no matching 'train_1_high.tif'")


def test_high_without_low(workdir):
    train, _, _ = good_members()
    del train["train_2_low.tif"]
    build(train=train)
    assert refused("has no matching").endswith("'train_2_high.tif' has no matching 'train_2_low.tif'")


def test_duplicate_ids(workdir):
    train, _, _ = good_members()
    train["train_01_low.tif"] = train["train_1_low.tif"]  # 01 and 1 are the same scene id
    build(train=train)
    assert "duplicate id 1: 'train_1_low.tif' and 'train_01_low.tif'" in refused("duplicate id")


def test_high_not_exactly_scale_times_low(workdir):
    train, _, _ = good_members()
    train["train_0_high.tif"] = tif(rand_image(np.random.default_rng(1), (16, 21)))
    build(train=train)
    assert "high 16x21 is not exactly 4 x low 4x5" in refused("not exactly")


def test_16_bit_refused_never_rescaled(workdir):
    _, evaluation, _ = good_members()
    evaluation["test_1_low.tif"] = tif(rand_image(np.random.default_rng(1), LOW_HW, dtype=np.uint16))
    build(evaluation=evaluation)
    message = refused("dtype uint16 is not uint8")
    assert "evaluation.zip:test_1_low.tif" in message and "never rescaled" in message


def test_grey_refused(workdir):
    train, _, _ = good_members()
    train["train_0_low.tif"] = tif(rand_image(np.random.default_rng(1), LOW_HW, channels=0))
    build(train=train)
    assert "train.zip:train_0_low.tif: greyscale" in refused("greyscale")


def test_rgba_accepted_with_one_warning(workdir):
    train, _, images = good_members()
    rgba = rand_image(np.random.default_rng(2), LOW_HW, channels=4)
    train["train_1_low.tif"] = tif(rgba, photometric="rgb", extrasamples=["unassalpha"])
    build(train=train)
    with pytest.warns(UserWarning, match=r"1 RGBA image\(s\), alpha channel dropped: train.zip:train_1_low.tif"):
        run()
    np.testing.assert_array_equal(tifffile.imread(paths.INTERIM / "train" / "train_1_low.tif"), rgba[..., :3])


@pytest.mark.parametrize("evil", ["../train_9_low.tif", "/etc/train_9_low.tif", "a/../../x.tif", "C:\\x.tif"])
def test_member_escaping_the_folder_refused_nothing_written(workdir, evil):
    train, _, _ = good_members()
    build(train={**train, evil: b"x"})
    message = refused("escapes the extraction folder")
    assert evil in message and "nothing written" in message
    assert not (workdir / "train_9_low.tif").exists() and not Path("/etc/train_9_low.tif").exists()


def test_unmatched_names_listed_in_one_warning_and_skipped(workdir):
    train, evaluation, _ = good_members()
    build(train={**train, "readme.txt": b"hi", "train_0_lowres.tif": b"x"},
          evaluation={**evaluation, "test_0_high.tif": b"x"})
    with pytest.warns(UserWarning) as record:
        manifest = run()
    messages = [str(w.message) for w in record]
    assert any("train.zip: skipped 2 member(s) matching no pattern" in m and "readme.txt, train_0_lowres.tif" in m
               for m in messages)
    assert any("evaluation.zip: skipped 1 member(s)" in m and "test_0_high.tif" in m for m in messages)
    assert len(manifest) == 5
    assert not (paths.INTERIM / "train" / "readme.txt").exists()


def test_no_scene_at_all(workdir):
    build(evaluation={"notes.txt": b"x"})
    with pytest.warns(UserWarning):
        assert "no member matches test_{i}_low.tif" in refused("no member matches")


def test_cli_prints_one_line_and_exits_1(workdir, config_file, cli):
    config = config_file()
    proc = cli("unzip", "--exp", config)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {paths.TRAIN_ZIP}: zip not found "
                                                "(put the organiser's zip there, or run `make demo-data`)"]
    assert "Traceback" not in proc.stderr + proc.stdout

    train, _, _ = good_members()
    train["train_0_high.tif"] = tif(rand_image(np.random.default_rng(1), (17, 20)))
    build(train=train)
    proc = cli("unzip", "--exp", config)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not exactly 4 x low" in lines[0]
    assert not paths.INTERIM.exists()

    # a broken TIFF header: tifffile's own log line is folded into the one error line
    train["train_0_high.tif"] = b"II*\x00 not a tiff"
    build(train=train)
    proc = cli("unzip", "--exp", config)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {paths.TRAIN_ZIP}:train_0_high.tif: not a readable TIFF (")


# ---------------------------------------------------------------- atomicity

@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_way_leaves_nothing_behind(workdir, monkeypatch, interrupt):
    build()
    real_write = s00_unzip._write_tif
    calls = []

    def failing_write(path, image):
        calls.append(path)
        if len(calls) == 4:
            raise interrupt
        return real_write(path, image)

    monkeypatch.setattr(s00_unzip, "_write_tif", failing_write)
    with pytest.raises(type(interrupt)):
        run()
    assert len(calls) == 4
    assert not paths.INTERIM.exists()
    assert list(paths.DATA.iterdir()) == [paths.RAW]  # no temporary folder left either


def test_failure_keeps_the_previous_extraction(workdir):
    build(n_train=2)
    run()
    before = paths.MANIFEST.read_text()
    train, _, _ = good_members(n_train=4)
    train["train_3_high.tif"] = b"garbage"
    build(train=train)
    with pytest.raises(PipelineError, match="train_3_high.tif: not a readable TIFF"):
        run()
    assert paths.MANIFEST.read_text() == before
    assert sorted(p.name for p in (paths.INTERIM / "train").iterdir()) == [
        "train_0_high.tif", "train_0_low.tif", "train_1_high.tif", "train_1_low.tif"]


# ---------------------------------------------------------------- reruns and config

def test_rerun_does_nothing_and_changed_zip_is_reextracted(workdir, config_file, cli):
    config = config_file()
    build()
    assert "2 test scenes" in cli("unzip", "--exp", config, check=True).stdout
    manifest_mtime = paths.MANIFEST.stat().st_mtime_ns
    files_mtime = (paths.INTERIM / "train" / "train_0_low.tif").stat().st_mtime_ns

    assert "nothing to do" in cli("unzip", "--exp", config, check=True).stdout
    # same bytes written again (a newer date): still nothing to do, manifest date kept for make
    data = paths.TRAIN_ZIP.read_bytes()
    paths.TRAIN_ZIP.write_bytes(data)
    os.utime(paths.TRAIN_ZIP, ns=(paths.TRAIN_ZIP.stat().st_atime_ns, manifest_mtime + 10**9))
    assert "nothing to do" in cli("unzip", "--exp", config, check=True).stdout
    assert paths.MANIFEST.stat().st_mtime_ns == manifest_mtime
    assert (paths.INTERIM / "train" / "train_0_low.tif").stat().st_mtime_ns == files_mtime

    build(n_test=3)  # evaluation.zip changed
    out = cli("unzip", "--exp", config, check=True).stdout
    assert "3 train pairs + 3 test scenes" in out
    assert len(artifacts.load_manifest("test")) == 3


def test_force_extracts_again(workdir, config_file, cli):
    config = config_file()
    build()
    cli("unzip", "--exp", config, check=True)
    assert "3 train pairs" in cli("unzip", "--exp", config, "--force", check=True).stdout


def test_x5_and_other_patterns_are_a_config_change(workdir, config_file, cli):
    """The 2023 contest used x5: scale and file names come from the experiment config."""
    x5 = config_file("x5", data=dict(scale=5, train_low="{i}_lr.tif", train_high="{i}_hr.tif",
                                     test_low="eval_{i}.tif"))
    train, evaluation, _ = good_members(scale=5)
    build(train={k.replace("train_", "").replace("_low", "_lr").replace("_high", "_hr"): v
                 for k, v in train.items()},
          evaluation={k.replace("test_", "eval_").replace("_low", ""): v for k, v in evaluation.items()})
    out = cli("unzip", "--exp", x5, check=True).stdout
    assert "3 train pairs + 2 test scenes (x5)" in out
    manifest = artifacts.load_manifest("train")
    assert manifest["high_width"].tolist() == [25] * 3
    assert manifest["high_path"].iloc[0].name == "0_hr.tif"

    # the same zips under the default x4 config: the config changed, so it checks again, and refuses
    x4 = config_file("x4", data=dict(train_low="{i}_lr.tif", train_high="{i}_hr.tif", test_low="eval_{i}.tif"))
    proc = cli("unzip", "--exp", x4)
    assert proc.returncode == 1 and "high 20x25 is not exactly 4 x low 4x5" in proc.stderr


def test_pattern_without_id_placeholder_refused(workdir):
    build()
    with pytest.raises(PipelineError, match=r"'train_low.tif' must contain '\{i\}' exactly once"):
        run({"train_low": "train_low.tif"})
