r"""A flow in standardized coordinates, fitted to the scale of its data or target."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_flag
from ..coordinates import AffineCoordinates
from .base import Flow
from .fitting import _check_samples

__all__ = ["Standardized"]

_CHI2_1_MEDIAN = 0.4549364231195724  # median of a chi-square with one degree of freedom
#: the score-based scale of :meth:`Standardized.standardize_` shrinks the sd by at most this
_MAX_SCORE_SHRINK = 3.0
#: a dense :meth:`Standardized.standardize_` falls back to a diagonal scale when the gradients
#: narrow a coordinate of the covariance-whitened space below this factor
_DENSE_MIN_NARROWING = 0.5


class Standardized(Flow):
    r"""A flow in standardized coordinates: :math:`x = m + S\,T(z)`, with :math:`T` the wrapped
    flow and the location :math:`m` and scale :math:`S` fixed buffers (not trained), set from
    data by :meth:`standardize_`. :math:`S` is diagonal (``scale``, ``(dim,)``) or, with
    ``dense=True``, lower triangular (``scale_tril``, ``(dim, dim)``), so that a target's
    correlations are in the standardization and the wrapped flow only learns what is not
    Gaussian about it.

    A flow started at the identity learns a target a hundred times narrower (or wider, or far
    off, or strongly correlated) than its base only slowly, by the gradient steps that move its
    scale; in standardized coordinates its layers only ever see data of unit scale near the
    origin. flowMC fits its flows this way, on the chains' mean and standard deviation;
    :class:`~pyro_ebm.samplers.AdaptiveFlowSampler` re-standardizes on its history before each
    fit. ``loc``, ``scale`` and ``scale_tril`` are in the ``state_dict``, so a saved or restored
    flow keeps them.

    :param flow: the flow :math:`T` (a :class:`Flow`; any object with ``dim``,
        ``sample_and_log_prob`` and ``log_prob`` serves for sampling and densities).
    :param dense: a lower-triangular :math:`S` (``O(dim^2)`` per point) instead of a diagonal
        one.
    :param coordinates: the :class:`~pyro_ebm.coordinates.AffineCoordinates` to use (shared,
        not copied; diagonal, or lower-triangular when ``dense``), e.g. a trainer's
        standardization; by default the identity until :meth:`standardize_`.

    Example:

    >>> from pyro_ebm.flows import RealNVP
    >>> flow = Standardized(RealNVP(2, num_layers=2)).standardize_(
    ...     5.0 + 0.01 * torch.randn(1000, 2, dtype=torch.get_default_dtype()))
    >>> x = flow.sample(2000)
    >>> bool((x.mean(0) - 5.0).abs().max() < 0.01), bool((x.std(0) - 0.01).abs().max() < 0.002)
    (True, True)
    >>> cov = torch.tensor([[1.0, 0.99], [0.99, 1.0]])
    >>> data = torch.distributions.MultivariateNormal(torch.zeros(2), cov).sample((4000,))
    >>> grad = data @ torch.linalg.inv(cov)  # the gradients of U(x) = x^T cov^-1 x / 2
    >>> flow = Standardized(RealNVP(2, num_layers=2), dense=True).standardize_(data, grad)
    >>> bool((flow.sample(4000).T.corrcoef()[0, 1] - 0.99).abs() < 0.01)
    True
    """

    def __init__(
        self, flow: nn.Module, dense: bool = False, coordinates: AffineCoordinates | None = None
    ) -> None:
        dim = getattr(flow, "dim", None)
        if not isinstance(dim, int):
            raise TypeError(f"flow must have an integer `dim`, got {type(flow).__name__}")
        dense = check_flag("dense", dense)
        nn.Module.__init__(self)  # no base of its own: the wrapped flow's is used
        self.dim = dim
        self.flow = flow
        self.dense = dense
        ref = next(iter([*flow.parameters(), *flow.buffers()]), torch.zeros(()))
        loc = torch.zeros(dim, dtype=ref.dtype, device=ref.device)
        eye = torch.eye(dim, dtype=ref.dtype, device=ref.device)
        if coordinates is None:
            coordinates = (
                AffineCoordinates(loc, scale_tril=eye) if dense else AffineCoordinates(loc)
            )
        elif not isinstance(coordinates, AffineCoordinates) or coordinates.kind != (
            "tril" if dense else "diagonal"
        ):
            kind = "lower-triangular" if dense else "diagonal"
            raise ValueError(f"coordinates must be {kind} AffineCoordinates of dim {dim}")
        elif coordinates.dim != dim:
            raise ValueError(f"coordinates has dim {coordinates.dim}, the flow {dim}")
        #: the map :math:`x = m + S u` (lower-triangular :math:`S` when ``dense``; shared when
        #: given)
        self.coordinates = coordinates
        self._register_load_state_dict_pre_hook(_old_buffer_names)

    @property
    def loc(self) -> Tensor:
        """:math:`m`, ``(dim,)``."""
        return self.coordinates.loc

    @property
    def scale(self) -> Tensor:
        """The marginal scales :math:`\\sqrt{\\mathrm{diag}(S S^\top)}`, ``(dim,)``."""
        return self.coordinates.scale

    @property
    def scale_tril(self) -> Tensor:
        """:math:`S`, ``(dim, dim)`` (``dense`` only)."""
        if not self.dense:
            raise AttributeError("scale_tril: this Standardized is diagonal (dense=False)")
        return self.coordinates.scale_tril

    @torch.no_grad()
    def standardize_(self, x: Tensor, grad: Tensor | None = None) -> Standardized:
        r"""Set ``loc`` to the mean of ``x`` ``(n, dim)`` and the scale to its standard
        deviation or, when dense, to the Cholesky factor of its covariance (its correlations
        shrunk toward zero by ``dim / (n + dim)``, so that few rows give a well-conditioned
        factor) if the gradients confirm it: a dense scale is kept only when the narrowing below
        leaves every coordinate of the space it whitens at least half its width, since the
        covariance of separated modes, or of a funnel, is no picture of their shape; else the
        scale is diagonal. Dense and without ``grad``, it is the covariance's factor.

        Given the gradients ``grad`` ``(n, dim)`` of the potential at ``x``, each coordinate
        ``u_i`` of the standardized space (``x = loc + S u``; its gradients are
        :math:`S^\top \nabla U`) is narrowed to the smaller of its sd (1) and its score-based
        scale :math:`\sqrt{m_1 / \mathrm{median}(\partial_{u_i} U^2)}`, :math:`m_1 \approx 0.455`
        the median of :math:`\chi^2_1`, but not below a third. At stationarity
        :math:`E[\partial_i U^2] = E[\partial_i^2 U]`, so for a Gaussian the score-based scale
        is the conditional sd :math:`(\Sigma^{-1})_{ii}^{-1/2}`; for a mixture of separated
        modes it is the modes' width, where the sd is their distance, which a flow would
        otherwise have to shrink by as much in every dimension. The floor at a third of the sd
        keeps the modes near the flow's base. The median ignores walkers still far out, whose
        gradients are huge; rows whose gradient is not finite (a walker started where the
        potential is not) are left out. An sd is floored at ``sqrt(eps) * (1 + |loc|)``.
        Returns ``self``."""
        x = _check_samples(self, x, "x", convert=False)  # moments in the data's dtype
        if grad is not None and (not isinstance(grad, Tensor) or grad.shape != x.shape):
            shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(f"grad must have the shape of x, {tuple(x.shape)}, got {shape}")
        n, dim = x.shape
        loc = x.mean(0)
        floor = torch.finfo(x.dtype).eps ** 0.5 * (1 + loc.abs())
        sd = x.std(0) if n > 1 else torch.ones_like(loc)
        sd = torch.maximum(torch.nan_to_num(sd, nan=1.0), floor)
        tril, narrow = None, None
        if self.dense and n > 1:
            z = (x - loc) / sd
            corr = z.T @ z / (n - 1)
            shrink = dim / (n + dim)
            eye = torch.eye(dim, dtype=x.dtype, device=x.device)
            chol, info = torch.linalg.cholesky_ex((1 - shrink) * corr + shrink * eye)
            if int(info) == 0:
                tril = sd[:, None] * chol
                if grad is not None:
                    narrow = self._narrowing(grad, tril)
                    if narrow.min() < _DENSE_MIN_NARROWING:
                        # the covariance spans separated modes (or a funnel)
                        tril, narrow = None, None
        if narrow is None:
            narrow = torch.ones_like(loc) if grad is None else self._narrowing(grad, None, sd)
        self.loc.copy_(loc)
        if tril is None:
            self.scale.copy_(torch.maximum(sd * narrow, floor))
            if self.dense:
                self.scale_tril.copy_(torch.diag(self.scale))
        else:
            self.scale_tril.copy_(tril * narrow)
            self.scale.copy_(self.scale_tril.pow(2).sum(-1).sqrt())  # the marginal scales
        return self

    @staticmethod
    def _narrowing(grad: Tensor, tril: Tensor | None, sd: Tensor | None = None) -> Tensor:
        """The score-based factor in ``[1/3, 1]`` of each coordinate of ``u`` (``x = loc +
        tril u``, or ``loc + sd * u``), see :meth:`standardize_` (1 where not finite)."""
        g_u = grad @ tril if tril is not None else grad * sd  # the gradients in u
        g2 = torch.where(torch.isfinite(grad).all(-1, keepdim=True), g_u.pow(2), torch.nan)
        score = (_CHI2_1_MEDIAN / g2.nanmedian(0).values).sqrt()
        score = torch.clamp(score, min=1 / _MAX_SCORE_SHRINK, max=1.0)
        return torch.where(torch.isfinite(score), score, torch.ones_like(score))

    def scale_change(self, other: Tensor) -> float:
        r"""The largest factor, as :math:`|\log|`, by which this standardization stretches or
        shrinks space relative to an earlier one, ``other`` (a ``scale`` or ``scale_tril``
        saved from :meth:`scale_matrix`): the extreme singular values of
        :math:`S_\mathrm{other}^{-1} S`."""
        if not self.dense:
            return float((self.scale / other).log().abs().max())
        rel = torch.linalg.solve_triangular(other, self.scale_tril, upper=False)
        return float(torch.linalg.svdvals(rel).log().abs().max())

    def scale_matrix(self) -> Tensor:
        """A copy of the scale: ``scale`` ``(dim,)``, or ``scale_tril`` ``(dim, dim)`` when
        dense."""
        return (self.scale_tril if self.dense else self.scale).clone()

    def inverse_mass(self) -> Tensor:
        r"""The local moves' preconditioner in these coordinates: :math:`S S^\top`, diagonal
        ``(dim,)`` or dense ``(dim, dim)``."""
        if self.dense:
            return self.scale_tril @ self.scale_tril.T
        return self.scale.pow(2)

    def _log_scale(self) -> Tensor:
        return self.coordinates.log_det()

    def _to_x(self, u: Tensor) -> Tensor:
        return self.coordinates.to_x(u)

    def _to_u(self, x: Tensor) -> Tensor:
        return self.coordinates.to_u(x)

    @property
    def base_dist(self) -> torch.distributions.Distribution:
        return self.flow.base_dist

    def base_log_prob(self, z: Tensor) -> Tensor:
        return self.flow.base_log_prob(z)

    def base_rsample(self, n: int) -> Tensor:
        return self.flow.base_rsample(n)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u, ladj = self.flow.forward(z)
        return self._to_x(u), ladj + self._log_scale()

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, ladj = self.flow.inverse(self._to_u(x))
        return z, ladj - self._log_scale()

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._check_x(x)
        return self.flow.log_prob(self._to_u(x)) - self._log_scale()

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        u, log_q = self.flow.rsample_and_log_prob(n)
        return self._to_x(u), log_q - self._log_scale()

    @torch.no_grad()
    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        u, log_q = self.flow.sample_and_log_prob(n)
        return self._to_x(u), log_q - self._log_scale()


def _old_buffer_names(state_dict, prefix, *args) -> None:
    """Load a ``state_dict`` saved before the coordinates object: ``loc``, ``scale`` and
    ``scale_tril`` were buffers of the flow itself."""
    for name in ("loc", "scale", "scale_tril"):
        if prefix + name in state_dict:
            state_dict[f"{prefix}coordinates.{name}"] = state_dict.pop(prefix + name)
