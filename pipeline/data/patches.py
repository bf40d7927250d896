"""Training data: scenes held in memory, scale-aware paired crops, paired augmentation.

External scenes (`data.extra`, pipeline/data/extra.py) join the training scenes only,
drawn with their share of the crops (`data.extra_weight`); validation never sees them.

Every training sample is a pure function of (seed, fold, sample index): sample `i`
draws its scene, crop, CutMix partner and augmentation from a NumPy generator seeded
with [seed, fold, i]. Step `t` of a batch size B uses samples t*B .. t*B+B-1, and rank
r of W takes its contiguous share of them, so
- the stream resumes exactly from a step number (nothing else to checkpoint),
- it does not depend on the number of DataLoader workers,
- a DDP run on W processes sees the same global batch as a single process.

Augmentation goes through one albumentations Compose that treats the HR crop as a
second image target: each transform draws its parameters once per call and applies them
to both, so LR and HR get the same flip/rotation and the same colour change even
though their sizes differ (dihedral ops and per-pixel colour ops are size-agnostic).
No arbitrary-angle rotation: its interpolation blurs the edges SSIM rewards.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.core import paths
from pipeline.core.artifacts import load_folds, load_manifest
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_image

# Magnitudes of the colour augmentations (the config sets only their probabilities):
# small shifts that keep rooftops, roads and vegetation their plausible colours.
HUE_SHIFT = 10            # of 180 OpenCV hue units
SATURATION_SHIFT = 15     # of 255
BRIGHTNESS_LIMIT = 0.1    # fraction of the full range
CONTRAST_LIMIT = 0.1
# CutMix box side, as a fraction of the patch side (drawn uniformly per sample)
CUTMIX_SIDE = (0.25, 0.5)


@dataclass
class Scene:
    """One training scene: uint8 RGB LR (h x w) and HR (scale*h x scale*w)."""
    id: str
    lr: np.ndarray
    hr: np.ndarray


# --- loading ---------------------------------------------------------------------------

FULL_FIT_STREAM = 1_000_003   # the sample stream's key of a full-data fit (a fold's is its number)


def fold_ids(fold: int | str) -> tuple[list, list]:
    """(training ids, validation ids) of a fold: validation is the held-out fold; of a full-data
    fit (`paths.FULL`): every training scene, no validation."""
    folds = load_folds()
    if fold == paths.FULL:
        return folds["id"].tolist(), []
    known = sorted(set(folds["fold"]))
    if fold not in known:
        raise PipelineError(f"{paths.FOLDS}: no fold {fold} (folds: {', '.join(map(str, known))})")
    return (folds.loc[folds["fold"] != fold, "id"].tolist(),
            folds.loc[folds["fold"] == fold, "id"].tolist())


def split_digest(val_ids: list) -> str:
    """A short fingerprint of a fold's validation ids, kept in its checkpoints: a fold
    re-split in folds.csv (same K, other scenes) is then caught, not scored with leaks."""
    text = "\n".join(sorted(map(str, val_ids)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_scenes(ids: list, scale: int) -> list[Scene]:
    """Read the training scenes `ids` (manifest ids) into memory as uint8."""
    rows = load_manifest("train").set_index("id")
    missing = [str(i) for i in ids if i not in rows.index]
    if missing:
        raise PipelineError(f"{paths.MANIFEST}: no training scene with id {', '.join(missing[:5])} "
                            f"(folds.csv is stale: rerun `make folds`)")
    scenes = []
    for scene_id in ids:
        row = rows.loc[scene_id]
        lr, hr = read_image(row["low_path"]), read_image(row["high_path"])
        if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise PipelineError(f"{row['high_path']}: {hr.shape[1]}x{hr.shape[0]} is not {scale}x "
                                f"the low image's {lr.shape[1]}x{lr.shape[0]}")
        scenes.append(Scene(scene_id, lr, hr))
    return scenes


def load_fold(fold: int | str, scale: int) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, validation scenes) of a fold (a full-data fit: every scene, none), in memory."""
    train_ids, val_ids = fold_ids(fold)
    if fold == paths.FULL:
        if not train_ids:
            raise PipelineError(f"{paths.FOLDS}: no training scene")
        return load_scenes(train_ids, scale), []
    if not train_ids or not val_ids:
        raise PipelineError(f"{paths.FOLDS}: fold {fold} leaves no training or no validation scene")
    return load_scenes(train_ids, scale), load_scenes(val_ids, scale)


# --- augmentation ----------------------------------------------------------------------

def build_augment(cfg: dict[str, Any]) -> A.Compose | None:
    """The paired augmentation of a config's `train.augment` section (None if nothing on)."""
    transforms = []
    if cfg["dihedral"]:
        transforms.append(A.D4(p=1.0))
    if cfg["hue_saturation"] > 0:
        transforms.append(A.HueSaturationValue(HUE_SHIFT, SATURATION_SHIFT, 0, p=cfg["hue_saturation"]))
    if cfg["brightness_contrast"] > 0:
        transforms.append(A.RandomBrightnessContrast(BRIGHTNESS_LIMIT, CONTRAST_LIMIT,
                                                     p=cfg["brightness_contrast"]))
    if not transforms:
        return None
    # HR as a second "image" target: same parameters, different size (shape check off)
    return A.Compose(transforms, additional_targets={"hr": "image"}, is_check_shapes=False, seed=0)


# --- the sample stream -------------------------------------------------------------------

class PairedPatches(Dataset):
    """Item `step` is this rank's share of training step `step`'s batch: uint8 NCHW tensors
    (LR: b x 3 x p x p, HR: b x 3 x sp x sp), b = batch_size / world_size."""

    def __init__(self, scenes: list[Scene], *, scale: int, lr_patch: int, batch_size: int,
                 steps: int, augment: dict[str, Any], seed: int, fold: int | str,
                 rank: int = 0, world_size: int = 1, extra_scenes: list[Scene] = (),
                 extra_weight: float | None = None):
        if batch_size % world_size:
            raise PipelineError(f"train.batch_size {batch_size} is not divisible by the "
                                f"{world_size} processes")
        n_competition = len(scenes)
        scenes = list(scenes) + list(extra_scenes)   # external scenes (data.extra) last
        for s in scenes:
            if min(s.lr.shape[:2]) < lr_patch:
                raise PipelineError(f"scene {s.id}: LR {s.lr.shape[:2]} is smaller than "
                                    f"train.lr_patch {lr_patch}")
        self.scenes, self.scale, self.patch = scenes, scale, lr_patch
        self.batch_size, self.steps = batch_size, steps
        self.seed, self.fold = seed, FULL_FIT_STREAM if fold == paths.FULL else fold
        self.per_rank = batch_size // world_size
        self.first = rank * self.per_rank
        self.augment = build_augment(augment)
        self.cutmix = float(augment["cutmix"])
        # scene drawn in proportion to its crop positions: every LR pixel equally likely
        counts = np.array([(s.lr.shape[0] - lr_patch + 1) * (s.lr.shape[1] - lr_patch + 1)
                           for s in scenes], dtype=np.float64)
        self.scene_p = counts / counts.sum()
        if extra_scenes and extra_weight is not None:
            # a fixed share of the crops from the external scenes, each group by pixels
            own, ext = counts[:n_competition], counts[n_competition:]
            self.scene_p = np.concatenate([own / own.sum() * (1 - extra_weight), ext / ext.sum() * extra_weight])

    def __len__(self) -> int:
        return self.steps

    def _crop(self, rng: np.random.Generator, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        p, s = self.patch, self.scale
        if exclude is None or len(self.scenes) == 1:
            k = int(rng.choice(len(self.scenes), p=self.scene_p))
        else:  # a partner from another scene
            others = np.delete(np.arange(len(self.scenes)), exclude)
            q = np.delete(self.scene_p, exclude)
            k = int(rng.choice(others, p=q / q.sum()))
        scene = self.scenes[k]
        y = int(rng.integers(0, scene.lr.shape[0] - p + 1))
        x = int(rng.integers(0, scene.lr.shape[1] - p + 1))
        lr = scene.lr[y:y + p, x:x + p]
        hr = scene.hr[y * s:(y + p) * s, x * s:(x + p) * s]
        return lr, hr, k

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample `index` of the stream: (LR p x p x 3, HR sp x sp x 3) uint8."""
        rng = np.random.default_rng([self.seed, self.fold, index])
        lr, hr, k = self._crop(rng)
        if self.cutmix > 0 and rng.random() < self.cutmix:
            lr, hr = lr.copy(), hr.copy()
            lr2, hr2, _ = self._crop(rng, exclude=k)
            p, s = self.patch, self.scale
            bh, bw = (max(1, int(round(p * f))) for f in rng.uniform(*CUTMIX_SIDE, size=2))
            y, x = int(rng.integers(0, p - bh + 1)), int(rng.integers(0, p - bw + 1))
            lr[y:y + bh, x:x + bw] = lr2[y:y + bh, x:x + bw]
            hr[y * s:(y + bh) * s, x * s:(x + bw) * s] = hr2[y * s:(y + bh) * s, x * s:(x + bw) * s]
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2 ** 31)))
            out = self.augment(image=lr, hr=hr)
            lr, hr = out["image"], out["hr"]
        return lr, hr

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        start = step * self.batch_size + self.first
        pairs = [self.sample(i) for i in range(start, start + self.per_rank)]
        lr = np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2)
        hr = np.stack([p[1] for p in pairs]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(hr))


# train.num_workers: auto = no workers on CPU, where the loader takes under 1 % of a step
# (docs/speed.md) and a worker would take a core from the training threads; on CUDA one
# worker per CPU thread of the job, up to this many, so the GPU never waits for crops.
AUTO_WORKERS_CUDA = 4


def loader_workers(setting: int | str, device: torch.device | str = "cpu") -> int:
    """The number of DataLoader worker processes `train.num_workers` means on `device`."""
    if setting != "auto":
        return int(setting)
    return min(AUTO_WORKERS_CUDA, torch.get_num_threads()) if torch.device(device).type == "cuda" else 0


def batches(dataset: PairedPatches, start_step: int, num_workers: int | str = "auto",
            device: torch.device | str = "cpu") -> DataLoader:
    """Batches of steps start_step .. steps-1 in order; workers (each 2 batches ahead) and, on
    CUDA, pinned memory so the copy to the GPU is asynchronous (to_float's non_blocking).

    The batches are the same for any number of workers (each is a function of its step).
    The loader draws its workers' base seed from a generator of its own: from the global
    torch RNG that draw would shift dropout/drop-path between a resumed run and an
    uninterrupted one (a resumed run creates one loader more).
    """
    workers = loader_workers(num_workers, device)
    return DataLoader(dataset, batch_size=None, sampler=range(start_step, len(dataset)),
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      generator=torch.Generator().manual_seed(dataset.seed), persistent_workers=False)


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NCHW -> float NCHW in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def scene_tensors(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole scene as uint8 1x3xHxW tensors (LR, HR), for validation."""
    def one(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    return one(scene.lr), one(scene.hr)
