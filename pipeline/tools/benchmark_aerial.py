"""`python -m pipeline benchmark-aerial` (`make benchmark-aerial`): the real aerial benchmark, end to end.

A competition in the organiser's format built from the real 0.3 m UC Merced urban tiles of
`../shared` (held out by place: tile numbers 00-29 of every class train, 30-44 test;
`groups.csv` keeps a place in one fold; `--kernel` makes the low-res images) in its own work
folder, `data/benchmarks/aerial[-<kernel>]`. Then, each step as its own `python -m pipeline`
command with that work folder:
1. the recipe `--exp` on every fold of every seed of `--seeds`, and each of `--kfold` (other
   nets and schedules) on every fold of the first seed, `--jobs` trainings at once on one
   thread each; stages 03-05 of the recipe and its score; stages 03-04 of every `--kfold`;
2. the blends of all of them (fitted and equal weights) and the pairs of `--blends`;
3. the recipe again with random folds (`<work folder>-random-folds`, groups.csv left out), to
   show how far each CV is from the test (`--no-random-folds` skips it);
4. the reference rows: bicubic, pretrained RLFN, + 8-way TTA, the recipe's fold 0 with and
   without TTA;
5. each of `--ablations` (default: every pipeline/configs/<exp>_*.yaml but the x5 ones) on fold 0;
6. the table (`python -m pipeline ablation`), the default submission chosen on grouped CV
   within the training budget, written to `<work folder>/default-submission.txt` and checked:
   `predict $(cat that file)` must give stage 04's pixels exactly; and the report.
Every step whose outputs are newer than its inputs is skipped, so a rerun (or a rerun after
an interruption) only does what is missing. `--main-rows` keeps to the recipe and the reference
rows (no k-fold candidates, blends, random folds or ablations). `--x5` runs the x5 study instead:
the same tiles at x5, `aerial_x5` (rlfn_x4 carried to x5) against `aerial_x5_scratch` and bicubic.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError

DEFAULT_KFOLD = ("rfdn", "steps1000", "steps2000", "rfdn_steps2000", "patch48_steps2000")   # <exp>_<suffix>
DEFAULT_BLENDS = ("steps2000:{exp}_steps2000,{exp}_rfdn_steps2000",
                  "patch48_steps2000:{exp}_patch48_steps2000,{exp}_rfdn_steps2000")
DEFAULT_SUBMISSION = "default-submission.txt"


class Benchmark:
    """The commands of one benchmark work folder, run as subprocesses, each skipped when fresh."""

    def __init__(self, workdir: Path, jobs: int):
        self.workdir, self.jobs = workdir, jobs

    @property
    def models(self) -> Path:
        return self.workdir / "models"

    @property
    def predictions(self) -> Path:
        return self.workdir / "data" / "predictions"

    def run(self, *args: str | Path, threads: int | None = None) -> None:
        """`python -m pipeline ARGS` in this work folder; a failure stops the benchmark with its message."""
        env = {**os.environ, "SR_WORKDIR": str(self.workdir)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "pipeline", *map(str, args)]
        print("+ " + " ".join(command[2:]), flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            raise PipelineError(f"benchmark-aerial: `{' '.join(command[2:])}` failed (SR_WORKDIR={self.workdir}); "
                                "rerun to pick up where it stopped")

    def train_all(self, runs: list[tuple[str, int, int]]) -> None:
        """(exp, seed, fold) trainings, `jobs` at once on one thread each (finished ones return at once)."""
        def train(run: tuple[str, int, int]) -> None:
            exp, seed, fold = run
            self.run("train", "--exp", exp, "--seed", seed, "--fold", fold, threads=1)
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(train, runs))

    def scored(self, exp: str, seeds: list[int] | None = None) -> None:
        """Stage 03 and 04 of `exp` unless both are newer than its checkpoints."""
        checkpoints = sorted((self.models / exp).glob("seed*/fold*/best.pt"))
        seed_args = ["--seeds", *seeds] if seeds else []
        if not fresh(self.models / exp / "oof" / "summary.json", checkpoints):
            self.run("oof", "--exp", exp, *seed_args)
        if not fresh(self.predictions / exp / "ensemble.json", checkpoints):
            self.run("ensemble", "--exp", exp, *seed_args)

    def predict(self, out: str, inputs: list[Path], *args: str | Path) -> None:
        """`predict` the test images into data/predictions/OUT unless OUT/.done is newer than `inputs`."""
        folder = self.predictions / out
        if fresh(folder / ".done", inputs):
            return
        (folder / ".done").unlink(missing_ok=True)
        self.run("predict", "--input", self.workdir / "data" / "interim" / "evaluation", "--output", folder, *args)
        (folder / ".done").touch()


def fresh(out: Path, inputs: list[Path]) -> bool:
    """`out` exists and none of `inputs` (files or folders, recursively) is newer."""
    if not out.exists():
        return False
    stamp = out.stat().st_mtime
    for path in inputs:
        for p in ([path] + (list(path.rglob("*")) if path.is_dir() else [])):
            if p.exists() and p.stat().st_mtime > stamp:
                return False
    return True


def workdir_for(kernel: str) -> Path:
    return paths.ROOT / "data" / "benchmarks" / ("aerial" if kernel == "pil-bicubic" else f"aerial-{kernel}")


def folds_of(exp: str) -> list[int]:
    return list(range(load_config(exp)["data"]["n_folds"]))


def plan(args: argparse.Namespace) -> dict:
    """What a run trains beside the recipe: k-fold candidates, pair blends (TAG:EXP,EXP),
    fold-0 ablations, and whether the random-folds twin runs."""
    exp, main = args.exp, args.main_rows

    def chosen(given: list[str] | None, default: list[str]) -> list[str]:
        return [] if main else (given if given is not None else default)
    return {"kfold": chosen(args.kfold, [f"{exp}_{s}" for s in DEFAULT_KFOLD]),
            "blends": chosen(args.blends, [b.format(exp=exp) for b in DEFAULT_BLENDS]),
            "ablations": chosen(args.ablations, sorted(p.stem for p in paths.CONFIGS.glob(f"{exp}_*.yaml")
                                                       if not p.stem.startswith(f"{exp}_x5"))),
            "random_folds": args.random_folds and not main}


def benchmark(args: argparse.Namespace) -> None:
    exp, seeds, seed0 = args.exp, args.seeds, args.seeds[0]
    planned = plan(args)
    kfold, blends, ablations, random_folds = (planned[k] for k in ("kfold", "blends", "ablations", "random_folds"))
    bench = Benchmark(workdir_for(args.kernel), args.jobs)
    data = ["demo-data", "--source", args.source, "--exp", exp, "--test-numbers", "30-44", "--seed", "0",
            "--kernel", args.kernel, "--workdir"]

    # 1. the recipe on every fold of every seed, the k-fold candidates on every fold of the first
    bench.run(*data, bench.workdir)
    for step in ("unzip", "degradation", "folds"):
        bench.run(step, "--exp", exp)
    folds = folds_of(exp)
    bench.train_all([(exp, s, f) for s in seeds for f in folds] + [(e, seed0, f) for e in kfold for f in folds])
    bench.scored(exp, seeds)
    submissions = bench.workdir / "submissions"
    latest = submissions / f"{exp}-latest.txt"
    if not fresh(latest, [bench.predictions / exp / "ensemble.json"]):
        bench.run("submission", "--exp", exp)
    bench.run("score", "--submission", submissions / latest.read_text().strip(),
              "--answers", bench.workdir / "data" / "demo" / "answers")
    for e in kfold:
        bench.scored(e)

    # 2. blends: of every k-fold recipe (fitted and equal weights), and the pairs
    if kfold:
        members = [exp, *kfold]
        summaries = [bench.models / e / "oof" / "summary.json" for e in members]
        for weighting, name in (("fit", f"{exp}-blend"), ("equal", f"{exp}-blend-equal")):
            if not fresh(bench.models / "blends" / name / "blend.json", summaries):
                bench.run("blend", "--exps", *members, "--name", name, "--weights", weighting)
            if not fresh(bench.predictions / name / "ensemble.json", [bench.models / "blends" / name / "blend.json"]):
                bench.run("ensemble", "--blend", name)
    for spec in blends:
        tag, members = spec.split(":", 1)
        members, name = members.split(","), f"{exp}-blend-{tag}"
        summaries = [bench.models / e / "oof" / "summary.json" for e in members]
        if not all(s.is_file() for s in summaries):
            continue                      # a member without stage 03 (not a k-fold recipe here)
        if not fresh(bench.models / "blends" / name / "blend.json", summaries):
            bench.run("blend", "--exps", *members, "--name", name)
        if not fresh(bench.predictions / name / "ensemble.json", [bench.models / "blends" / name / "blend.json"]):
            bench.run("ensemble", "--blend", name)

    # 3. the recipe with random folds, beside
    if random_folds:
        other = Benchmark(bench.workdir.with_name(bench.workdir.name + "-random-folds"), args.jobs)
        other.run(*data, other.workdir)
        (other.workdir / "data" / "raw" / "groups.csv").unlink(missing_ok=True)
        other.run("unzip", "--exp", exp)
        other.run("folds", "--exp", exp)
        other.train_all([(exp, seed0, f) for f in folds])
        other.scored(exp)

    # 4. the reference rows
    manifest = [bench.workdir / "data" / "interim" / "manifest.csv"]
    bench.predict("bicubic", manifest, "--model", "bicubic", "--tta", "1")
    bench.predict("pretrained", manifest, "--model", "rlfn", "--weights", "rlfn_x4", "--tta", "1")
    bench.predict("pretrained-tta8", manifest, "--model", "rlfn", "--weights", "rlfn_x4", "--tta", "8")
    seed_dir = bench.models / exp / f"seed{seed0}"
    for tta in (1, 8):
        bench.predict(f"{exp}-fold0" + ("" if tta == 1 else f"-tta{tta}"), [seed_dir],
                      "--checkpoint", seed_dir / "fold0" / "best.pt", "--tta", tta)
    if len(seeds) > 1:
        bench.predict(f"{exp}-seed{seed0}", [seed_dir], "--checkpoint", seed_dir, "--tta", "8")

    # 5. the ablations on fold 0
    bench.train_all([(a, 0, 0) for a in ablations])
    for a in ablations:
        best = bench.models / a / "seed0" / "fold0" / "best.pt"
        bench.predict(f"{a}-fold0", [best], "--checkpoint", best, "--tta", "1")

    # 6. the table, the default submission and its check, the report
    bench.run("ablation", "--workdir", bench.workdir, "--exp", exp, "--write-default")
    chosen = bench.workdir / DEFAULT_SUBMISSION
    bench.predict("default-submission", [chosen], *chosen.read_text().split())
    bench.run("ablation", "--workdir", bench.workdir, "--exp", exp, "--check-default",
              bench.predictions / "default-submission")
    bench.run("report")


def x5(args: argparse.Namespace) -> None:
    """The same tiles built at x5 (255x255 -> 51x51): fold 0 of aerial_x5 (rlfn_x4 carried to x5)
    and aerial_x5_scratch (the same net from a random init, same steps), both scored on the
    120 test answers with bicubic x5."""
    bench = Benchmark(paths.ROOT / "data" / "benchmarks" / "aerial_x5", args.jobs)
    bench.run("demo-data", "--source", args.source, "--exp", "aerial_x5", "--n-train", "420", "--n-test", "120",
              "--seed", "0", "--workdir", bench.workdir)
    bench.run("unzip", "--exp", "aerial_x5")
    bench.run("folds", "--exp", "aerial_x5")
    bench.train_all([("aerial_x5", 0, 0), ("aerial_x5_scratch", 0, 0)])
    manifest = [bench.workdir / "data" / "interim" / "manifest.csv"]
    bench.predict("bicubic", manifest, "--model", "bicubic", "--scale", "5", "--tta", "1")
    for e in ("aerial_x5", "aerial_x5_scratch"):
        best = bench.models / e / "seed0" / "fold0" / "best.pt"
        bench.predict(f"{e}-fold0", [best], "--checkpoint", best, "--tta", "1")
    bench.run("ablation", "--workdir", bench.workdir, "--exp", "aerial_x5")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", type=Path, default=paths.SHARED_DATA / "ucmerced_urban",
                        help="folder of the real tiles (default ../shared/data/ucmerced_urban)")
    parser.add_argument("--exp", default="aerial", help="the recipe (default aerial)")
    parser.add_argument("--kernel", default="pil-bicubic", help="the organiser's downscaling kernel (demo-data --kernel)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the recipe (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (default 2)")
    parser.add_argument("--kfold", nargs="*", default=None,
                        help=f"recipes trained on every fold beside --exp (default: <exp>_{{{','.join(DEFAULT_KFOLD)}}})")
    parser.add_argument("--blends", nargs="*", default=None, metavar="TAG:EXP,EXP",
                        help="pair blends fitted beside the blend of all (default: the 2000-step pairs)")
    parser.add_argument("--ablations", nargs="*", default=None,
                        help="recipes trained on fold 0 (default: every pipeline/configs/<exp>_*.yaml but x5)")
    parser.add_argument("--no-random-folds", dest="random_folds", action="store_false",
                        help="skip the recipe with random folds")
    parser.add_argument("--main-rows", action="store_true",
                        help="the recipe and the reference rows only (no k-fold candidates, blends, "
                             "random folds or ablations)")
    parser.add_argument("--x5", action="store_true", help="the x5 study instead (aerial_x5 vs from scratch vs bicubic)")


def main(args: argparse.Namespace) -> int:
    if not args.source.is_dir():
        raise PipelineError(f"benchmark-aerial: {args.source} not found: the real tiles live in "
                            "../shared/data/ucmerced_urban beside the checkout (not in the repository)")
    if args.jobs < 1:
        raise PipelineError(f"benchmark-aerial: --jobs must be >= 1, got {args.jobs}")
    began = time.time()
    (x5 if args.x5 else benchmark)(args)
    print(f"benchmark-aerial: done in {(time.time() - began) / 3600:.2f} h")
    return 0
