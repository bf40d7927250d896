"""The HTML report (`python -m pipeline report`): its table data against the artifacts, the
scene crops, the cache, and the page as a person sees it in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import headless_chromium
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import missing
from tiny_experiment import build_competition

from pipeline.core import io, ledger, paths
from pipeline.core.artifacts import load_manifest
from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.config import DEFAULTS, load_config
from pipeline.stages import s03_oof, s04_ensemble, s05_submission
from pipeline.tools import report
from pipeline.train import loop

# 4 training steps of a small ESPCN on 8x8 -> 32x32 crops, validated at steps 0, 2 and 4
TINY_YAML = ("data: {n_folds: 2}\n"
             "model: {name: espcn, args: {channels: [8, 6]}}\n"
             "train: {steps: 4, batch_size: 4, lr_patch: 8, val_every: 2, ckpt_every: 2,\n"
             "        optimizer: adam, lr: 1.0e-3, precision: fp32}\n"
             "infer: {tta: 8, tile: 0, batch: 8, precision: fp32}\n")
# a blend file as `python -m pipeline blend` writes it (the fields the report reads)
BLEND = {"members": [{"exp": "tiny", "weight": 0.7, "cv": 0.6}, {"exp": "tiny_lr", "weight": 0.3, "cv": 0.59}],
         "kept": "fitted", "cv": {"equal": 0.605, "fitted_out_of_fold": 0.61, "blend": 0.61},
         "per_fold": {"0": {"fitted": 0.56, "n": 2}, "1": {"fitted": 0.66, "n": 2}}, "tta": 1}


def _use(folder: Path):
    paths.set_workdir(folder)
    paths.CONFIGS = folder / "configs"   # the experiments' YAML files live in the workdir here


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A work folder made by the real stages: `tiny` (2 seeds x 2 folds, oof, ensemble, zip),
    `tiny_lr` (`base: tiny`, another lr; 1 seed, oof), `tiny_nooof` (fold 0 only, no stage 03),
    a blend file and an LB score for the zip."""
    folder = tmp_path_factory.mktemp("report")
    previous = paths.WORKDIR, paths.CONFIGS
    (folder / "configs").mkdir()
    (folder / "configs/tiny.yaml").write_text(TINY_YAML)
    (folder / "configs/tiny_lr.yaml").write_text("# tiny at a higher lr\nbase: tiny\ntrain: {lr: 3.0e-3}\n")
    (folder / "configs/tiny_nooof.yaml").write_text("base: tiny\ntrain: {steps: 2, val_every: 1}\n")
    try:
        _use(folder)
        build_competition(folder / "configs/tiny.yaml", n_train=6, n_test=2)
        for exp, seeds, folds in (("tiny", (0, 1), (0, 1)), ("tiny_lr", (0,), (0, 1)), ("tiny_nooof", (0,), (0,))):
            cfg = load_config(exp)
            for seed in seeds:
                for fold in folds:
                    loop.train(cfg, fold, seed)
            if exp != "tiny_nooof":
                s03_oof.run_oof(cfg)
        cfg = load_config("tiny")
        s04_ensemble.run_ensemble(cfg)
        zip_path = s05_submission.build_submission(cfg)
        ledger.record_lb(zip_path.name, 0.6)
        (folder / "models/blends/mix").mkdir(parents=True)
        (folder / "models/blends/mix/blend.json").write_text(json.dumps(BLEND))
    finally:
        paths.set_workdir(previous[0])
        paths.CONFIGS = previous[1]
    return folder


@pytest.fixture
def in_tiny(tiny_workdir, monkeypatch):
    previous = paths.WORKDIR
    monkeypatch.setattr(paths, "CONFIGS", tiny_workdir / "configs")
    paths.set_workdir(tiny_workdir)
    yield tiny_workdir
    paths.set_workdir(previous)


def rows_by_name() -> dict:
    return {r["name"]: r for r in report.collect()["rows"]}


def test_table_rows_match_the_artifacts(in_tiny):
    rows = rows_by_name()
    assert set(rows) == {"tiny", "tiny_lr", "tiny_nooof", "mix"}
    summary = json.loads((in_tiny / "models/tiny/oof/summary.json").read_text())
    oof = pd.read_csv(in_tiny / "models/tiny/oof/oof.csv")
    tiny = rows["tiny"]
    assert tiny["kind"] == "experiment" and tiny["net"] == "espcn" and tiny["runs"] == 4
    assert tiny["cv"] == summary["cv"]["mean"] == pytest.approx(oof["ssim"].mean(), abs=1e-6)
    assert tiny["cv_std"] == summary["cv"]["std"]
    assert tiny["per_fold"] == {f: pytest.approx(oof[oof["fold"] == f]["ssim"].mean(), abs=1e-6) for f in (0, 1)}
    assert tiny["per_seed"] == {s: pytest.approx(oof[oof["seed"] == s]["ssim"].mean(), abs=1e-6) for s in (0, 1)}
    assert tiny["seed_ensemble"] == summary["seed_ensemble"]["cv"]["mean"]
    assert tiny["gain_over_bicubic"] == pytest.approx(oof["ssim"].mean() - oof.groupby("id")["bicubic_ssim"].mean().mean())
    assert tiny["gain_over_start"] is None and tiny["start_weights"] is None   # from scratch: no start point
    # TTA gain: out-of-fold SSIM (8 views) minus each best.pt's own (no-TTA) validation SSIM
    val = {(s, f): read_checkpoint(in_tiny / f"models/tiny/seed{s}/fold{f}/best.pt")["val_ssim"]
           for s in (0, 1) for f in (0, 1)}
    assert tiny["tta"] == 8
    assert tiny["tta_gain"] == pytest.approx(np.mean([r.ssim - val[(r.seed, r.fold)] for r in oof.itertuples()]), abs=1e-9)
    assert tiny["best_val"] == pytest.approx(np.mean(list(val.values())))
    # training time: config.yaml (written at the start) to last.pt (the end), summed over runs
    runs = [in_tiny / f"models/tiny/seed{s}/fold{f}" for s in (0, 1) for f in (0, 1)]
    assert tiny["train_seconds"] == pytest.approx(sum((r / "last.pt").stat().st_mtime - (r / "config.yaml").stat().st_mtime
                                                      for r in runs))
    # curves: every run's validation points of its log.csv
    assert len(tiny["curves"]) == 4
    log = pd.read_csv(in_tiny / "models/tiny/seed1/fold0/log.csv")
    curve = next(c for c in tiny["curves"] if (c["seed"], c["fold"]) == (1, 0))
    assert [p[0] for p in curve["points"]] == [0, 2, 4]
    assert [p[1] for p in curve["points"]] == pytest.approx(log["val_ssim"].dropna().tolist(), abs=1e-6)
    assert curve["bicubic"] == pytest.approx(log["bicubic_ssim"].dropna().iloc[0])
    # recipe: against the `base:` experiment when the YAML names one, else the defaults
    assert rows["tiny_lr"]["base"] == "tiny" and rows["tiny_lr"]["diffs"] == ["train.lr: 0.003"]
    assert rows["tiny"]["base"] == "defaults"
    assert {"model.name: espcn", "train.optimizer: adam", "train.steps: 4", "data.n_folds: 2"} <= set(tiny["diffs"])
    assert rows["tiny_lr"]["seed_ensemble"] is None and rows["tiny_lr"]["per_seed"].keys() == {0}
    # no stage 03: listed, with its training figures and no CV
    nooof = rows["tiny_nooof"]
    assert nooof["cv"] is None and nooof["runs"] == 1 and nooof["steps"] == 2 and nooof["best_val"] is not None
    assert rows["mix"]["kind"] == "blend" and rows["mix"]["cv"] == 0.61 and rows["mix"]["per_fold"] == {0: 0.56, 1: 0.66}
    assert rows["mix"]["fold_std"] == pytest.approx(0.05)
    assert rows["mix"]["diffs"] == ["tiny: 0.7", "tiny_lr: 0.3"]
    assert all(r["stale"] is None for r in rows.values())


def test_rows_are_ordered_by_cv_and_a_retrained_checkpoint_marks_stage_03_stale(in_tiny, tmp_path):
    names = [r["name"] for r in report.collect()["rows"]]
    cvs = [r["cv"] for r in report.collect()["rows"]]
    scored = [c for c in cvs if c is not None]
    assert scored == sorted(scored, reverse=True) and cvs[-1] is None and names[-1] == "tiny_nooof"
    copy = tmp_path / "w"
    shutil.copytree(in_tiny, copy)   # copy2: mtimes kept
    paths.set_workdir(copy)
    os.utime(copy / "models/tiny_lr/seed0/fold1/best.pt")
    assert rows_by_name()["tiny_lr"]["stale"] == "models/tiny_lr/seed0/fold1/best.pt changed since stage 03"


def test_crops_are_the_scenes_pixels_and_reruns_reuse_them(in_tiny, tmp_path):
    out = tmp_path / "reports"
    first = report.build_report(out)
    assert first["experiments"] == 3 and first["blends"] == 1 and first["submissions"] == 1
    card = next(c for c in report.collect(report.SceneImages(report.Cache(out)), report.Cache(out))["cards"]
                if c["name"] == "tiny")
    table = pd.read_csv(in_tiny / "models/tiny/oof/oof.csv")
    seed0 = table[table["seed"] == 0].sort_values("ssim")
    assert [g["label"] for g in card["gallery"]] == ["worst", "best"]
    assert [g["id"] for g in card["gallery"]] == [seed0["id"].iloc[0], seed0["id"].iloc[-1]]
    manifest = load_manifest("train").set_index("id")
    for g in card["gallery"]:
        truth = io.read_image(manifest.loc[g["id"], "high_path"])
        low = io.read_image(manifest.loc[g["id"], "low_path"])
        pred = io.read_image(in_tiny / f"models/tiny/oof/pred_seed0/{g['id']}.tif")
        y, x, side = report.crop_window(truth, 4)
        assert side == 32 and (y, x) == (0, 0)   # the whole 32x32 scene
        np.testing.assert_array_equal(io.read_image(out / g["images"]["truth"]), truth)
        np.testing.assert_array_equal(io.read_image(out / g["images"]["prediction"]), pred)
        np.testing.assert_array_equal(io.read_image(out / g["images"]["lr"]), np.kron(low, np.ones((4, 4, 1), np.uint8)))
        assert g["ssim"] == pytest.approx(seed0.set_index("id").loc[g["id"], "ssim"])

    png = out / card["gallery"][0]["images"]["prediction"]
    stamp = png.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged work folder needs no prediction, plot or file hash")

    # the rerun reuses every image and plot: no net runs, nothing is plotted or hashed again
    import pipeline.infer.ensemble
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.infer.ensemble, "predict_scene", refuse)
        mp.setattr(report, "plot_scenes", refuse)
        mp.setattr(report, "plot_cv_lb", refuse)
        mp.setattr(io, "sha256_file", refuse)
        again = report.build_report(out)
    assert again["written"] == 0 and again["reused"] == first["written"] + first["reused"]
    assert png.stat().st_mtime_ns == stamp


def test_without_kept_predictions_the_checkpoint_predicts_the_same_crop(in_tiny, tmp_path):
    """Stage 03's kept prediction gone: the fold's best.pt predicts the scene with stage 03's
    settings; the crop is the same pixels, keyed by the checkpoint file's sha256."""
    copy = tmp_path / "w"
    shutil.copytree(in_tiny, copy)
    kept = {p.name: io.read_image(p) for p in (copy / "models/tiny/oof/pred_seed0").glob("*.tif")}
    shutil.rmtree(copy / "models/tiny/oof/pred_seed0")
    paths.set_workdir(copy)
    report.build_report(copy / "reports")
    card = next(c for c in report.collect(report.SceneImages(report.Cache(copy / "reports")))["cards"]
                if c["name"] == "tiny")
    for g in card["gallery"]:
        ckpt = copy / f"models/tiny/seed{g['seed']}/fold{g['fold']}/best.pt"
        assert io.sha256_file(ckpt)[:16] in g["images"]["prediction"]
        np.testing.assert_array_equal(io.read_image(copy / "reports" / g["images"]["prediction"]), kept[f"{g['id']}.tif"])


def test_report_cli_and_an_empty_workdir(workdir, cli):
    proc = cli("report", env={"SR_WORKDIR": str(workdir)})
    assert proc.returncode == 0, proc.stderr
    assert "report: 0 experiment(s), 0 blend(s), 0 submission(s)" in proc.stdout
    html = (workdir / "reports/index.html").read_text()
    assert "No experiment yet" in html and "No submission yet" in html
    (workdir / "submissions").mkdir()
    (workdir / "submissions/ledger.csv").write_text("zip,cv\nx.zip,0.5\n")
    proc = cli("report", env={"SR_WORKDIR": str(workdir)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {workdir}/submissions/ledger.csv: columns experiments, created, sha256, lb, lb_recorded missing "
        f"(expected {', '.join(ledger.COLUMNS)})"]


def test_html_is_escaped_by_the_template(in_tiny, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(in_tiny, copy)
    (copy / "models/blends/<b>").mkdir(parents=True)
    (copy / "models/blends/<b>/blend.json").write_text(json.dumps({"members": [{"exp": "<script>x</script>", "weight": 1}],
                                                                       "cv": {"blend": 0.5}}))
    paths.set_workdir(copy)
    html = report.build_report(copy / "reports")["path"].read_text()
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


# --- as a person sees it --------------------------------------------------------------------

def test_report_in_headless_chromium(in_tiny, tmp_path):
    if headless_chromium.find_chromium() is None:
        missing("chromium not installed (apt-get install chromium; .ci/run installs it where it can)")
    out = tmp_path / "reports"
    index = report.build_report(out)["path"]
    with headless_chromium.Chromium(width=1400, height=1000) as browser:
        page = browser.open(index)
        shot = browser.screenshot(tmp_path / "report.png")
        if os.environ.get("REPORT_SCREENSHOT"):
            shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])
        assert page.errors == []
        folder = out.resolve().as_uri() + "/"
        outside = [u for u in page.requests if not u.startswith(folder)]
        assert outside == [], f"requests outside {folder}"
        assert any(u.endswith(".png") for u in page.requests)
        # every crop loaded and decoded
        assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth === 32)")
        assert browser.evaluate("document.images.length") == 2 * 2 * 4   # 2 experiments x 2 scenes x 4 panels
        names = browser.evaluate("Array.from(document.querySelectorAll('#exp-table tbody tr')).map(r => r.dataset.name)")
        assert sorted(names) == ["mix", "tiny", "tiny_lr", "tiny_nooof"]
        assert browser.evaluate("document.querySelector('#exp-table').getBoundingClientRect().height") > 100
        # the best two by CV start ticked: their 4 + 2 runs are drawn on the comparison plot
        with_curves = [n for n in names if n != "mix"]   # a blend has no training curve
        assert browser.evaluate("document.getElementById('compare-chart').dataset.experiments") == ",".join(with_curves[:2])
        assert browser.evaluate("document.querySelectorAll('#compare-chart path').length") == 6
        # sorting: click the CV header (descending first), then again (ascending; empty last)
        cv = browser.evaluate("""(() => { const th = Array.from(document.querySelectorAll('#exp-table th'))
            .find(h => h.textContent.trim() === 'CV'); th.click(); const a = cvs(); th.click(); return [a, cvs()];
            function cvs() { return Array.from(document.querySelectorAll('#exp-table tbody tr'))
            .map(r => r.cells[4].dataset.v); } })()""")
        values = [float(v) for v in cv[0] if v]
        assert values == sorted(values, reverse=True) and cv[0][-1] == ""
        assert [float(v) for v in cv[1] if v] == sorted(values) and cv[1][-1] == ""
        # a click on one panel zooms all four panels of that scene onto the same region
        transforms = browser.evaluate("""(() => { const g = document.querySelector('.zoom-group');
            const port = g.querySelector('.viewport'); const r = port.getBoundingClientRect();
            const at = {clientX: r.left + r.width * 0.25, clientY: r.top + r.height * 0.75, bubbles: true, pointerId: 1};
            port.dispatchEvent(new PointerEvent('pointerdown', at)); port.dispatchEvent(new PointerEvent('pointerup', at));
            return Array.from(g.querySelectorAll('img')).map(i => i.style.transform); })()""")
        assert len(set(transforms)) == 1 and "scale(4)" in transforms[0]
        assert page.errors == []
    assert shot.stat().st_size > 10_000


def test_stage_05_recorded_its_zip_with_the_cv_of_its_checkpoints(in_tiny):
    """The fixture's zip: stage 05 added it to the ledger with stage 03's seed-ensemble CV (the
    zip is the ensemble of every checkpoint of both seeds), then `lb` its score."""
    summary = json.loads((in_tiny / "models/tiny/oof/summary.json").read_text())
    table = ledger.read_ledger()
    zip_name = (in_tiny / "submissions/tiny-latest.txt").read_text().strip()
    assert table["zip"].tolist() == [zip_name] and table.loc[0, "experiments"] == "tiny"
    assert table.loc[0, "cv"] == pytest.approx(summary["seed_ensemble"]["cv"]["mean"], abs=1e-6)
    assert table.loc[0, "sha256"] == io.sha256_file(in_tiny / "submissions" / zip_name)
    assert table.loc[0, "lb"] == 0.6


@pytest.mark.parametrize("blend, diffs, cv, per_fold", [
    (BLEND, ["tiny: 0.7", "tiny_lr: 0.3"], 0.61, {0: 0.56, 1: 0.66}),
    ({**BLEND, "kept": "equal", "cv": {**BLEND["cv"], "blend": 0.605}}, ["tiny: 0.7", "tiny_lr: 0.3"], 0.605, {}),
])
def test_blend_files(workdir, blend, diffs, cv, per_fold):
    """The blend's CV is the one it kept; per-fold figures only for fitted weights (the
    equal-weight blend has none of its own); a file that is not a blend is left out."""
    (workdir / "models/blends/x").mkdir(parents=True)
    (workdir / "models/blends/x/blend.json").write_text(json.dumps(blend))
    (workdir / "models/blends/broken").mkdir()
    (workdir / "models/blends/broken/blend.json").write_text("{")
    (workdir / "models/blends/other").mkdir()
    (workdir / "models/blends/other/blend.json").write_text(json.dumps({"weights": {"a": 1}}))
    with pytest.warns(UserWarning) as caught:
        (row,) = report.blend_rows()
    messages = sorted(str(w.message) for w in caught)
    assert messages[0].endswith("broken/blend.json: not valid JSON; left out of the report")
    assert "other/blend.json: not a blend file of `python -m pipeline blend` (KeyError" in messages[1]
    assert (row["name"], row["kind"], row["diffs"], row["cv"], row["per_fold"]) == ("x", "blend", diffs, cv, per_fold)


def test_recipe_leaves_out_what_a_run_loaded(workdir):
    """config.yaml records what model.pretrained loaded (pretrained_loaded): a fact of the run,
    not a recipe choice, so it is not listed among the differences from the base."""
    run = workdir / "models" / "x" / "seed0" / "fold0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"exp": "x", "train": {**DEFAULTS["train"], "steps": 7},
         "pretrained_loaded": {"file": "/w/rlfn_x4.pth", "tensors_loaded": 114}}))
    cfg, base, diffs = report.experiment_recipe("x", [{"dir": run}])
    assert base == "defaults" and diffs == ["train.steps: 7"]
