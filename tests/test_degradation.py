"""The degradation probe and its kernels: MATLAB imresize against the benchmark LR files,
the right kernel named on competitions made with each candidate from real tiles (x4 and
x5), nothing claimed on noisy or rescaled low-res, degradation.json and the CLI table."""
from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.core import io, paths
from pipeline.core.errors import PipelineError
from pipeline.data import competition
from pipeline.data import degradation as D


def real_tiles(shared, n: int, scale: int) -> list[np.ndarray]:
    """n real aerial tiles from across the classes, cropped to a multiple of the scale."""
    tiles = sorted((shared / "data" / "ucmerced_urban").glob("*/*.tif"))
    picked = tiles[::len(tiles) // n][:n]
    return [competition.crop_to_scale(io.read_image(p), scale) for p in picked]


def write_pairs(folder, highs, lows) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, (high, low) in enumerate(zip(highs, lows)):
        io.write_tif(folder / f"train_{i}_high.tif", high)
        io.write_tif(folder / f"train_{i}_low.tif", low)
        pairs.append((folder / f"train_{i}_low.tif", folder / f"train_{i}_high.tif"))
    return pairs


@pytest.mark.shared
def test_matlab_bicubic_reproduces_the_benchmarks_lr_files(shared):
    """Set5 + Set14 LR_bicubic/X4 are MATLAB imresize outputs: every pixel reproduced."""
    root = shared / "data" / "sr_benchmarks"
    checked = 0
    for hr_path in sorted(root.glob("Set*/HR/*.png")):
        hr = np.asarray(Image.open(hr_path))
        lr = np.asarray(Image.open(hr_path.parent.parent / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png"))
        ours = D.matlab_bicubic(hr if hr.ndim == 3 else hr[..., None], 4).reshape(lr.shape)
        np.testing.assert_array_equal(ours, lr, err_msg=hr_path.name)
        checked += 1
    assert checked == 19
    # Pillow's bicubic is the same antialiased Keys kernel but not the same code: it
    # differs (borders, pass order of the rounding), which is how the probe tells them apart
    hr = np.asarray(Image.open(root / "Set5" / "HR" / "baby.png"))
    assert not np.array_equal(D.downscale(hr, 4, "pil-bicubic"), D.matlab_bicubic(hr, 4))


CANDIDATES = list(D.KERNELS) + ["gauss1.2", "gauss2.1@2,1", "gauss0.6@3,3"]


@pytest.mark.shared
@pytest.mark.parametrize("kernel", CANDIDATES)
def test_probe_names_the_kernel_that_made_the_low_res(shared, tmp_path, kernel):
    highs = real_tiles(shared, 8, 4)
    pairs = write_pairs(tmp_path, highs, [D.downscale(h, 4, kernel) for h in highs])
    result = D.probe(pairs, 4, n_jobs=2)
    assert result["best"] == kernel
    assert result["psnr"] == D.PSNR_CAP and result["fits"]          # reproduced exactly
    assert result["candidates"][0] == {"kernel": kernel, "psnr": 100.0, "min_psnr": 100.0, "exact": 1.0}
    # the next different operation is far behind (box/area: the same operation, skipped)
    runner_up = next(c for c in result["candidates"][1:] if not D.same_operation(c["kernel"], kernel, 4))
    assert result["margin"] == pytest.approx(100.0 - runner_up["psnr"], abs=1e-3)
    assert result["margin"] > 40
    names = [c["kernel"] for c in result["candidates"]]
    assert len(names) == len(set(names)) == len(D.KERNELS) + len(D.GAUSS_SIGMAS)


# the kernels that compute the same operation at x5, written out (not from same_operation_as)
X5_TWINS = {"cv2-area": {"cv2-area", "pil-box"},
            "cv2-cubic": {"cv2-cubic", "cv2-linear", "skimage"},
            "skimage-aa": {"skimage-aa", "skimage-aa-linear"}}


@pytest.mark.shared
@pytest.mark.parametrize("kernel", ["pil-bicubic", "pil-lanczos", "cv2-area", "cv2-cubic", "matlab-bicubic",
                                    "skimage-aa", "gauss1.4@3,1"])
def test_probe_at_x5(shared, tmp_path, kernel):
    highs = real_tiles(shared, 6, 5)
    pairs = write_pairs(tmp_path, highs, [D.downscale(h, 5, kernel) for h in highs])
    result = D.probe(pairs, 5, n_jobs=2)
    assert (result["psnr"], result["scale"]) == (100.0, 5)
    # at odd scales output centres fall on pixels: cv2-cubic, cv2-linear and skimage all
    # pick the centre pixel of each block, skimage-aa and skimage-aa-linear blur first
    # and then pick it (the same output: either is the right answer, and the table says so)
    twins = X5_TWINS.get(kernel, {kernel})
    assert D.same_operation_as(kernel, 5) == twins
    assert result["best"] in twins
    if len(twins) > 1:
        others = ", ".join(sorted(twins - {result["best"]}))
        assert f"<- best; same operation as {others} at x5" in D.format_table(result)
    # skimage-aa's Gaussian (sigma 2) is close to gauss2@2,2 (61 dB, other truncation)
    assert result["margin"] > (35 if kernel == "skimage-aa" else 40)


@pytest.mark.shared
def test_nothing_fits_noisy_or_rescaled_low_res_and_the_closest_is_named(shared, tmp_path):
    highs = real_tiles(shared, 8, 4)
    rng = np.random.default_rng(0)
    # a known kernel under sensor-like noise (sigma 3 levels)
    noisy = [np.clip(D.downscale(h, 4, "pil-lanczos") + rng.normal(0, 3, (h.shape[0] // 4, h.shape[1] // 4, 3)),
                     0, 255).round().astype(np.uint8) for h in highs]
    result = D.probe(write_pairs(tmp_path / "noisy", highs, noisy), 4, n_jobs=2)
    assert not result["fits"] and result["psnr"] < D.FIT_PSNR
    assert result["best"] == "pil-lanczos"       # still the closest
    assert 37 < result["psnr"] < 40              # ~ the noise alone: 20 log10(255 / 3) = 38.6 dB
    # low-res made from a 3 % larger view of the scene: no kernel lines up with it
    rescaled = []
    for h in highs:
        big = np.asarray(Image.fromarray(h).resize((round(h.shape[1] * 1.03), round(h.shape[0] * 1.03)),
                                                   Image.Resampling.BICUBIC))
        rescaled.append(D.downscale(competition.crop_to_scale(big, 4, h.shape[:2]), 4, "pil-bicubic"))
    result = D.probe(write_pairs(tmp_path / "rescaled", highs, rescaled), 4, n_jobs=2)
    assert not result["fits"] and result["psnr"] < 35
    table = D.format_table(result)
    assert f"no candidate reproduces the low-res images (best {result['psnr']:.2f} dB < 45 dB); " \
           f"the closest is {result['best']}" in table


def test_cli_on_a_demo_competition_writes_the_json_and_prints_the_table(workdir, config_file, cli):
    """Built-in photographs (no ../shared needed), made with box averaging."""
    config = config_file()
    cli("demo-data", "--exp", config, "--kernel", "pil-box", "--n-train", 10, "--n-test", 2, check=True)
    cli("unzip", "--exp", config, check=True)
    proc = cli("degradation", "--exp", config, check=True)
    result = json.loads((paths.INTERIM / "degradation.json").read_text())
    assert set(result) >= {"best", "psnr", "margin", "candidates"}
    assert (result["best"], result["psnr"], result["fits"], result["scenes"]) == ("pil-box", 100.0, True, 10)
    assert all(set(c) >= {"kernel", "psnr"} for c in result["candidates"])
    assert [c["psnr"] for c in result["candidates"]] == sorted((c["psnr"] for c in result["candidates"]), reverse=True)
    # cv2-area is the same operation (it differs in rounding only): the margin is over the next one
    assert result["candidates"][1]["kernel"] == "cv2-area"
    assert result["margin"] == pytest.approx(100 - result["candidates"][2]["psnr"], abs=1e-3)
    lines = proc.stdout.splitlines()
    assert re.match(r"\s+1\s+pil-box\s+100\.00\s+100\.00\s+100\.0%\s+<- best; same operation as cv2-area at x4", lines[2])
    assert f"made with pil-box (100.00 dB, margin {result['margin']:.2f} dB over the next different operation; " \
           "10 of 10 training scenes, x4)" in proc.stdout
    assert not list(paths.INTERIM.glob(".*.tmp*"))          # written atomically
    # a subset gives the same answer
    proc = cli("degradation", "--exp", config, "--max-scenes", 3, check=True)
    assert "made with pil-box" in proc.stdout and "3 of 10 training scenes" in proc.stdout


def test_kernel_names_and_refusals(workdir, config_file, cli):
    assert D.check_kernel("gauss1.5@1,2", 4) == "gauss1.5@1,2"
    assert D.parse_gauss("gauss1.5") == (1.5, (0, 0)) and D.gauss_name(1.5, (1, 2)) == "gauss1.5@1,2"
    high = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    # gauss<sigma>@dy,dx: every 4th pixel of the blurred image from row dy, column dx
    np.testing.assert_array_equal(D.downscale(high, 4, "gauss1.5@1,2"),
                                  cv2.GaussianBlur(high, (0, 0), 1.5)[1::4, 2::4])
    with pytest.raises(PipelineError, match=r"unknown kernel 'bicubic' \(known: pil-bicubic, .*gauss<sigma>"):
        D.downscale(high, 4, "bicubic")
    with pytest.raises(PipelineError, match=r"offset \(4, 0\) must be below the scale 4"):
        D.downscale(high, 4, "gauss1@4,0")
    proc = cli("demo-data", "--exp", config_file(), "--kernel", "gauss0")
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown kernel 'gauss0'")
    proc = cli("degradation", "--exp", config_file())
    assert proc.returncode == 1 and "manifest.csv: missing; run `make unzip`" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.shared
def test_degradation_study_prints_every_truth_with_itself_first(shared, capsys):
    from pipeline.tools import degradation_study

    degradation_study.main(["--source", str(shared / "data" / "ucmerced_urban"), "--n", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 tiles of") and len(lines) == 1 + len(D.KERNELS) + 7
    for line in lines[1:1 + len(D.KERNELS)]:
        truth, first = line.split()[:2]
        assert first == truth and line.split()[2] == "100.0", line
    noisy = next(line for line in lines if "noise 2" in line)
    assert float(noisy.split()[5]) < D.FIT_PSNR          # pil-bicubic, but below the threshold
