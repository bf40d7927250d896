"""Stage 02's runtime pieces: DataLoader workers (same batches with any number of them) and
the TensorBoard writer (read back with TensorBoard's own EventAccumulator)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import AUG_ALL, TINY, fake_scenes, read_board

from pipeline.core.config import check_values, load_config
from pipeline.core.errors import PipelineError
from pipeline.data import patches as data
from pipeline.nets import build_net
from pipeline.train.board import TrainingBoard


def test_batches_are_the_same_with_0_and_2_workers():
    stream = data.PairedPatches(fake_scenes(), scale=4, lr_patch=16, batch_size=6, steps=9,
                                augment=AUG_ALL, seed=5, fold=2)
    before = torch.get_rng_state()
    alone = list(data.batches(stream, 3, num_workers=0))
    with_workers = list(data.batches(stream, 3, num_workers=2))
    assert len(alone) == len(with_workers) == 6
    for (lr0, hr0), (lr2, hr2), step in zip(alone, with_workers, range(3, 9)):
        assert torch.equal(lr0, lr2) and torch.equal(hr0, hr2), step
        assert torch.equal(hr0, stream[step][1])           # each batch is its step's
    # the loader's seed draw comes from its own generator: the training RNG is untouched,
    # so a resumed run (one loader more) keeps the dropout / drop-path stream of a straight one
    assert torch.equal(torch.get_rng_state(), before)


def test_num_workers_auto_and_pinned_memory_on_cuda(monkeypatch):
    stream = data.PairedPatches(fake_scenes(), scale=4, lr_patch=16, batch_size=2, steps=2,
                                augment=AUG_ALL, seed=0, fold=0)
    assert data.loader_workers("auto", "cpu") == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert data.loader_workers("auto", "cuda") == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert data.loader_workers("auto", torch.device("cuda", 1)) == data.AUTO_WORKERS_CUDA
    assert data.loader_workers(3, "cpu") == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # a job of one thread: one worker
    on_cuda = data.batches(stream, 0, "auto", "cuda")      # built, not iterated: no GPU needed
    assert on_cuda.pin_memory and on_cuda.num_workers == 1
    assert not data.batches(stream, 0, "auto", "cpu").pin_memory


@pytest.mark.parametrize("value", [-1, 1.5, "many", True])
def test_bad_num_workers_is_refused_by_name(value):
    cfg = load_config("demo")
    cfg["train"].update(TINY["train"], num_workers=value)
    with pytest.raises(PipelineError, match=r"train.num_workers must be 'auto' or an integer >= 0"):
        check_values(cfg)


def test_resumed_board_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    """A killed run whose events reached step 6 after its checkpoint at 4; the resumed run
    trains 5.. again: TensorBoard shows each step once, the resumed run's figures."""
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    scene = data.Scene("s", low, np.kron(low, np.ones((4, 4, 1), np.uint8)))
    net = build_net("bicubic", scale=4)

    def rows(steps, offset):
        return [{"step": s, "loss": 1.0 / s + offset, "lr": 1e-3, "loss_l1": 0.5 + offset,
                 "val_ssim": 0.5 + s / 100 + offset if s % 3 == 0 else None, "bicubic_ssim": None}
                for s in steps]

    killed = TrainingBoard(tmp_path, 0, scene, 4, torch.device("cpu"))
    killed.log_row({"step": 0, "loss": None, "lr": None, "val_ssim": 0.4, "bicubic_ssim": 0.3})
    for row in rows(range(1, 7), 0.0):
        killed.log_row(row)
    killed.log_crop(3, net)
    killed.log_crop(6, net)
    killed.close()
    resumed = TrainingBoard(tmp_path, 4, scene, 4, torch.device("cpu"))
    for row in rows(range(5, 9), 10.0):
        resumed.log_row(row)
    resumed.close()

    board = read_board(tmp_path)
    loss = board.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    np.testing.assert_allclose([e.value for e in loss], [1 / s for s in range(1, 5)] + [1 / s + 10 for s in range(5, 9)],
                               rtol=1e-6)
    assert [e.step for e in board.Scalars("train/loss_l1")] == list(range(1, 9))
    assert [(e.step, round(e.value, 5)) for e in board.Scalars("val/ssim")] == [(0, 0.4), (3, 0.53), (6, 10.56)]
    assert [e.step for e in board.Scalars("val/bicubic_ssim")] == [0]
    crops = board.Images("val/crop")
    assert [e.step for e in crops] == [3] and (crops[0].height, crops[0].width) == (48, 120)
