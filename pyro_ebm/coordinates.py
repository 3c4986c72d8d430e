r"""Affine changes of coordinates, :math:`x = m + S u`: the one object that energies
(:class:`~pyro_ebm.energy.StandardizedEnergy`), flows (:class:`~pyro_ebm.flows.Standardized`)
and both trainers (standardized EBM training, EBFlow's whitening) use."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_tensor

__all__ = ["AffineCoordinates", "needs_standardization"]


class AffineCoordinates(nn.Module):
    r"""The affine map :math:`x = m + S u` between data coordinates :math:`x` and standardized
    ones :math:`u`, with the log-determinant :math:`\log|\det S|` that densities need
    (:math:`\log p_x(x) = \log p_u(u) - \log|\det S|`).

    :math:`S` is one of

    - diagonal, ``scale`` :math:`s > 0` ``(dim,)``: :math:`u = (x - m) / s`;
    - lower triangular, ``scale_tril`` ``(dim, dim)`` with a positive diagonal (e.g. the
      Cholesky factor of a covariance);
    - the inverse of a whitening matrix, ``whitening`` :math:`W` ``(dim, dim)``:
      :math:`u = W (x - m)` (e.g. ZCA whitening), with ``log_det`` :math:`= -\log|\det W|`
      given or computed in float64.

    ``loc``, ``scale`` (the marginal scales :math:`\sqrt{\mathrm{diag}(S S^\top)}`) and the
    matrix are buffers: they move with ``.to()`` and are in the ``state_dict``. Points may have
    any leading shape ``(..., dim)``.

    :param loc: :math:`m`, ``(dim,)``.
    :param scale: diagonal :math:`S`, ``(dim,)`` (default: ones, unless a matrix is given).
    :param scale_tril: lower-triangular :math:`S`.
    :param whitening: :math:`W = S^{-1}`.
    :param log_det: :math:`\log|\det S|` for ``whitening`` (computed when ``None``).

    Example:

    >>> c = AffineCoordinates(torch.tensor([5.0, -1.0]), torch.tensor([2.0, 0.5]))
    >>> x = torch.tensor([[7.0, -1.5]])
    >>> c.to_u(x), c.to_x(c.to_u(x)), round(float(c.log_det()), 6)
    (tensor([[ 1., -1.]]), tensor([[ 7.0000, -1.5000]]), 0.0)
    >>> AffineCoordinates.standardizing(torch.tensor([[0.0], [2.0], [4.0]])).scale
    tensor([2.])
    """

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor | None = None,
        *,
        scale_tril: Tensor | None = None,
        whitening: Tensor | None = None,
        log_det: float | None = None,
    ) -> None:
        super().__init__()
        loc = check_tensor("loc", loc, ndim=1)
        dim = loc.shape[0]
        given = [n for n, v in (("scale", scale), ("scale_tril", scale_tril),
                                ("whitening", whitening)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise ValueError(f"give at most one of scale, scale_tril and whitening, got {given}")
        self.kind = {"scale_tril": "tril", "whitening": "whitening"}.get(
            given[0] if given else "scale", "diagonal"
        )
        self.register_buffer("loc", loc.detach().clone())
        if self.kind == "diagonal":
            scale = torch.ones_like(loc) if scale is None else scale
            scale = check_tensor("scale", scale, shape=(dim,))
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError("scale must be finite and positive")
            self.register_buffer("scale", scale.detach().clone())
            return
        name, matrix = given[0], scale_tril if self.kind == "tril" else whitening
        matrix = check_tensor(name, matrix, shape=(dim, dim))
        if not torch.isfinite(matrix).all():
            raise ValueError(f"{name} must be finite")
        self.register_buffer(name, matrix.detach().clone())
        if self.kind == "tril":
            if not (matrix.diagonal() > 0).all():
                raise ValueError("scale_tril must have a positive diagonal")
            self.register_buffer("scale", matrix.pow(2).sum(-1).sqrt())
        else:
            if log_det is None:
                log_det = -float(torch.linalg.slogdet(matrix.double())[1])
            self.whitening_log_det = float(log_det)
            self.register_buffer("scale", torch.linalg.inv(matrix).pow(2).sum(-1).sqrt())

    @classmethod
    def standardizing(cls, x: Tensor) -> AffineCoordinates:
        r"""The diagonal coordinates in which the rows of ``x`` ``(n, dim)`` have mean 0 and sd
        1: moments in float64, kept in ``x``'s dtype; an sd is floored at
        :math:`4\,\epsilon\,(1 + |m|)` (for a constant coordinate only)."""
        x = check_tensor("x", x, ndim=2)
        wide = x.double()
        loc, scale = wide.mean(0), wide.std(0)
        floor = 4 * torch.finfo(x.dtype).eps * (1 + loc.abs())
        return cls(loc.to(x.dtype), scale.clamp(min=floor).to(x.dtype))

    @property
    def dim(self) -> int:
        return self.loc.shape[0]

    def matrix(self) -> Tensor:
        """:math:`S` as a ``(dim, dim)`` matrix."""
        if self.kind == "diagonal":
            return torch.diag(self.scale)
        if self.kind == "tril":
            return self.scale_tril
        return torch.linalg.inv(self.whitening)

    def to_u(self, x: Tensor) -> Tensor:
        r""":math:`u = S^{-1} (x - m)` of ``x`` ``(..., dim)``."""
        if self.kind == "diagonal":
            return (x - self.loc) / self.scale
        if self.kind == "whitening":
            return (x - self.loc) @ self.whitening.T
        r = (x - self.loc).reshape(-1, self.dim).T
        u = torch.linalg.solve_triangular(self.scale_tril, r, upper=False).T
        return u.reshape(x.shape)

    def to_x(self, u: Tensor) -> Tensor:
        r""":math:`x = m + S u` of ``u`` ``(..., dim)``."""
        if self.kind == "diagonal":
            return self.loc + self.scale * u
        if self.kind == "tril":
            return self.loc + u @ self.scale_tril.T
        flat = u.reshape(-1, self.dim)
        return (torch.linalg.solve(self.whitening, flat.T).T + self.loc).reshape(u.shape)

    def log_det(self) -> Tensor:
        r""":math:`\log|\det S|`, a scalar tensor."""
        if self.kind == "diagonal":
            return self.scale.log().sum()
        if self.kind == "tril":
            return self.scale_tril.diagonal().log().sum()
        return self.loc.new_tensor(self.whitening_log_det)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}"


def needs_standardization(data: Tensor) -> bool:
    r"""Whether data ``(n, dim)`` are far from centred and unit-scaled, so that the trainers
    work in standardized coordinates (:class:`~pyro_ebm.train.EBMTrainer` with
    ``standardize=None``; :class:`~pyro_ebm.ebflow.EBFlowTrainer` whitens): when a coordinate's
    mean lies more than 2 RMS standard deviations from 0, the RMS sd is outside ``[0.1, 10]``,
    or the coordinates' sds differ by more than a factor 100. Off for the toy data sets of
    :mod:`pyro_ebm.datasets` (means within 0.7 RMS sd, RMS sds 0.7-3.4).

    Why: an EBM's tilt :math:`\rho` is centred at 0 with the RMS sd, and the networks see the
    raw coordinates; far from them, the walkers do not reach the data.

    Example:

    >>> needs_standardization(torch.randn(100, 2)), needs_standardization(50 + torch.randn(100, 2))
    (False, True)
    """
    sd = data.std(0)
    rms = float(sd.pow(2).mean().sqrt())
    if not 0.1 <= rms <= 10.0:
        return True
    if float(data.mean(0).abs().max()) > 2.0 * rms:
        return True
    return float(sd.max()) > 100.0 * float(sd.min())
