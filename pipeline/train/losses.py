"""Training losses, composed by weight from the config's `loss` section.

    loss: {ssim: 1.0, l1: 0.0, charbonnier: 0.0, sobel: 0.1}

Terms with weight 0 are skipped; an unknown name is refused. All terms take float NCHW
images in [0, 1] (SR, HR) and are computed in float32 even under bf16 autocast, so the
SSIM term is the scored metric to within 1e-5 (see metrics.ssim_torch).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.core.metrics import ssim_torch

CHARBONNIER_EPS = 1e-3
# SmoothL1 switches from quadratic to linear at 0.01 (~2.5 grey levels of gradient):
# small gradient errors get a smooth pull, edges the robust L1 one
SOBEL_BETA = 0.01


class SSIMLoss(nn.Module):
    """1 - competition SSIM (7x7 uniform window), averaged over the batch."""

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return 1.0 - ssim_torch(sr, hr).mean()


class L1Loss(nn.Module):
    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(sr, hr)


class CharbonnierLoss(nn.Module):
    """sqrt((sr - hr)^2 + eps^2): L1 away from zero, smooth at zero."""

    def __init__(self, eps: float = CHARBONNIER_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((sr - hr) ** 2 + self.eps ** 2).mean()


class SobelLoss(nn.Module):
    """SmoothL1 between the Sobel x/y gradients of SR and HR, per channel.

    Penalises edges that are misplaced, doubled or jagged, which pixel losses barely
    see (the 11th-place MScup solution found it removed aliasing on edges). Only
    windows inside the image are used, so padding invents no edges at the border.
    """

    def __init__(self, beta: float = SOBEL_BETA):
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([gx, gx.T]).unsqueeze(1), persistent=False)  # (2,1,3,3)
        self.beta = beta

    def gradients(self, img: torch.Tensor) -> torch.Tensor:
        n, c, h, w = img.shape
        g = F.conv2d(img.reshape(n * c, 1, h, w), self.kernel.to(img.dtype))
        return g.reshape(n, c * 2, h - 2, w - 2)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(self.gradients(sr), self.gradients(hr), beta=self.beta)


LOSS_TERMS: dict[str, type[nn.Module]] = {
    "ssim": SSIMLoss,
    "l1": L1Loss,
    "charbonnier": CharbonnierLoss,
    "sobel": SobelLoss,
}


class WeightedLoss(nn.Module):
    """sum_i w_i * term_i(sr, hr); `last_terms` keeps the unweighted values for logging."""

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)
        self.terms = nn.ModuleDict({name: LOSS_TERMS[name]() for name in self.weights})
        self.last_terms: dict[str, float] = {}

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        total, self.last_terms = self.evaluate(sr, hr)
        return total

    def evaluate(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(the weighted loss, each term's unweighted value), keeping no state: threads that
        train shards of one batch (pipeline/accel/cpu/shards.py) call it at the same time."""
        if sr.shape != hr.shape:
            raise PipelineError(f"loss: SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
        # float32 even inside a bf16 autocast region: SSIM's variances need the precision
        with torch.autocast(device_type=sr.device.type, enabled=False):
            sr, hr = sr.float(), hr.float()
            values = {name: term(sr, hr) for name, term in self.terms.items()}
        total = sum(self.weights[name] * v for name, v in values.items())
        return total, {name: float(v.detach()) for name, v in values.items()}

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())


def build_loss(weights: dict[str, float]) -> WeightedLoss:
    """The weighted loss of a config `loss` section; zero weights are left out."""
    if not isinstance(weights, dict):
        raise PipelineError(f"loss: a mapping of term -> weight expected, got {weights!r}")
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise PipelineError(f"loss: unknown term(s) {', '.join(unknown)} (known: {', '.join(LOSS_TERMS)})")
    used = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise PipelineError(f"loss: weight of '{name}' must be a number >= 0, got {w!r}")
        if w > 0:
            used[name] = float(w)
    if not used:
        raise PipelineError("loss: every term has weight 0; give at least one a positive weight")
    return WeightedLoss(used)
