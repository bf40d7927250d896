"""External training data (data.extra): scenes and low-res with the probe's kernel, the
cache and when it is rebuilt, bad files, and never a scene of it in validation or OOF."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from PIL import Image
from test_train import TINY, make_competition

from pipeline.core import paths
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data import degradation
from pipeline.data import extra as extra_data
from pipeline.data import patches as data
from pipeline.stages import s03_oof
from pipeline.train import loop


def photo_tiles(n: int, side: int = 64) -> list[np.ndarray]:
    """n different RGB tiles cut from scikit-image's bundled photographs (offline)."""
    import skimage.data

    tiles = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        image = getattr(skimage.data, name)()
        for y in range(0, image.shape[0] - side + 1, side):
            for x in range(0, image.shape[1] - side + 1, side):
                tiles.append(np.ascontiguousarray(image[y:y + side, x:x + side]))
    return tiles[::max(1, len(tiles) // n)][:n]


@pytest.fixture
def competition(workdir):
    """A tiny competition (stage 00 + folds) with its degradation.json (Pillow bicubic)."""
    make_competition()
    rows = pd.read_csv(paths.MANIFEST)
    pairs = [(paths.INTERIM / lo, paths.INTERIM / hi) for lo, hi in zip(rows["low_path"], rows["high_path"])
             if isinstance(hi, str)]
    (paths.INTERIM / "degradation.json").write_text(json.dumps(degradation.probe(pairs, 4, n_jobs=1)))
    return workdir


@pytest.fixture
def extra_folder(tmp_path):
    """A folder tree of 5 png/jpg/tif images of varied sizes, one in a sub-folder."""
    folder = tmp_path / "external"
    (folder / "sub").mkdir(parents=True)
    tiles = photo_tiles(4)
    Image.fromarray(tiles[0]).save(folder / "a.png")
    Image.fromarray(tiles[1][:61, :50]).save(folder / "b.png")          # cropped to 60 x 48
    tifffile.imwrite(folder / "sub" / "c.tif", tiles[2], photometric="rgb")
    Image.fromarray(tiles[3]).save(folder / "sub" / "d.jpg", quality=95)
    return folder


def config(folder, name="extra", **data_section) -> dict:
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["data"].update(data_section)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def test_scenes_get_the_probes_kernel_and_the_cache_is_reused(competition, extra_folder, tmp_path):
    cfg = config(tmp_path, extra=[str(extra_folder)])
    assert json.loads((paths.INTERIM / "degradation.json").read_text())["best"] == "pil-bicubic"
    manifest = extra_data.prepare(cfg)
    assert manifest.pop("built") and (manifest["kernel"], manifest["scale"]) == ("pil-bicubic", 4)
    sources = [s["path"] for s in manifest["sources"]]
    assert sources == [str(extra_folder / n) for n in ("a.png", "b.png", "sub/c.tif", "sub/d.jpg")]
    assert all(re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in manifest["sources"])
    root = extra_data.extra_dir()
    assert root == paths.INTERIM / "extra"
    shapes = []
    for scene in manifest["scenes"]:
        high, low = tifffile.imread(root / scene["high"]), tifffile.imread(root / scene["low"])
        np.testing.assert_array_equal(low, degradation.downscale(high, 4, "pil-bicubic"))
        shapes.append(high.shape)
    assert shapes == [(64, 64, 3), (60, 48, 3), (64, 64, 3), (64, 64, 3)]
    # same inputs: reused as they are (nothing rebuilt, same files)
    before = (root / "high" / "extra_0.tif").stat().st_mtime_ns
    assert "built" not in extra_data.prepare(cfg)
    # a touched file (same bytes): its sha256 decides, still reused
    os.utime(extra_folder / "a.png", ns=(1, 1))
    assert "built" not in extra_data.prepare(cfg)
    assert (root / "high" / "extra_0.tif").stat().st_mtime_ns == before
    # changed content, another kernel, a new file: rebuilt
    Image.fromarray(photo_tiles(8)[5]).save(extra_folder / "a.png")
    assert extra_data.prepare(cfg).get("built")
    other = extra_data.prepare(config(tmp_path, extra=[str(extra_folder)], extra_kernel="cv2-area"))
    assert other.get("built") and other["kernel"] == "cv2-area"
    high = tifffile.imread(root / other["scenes"][0]["high"])
    np.testing.assert_array_equal(tifffile.imread(root / other["scenes"][0]["low"]),
                                  degradation.downscale(high, 4, "cv2-area"))
    Image.fromarray(photo_tiles(8)[6]).save(extra_folder / "e.png")
    assert len(extra_data.prepare(cfg)["scenes"]) == 5
    assert not list(paths.INTERIM.glob(".extra.*tmp"))


def test_large_images_are_cut_into_competition_sized_scenes():
    image = np.arange(3700 * 3100 * 3, dtype=np.int64).reshape(3700, 3100, 3).astype(np.uint8)
    scenes = extra_data.cut_scenes(image, 4)
    assert len(scenes) == 6 and {s.shape for s in scenes} == {(1200, 1500, 3)}   # a 3 x 2 grid
    # centred: 3700 - 3600 = 100 rows and 3100 - 3000 = 100 columns left out, half each side
    np.testing.assert_array_equal(scenes[0], image[50:1250, 50:1550])
    np.testing.assert_array_equal(scenes[5], image[2450:3650, 1550:3050])
    assert [s.shape for s in extra_data.cut_scenes(image[:1203, :1501], 4)] == [(1200, 1500, 3)]
    assert [s.shape for s in extra_data.cut_scenes(image[:1700, :803], 4)] == [(1200, 800, 3)]   # 1.4 scenes
    assert [s.shape for s in extra_data.cut_scenes(image[:1900, :803], 4)] == [(948, 800, 3)] * 2  # 1.6
    assert extra_data.cut_scenes(image[:30, :30], 4) == []        # under 8 low-res pixels: no scene


def test_bad_inputs_get_one_line_each(competition, tmp_path, cli):
    bad = tmp_path / "bad"
    bad.mkdir()
    tifffile.imwrite(bad / "deep.tif", np.zeros((32, 32, 3), np.uint16), photometric="rgb")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad / "grey.png")
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(photo_tiles(1)[0]).save(bad / "fine.png")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "extra": [str(bad)]}}))
    proc = cli("train", "--exp", path, "--fold", 0, env={"SR_WORKDIR": str(competition)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert re.match(rf"error: {bad}/broken.jpg: cannot decode image", lines[0])
    assert lines[1].startswith(f"error: {bad}/deep.tif: dtype uint16 is not uint8")
    assert lines[2].startswith(f"error: {bad}/grey.png: greyscale image")
    assert lines[3] == "error: data.extra: 3 bad image(s) of 4"
    assert not (extra_data.extra_dir()).exists()                 # nothing half-built

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images")
    for folder, message in ((empty, "data.extra folder holds no tif/png/jpg image (searched recursively)"),
                            (tmp_path / "absent", "data.extra folder not found")):
        with pytest.raises(PipelineError, match=re.escape(f"{folder}: {message}")):
            extra_data.prepare(config(tmp_path, extra=[str(folder)]))
    with pytest.raises(PipelineError, match="data.extra_weight must be a share between 0 and 1"):
        extra_data.prepare(config(tmp_path, extra=[str(empty)], extra_weight=1.5))
    with pytest.raises(PipelineError, match="unknown kernel 'bicubic'"):
        extra_data.prepare(config(tmp_path, extra=[str(bad)], extra_kernel="bicubic"))


def test_a_copy_of_a_competition_scene_or_no_fitting_kernel_is_refused(competition, tmp_path):
    leak = tmp_path / "leak"
    leak.mkdir()
    tifffile.imwrite(leak / "copy.tif", tifffile.imread(paths.INTERIM / "train" / "train_3_high.tif"))
    with pytest.raises(PipelineError, match=r"copy.tif: identical to the competition's training scene train_3"):
        extra_data.prepare(config(tmp_path, extra=[str(leak)]))
    record = json.loads((paths.INTERIM / "degradation.json").read_text())
    (paths.INTERIM / "degradation.json").write_text(json.dumps({**record, "fits": False, "psnr": 31.0}))
    with pytest.raises(PipelineError, match=r"no candidate reproduces the low-res images \(closest pil-bicubic, "
                                            r"31.0 dB\): set data.extra_kernel"):
        extra_data.prepare(config(tmp_path, extra=[str(leak)]))
    (paths.INTERIM / "degradation.json").unlink()
    with pytest.raises(PipelineError, match="degradation.json: missing; run `python -m pipeline degradation`"):
        extra_data.prepare(config(tmp_path, extra=[str(leak)]))


def test_extra_share_of_crops_and_the_stream_stays_deterministic():
    rng = np.random.default_rng(0)
    own = [data.Scene(i, rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), None) for i in range(3)]
    ext = [data.Scene(f"extra_{i}", rng.integers(0, 256, (20 + 10 * i, 40, 3), dtype=np.uint8), None)
           for i in range(4)]
    for s in own + ext:
        s.hr = np.kron(s.lr, np.ones((4, 4, 1), np.uint8))
    common = dict(scale=4, lr_patch=16, batch_size=4, steps=500, augment=TINY["train"]["augment"], seed=1, fold=2)

    def drawn(stream) -> list:
        return [stream.scenes[stream._crop(np.random.default_rng([1, 2, i]))[2]].id for i in range(2000)]

    # no external scenes: exactly the stream of before
    plain, empty = data.PairedPatches(own, **common), data.PairedPatches(own, **common, extra_scenes=[], extra_weight=0.3)
    assert all(np.array_equal(plain.sample(i)[1], empty.sample(i)[1]) for i in range(20))
    for weight, expected in ((0.3, 0.3), (None, None)):
        stream = data.PairedPatches(own, **common, extra_scenes=ext, extra_weight=weight)
        share = np.mean([str(i).startswith("extra_") for i in drawn(stream)])
        if expected is None:     # in proportion to crop positions
            counts = [(s.lr.shape[0] - 15) * (s.lr.shape[1] - 15) for s in own + ext]
            expected = sum(counts[3:]) / sum(counts)
        assert share == pytest.approx(expected, abs=0.03)
        again = data.PairedPatches(own, **common, extra_scenes=ext, extra_weight=weight)
        for step in (0, 7, 499):
            assert all(np.array_equal(a, b) for a, b in zip(stream[step], again[step]))


def test_training_with_extra_data_never_validates_or_scores_it(competition, extra_folder, tmp_path, capsys,
                                                               monkeypatch):
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "extra": [str(extra_folder)],
                                                      "extra_weight": 0.5},
                                    "infer": {"tta": 1}}))
    cfg = load_config(path)
    validated = []
    real_validate = loop.validate
    monkeypatch.setattr(loop, "validate", lambda net, scenes, *a: validated.append(
        [s.id for s in scenes]) or real_validate(net, scenes, *a))
    result = loop.train(cfg, fold=0, seed=0)
    assert "+ 4 external scenes from 4 image(s), low-res by pil-bicubic x4, 50% of the crops" in capsys.readouterr().out
    folds = pd.read_csv(paths.FOLDS)
    fold0 = sorted(folds.loc[folds["fold"] == 0, "id"])
    assert validated and all(sorted(ids) == fold0 for ids in validated)
    assert result.steps_done == TINY["train"]["steps"]
    # stage 03 scores the held-out competition scenes only
    with pytest.warns(UserWarning, match="no best.pt for seed0/fold1, seed0/fold2"):
        s03_oof.run_oof(cfg, seeds=[0], tta=1)
    oof = pd.read_csv(paths.oof_dir("extra") / "oof.csv")
    assert sorted(oof["id"]) == fold0 and not oof["id"].astype(str).str.startswith("extra").any()
    assert "extra" not in " ".join(map(str, folds["id"]))
