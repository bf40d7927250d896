"""Pretrained weights: find, download, verify and load them.

`resolve_weights(name_or_path)` finds a file: an existing path as given; otherwise a
known name (`rlfn_x4`) or file name (`rlfn_x4.pth`) is looked up in every folder of
`SR_WEIGHTS_DIR` (':'-separated), then `models/pretrained/`, then downloaded from the
authors' published address into `models/pretrained/`. A file carrying a known name is
checked against its known sha256 (or its size where no sha256 is published) and refused
when it differs, so a truncated or different file never loads silently under that name.

`load_weights(net, path_or_name)` reads the official layouts (`{'params': ...}`,
`{'params_ema': ...}`, a bare state_dict, a `module.` prefix) and the pipeline's own
checkpoints, and loads them strictly. `python -m pipeline weights` lists the known files
and where they were found; `--fetch NAME` (or `all`) downloads what is missing.
"""
from __future__ import annotations

import pickle
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.checkpoints import is_pipeline_checkpoint
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path, sha256_file
from pipeline.core.locks import locked


@dataclass(frozen=True)
class KnownWeights:
    """A published weight file: what it is, which net loads it, where it comes from."""
    name: str                    # short name used in configs: `pretrained: rlfn_x4`
    file: str                    # the authors' file name
    net: str                     # registry name for build_net
    url: str | None              # the authors' published download address; None: no script can fetch it
    sha256: str | None           # None: not published; the size is checked instead (if known)
    size: int | None = None
    net_args: dict = field(default_factory=dict)
    note: str = ""
    get_it: str = ""             # where a person downloads it when no url serves a script


_RLFN_URL = "https://github.com/bytedance/RLFN/raw/main/model_zoo/"
_SWINIR_URL = "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/"
# XPixelGroup/HAT's README: the release files are on a cloud drive (no direct file address)
_HAT_DRIVE = ("the HAT authors' Google Drive folder https://drive.google.com/drive/folders/"
              "1HpmReFfoUqUbnAOQ7rvOeNU3uf_m69w0 (or Baidu Netdisk https://pan.baidu.com/s/"
              "1u2r4Lc2_EEeQqra2-w85Xg, access code qyrl), linked from github.com/XPixelGroup/HAT")

KNOWN_WEIGHTS: dict[str, KnownWeights] = {w.name: w for w in [
    KnownWeights("rlfn_x4", "rlfn_x4.pth", "rlfn", _RLFN_URL + "rlfn_x4.pth",
                 "8c7edb57dfc89048bafba29d591d4c27d4099964b4a9e22df23d6dc257a637c0",
                 note="RLFN x4, Apache-2.0; Set5 32.24 dB"),
    KnownWeights("rlfn_s_x4", "rlfn_s_x4.pth", "rlfn_s", _RLFN_URL + "rlfn_s_x4.pth",
                 "f769c5a88433786b2db0c2b24da6ca6c92a24c62344b9354a390f8a74388e89d",
                 note="RLFN-S x4, Apache-2.0; Set5 32.23 dB"),
    # RFDN and SAFMN: addresses built from the origin (repo, path); HEAD is the default branch
    KnownWeights("rfdn_x4", "RFDN_AIM.pth", "rfdn",
                 "https://github.com/njulj/RFDN/raw/HEAD/trained_model/RFDN_AIM.pth",
                 "11af8ec8ebd68689e90ef1e29044f9804c72d3bd9f7573820b7b26035782760c",
                 note="RFDN (AIM 2020), MIT; Set5 32.16 dB measured"),
    KnownWeights("safmn_x4", "team15_SAFMN.pth", "safmn",
                 "https://github.com/sunny2109/SAFMN/raw/HEAD/NTIRE2023_ESR/model_zoo/team15_SAFMN.pth",
                 "93fe3d7175ef1446cfcb3a884ddf8bbb4391f31190e9d1bf6c6c1cb768f8b565",
                 note="SAFMN (NTIRE 2023 ESR), MIT; Set5 32.17 dB measured"),
    KnownWeights("swinir_s_x4", "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth", "swinir_s",
                 _SWINIR_URL + "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth",
                 None, size=17_225_941,
                 note="SwinIR-S x4 (lightweight), Apache-2.0; no published sha256, size checked"),
    # no sha256 or size published: accepted by the strict layout check on loading; a run
    # records the file's sha256 in its config.yaml (pretrained_loaded)
    KnownWeights("hat_s_x4", "HAT-S_SRx4.pth", "hat_s", None, None, get_it=_HAT_DRIVE,
                 note="HAT-S x4 (options/test/HAT-S_SRx4.yml), Apache-2.0; from a cloud drive, no sha256 published"),
    KnownWeights("hat_x4", "HAT_SRx4_ImageNet-pretrain.pth", "hat", None, None, get_it=_HAT_DRIVE,
                 note="HAT x4, ImageNet-pretrained (options/test/HAT_SRx4_ImageNet-pretrain.yml), Apache-2.0; "
                      "from a cloud drive, no sha256 published"),
]}


def known_weights(name: str) -> KnownWeights | None:
    """The registry entry for a short name, a file name or a file stem; None if unknown."""
    base = Path(str(name)).name
    for w in KNOWN_WEIGHTS.values():
        if base in (w.name, w.file, Path(w.file).stem):
            return w
    return None


def verify(path: Path, known: KnownWeights) -> None:
    """Refuse a file whose content is not the known file it is named after."""
    if known.sha256 is not None:
        actual = sha256_file(path)
        if actual != known.sha256:
            raise PipelineError(
                f"{path}: sha256 {actual[:16]}... is not that of the published {known.file} "
                f"({known.sha256[:16]}...); refused: remove it or give it another name")
    elif known.size is not None and path.stat().st_size != known.size:
        raise PipelineError(
            f"{path}: {path.stat().st_size} bytes, the published {known.file} has {known.size} "
            "(no sha256 is published for it); refused: remove it or give it another name")


def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest` (any urllib scheme, file:// included), with a progress bar."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


def download(known: KnownWeights) -> Path:
    """Download a known file into models/pretrained/, verified before it takes its name."""
    if known.url is None:
        raise PipelineError(f"{known.file}: not found in {where_searched()}; no script can download it: "
                            f"get it by hand from {known.get_it} and put it in {paths.PRETRAINED} "
                            "or a folder on SR_WEIGHTS_DIR")
    dest = paths.PRETRAINED / known.file
    with locked(dest), atomic_path(dest) as tmp:
        try:
            _fetch(known.url, tmp)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PipelineError(
                f"{known.file}: not found in {where_searched()} and the download from "
                f"{known.url} failed ({reason}); download it by hand and put it in "
                f"{paths.PRETRAINED} or a folder on SR_WEIGHTS_DIR") from None
        try:
            verify(tmp, known)
        except PipelineError as exc:
            raise PipelineError(f"{known.url}: downloaded file refused: {exc}") from None
    return dest


def where_searched() -> str:
    return ", ".join(str(d) for d in paths.weights_search_dirs())


def find_local(name_or_file: str) -> Path | None:
    """The first folder on the search path holding this file (by file name), or None."""
    known = known_weights(name_or_file)
    file = known.file if known else Path(name_or_file).name
    for folder in paths.weights_search_dirs():
        if (folder / file).is_file():
            return folder / file
    return None


def resolve_weights(name_or_path: str | Path, download_missing: bool = True) -> Path:
    """A path to a verified weight file (see the module docstring for the search order)."""
    text = str(name_or_path)
    given = Path(text).expanduser()
    if given.is_file():
        found = given
    elif given.name != text:  # a path with folders that does not exist: nothing to search
        raise PipelineError(f"{text}: weight file not found")
    else:
        found = find_local(text)
        if found is None:
            known = known_weights(text)
            if known is None:
                raise PipelineError(f"{text}: unknown weights (known: {', '.join(KNOWN_WEIGHTS)}) "
                                    f"and no such file in {where_searched()}")
            if not download_missing and known.url is not None:
                raise PipelineError(f"{known.file}: not found in {where_searched()}; download it "
                                    f"from {known.url} into {paths.PRETRAINED} or a folder on SR_WEIGHTS_DIR")
            return download(known)
    known = known_weights(found.name)
    if known is not None:
        verify(found, known)
    return found


def read_weight_file(path: Path) -> Any:
    """torch.load on CPU: tensors-only unpickling, or full unpickling for a file that
    holds other Python objects (the pipeline's own last.pt keeps training state)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise PipelineError(f"{path}: not a readable weight file ({type(exc).__name__})") from None


def extract_state_dict(obj: Any, source: str = "weights", param_key: str | None = None) -> dict:
    """The state_dict inside any supported layout, with `module.` / `_orig_mod.` removed."""
    if is_pipeline_checkpoint(obj):
        state = obj["state_dict"]
    elif isinstance(obj, Mapping) and param_key is not None:
        if param_key not in obj:
            raise PipelineError(f"{source}: no '{param_key}' entry (has: {', '.join(map(str, obj))})")
        state = obj[param_key]
    elif isinstance(obj, Mapping) and "params_ema" in obj:   # BasicSR/KAIR: EMA weights first
        state = obj["params_ema"]
    elif isinstance(obj, Mapping) and "params" in obj:
        state = obj["params"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise PipelineError(f"{source}: no state_dict of tensors found")
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):  # DataParallel/DDP, torch.compile
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class LoadReport:
    """What a load did: for the run's printout and its config.yaml."""
    source: str
    sha256: str | None           # of the file (None for an in-memory dict)
    loaded: int                  # the net's tensors that came from the file
    reinitialised: list[str]     # modules left as built (model.reinit)
    unused: int                  # the file's tensors inside those modules, not used

    def summary(self) -> str:
        line = f"{self.loaded} tensors loaded from {Path(self.source).name}"
        if self.reinitialised:
            line += (f"; re-initialised: {', '.join(self.reinitialised)} "
                     f"({self.unused} tensors of the file not used)")
        return line

    def record(self) -> dict:
        return {"file": self.source, "sha256": self.sha256, "tensors_loaded": self.loaded,
                "reinitialised": list(self.reinitialised), "file_tensors_not_used": self.unused}


def _inside(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _check_reinit(net: nn.Module, reinit: list[str]) -> None:
    """Every prefix must name a module of the net: a typo would otherwise load nothing new."""
    modules = [n for n, _ in net.named_modules() if n]
    for prefix in reinit:
        if not isinstance(prefix, str) or not any(_inside(n, [prefix]) for n in modules):
            top = sorted({n.split(".")[0] for n in modules})
            raise PipelineError(f"model.reinit: '{prefix}' matches no module of {type(net).__name__} "
                                f"(its modules: {_short(top, 8)})")


def load_weights(net: nn.Module, path_or_name: str | Path | Mapping, strict: bool = True,
                 param_key: str | None = None, reinit: list[str] | tuple = ()) -> nn.Module:
    """Load weights into `net` in place (strictly by default) and return it.

    `path_or_name`: a file path, a known name (resolved as `resolve_weights` does) or an
    already loaded checkpoint dict. Any mismatch raises PipelineError naming the source
    and the keys concerned. `reinit`: module prefixes (`upsampler`, `layers.3`) left as
    built, i.e. freshly initialised; only their tensors may be missing from the file or
    not fit it (e.g. an upsampler for another scale); see `load_pretrained`.
    """
    _load(net, path_or_name, strict, param_key, reinit, hash_file=False)
    return net


def load_pretrained(net: nn.Module, path_or_name: str | Path | Mapping,
                    reinit: list[str] | tuple = ()) -> LoadReport:
    """`load_weights` (strict), returning what was loaded and the file's sha256, for a
    run to record. Every tensor of the file outside the `reinit` modules must fit by name
    and shape; the `reinit` modules are initialised afresh as a whole (none of their file
    tensors is used, fitting or not), so a module is never half pretrained."""
    return _load(net, path_or_name, True, None, reinit, hash_file=True)


def _load(net: nn.Module, path_or_name: str | Path | Mapping, strict: bool, param_key: str | None,
          reinit: list[str] | tuple, hash_file: bool) -> LoadReport:
    reinit = list(reinit or [])
    _check_reinit(net, reinit)
    if isinstance(path_or_name, Mapping):
        source, obj, digest = "weights", path_or_name, None
    else:
        path = resolve_weights(path_or_name)
        source, obj = str(path), read_weight_file(path)
        digest = sha256_file(path) if hash_file else None
    state = extract_state_dict(obj, source, param_key)
    kept = {k: v for k, v in state.items() if not _inside(k, reinit)}
    own = net.state_dict()
    wrong_shape = [k for k, v in kept.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        k = wrong_shape[0]
        hint = "" if reinit else " (model.reinit: [module] initialises a module afresh instead)"
        raise PipelineError(f"{source}: {len(wrong_shape)} tensors do not fit {type(net).__name__}, "
                            f"e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}{hint}")
    try:
        # strict is checked below, to name the keys in one line (torch loads the rest either way)
        result = net.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # e.g. a net's own check of derived buffers (swinir, hat)
        raise PipelineError(f"{source}: does not fit {type(net).__name__}: "
                            f"{' '.join(str(exc).split())[:400]}") from None
    missing = [k for k in result.missing_keys if not _inside(k, reinit)]
    if missing or result.unexpected_keys:
        message = (f"{source}: does not fit {type(net).__name__}: missing {_short(missing) or '-'}; "
                   f"unexpected {_short(result.unexpected_keys) or '-'}")
        if strict:
            raise PipelineError(message)
        warnings.warn(message + " (loaded non-strictly)", stacklevel=2)
    return LoadReport(source, digest, loaded=len(own) - len(result.missing_keys), reinitialised=reinit,
                      unused=len(state) - len(kept))


