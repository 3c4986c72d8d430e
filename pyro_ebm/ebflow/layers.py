r"""Layers of an energy-based normalizing flow (EBFlow, Chao et al. 2023).

Every layer maps ``x -> (y, log|det J(x)|)`` on ``(batch, D)`` inputs and says whether it is
*linear* (constant Jacobian). For a linear layer the log-determinant does not depend on ``x``: it
belongs to the normalizing constant, and score-matching training never computes it
(:meth:`log_det` computes it once, for evaluation). ``inverse(y)`` inverts the layer.

Reference: Chao, Sun, Hsieh, Tai, Lee, Gong, Chiu (2023), "Training Energy-Based Normalizing Flow
with Score-Matching Objectives", https://arxiv.org/abs/2305.15267
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Conv2d",
    "Dense",
    "EBFlowLayer",
    "ElementwiseLayer",
    "LinearLayer",
    "Logit",
    "SmoothLeakyReLU",
    "Squeeze",
    "zca_whitening",
]


class EBFlowLayer(nn.Module):
    r"""Base class: ``forward(x) -> (y, log_det)`` with ``log_det`` of shape ``(batch,)``.

    Layers may also implement :meth:`jet`, the second-order forward ("Taylor") mode that lets
    sliced score matching run without double back-propagation
    (:meth:`pyro_ebm.ebflow.model.EBFlow.energy_jet`).
    """

    #: constant Jacobian: its log-determinant goes into the normalizing constant
    linear: bool = False
    #: implements :meth:`jet`
    has_jet: bool = False

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        raise NotImplementedError

    def log_det(self) -> Tensor:
        """The constant log|det J| of a linear layer."""
        raise TypeError(f"{type(self).__name__} is not linear")

    def jet(
        self, x: Tensor, u: Tensor, w: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        r"""Push the second-order jet of a curve :math:`x(t)` with :math:`x(0) = x`,
        :math:`x'(0) = u`, :math:`x''(0) = w` (``None``: zero) through the layer: returns
        :math:`(y, y', y'')` at ``t = 0``, with :math:`y' = J u` and
        :math:`y'' = J w + D^2 g[u, u]`, and :math:`(\ell, \ell', \ell'')` for
        :math:`\ell(t) = \log|\det J(x(t))|` (zeros for linear layers, whose log-det is
        constant)."""
        raise NotImplementedError(f"{type(self).__name__} has no jet")


class LinearLayer(EBFlowLayer):
    """A layer ``y = A x + c`` with constant ``A``: subclasses give :meth:`_matvec` (``A x``
    on rows) and :meth:`_offset` (``c``)."""

    linear = True
    has_jet = True

    def _matvec(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _offset(self) -> Tensor | float:
        return 0.0

    def _rmatvec(self, g: Tensor) -> Tensor:
        """``A^T g`` on rows (the vector-Jacobian product)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._matvec(x) + self._offset(), x.new_zeros(x.shape[:-1])

    def jet(self, x: Tensor, u: Tensor, w: Tensor | None) -> tuple:
        n = len(x)
        out = self._matvec(torch.cat([x, u] if w is None else [x, u, w]))
        zero = x.new_zeros(n)
        w_out = None if w is None else out[2 * n :]
        return out[:n] + self._offset(), out[n : 2 * n], w_out, zero, zero, zero


class ElementwiseLayer(EBFlowLayer):
    """A strictly increasing element-wise map: subclasses give :meth:`_derivatives`, the value
    and first three derivatives."""

    has_jet = True

    def _derivatives(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, d1, _, _ = self._derivatives(x)
        return y, d1.log().sum(-1)

    def jet(
        self, x: Tensor, u: Tensor, w: Tensor | None, derivatives: tuple | None = None
    ) -> tuple:
        """See :meth:`EBFlowLayer.jet`; ``derivatives``: :meth:`_derivatives` of ``x`` if the
        caller already has them."""
        y, d1, d2, d3 = self._derivatives(x) if derivatives is None else derivatives
        r = d2 / d1  # derivative of log f'
        u2 = u * u
        w_out = d2 * u2 if w is None else d1 * w + d2 * u2
        ld2 = (d3 / d1 - r * r) * u2
        if w is not None:
            ld2 = ld2 + r * w
        return y, d1 * u, w_out, d1.log().sum(-1), (r * u).sum(-1), ld2.sum(-1)


def zca_whitening(y: Tensor, shrinkage: float = 1e-3) -> tuple[Tensor, Tensor]:
    r"""The mean :math:`\mu` and whitening matrix :math:`M` of the rows of ``y`` (``(n, D)``), so
    that :math:`M (y - \mu)` has covariance about ``I``: ZCA-cor whitening (Kessy, Lewin,
    Strimmer 2018), :math:`M = R_\epsilon^{-1/2} S^{-1}` with :math:`S` the standard deviations
    and :math:`R` the correlation matrix, the whitening closest to the standardised data. The
    ``shrinkage`` is added to every eigenvalue of :math:`R` (whose mean is 1), which bounds the
    amplification of directions the rows barely cover (nearly collinear features, fewer rows
    than dimensions) independently of the features' units.

    Example::

        >>> y = torch.randn(5000, 2) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + 3.0
        >>> mean, m = zca_whitening(y)
        >>> torch.allclose(torch.cov(((y - mean) @ m.T).T), torch.eye(2), atol=1e-2)
        True
    """
    mean = y.mean(0)
    centred = (y - mean).double()
    sd = (centred.pow(2).sum(0) / max(len(y) - 1, 1)).sqrt()
    sd = sd.clamp_min(torch.finfo(y.dtype).eps * float(sd.max().clamp_min(1.0)))
    standard = centred / sd
    lam, u = torch.linalg.eigh(standard.T @ standard / max(len(y) - 1, 1))
    lam = lam.clamp_min(0.0) + shrinkage
    return mean, (((u * lam.rsqrt()) @ u.T) / sd).to(y.dtype)


class Dense(LinearLayer):
    r"""Dense linear layer :math:`y = W x + b` with an unconstrained ``D x D`` weight, initialised
    at :math:`-I` as in the paper (so the initial flow is a reflection, log-det 0).

    Example::

        >>> layer = Dense(3)
        >>> y, ld = layer(torch.ones(2, 3))
        >>> y[0].tolist(), float(layer.log_det().detach())
        ([-1.0, -1.0, -1.0], 0.0)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(-torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def _matvec(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def _rmatvec(self, g: Tensor) -> Tensor:
        return g @ self.weight

    def _offset(self) -> Tensor:
        return self.bias

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        return torch.linalg.solve(self.weight, (y - self.bias).T).T

    def log_det(self) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1]


class SmoothLeakyReLU(ElementwiseLayer):
    r"""Element-wise smooth leaky ReLU :math:`f(x) = a x + (1 - a) \log(1 + e^x)`, ``a = 0.3``:
    strictly increasing (slope in ``(a, 1)``), inverted by Newton's method. With
    ``residual=True`` it is :math:`x + f(x)` (slope in ``(1 + a, 2)``), the variant of the
    paper's CNN model.

    Example::

        >>> f = SmoothLeakyReLU()
        >>> x = torch.linspace(-4, 4, 9)[None]
        >>> y, _ = f(x)
        >>> bool(torch.allclose(f.inverse(y), x, atol=1e-6))
        True
    """

    def __init__(self, a: float = 0.3, residual: bool = False) -> None:
        super().__init__()
        if not 0 < a < 1:
            raise ValueError(f"a must lie in (0, 1), got {a!r}")
        self.a = a
        self.residual = bool(residual)

    def _derivatives(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sig = torch.sigmoid(x)
        y = self.a * x + (1 - self.a) * F.softplus(x)
        d1 = self.a + (1 - self.a) * sig
        if self.residual:
            y, d1 = y + x, d1 + 1
        d2 = (1 - self.a) * sig * (1 - sig)
        return y, d1, d2, d2 * (1 - 2 * sig)

    def inverse(self, y: Tensor, num_iter: int = 50) -> Tensor:
        """The input ``x`` that this layer maps to ``y``, by ``num_iter`` Newton steps."""
        x = y.clone()
        for _ in range(num_iter):
            fx, slope, _, _ = self._derivatives(x)
            step = (fx - y) / slope
            x = x - step
            if step.numel() == 0 or step.abs().max() < 1e-12:
                break
        return x


class ActNorm(LinearLayer):
    r"""Per-dimension affine map :math:`y = e^{s} \odot x + t` (a linear layer; identity at
    initialisation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def _matvec(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()

    def _rmatvec(self, g: Tensor) -> Tensor:
        return self._matvec(g)

    def _offset(self) -> Tensor:
        return self.shift

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        return (y - self.shift) * torch.exp(-self.log_scale)

    def log_det(self) -> Tensor:
        return self.log_scale.sum()


class Logit(ElementwiseLayer):
    r"""The logit pre-processing :math:`y = \operatorname{logit}(\lambda + (1 - 2\lambda) x)` for
    ``x`` in ``(0, 1)``, as a (non-linear) layer: used *inside* the model when training without
    MaP, so that the objective matches scores in the data space."""

    def __init__(self, lam: float = 1e-6) -> None:
        super().__init__()
        if not 0 < lam < 0.5:
            raise ValueError(f"lam must lie in (0, 0.5), got {lam!r}")
        self.lam = lam

    def _derivatives(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = 1 - 2 * self.lam
        p = self.lam + c * x
        q = 1 - p
        y = torch.log(p) - torch.log1p(-p)
        d1 = c / (p * q)
        d2 = c**2 * (1 / q**2 - 1 / p**2)
        d3 = 2 * c**3 * (1 / q**3 + 1 / p**3)
        return y, d1, d2, d3

    def inverse(self, y: Tensor) -> Tensor:
        """Clamped to ``[0, 1]`` (where ``sigmoid`` rounds below ``lam`` or to 1), so that the
        forward map stays finite on what comes back."""
        return ((torch.sigmoid(y) - self.lam) / (1 - 2 * self.lam)).clamp(0.0, 1.0)


def _check_image_shape(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be an image shape (C, H, W), got {shape!r}")
    return shape  # type: ignore[return-value]


class Conv2d(LinearLayer):
    r"""Convolution with ``C`` input and output channels, a ``k x k`` kernel (``k`` odd), stride 1
    and zero "same" padding, on flattened images of shape ``(C, H, W)``: a linear map of
    :math:`\mathbb R^{CHW}`. Initialised at the negated identity kernel (``-dirac``, as in the
    paper) with zero bias; with ``data_init`` (default) it takes part in :meth:`EBFlow.initialize
    <pyro_ebm.ebflow.model.EBFlow.initialize>` (:meth:`data_init_`).

    Its log-determinant (evaluation only) is that of the dense ``CHW x CHW`` matrix of the map
    (the doubly block-Toeplitz matrix), built by convolving the standard basis: exact, and
    :math:`O((CHW)^3)`, which is what score-matching training avoids. :meth:`inverse` solves
    with the same matrix.

    Example::

        >>> conv = Conv2d((1, 4, 4), kernel_size=3)
        >>> x = torch.randn(2, 16)
        >>> bool(torch.allclose(conv(x)[0], -x)), float(conv.log_det().detach())
        (True, 0.0)
    """

    def __init__(
        self, shape: Sequence[int], kernel_size: int = 7, bias: bool = True, data_init: bool = True
    ) -> None:
        super().__init__()
        self.shape = _check_image_shape("shape", shape)
        self.data_init = bool(data_init)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        c = self.shape[0]
        weight = torch.zeros(c, c, kernel_size, kernel_size)
        nn.init.dirac_(weight)
        self.weight = nn.Parameter(-weight)
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None
        self.padding = kernel_size // 2

    def _matvec(self, x: Tensor) -> Tensor:
        y = F.conv2d(x.reshape(-1, *self.shape), self.weight, padding=self.padding)
        return y.reshape(x.shape)

    def _rmatvec(self, g: Tensor) -> Tensor:
        x = F.conv_transpose2d(g.reshape(-1, *self.shape), self.weight, padding=self.padding)
        return x.reshape(g.shape)

    def matrix(self) -> Tensor:
        """The dense ``(CHW, CHW)`` matrix ``M`` of the map without bias (``y = M x + b``)."""
        dim = math.prod(self.shape)
        eye = torch.eye(dim, dtype=self.weight.dtype, device=self.weight.device)
        return self._matvec(eye).T

    def _offset(self) -> Tensor | float:
        if self.bias is None:
            return 0.0
        return self.bias[:, None].expand(self.shape[0], self.shape[1] * self.shape[2]).reshape(-1)

    @torch.no_grad()
    def data_init_(self, y: Tensor) -> Tensor:
        """Data-dependent initialisation from this layer's outputs ``y`` on a batch: scale each
        output channel's kernel (and shift its bias) so that the channel has mean 0 and
        standard deviation 1 over the batch and the pixels, as Glow's ActNorm initialisation
        (Kingma & Dhariwal 2018) folded into the convolution. Returns the new outputs. Without
        a bias only the scale is set (unit root mean square)."""
        c = self.shape[0]
        yc = y.reshape(len(y), c, -1).transpose(0, 1).reshape(c, -1)
        mean = yc.mean(1) if self.bias is not None else torch.zeros_like(yc[:, 0])
        scale = (yc - mean[:, None]).pow(2).mean(1).sqrt().clamp_min(1e-6)
        self.weight.div_(scale[:, None, None, None])
        if self.bias is not None:
            self.bias.sub_(mean).div_(scale)
        shape = (1, c, 1)
        return ((y.reshape(len(y), c, -1) - mean.view(shape)) / scale.view(shape)).reshape(y.shape)

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        return torch.linalg.solve(self.matrix(), (y - self._offset()).T).T

    def log_det(self) -> Tensor:
        return torch.linalg.slogdet(self.matrix())[1]


class Squeeze(LinearLayer):
    r"""Space-to-depth: ``(C, H, W) -> (4C, H/2, W/2)``, each ``2 x 2`` patch becoming four
    channels (Dinh et al. 2017). A permutation of the flattened vector: linear, log-det 0.

    Example::

        >>> sq = Squeeze((1, 2, 2))
        >>> sq(torch.arange(4.0)[None])[0].tolist()
        [[0.0, 1.0, 2.0, 3.0]]
        >>> Squeeze((1, 4, 4)).out_shape
        (4, 2, 2)
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = _check_image_shape("shape", shape)
        c, h, w = self.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got shape {self.shape}")
        self.out_shape = (4 * c, h // 2, w // 2)

    def _matvec(self, x: Tensor) -> Tensor:
        c, h, w = self.shape
        y = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(x.shape)

    def _rmatvec(self, g: Tensor) -> Tensor:
        return self.inverse(g)  # a permutation: its transpose is its inverse

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        c, h, w = self.shape
        x = y.reshape(-1, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(y.shape)

    def log_det(self) -> Tensor:
        return torch.zeros(())


class AffineCoupling(EBFlowLayer):
    r"""Masked affine coupling (Dinh et al. 2017): with a binary ``mask``,

    .. math:: y = m \odot x + (1 - m) \odot \big(x\, e^{s(m \odot x)} + t(m \odot x)\big),
        \qquad \log|\det J| = \textstyle\sum (1 - m) \odot s,

    ``s = tanh(.)`` and ``t`` from one MLP (``num_hidden`` hidden layers of ``hidden`` SiLU
    units: smooth, so the score and its derivatives used by score matching are continuous).
    Non-linear; the identity at initialisation (last layer zero).

    Example::

        >>> layer = AffineCoupling(torch.tensor([1.0, 0.0]))
        >>> x = torch.randn(3, 2)
        >>> bool(torch.allclose(layer(x)[0], x))
        True
    """

    def __init__(self, mask: Tensor, hidden: int = 64, num_hidden: int = 2) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
        if mask.dim() != 1 or not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be a 1-D tensor of zeros and ones")
        self.register_buffer("mask", mask)
        dim = len(mask)
        sizes = [dim] + [hidden] * num_hidden
        net: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            net += [nn.Linear(a, b), nn.SiLU()]
        last = nn.Linear(sizes[-1], 2 * dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*net, last)

    def _shift_scale(self, x_masked: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_masked).chunk(2, dim=-1)
        free = 1 - self.mask
        return torch.tanh(s) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._shift_scale(x * self.mask)
        return x * s.exp() + t, s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` that this layer maps to ``y`` (same shape)."""
        s, t = self._shift_scale(y * self.mask)
        return (y - t) * torch.exp(-s)
