r"""The :class:`Flow` base class and its bijection as a Pyro ``TransformModule``."""

from __future__ import annotations

import itertools
import math

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import constraints

from .._checks import check_int as _check_int
from .._checks import check_positive as _check_positive

__all__ = ["Flow", "FlowTransform"]

_LOG_2PI = math.log(2 * math.pi)


class FlowTransform(TransformModule):
    r"""The bijection :math:`z \mapsto x` of a :class:`Flow` as a Pyro
    :class:`~pyro.distributions.TransformModule`: the flow is a submodule, so its parameters
    register wherever the transform does (an autoguide, ``pyro.module``).

    It maps the flow's base to its samples; Pyro's ``AutoNormalizingFlow`` puts it on a
    standard normal base, which is the flow's own when ``base_scale=1`` (the default).
    ``log_abs_det_jacobian(z, x)`` reuses the log-determinant of the last call when given its
    own input and output tensors.

    :param flow: the :class:`Flow`.
    :param cache_size: as for :class:`torch.distributions.Transform` (0 or 1).

    Example (a pyro_ebm flow as the transform of Pyro's ``AutoNormalizingFlow``):

    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormalizingFlow
    >>> from pyro_ebm.flows import RealNVP
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoNormalizingFlow(model, lambda dim: RealNVP(dim, num_layers=2).transform)
    >>> guide().keys(), len(list(guide.parameters())) > 0
    (dict_keys(['x']), True)

    References:

    - Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing bad geometry
      in Hamiltonian Monte Carlo using neural transport", https://arxiv.org/abs/1903.03704
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, flow: Flow, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self._ladj: tuple[Tensor, Tensor, Tensor] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return hash(id(self.flow))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_ladj"] = None  # may hold non-leaf tensors, which cannot be copied
        return state

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        """This transform with a cache of ``cache_size`` (itself when unchanged)."""
        return self if cache_size == self._cache_size else FlowTransform(self.flow, cache_size)

    def _call(self, z: Tensor) -> Tensor:
        x, ladj = self.flow.forward(z)
        self._ladj = (z, x, ladj)
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        z, ladj = self.flow.inverse(x)
        self._ladj = (z, x, -ladj)
        return z

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._ladj is not None and self._ladj[0] is x and self._ladj[1] is y:
            return self._ladj[2]
        return self.flow.forward(x)[1]


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = T(z)`, :math:`z \sim \mathcal{N}(0, \sigma^2 I)`.

    The base class applies its ``layers`` (modules with ``layer(z, inverse=False) -> (out,
    ladj)``) in order; with no layers it is just its Gaussian base. Subclasses may instead
    override :meth:`forward`, :meth:`inverse` and the base methods (see :class:`ZukoFlow`).

    :param dim: event dimension ``D`` of the samples.
    :param base_scale: standard deviation :math:`\sigma` of the Gaussian base.

    Example:

    >>> flow = Flow(3, base_scale=2.0)
    >>> x, log_q = flow.sample_and_log_prob(5)
    >>> x.shape, log_q.shape
    (torch.Size([5, 3]), torch.Size([5]))
    >>> torch.allclose(log_q, flow.base_dist.log_prob(x))
    True
    """

    def __init__(self, dim: int, base_scale: float = 1.0) -> None:
        super().__init__()
        self.dim = _check_int("dim", dim, 1)
        base_scale = _check_positive("base_scale", base_scale)
        self.register_buffer("base_loc", torch.zeros(dim))
        self.register_buffer("base_scale", torch.full((dim,), base_scale))
        self.layers = nn.ModuleList()

    # ---------------------------------------------------------------- base distribution
    @property
    def base_dist(self) -> torch.distributions.Distribution:
        """The base distribution, event shape ``(dim,)`` (a Pyro ``Normal(...).to_event(1)``)."""
        import pyro.distributions as dist

        return dist.Normal(self.base_loc, self.base_scale).to_event(1)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """Log density of the base at ``z`` of shape ``(..., dim)`` (fast, no validation)."""
        u = z / self.base_scale
        return -0.5 * u.square().sum(-1) - self.base_scale.log().sum() - 0.5 * self.dim * _LOG_2PI

    def base_rsample(self, n: int) -> Tensor:
        """Draw ``n`` reparameterised base samples, shape ``(n, dim)``."""
        eps = torch.randn(n, self.dim, dtype=self.base_loc.dtype, device=self.base_loc.device)
        return self.base_loc + self.base_scale * eps

    # ---------------------------------------------------------------- bijection
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Map latents to samples: returns ``x = T(z)`` and :math:`\log|\det J_T(z)|`."""
        ladj = None
        for layer in self.layers:
            z, l = layer(z)
            ladj = l if ladj is None else ladj + l
        if ladj is None:
            ladj = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        return z, ladj

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Map samples to latents: returns ``z = T^{-1}(x)`` and :math:`\log|\det J_{T^{-1}}(x)|`.

        Fed a batch ``(..., dim)``, returns ``(..., dim)`` and ``(...)``.
        """
        ladj = None
        for layer in reversed(self.layers):
            x, l = layer(x, inverse=True)
            ladj = l if ladj is None else ladj + l
        if ladj is None:
            ladj = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        return x, ladj

    @property
    def transform(self) -> FlowTransform:
        r"""The bijection :math:`z \mapsto x` as a Pyro ``TransformModule``
        (:class:`FlowTransform`), e.g. for ``AutoNormalizingFlow(model, lambda dim:
        RealNVP(dim).transform)``; ``transform.inv`` maps back."""
        return FlowTransform(self)

    def as_distribution(self) -> torch.distributions.Distribution:
        """The flow as a Pyro ``TransformedDistribution`` (e.g. for a ``pyro.sample`` site)."""
        import pyro.distributions as dist

        return dist.TransformedDistribution(self.base_dist, [self.transform])

    # ---------------------------------------------------------------- sampling / density
    def _check_x(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` of shape ``(..., dim)`` in the flow's dtype (a floating ``x`` of another dtype
        is converted), else a clear error."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape (..., {self.dim}), got {tuple(x.shape)}")
        dtype = float_dtype(self)
        if dtype is not None and x.dtype != dtype and x.is_floating_point():
            x = x.to(dtype)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of ``x`` of shape ``(..., dim)``; returns shape ``(...)``."""
        x = self._check_x(x)
        z, ladj = self.inverse(x)
        return self.base_log_prob(z) + ladj

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``n`` differentiable samples and their log density from one forward pass."""
        _check_int("n", n, 0)
        z = self.base_rsample(n)
        x, ladj = self.forward(z)
        return x, self.base_log_prob(z) - ladj

    @torch.no_grad()
    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        r"""Draw ``n`` samples ``(n, dim)`` and their log density ``(n,)`` without gradients.

        The density comes from the forward pass, :math:`\log q_0(z) - \log|\det J_T(z)|`, so no
        inversion is done: this is the fast path for independent Metropolis-Hastings and i-SIR.
        """
        return self.rsample_and_log_prob(n)

    def rsample(self, n: int) -> Tensor:
        """Draw ``n`` reparameterised samples, shape ``(n, dim)``."""
        _check_int("n", n, 0)
        return self.forward(self.base_rsample(n))[0]

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """Draw ``n`` samples, shape ``(n, dim)``, without gradients."""
        return self.rsample(n)


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating buffer or parameter (``None``: it has none): the
    dtype its inputs are converted to."""
    tensors = itertools.chain(module.buffers(), module.parameters())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)
