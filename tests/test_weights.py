"""Weights: every checkpoint layout loads, the search order holds, downloads are verified,
a file that is not what its known name says is refused, offline gives one clear line."""
from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch

from pipeline import nets
from pipeline.core import paths, weights
from pipeline.core.checkpoints import save_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.weights import KnownWeights, load_weights, resolve_weights
from pipeline.nets import build_net
from pipeline.tools import weights as weights_command

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def espcn_pair():
    """Two differently initialised ESPCNs: `src` holds the weights `dst` must end with."""
    torch.manual_seed(0)
    src = build_net("espcn", scale=2)
    torch.manual_seed(1)
    return src, build_net("espcn", scale=2)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["bare", "params", "params_ema", "module", "params_module", "pipeline"])
def test_every_layout_loads(workdir, layout):
    src, dst = espcn_pair()
    sd = src.state_dict()
    path = workdir / f"{layout}.pth"
    if layout == "pipeline":
        save_checkpoint(path, net_name="espcn", net_args={"scale": 2}, state_dict=sd, exp="x", seed=0,
                        fold=0, step=10, val_ssim=0.5)
    else:
        payload = {"bare": sd, "params": {"params": sd},
                   "params_ema": {"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd},
                   "module": {f"module.{k}": v for k, v in sd.items()},
                   "params_module": {"params": {f"module.{k}": v for k, v in sd.items()}}}[layout]
        torch.save(payload, path)
    assert not same_weights(src, dst)
    load_weights(dst, path)
    assert same_weights(src, dst)


def test_param_key_chooses_an_entry(workdir):
    src, dst = espcn_pair()
    path = workdir / "both.pth"
    torch.save({"params": src.state_dict(), "params_ema": dst.state_dict()}, path)
    load_weights(dst, path, param_key="params")
    assert same_weights(src, dst)
    with pytest.raises(PipelineError, match="no 'ema' entry"):
        load_weights(dst, path, param_key="ema")


def test_mismatches_are_refused_with_the_keys_named(workdir):
    src, dst = espcn_pair()
    sd = dict(src.state_dict())
    sd["extra.weight"] = sd.pop("to_subpixels.bias")
    with pytest.raises(PipelineError, match="missing to_subpixels.bias; unexpected extra.weight"):
        load_weights(dst, sd)
    with pytest.warns(UserWarning, match="non-strictly"):
        load_weights(dst, sd, strict=False)
    with pytest.raises(PipelineError, match="do not fit"):
        load_weights(build_net("espcn", scale=4), src.state_dict())  # 3*16 vs 3*4 output channels
    junk = workdir / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="junk.pth: not a readable weight file"):
        load_weights(dst, junk)


@pytest.fixture
def search_dirs(workdir, monkeypatch):
    """Two SR_WEIGHTS_DIR folders; models/pretrained of the temp workdir comes last."""
    a, b = workdir / "a", workdir / "b"
    for d in (a, b, paths.PRETRAINED):
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("SR_WEIGHTS_DIR", f"{a}:{b}")
    return a, b, paths.PRETRAINED


def test_resolve_order(search_dirs):
    a, b, pretrained = search_dirs
    for d in (pretrained, b, a):
        (d / "mine.pth").write_bytes(d.name.encode())
        assert resolve_weights("mine.pth") == d / "mine.pth"  # the earliest folder holding it
    (a / "mine.pth").unlink()
    assert resolve_weights("mine.pth") == b / "mine.pth"
    assert resolve_weights(str(pretrained / "mine.pth")) == pretrained / "mine.pth"  # a path as given
    with pytest.raises(PipelineError, match="nothere.pth: weight file not found"):
        resolve_weights(str(a / "nothere.pth"))
    with pytest.raises(PipelineError, match="unknown weights .*rlfn_x4"):
        resolve_weights("nothere.pth")


@pytest.fixture
def known_file(search_dirs, monkeypatch, tmp_path):
    """A published file stand-in: served from a file:// URL, registered with its sha256."""
    served = tmp_path / "served" / "tiny_x2.pth"
    served.parent.mkdir()
    torch.save(espcn_pair()[0].state_dict(), served)
    entry = KnownWeights("tiny_x2", "tiny_x2.pth", "espcn", served.as_uri(),
                         hashlib.sha256(served.read_bytes()).hexdigest(), net_args={"scale": 2})
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "tiny_x2", entry)
    return entry, served


def test_download_verifies_and_then_finds_locally(known_file, monkeypatch):
    entry, served = known_file
    path = resolve_weights("tiny_x2")
    assert path == paths.PRETRAINED / "tiny_x2.pth"
    assert path.read_bytes() == served.read_bytes()

    def no_network(url, dest):
        raise AssertionError("fetched although the file is local")
    monkeypatch.setattr(weights, "_fetch", no_network)
    assert resolve_weights("tiny_x2.pth") == path  # by file name too
    net = nets.build_pretrained("tiny_x2")  # `pretrained: tiny_x2` in a config
    assert same_weights(net, espcn_pair()[0]) and not net.training


def test_a_file_not_matching_its_known_sha256_is_refused(known_file, search_dirs):
    entry, served = known_file
    a = search_dirs[0]
    (a / "tiny_x2.pth").write_bytes(served.read_bytes()[:-1])  # truncated
    with pytest.raises(PipelineError, match="sha256 .* is not that of the published tiny_x2.pth.*refused"):
        resolve_weights("tiny_x2")
    with pytest.raises(PipelineError, match="refused"):
        load_weights(build_net("espcn", scale=2), a / "tiny_x2.pth")  # also as a path


def test_a_bad_download_is_refused_and_leaves_nothing(known_file, monkeypatch):
    entry, served = known_file
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "tiny_x2", KnownWeights(
        entry.name, entry.file, entry.net, entry.url, "0" * 64))
    with pytest.raises(PipelineError, match="downloaded file refused"):
        resolve_weights("tiny_x2")
    assert list(paths.PRETRAINED.iterdir()) == []


def test_size_is_checked_when_no_sha256_is_published(known_file, monkeypatch):
    entry, served = known_file
    size = served.stat().st_size
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "tiny_x2", KnownWeights(
        entry.name, entry.file, entry.net, entry.url, None, size=size + 1))
    with pytest.raises(PipelineError, match=f"{size} bytes, the published tiny_x2.pth has {size + 1}"):
        resolve_weights("tiny_x2")
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "tiny_x2", KnownWeights(
        entry.name, entry.file, entry.net, entry.url, None, size=size))
    assert resolve_weights("tiny_x2").stat().st_size == size


def test_offline_and_missing_is_one_line_naming_file_address_and_folder(search_dirs, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(weights, "_fetch", offline)
    with pytest.raises(PipelineError) as err:
        resolve_weights("swinir_s_x4")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth: not found in")
    assert "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/" in message
    assert str(paths.PRETRAINED) in message and "SR_WEIGHTS_DIR" in message
    with pytest.raises(PipelineError, match="rlfn_x4.pth: not found .* download it from https://github.com/bytedance"):
        resolve_weights("rlfn_x4", download_missing=False)


def test_registry_entries_build_their_nets():
    for w in weights.KNOWN_WEIGHTS.values():
        net = build_net(w.net, **w.net_args)
        assert net.scale == 4, w.name
        if w.url is None:   # a cloud drive (HAT): a person fetches it; checked by its layout on load
            assert "drive.google.com" in w.get_it and w.sha256 is None and w.size is None, w.name
            continue
        assert w.url.startswith("https://github.com/") and w.url.endswith(w.file)
        assert (w.sha256 and len(w.sha256) == 64) or w.size  # every file is checked somehow
    assert weights.KNOWN_WEIGHTS["swinir_s_x4"].size == 17_225_941


@pytest.mark.shared
def test_shared_release_files_verify_and_build(shared, monkeypatch):
    monkeypatch.setenv("SR_WEIGHTS_DIR", str(paths.SHARED_WEIGHTS))
    assert resolve_weights("rlfn_x4") == paths.SHARED_WEIGHTS / "rlfn_x4.pth"  # sha256 checked
    net = nets.build_pretrained("rlfn_s_x4")
    assert type(net).__name__ == "RLFN" and net.conv_1.out_channels == 48


@pytest.mark.shared
def test_weights_command_lists_status(shared, cli, workdir):
    proc = cli("weights", env={"SR_WEIGHTS_DIR": str(paths.SHARED_WEIGHTS), "SR_WORKDIR": str(workdir)})
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "ok" in lines["rlfn_x4"].split() and str(paths.SHARED_WEIGHTS / "rlfn_x4.pth") in lines["rlfn_x4"]
    assert "missing" in lines["swinir_s_x4"].split() and "releases/download" in lines["swinir_s_x4"]
    bad = cli("weights", "--fetch", "nope", env={"SR_WORKDIR": str(workdir)})
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: nope: unknown weights")


def test_fetch_all_reports_every_failure_and_fails(search_dirs, monkeypatch, capsys):
    import argparse

    def offline(url, dest):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(weights, "_fetch", offline)
    assert weights_command.main(argparse.Namespace(fetch=["all"])) == 1
    out, err = capsys.readouterr()
    errors = err.strip().splitlines()
    fetchable = [w for w in weights.KNOWN_WEIGHTS.values() if w.url]   # `all` leaves the cloud-drive files out
    assert len(errors) == len(fetchable) and all(e.startswith("error: ") for e in errors)
    assert out.count(" missing ") == len(weights.KNOWN_WEIGHTS)


@pytest.mark.parametrize("name,file,net", [("hat_s_x4", "HAT-S_SRx4.pth", "hat_s"),
                                           ("hat_x4", "HAT_SRx4_ImageNet-pretrain.pth", "hat")])
def test_cloud_drive_weights_say_where_to_get_them(name, file, net, workdir, monkeypatch):
    """No script can fetch the HAT releases: the message names the authors' drive and the
    folders to put the file in, and nothing is attempted over the network."""
    monkeypatch.setattr(weights, "_fetch", lambda *a: pytest.fail("a cloud drive was fetched"))
    assert weights.known_weights(file).name == name and weights.known_weights(name).net == net
    with pytest.raises(PipelineError, match=rf"{file}: not found in .*no script can download it: get it by "
                                            r"hand from the HAT authors' Google Drive folder https://drive"
                                            r".*and put it in .*models/pretrained or a folder on SR_WEIGHTS_DIR"):
        weights.resolve_weights(name)


def test_a_file_without_published_checksum_is_accepted_by_layout_and_its_sha256_reported(workdir, tmp_path,
                                                                                         monkeypatch):
    """HAT-S_SRx4.pth has no published sha256: any file of that name that loads strictly
    is used, and load_pretrained reports its sha256 (the run records it)."""
    from pipeline.core.io import sha256_file
    from pipeline.nets import build_net

    small = {"embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 4, "img_size": 16}
    folder = tmp_path / "w"
    folder.mkdir()
    torch.manual_seed(7)
    saved = build_net("hat_s", **small).state_dict()
    torch.save({"params_ema": saved}, folder / "HAT-S_SRx4.pth")
    monkeypatch.setenv("SR_WEIGHTS_DIR", str(folder))
    torch.manual_seed(8)
    net = build_net("hat_s", **small)
    report = weights.load_pretrained(net, "hat_s_x4")
    assert report.sha256 == sha256_file(folder / "HAT-S_SRx4.pth") and report.reinitialised == []
    loaded = net.state_dict()                       # the file's weights are in the net, every one
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if not k.startswith("relative_position_index"))
    assert sum(v.numel() for v in saved.values()) > 0
    with pytest.raises(PipelineError, match="do not fit HAT"):   # a file of that name for another net: refused
        weights.load_pretrained(build_net("hat_s", **{**small, "embed_dim": 12}), "hat_s_x4")
