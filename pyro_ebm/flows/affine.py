r"""The learnable Gaussian :class:`AffineFlow`, with optional couplings and a sinh-arcsinh map."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_flag, check_hidden
from .._checks import check_int as _check_int
from .._checks import check_positive as _check_positive
from .base import Flow
from .coupling import _couplings

__all__ = ["AffineFlow"]


def _cached_while_frozen(method: Callable[[nn.Module], tuple]) -> Callable[[nn.Module], tuple]:
    r"""Cache what a layer derives from its parameters (scales, triangular factors) while none
    of them requires gradients, as in the frozen copy of a flow that FlowHMC/FlowNUTS/FlowIMH
    sample with: one less chain of small operations in every call, and constants rather than
    operations in a compiled latent potential. The cache is keyed on each parameter's storage
    and version counter, so in-place updates (``load_state_dict``, an optimizer step) and moves
    to another device invalidate it."""

    @functools.wraps(method)
    def wrapper(self: nn.Module) -> tuple:
        params = tuple(self.parameters())
        # no cache for trainable parameters, nor inside inference mode or for inference
        # tensors (no version counter; results unusable by autograd outside that mode)
        if torch.is_inference_mode_enabled() or any(
            p.requires_grad or p.is_inference() for p in params
        ):
            return method(self)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        cache = self.__dict__.get("_frozen_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, method(self))
            self.__dict__["_frozen_cache"] = cache
        return cache[1]

    return wrapper


class _AffineLayer(nn.Module):
    """``x = loc + L z`` with ``L`` lower-triangular (or diagonal), positive diagonal ``exp(s)``."""

    def __init__(self, dim: int, full: bool) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.full = full
        if full:
            self.off_diag = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))
            rows, cols = torch.tril_indices(dim, dim, offset=-1)
            self.register_buffer("rows", rows)
            self.register_buffer("cols", cols)

    def scale_tril(self) -> Tensor:
        eye_part = torch.diag_embed(self.log_diag.exp())
        if not self.full:
            return eye_part
        return eye_part.index_put((self.rows, self.cols), self.off_diag)

    @_cached_while_frozen
    def _derived(self) -> tuple[Tensor, Tensor]:
        """``(L^T, log|det L|)`` for a full layer, ``(diag L, log|det L|)`` for a diagonal one."""
        scale = self.scale_tril().T if self.full else self.log_diag.exp()
        return scale, self.log_diag.sum()

    def forward(self, z: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        scale, log_det = self._derived()
        ladj = log_det.expand(z.shape[:-1])
        if not self.full:
            if inverse:
                return (z - self.loc) / scale, -ladj
            return self.loc + z * scale, ladj
        if inverse:
            out = torch.linalg.solve_triangular(
                scale, (z - self.loc).unsqueeze(-2), upper=True, left=False
            )
            return out.squeeze(-2), -ladj
        return self.loc + z @ scale, ladj


def _log_cosh(a: Tensor) -> Tensor:
    """``log(cosh(a))`` without overflow for large ``|a|``."""
    a = a.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2)


class _SinhArcsinhLayer(nn.Module):
    r"""Elementwise normalised sinh-arcsinh map (Jones & Pewsey 2009), :math:`f(z) =
    (\sinh(\delta \operatorname{asinh} z - s) + \sinh s) / (\delta \cosh s)`, so that
    :math:`f(0) = 0` and :math:`f'(0) = 1` (without this, :math:`\delta` also scales the centre
    and a reverse-KL fit spends it as a scale); :math:`\delta = e^{\max(t, 0)}` keeps tails as
    heavy as Gaussian or heavier (see :class:`AffineFlow`). The identity at ``s = t = 0``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.skew = nn.Parameter(torch.zeros(dim))
        self.log_tail = nn.Parameter(torch.zeros(dim))

    @_cached_while_frozen
    def _derived(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Tail weight, normaliser, ``sinh s`` and ``log cosh s``."""
        tail, s = self.log_tail.clamp(min=0.0).exp(), self.skew
        return tail, tail * torch.cosh(s), torch.sinh(s), _log_cosh(s)

    def forward(self, z: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        (tail, norm, sinh_s, log_cosh_s), s = self._derived(), self.skew
        if inverse:
            a = torch.asinh(z * norm - sinh_s)
            out = torch.sinh((a + s) / tail)
            ladj = log_cosh_s - _log_cosh(a) + 0.5 * torch.log1p(out * out)
            return out, ladj.sum(-1)
        a = tail * torch.asinh(z) - s
        ladj = _log_cosh(a) - log_cosh_s - 0.5 * torch.log1p(z * z)
        return (torch.sinh(a) + sinh_s) / norm, ladj.sum(-1)


class AffineFlow(Flow):
    r"""A learnable Gaussian :math:`x = \mu + L z` (``L`` lower-triangular with a positive
    diagonal, or diagonal), optionally preceded by RealNVP coupling layers on ``z``.

    The cheapest flow for NeuTra-style HMC (:class:`~pyro_ebm.infer.FlowHMC`,
    :class:`~pyro_ebm.infer.FlowNUTS`) on near-Gaussian posteriors: one ``(dim, dim)`` matrix
    product per gradient whitens location, scales and linear correlations, which is what a
    dense mass matrix does; coupling layers (``num_coupling_layers > 0``) add some
    non-Gaussianity at the price of their MLPs in every gradient, and ``sinh_arcsinh=True``
    adds per-coordinate skew and tail weight (a scale parameter's log, say) for a few
    elementwise operations. Starts at the identity (exactly, or up to rounding with the
    sinh-arcsinh map).

    :param dim: event dimension.
    :param full: lower-triangular ``L`` (``True``) or diagonal ``L``.
    :param num_coupling_layers: affine coupling layers applied to ``z`` before the affine map.
    :param hidden: hidden widths of each coupling layer's MLP.
    :param base_scale: standard deviation of the Gaussian base.
    :param log_scale_bound: bound of the couplings' soft-clamped log-scale.
    :param sinh_arcsinh: apply an elementwise sinh-arcsinh map (Jones & Pewsey 2009,
        "Sinh-arcsinh distributions", Biometrika 96) to ``z`` (after the couplings) before the
        affine map, :math:`z_i \mapsto (\sinh(\delta_i \operatorname{asinh} z_i - s_i) +
        \sinh s_i) / (\delta_i \cosh s_i)`, with learnable skew :math:`s_i` and tail weight
        :math:`\delta_i = e^{\max(t_i, 0)} \ge 1` (tails as heavy as Gaussian or heavier: a
        flow with lighter tails than the target makes NeuTra's latent potential heavy-tailed,
        and a reverse-KL fit from a too-wide start drifts there); :math:`f(0) = 0` and
        :math:`f'(0) = 1`, so location and scale stay with the affine map.

    Example:

    >>> flow = AffineFlow(3)
    >>> x = torch.randn(5, 3, dtype=flow.base_loc.dtype)
    >>> torch.allclose(flow.log_prob(x), flow.base_dist.log_prob(x))  # identity at init
    True
    """

    def __init__(
        self,
        dim: int,
        full: bool = True,
        num_coupling_layers: int = 0,
        hidden: Sequence[int] = (16, 16),
        base_scale: float = 1.0,
        log_scale_bound: float = 3.0,
        sinh_arcsinh: bool = False,
    ) -> None:
        super().__init__(dim, base_scale)
        _check_int("num_coupling_layers", num_coupling_layers, 0)
        _check_positive("log_scale_bound", log_scale_bound)
        hidden = check_hidden("hidden", hidden)
        full = check_flag("full", full)
        sinh_arcsinh = check_flag("sinh_arcsinh", sinh_arcsinh)
        if num_coupling_layers:
            self.layers.extend(
                _couplings(dim, num_coupling_layers, hidden, nn.SiLU, log_scale_bound)
            )
        if sinh_arcsinh:
            self.layers.append(_SinhArcsinhLayer(dim))
        self.layers.append(_AffineLayer(dim, full))

    @property
    def loc(self) -> Tensor:
        r"""The location :math:`\mu` of the affine map."""
        return self.layers[-1].loc

    @property
    def scale_tril(self) -> Tensor:
        """The lower-triangular scale :math:`L` of the affine map."""
        return self.layers[-1].scale_tril()
