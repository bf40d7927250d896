"""Precision (pipeline/infer/precision.py and its use in training): `auto` on every kind of
hardware (capabilities mocked), fp16 training with a gradient scaler (an inf step skipped,
weights and EMA untouched), its state in last.pt and an exact resume, and channels-last
training giving the NCHW results."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from test_train import make_competition, run, states_equal, write_config
from tiny_experiment import wrap_step_gradients
from torch.optim.swa_utils import AveragedModel

from pipeline.core import paths
from pipeline.core.checkpoints import read_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.infer import precision
from pipeline.infer.precision import Hardware, choose
from pipeline.nets import build_net
from pipeline.nets.fast import use_fast_path
from pipeline.train import loop

CONV_NET = build_net("espcn", channels=[8, 8])
ATTENTION_NET = build_net("swinir_s", depths=[1], num_heads=[6], embed_dim=12)


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """One torch thread: the machine's cores are shared with other jobs."""


@pytest.mark.parametrize("hw, conv, attention, attention_inference", [
    (Hardware("cuda", cuda_capability=(9, 0)), "bf16", "bf16", "bf16"),      # H100
    (Hardware("cuda", cuda_capability=(8, 0)), "bf16", "bf16", "bf16"),      # A100
    (Hardware("cuda", cuda_capability=(7, 5)), "fp16", "fp16", "fp16"),      # T4
    (Hardware("cuda", cuda_capability=(6, 0)), "fp16", "fp16", "fp16"),      # P100
    (Hardware("cuda", cuda_capability=(5, 2)), "fp32", "fp32", "fp32"),      # Maxwell: no fast fp16
    (Hardware("cpu", cpu_bf16="amx"), "bf16", "bf16", "bf16"),
    # measured (see precision.py): bf16 pays there except a window transformer's inference
    (Hardware("cpu", cpu_bf16="avx512_bf16"), "bf16", "bf16", "fp32"),
    (Hardware("cpu", cpu_bf16="none"), "fp32", "fp32", "fp32"),              # AVX2: bf16 emulated
    (Hardware("mps"), "fp32", "fp32", "fp32"),
])
def test_auto_picks_what_the_hardware_runs_natively(hw, conv, attention, attention_inference):
    cases = [(CONV_NET, True, conv), (CONV_NET, False, conv), (ATTENTION_NET, True, attention),
             (ATTENTION_NET, False, attention_inference),
             (torch.nn.ModuleList([CONV_NET, ATTENTION_NET]), False, attention_inference)]   # an ensemble
    for net, training, expected in cases:
        chosen = choose("auto", hw.device_type, net, training=training, hw=hw)
        assert (chosen.name, chosen.asked, chosen.emulated) == (expected, "auto", False)
        assert chosen.reason.startswith("auto: ")
        assert chosen.scaler == (expected == "fp16")
        assert chosen.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]
    if (attention, attention_inference) == ("bf16", "fp32"):
        reason = choose("auto", hw.device_type, ATTENTION_NET, training=False, hw=hw).reason
        assert reason == ("auto: this CPU has AVX512-BF16 but no AMX, where SwinIR's inference measured "
                          "no faster in bf16 than in fp32")


def test_explicit_names_are_honoured_or_fall_back_with_the_reason():
    avx2, t4 = Hardware("cpu", cpu_bf16="none"), Hardware("cuda", cuda_capability=(7, 5))
    bf16 = choose("bf16", "cpu", CONV_NET, hw=avx2)          # training: emulated bf16 is not used
    assert bf16.name == "fp32" and "no native bf16" in bf16.reason
    assert choose("bf16", "cpu", CONV_NET, training=False, hw=avx2).emulated   # inference: honoured, warned
    fp16 = choose("fp16", "cpu", CONV_NET, hw=avx2)          # tests the GPU path on a CPU
    assert (fp16.name, fp16.scaler, fp16.emulated) == ("fp16", True, True)
    assert choose("bf16", "cuda", hw=t4).name == "fp32"
    assert choose("fp16", "cuda", hw=t4).reason == "asked; native on cuda (compute capability 7.5)"
    assert choose("fp32", "cuda", hw=t4).name == "fp32"
    with pytest.raises(PipelineError, match=r"precision 'fp8' unknown \(choose auto, bf16, fp16, fp32\)"):
        choose("fp8", "cpu")


@pytest.mark.parametrize("flags, mkldnn_bf16, expected", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True, "amx"),
    ({"avx2", "avx512f", "avx512_bf16"}, True, "avx512_bf16"),       # AMD EPYC Zen 4
    ({"avx2", "fma"}, False, "none"),
])
def test_cpu_capabilities_come_from_the_cpu_flags(monkeypatch, flags, mkldnn_bf16, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
    precision._cpu_bf16.cache_clear()
    try:
        assert precision.hardware("cpu") == Hardware("cpu", cpu_bf16=expected)
    finally:
        precision._cpu_bf16.cache_clear()


def test_config_refuses_an_unknown_precision(workdir):
    make_competition()
    with pytest.raises(PipelineError, match=r"train.precision 'half' unknown \(auto, bf16, fp16, fp32\)"):
        run(write_config(workdir, train={"precision": "half"}))
    with pytest.raises(PipelineError, match=r"train.compile must be true or false, got 'yes'"):
        run(write_config(workdir, train={"compile": "yes"}))


# --- fp16 with a gradient scaler in stage 02 -------------------------------------------------

def _inf_loss_at(monkeypatch, steps_with_inf: set[int]) -> None:
    """The training loss and its gradients are inf at the given steps (1-based) of the next
    run: an fp16 overflow, injected after the forward and backward (of every shard of the
    batch), where the scaler must catch it (replaces an earlier injection)."""
    def change(n, loss, terms, params):
        if n in steps_with_inf:
            for p in params:
                p.grad.fill_(float("inf"))
            return loss * float("inf"), terms
        return loss, terms
    wrap_step_gradients(monkeypatch, change)


def _weights_seen_by_each_step(monkeypatch) -> list[dict]:
    """The net's weights at every training forward (= after the previous step)."""
    seen = []
    real_build = loop.build_model

    def build(*args, **kwargs):
        net = real_build(*args, **kwargs)
        net.register_forward_pre_hook(
            lambda m, _: seen.append(copy.deepcopy(m.state_dict())) if m.training else None)
        return net
    monkeypatch.setattr(loop, "build_model", build)
    return seen


def test_fp16_skips_an_inf_step_without_touching_weights_or_ema(workdir, monkeypatch, capsys):
    make_competition()
    cfg = write_config(workdir, train={"precision": "fp16"})
    _inf_loss_at(monkeypatch, {5})
    seen = _weights_seen_by_each_step(monkeypatch)
    ema_updates = []
    real_update = AveragedModel.update_parameters
    monkeypatch.setattr(AveragedModel, "update_parameters",
                        lambda self, model: ema_updates.append(1) or real_update(self, model))
    result = run(cfg)                                  # does not stop: the scaler skips the step
    assert result.steps_done == s02_train_steps(cfg)
    log = pd.DataFrame(result.log)
    assert "precision fp16 (asked; emulated on this CPU" in capsys.readouterr().out
    assert (log["precision"].dropna() == "fp16").all() and log["precision_reason"].notna().sum() == 1
    step5 = log.set_index("step").loc[5]
    assert step5["skipped"] == 1 and step5["loss"] == float("inf")
    assert step5["grad_scale"] == log.set_index("step").loc[4, "grad_scale"] / 2
    for step in range(1, len(seen)):                   # after step `step`, the weights of seen[step]
        unchanged = states_equal(seen[step], seen[step - 1])
        assert unchanged == bool(log.set_index("step").loc[step, "skipped"]), step
    assert len(ema_updates) == len(seen) - int(log["skipped"].sum())   # skipped steps: no EMA update
    assert all(torch.isfinite(v).all() for v in result.net.state_dict().values())
    assert all(torch.isfinite(v).all() for v in result.ema.state_dict().values() if v.is_floating_point())


def s02_train_steps(cfg_path: str) -> int:
    from pipeline.core.config import load_config
    return load_config(cfg_path)["train"]["steps"]


def test_fp16_scaler_state_is_in_last_pt_and_resume_is_exact(workdir, monkeypatch, tmp_path_factory):
    """Killed after step 4 (the scale halved by an inf step at 3), resumed: the same weights,
    EMA, losses and scales as the run that never stopped."""
    cfg = write_config(workdir, train={"precision": "fp16", "steps": 8, "ckpt_every": 2})
    make_competition()
    _inf_loss_at(monkeypatch, {3, 6})
    real_step = torch.amp.GradScaler.step
    state = {"n": 0}

    def dying_step(self, optimizer, *args, **kwargs):
        state["n"] += 1
        if state["n"] == 6 and state.get("die"):
            raise KeyboardInterrupt          # killed inside step 6: last.pt is step 4's
        return real_step(self, optimizer, *args, **kwargs)
    monkeypatch.setattr(torch.amp.GradScaler, "step", dying_step)
    state["die"] = True
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    last = read_checkpoint(paths.run_dir("tiny", 0, 0) / "last.pt")
    assert last["step"] == 4
    scaler_state = last["train_state"]["scaler"]
    assert scaler_state["scale"] == 2.0 ** 15       # 2**16 halved once, by the inf step 3
    state.update(die=False)
    _inf_loss_at(monkeypatch, {6 - 4})               # the resumed run's 2nd step is step 6
    resumed = run(cfg)
    assert resumed.steps_done == 4

    paths.set_workdir(tmp_path_factory.mktemp("uninterrupted"))
    make_competition()
    _inf_loss_at(monkeypatch, {3, 6})
    straight = run(cfg)
    assert states_equal(resumed.net.state_dict(), straight.net.state_dict())
    assert states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    columns = ["step", "loss", "lr", "val_ssim", "skipped", "grad_scale"]
    assert pd.DataFrame(resumed.log)[columns].equals(pd.DataFrame(straight.log)[columns])
    assert pd.DataFrame(straight.log)["skipped"].sum() == 2


# --- channels-last training ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rlfn", "rfdn", "safmn", "espcn", "srcnn"])
def test_channels_last_training_gives_the_nchw_outputs_and_gradients(name):
    torch.manual_seed(11)
    ref = build_net(name).train()
    fast = use_fast_path(copy.deepcopy(ref))
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.rand(2, 3, 12, 10), torch.rand(2, 3, 12 * ref.scale, 10 * ref.scale)
    outs = []
    for net in (ref, fast):
        out = net(x)
        (out - y).abs().mean().backward()
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    for (key, a), b in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), key


@pytest.mark.filterwarnings("ignore:fp16 on this", "ignore:bf16 on this")
def test_inference_takes_the_same_names():
    """infer.precision / predict --precision: auto is what `choose` resolves for the net here;
    fp16 runs under autocast (emulated on a CPU) close to fp32."""
    from pipeline.infer.ensemble import predict_float
    torch.manual_seed(12)
    net = build_net("espcn", channels=[8, 8])
    x = torch.rand(1, 3, 12, 16)
    resolved = choose("auto", "cpu", net, training=False).name
    assert torch.equal(predict_float([net], x, precision="auto"), predict_float([net], x, precision=resolved))
    fp16, fp32 = predict_float([net], x, precision="fp16"), predict_float([net], x, precision="fp32")
    assert fp16.dtype == torch.float32 and 0 < (fp16 - fp32).abs().max().item() < 2e-2


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(workdir):
    """train.compile: true (torch.compile of the net) trains the same run as eager, within
    float rounding (the compiled kernels fuse differently)."""
    make_competition()
    eager = run(write_config(workdir, train={"steps": 4, "precision": "fp32"}))
    paths.set_workdir(workdir / "compiled")
    make_competition()
    compiled = run(write_config(workdir, name="tiny", train={"steps": 4, "precision": "fp32", "compile": True}))
    losses_of = [pd.DataFrame(r.log)["loss"].dropna().to_numpy() for r in (eager, compiled)]
    assert len(losses_of[0]) == 4 and abs(losses_of[0] - losses_of[1]).max() < 1e-4
