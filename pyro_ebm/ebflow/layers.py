r"""Layers of an energy-based normalizing flow (EBFlow, Chao et al. 2023).

Every layer maps ``x -> (y, log|det J(x)|)`` on ``(batch, D)`` inputs and says whether it is
*linear* (constant Jacobian). For a linear layer the log-determinant does not depend on ``x``: it
belongs to the normalizing constant, and score-matching training never computes it
(:meth:`log_det` computes it once, for evaluation). ``inverse(y)`` inverts the layer.

Reference: Chao, Sun, Hsieh, Tai, Lee, Gong, Chiu (2023), "Training Energy-Based Normalizing Flow
with Score-Matching Objectives", https://arxiv.org/abs/2305.15267
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ActNorm", "Dense", "EBFlowLayer", "SmoothLeakyReLU"]


class EBFlowLayer(nn.Module):
    """Base class: ``forward(x) -> (y, log_det)`` with ``log_det`` of shape ``(batch,)``."""

    #: constant Jacobian: its log-determinant goes into the normalizing constant
    linear: bool = False

    def inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def log_det(self) -> Tensor:
        """The constant log|det J| of a linear layer."""
        raise TypeError(f"{type(self).__name__} is not linear")


class Dense(EBFlowLayer):
    r"""Dense linear layer :math:`y = W x + b` with an unconstrained ``D x D`` weight, initialised
    at :math:`-I` as in the paper (so the initial flow is a reflection, log-det 0).

    Example::

        >>> layer = Dense(3)
        >>> y, ld = layer(torch.ones(2, 3))
        >>> y[0].tolist(), float(layer.log_det().detach())
        ([-1.0, -1.0, -1.0], 0.0)
    """

    linear = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(-torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.linear(x, self.weight, self.bias)
        return y, torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def inverse(self, y: Tensor) -> Tensor:
        return torch.linalg.solve(self.weight, (y - self.bias).T).T

    def log_det(self) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1]


class SmoothLeakyReLU(EBFlowLayer):
    r"""Element-wise smooth leaky ReLU :math:`f(x) = a x + (1 - a) \log(1 + e^x)`, ``a = 0.3``:
    strictly increasing (slope in ``(a, 1)``), inverted by Newton's method.

    Example::

        >>> f = SmoothLeakyReLU()
        >>> x = torch.linspace(-4, 4, 9)[None]
        >>> y, _ = f(x)
        >>> bool(torch.allclose(f.inverse(y), x, atol=1e-6))
        True
    """

    def __init__(self, a: float = 0.3) -> None:
        super().__init__()
        if not 0 < a < 1:
            raise ValueError(f"a must lie in (0, 1), got {a!r}")
        self.a = a

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.a * x + (1 - self.a) * F.softplus(x)
        slope = self.a + (1 - self.a) * torch.sigmoid(x)
        return y, slope.log().sum(-1)

    def inverse(self, y: Tensor, num_iter: int = 50) -> Tensor:
        x = y.clone()
        for _ in range(num_iter):
            fx = self.a * x + (1 - self.a) * F.softplus(x)
            slope = self.a + (1 - self.a) * torch.sigmoid(x)
            step = (fx - y) / slope
            x = x - step
            if step.abs().max() < 1e-12:
                break
        return x


class ActNorm(EBFlowLayer):
    r"""Per-dimension affine map :math:`y = e^{s} \odot x + t` (a linear layer; identity at
    initialisation)."""

    linear = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x * self.log_scale.exp() + self.shift
        return y, torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def inverse(self, y: Tensor) -> Tensor:
        return (y - self.shift) * torch.exp(-self.log_scale)

    def log_det(self) -> Tensor:
        return self.log_scale.sum()


class Logit(EBFlowLayer):
    r"""The logit pre-processing :math:`y = \operatorname{logit}(\lambda + (1 - 2\lambda) x)` for
    ``x`` in ``(0, 1)``, as a (non-linear) layer: used *inside* the model when training without
    MaP, so that the objective matches scores in the data space."""

    def __init__(self, lam: float = 1e-6) -> None:
        super().__init__()
        if not 0 < lam < 0.5:
            raise ValueError(f"lam must lie in (0, 0.5), got {lam!r}")
        self.lam = lam

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.lam + (1 - 2 * self.lam) * x
        y = torch.log(p) - torch.log1p(-p)
        ld = (torch.log(torch.tensor(1 - 2 * self.lam)) - torch.log(p) - torch.log1p(-p)).sum(-1)
        return y, ld

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.lam) / (1 - 2 * self.lam)
