"""demo-data: a demo competition in exactly the organiser's format, deterministic, offline."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.tools import demo_data


def zip_images(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return {name: tifffile.imread(zf.open(name)) for name in zf.namelist()}


def pil_bicubic(high: np.ndarray, scale: int) -> np.ndarray:
    h, w = high.shape[:2]
    return np.asarray(Image.fromarray(high).resize((w // scale, h // scale), Image.Resampling.BICUBIC))


def test_builtin_demo_is_in_the_exact_competition_format(workdir, config_file):
    summary = demo_data.build_demo(exp=config_file())
    assert (summary["n_train"], summary["n_test"], summary["tile"]) == (16, 6, 192)
    # six different photographs feed the 22 scenes (round-robin over the sources)
    assert len({name.split("#")[0] for name in summary["train_sources"] + summary["test_sources"]}) == 6

    train = zip_images(paths.TRAIN_ZIP)
    assert sorted(train) == sorted([f"train_{i}_low.tif" for i in range(16)] +
                                   [f"train_{i}_high.tif" for i in range(16)])  # flat, nothing else
    for i in range(16):
        low, high = train[f"train_{i}_low.tif"], train[f"train_{i}_high.tif"]
        assert low.dtype == high.dtype == np.uint8
        assert low.shape == (48, 48, 3) and high.shape == (192, 192, 3)
        np.testing.assert_array_equal(low, pil_bicubic(high, 4))

    evaluation = zip_images(paths.EVAL_ZIP)
    assert sorted(evaluation) == sorted(f"test_{i}_low.tif" for i in range(6))
    answers = sorted(p.name for p in paths.DEMO_ANSWERS.iterdir())
    assert answers == sorted(f"test_{i}_high.tif" for i in range(6))
    for i in range(6):
        high = tifffile.imread(paths.DEMO_ANSWERS / f"test_{i}_high.tif")
        assert high.dtype == np.uint8 and high.shape == (192, 192, 3)
        np.testing.assert_array_equal(evaluation[f"test_{i}_low.tif"], pil_bicubic(high, 4))
    # test scenes are not copies of training scenes
    train_highs = [train[f"train_{i}_high.tif"] for i in range(16)]
    assert not any(np.array_equal(tifffile.imread(paths.DEMO_ANSWERS / a), h) for a in answers for h in train_highs)


def test_same_seed_same_bytes_and_unchanged_zips_are_not_rewritten(workdir, config_file):
    config = config_file()
    demo_data.build_demo(exp=config, n_train=4, n_test=2, seed=3)
    first = paths.TRAIN_ZIP.read_bytes(), paths.EVAL_ZIP.read_bytes()
    mtime = paths.TRAIN_ZIP.stat().st_mtime_ns
    summary = demo_data.build_demo(exp=config, n_train=4, n_test=2, seed=3)
    assert summary["written"] == [False, False]
    assert (paths.TRAIN_ZIP.read_bytes(), paths.EVAL_ZIP.read_bytes()) == first
    assert paths.TRAIN_ZIP.stat().st_mtime_ns == mtime
    summary = demo_data.build_demo(exp=config, n_train=4, n_test=2, seed=4)
    assert summary["written"] == [True, True] and paths.TRAIN_ZIP.read_bytes() != first[0]


def test_source_folder_recursive_cropped_to_scale_and_competition_size(workdir, config_file):
    rng = np.random.default_rng(0)
    src = workdir / "photos"
    (src / "a" / "b").mkdir(parents=True)
    sizes = {"one.png": (70, 90), "a/two.jpg": (64, 64), "a/b/three.tif": (1210, 1530), "a/b/four.tiff": (45, 66)}
    for name, hw in sizes.items():
        image = rng.integers(0, 255, (*hw, 3), dtype=np.uint8)
        if name.endswith((".tif", ".tiff")):
            tifffile.imwrite(src / name, image, photometric="rgb")
        else:
            Image.fromarray(image).save(src / name, quality=95)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(src / "grey.png")
    (src / "notes.txt").write_text("not an image")

    config = config_file("x5", data=dict(scale=5))
    with pytest.warns(UserWarning, match=r"skipped 1 source image\(s\) that are not 8-bit RGB: .*grey.png"):
        summary = demo_data.build_demo(source=src, exp=config, test_fraction=0.5)
    assert (summary["n_train"], summary["n_test"], summary["scale"]) == (2, 2, 5)
    highs = [tifffile.imread(p) for p in sorted(paths.DEMO_ANSWERS.iterdir())]
    highs += [img for name, img in zip_images(paths.TRAIN_ZIP).items() if "_high" in name]
    # each image whole, centre-cropped to multiples of 5 and to at most 1200x1500
    assert sorted(h.shape[:2] for h in highs) == [(45, 65), (60, 60), (70, 90), (1200, 1500)]
    for name, low in zip_images(paths.TRAIN_ZIP).items():
        if "_low" in name:
            high = zip_images(paths.TRAIN_ZIP)[name.replace("_low", "_high")]
            assert low.shape == (high.shape[0] // 5, high.shape[1] // 5, 3)


def test_kernels_and_their_downscale(workdir):
    rng = np.random.default_rng(1)
    high = rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)
    block_mean = high.reshape(10, 4, 6, 4, 3).astype(float).mean(axis=(1, 3))
    box = demo_data.downscale(high, 4, "pil-box")
    assert box.shape == (10, 6, 3) and np.abs(box - block_mean).max() <= 1.0
    for kernel in demo_data.KERNELS:
        low = demo_data.downscale(high, 4, kernel)
        assert low.dtype == np.uint8 and low.shape == (10, 6, 3)
    # bicubic is sharper than the box average: it differs from it on noise
    assert np.abs(demo_data.downscale(high, 4).astype(float) - block_mean).mean() > 2
    with pytest.raises(PipelineError, match="not a multiple of scale 4"):
        demo_data.downscale(high[:39], 4)
    with pytest.raises(PipelineError, match="unknown kernel 'nearest'"):
        demo_data.downscale(high, 4, "nearest")


def test_split_counts():
    assert demo_data.split_counts(540, None, None, 0.22) == (421, 119)  # the UC Merced benchmark
    assert demo_data.split_counts(100, None, 10, 0.25) == (90, 10)
    assert demo_data.split_counts(100, 30, None, 0.25) == (30, 10)
    with pytest.raises(PipelineError, match="20 train \\+ 6 test scenes requested but the sources give only 22"):
        demo_data.split_counts(22, 20, 6, 0.25)
    with pytest.raises(PipelineError, match="between 0 and 1"):
        demo_data.split_counts(22, None, None, 1.0)


def test_cli_workdir_x5_then_unzip_accepts_it(workdir, config_file, cli, tmp_path_factory):
    other = tmp_path_factory.mktemp("bench")
    config = config_file("x5", data=dict(scale=5))
    proc = cli("demo-data", "--exp", config, "--workdir", other, "--n-train", 3, "--n-test", 2,
               "--kernel", "pil-lanczos", check=True)
    assert re.search(r"3 train \+ 2 test scenes from 6 source image\(s\), x5 pil-lanczos, tile 190", proc.stdout)
    assert (other / "data" / "raw" / "train.zip").exists() and not paths.TRAIN_ZIP.exists()
    assert len(list((other / "data" / "demo" / "answers").iterdir())) == 2
    proc = cli("unzip", "--exp", config, env={"SR_WORKDIR": str(other)}, check=True)
    assert "3 train pairs + 2 test scenes (x5)" in proc.stdout

    proc = cli("demo-data", "--exp", config, "--tile", 96)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --tile 96 must be a multiple of scale 5 and at most 1200"


def test_source_groups_and_split_by_tile_number(workdir, tmp_path):
    """--source writes groups.csv (folder + block of 15 tile numbers); --test-numbers puts
    those numbers of every folder in the test set; the built-in demo removes the file."""
    import pandas as pd
    from PIL import Image

    from pipeline.data.folds import source_group

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("harbor", "runway"):
        (src / cls).mkdir(parents=True)
        for n in range(0, 45, 4):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(src / cls / f"{cls}{n:02d}.png")
    assert source_group("harbor/harbor07.png#0") == "harbor/00-14"
    assert source_group("harbor/harbor30.png#0") == "harbor/30-44"
    assert source_group("photo.png#3") == "photo.png"
    summary = demo_data.build_demo(source=src, exp="demo", test_numbers=demo_data.parse_numbers("30-44"))
    numbers = lambda names: sorted({int(n.split("#")[0][-6:-4]) for n in names})
    assert numbers(summary["test_sources"]) == [32, 36, 40, 44]
    assert max(numbers(summary["train_sources"])) == 28
    table = pd.read_csv(paths.RAW / "groups.csv")
    assert list(table.columns) == ["id", "group"] and list(table["id"]) == list(range(summary["n_train"]))
    assert table["group"].tolist() == [source_group(n) for n in summary["train_sources"]]
    assert set(table["group"]) == {"harbor/00-14", "harbor/15-29", "runway/00-14", "runway/15-29"}
    with pytest.raises(PipelineError, match="expected a range like 30-44"):
        demo_data.parse_numbers("thirty")
    demo_data.build_demo(exp="demo", n_train=4, n_test=2, tile=32)
    assert not (paths.RAW / "groups.csv").exists()
