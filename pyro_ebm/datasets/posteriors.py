r"""Small reference Pyro models for tests, benchmarks and tutorials.

- :func:`eight_schools_noncentered`: posteriordb's ``eight_schools-eight_schools_noncentered``
  (10 unconstrained dimensions, a funnel-shaped hierarchical posterior), with its data in
  :data:`EIGHT_SCHOOLS_DATA`.
- :func:`low_dim_gauss_mix`: posteriordb's ``low_dim_gauss_mix-low_dim_gauss_mix`` (a
  two-component Gaussian mixture with ordered means; 5 unconstrained dimensions). Its data (1000
  points) are not shipped: load them from posteriordb.
- :func:`label_switching_mixture`: a two-component mixture with exchangeable components, whose
  posterior has two symmetric modes of equal mass (label switching); data from
  :func:`label_switching_data`.

The posteriordb models are written to have exactly Stan's log density up to a constant: the
same priors (a Stan ``cauchy(0, 5)`` on ``real<lower=0>`` is a half-Cauchy, a ``normal(0, 2)`` on
``real<lower=0>`` a half-normal), and Pyro's default unconstraining transforms, which for
``ordered``, ``<lower=0>`` and ``<lower=0, upper=1>`` are the same as Stan's (cumulative sum of
exponentials, ``exp``, logistic), so reference draws from Stan apply to these models.

References:

- Magnusson, Bürkner, Vehtari et al., posteriordb: a database of posteriors, data and reference
  posterior draws, https://github.com/stan-dev/posteriordb (BSD-3).
- Rubin (1981), "Estimation in parallel randomized experiments" (the eight schools data).
- Stephens (2000), "Dealing with label switching in mixture models", J. R. Stat. Soc. B 62.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from .._checks import check_int, check_positive

__all__ = [
    "EIGHT_SCHOOLS_DATA",
    "SortedNormal",
    "eight_schools_noncentered",
    "label_switching_data",
    "label_switching_mixture",
    "low_dim_gauss_mix",
]

#: The eight schools data (Rubin 1981), as in posteriordb's ``eight_schools`` data set:
#: ``J`` schools, estimated treatment effects ``y`` and their standard errors ``sigma``.
EIGHT_SCHOOLS_DATA: dict[str, int | tuple[float, ...]] = {
    "J": 8,
    "y": (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0),
    "sigma": (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0),
}


class SortedNormal(TorchDistribution):
    r"""The order statistics of ``K`` i.i.d. :math:`\mathcal N(\text{loc}, \text{scale}^2)`
    draws: density :math:`K!\prod_k \mathcal N(x_k \mid \text{loc}, \text{scale})` on
    :math:`x_1 < \dots < x_K` (Stan's ``ordered[K] x; x ~ normal(loc, scale);``, normalised).

    :param float loc: location of each component.
    :param float scale: scale (positive).
    :param int size: ``K``, the event size.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector
    has_rsample = True

    def __init__(
        self, loc: float | Tensor, scale: float | Tensor, size: int, validate_args=None
    ) -> None:
        size = check_int("size", size, 1)
        self.loc = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        self.scale = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        self.size = int(size)
        batch_shape = torch.broadcast_shapes(self.loc.shape, self.scale.shape)
        super().__init__(batch_shape, (self.size,), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(SortedNormal, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.size = self.size
        super(SortedNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (self.loc[..., None] + self.scale[..., None] * eps).sort(-1).values

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lp = dist.Normal(self.loc[..., None], self.scale[..., None]).log_prob(value).sum(-1)
        return lp + math.lgamma(self.size + 1)


def _as_tensor(values: Sequence[float] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.get_default_dtype())
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    return t


def eight_schools_noncentered(
    J: int, y: Sequence[float] | Tensor, sigma: Sequence[float] | Tensor
) -> None:
    r"""posteriordb's ``eight_schools_noncentered`` in Pyro.

    .. math::

        \tilde\theta_j \sim \mathcal N(0, 1),\quad \mu \sim \mathcal N(0, 5),\quad
        \tau \sim \mathrm{HalfCauchy}(5),\quad
        \theta_j = \mu + \tau\,\tilde\theta_j,\quad y_j \sim \mathcal N(\theta_j, \sigma_j).

    Latent sites, in Stan's order: ``theta_trans`` (shape ``(J,)``), ``mu``, ``tau`` (positive;
    unconstrained as ``log tau``); ``theta`` is recorded as a deterministic site (Pyro's
    :class:`~pyro.infer.mcmc.MCMC` returns only the latents: compute
    ``theta = mu + tau * theta_trans`` from the draws). Posteriordb's reference draws name them
    ``theta[1]`` ... ``theta[8]``, ``mu``, ``tau``.

    :param int J: number of schools.
    :param y: estimated treatment effects, length ``J``.
    :param sigma: their standard errors (positive), length ``J``.

    Example::

        >>> from pyro_ebm import ModelEnergy
        >>> E = ModelEnergy(eight_schools_noncentered, tuple(EIGHT_SCHOOLS_DATA.values()))
        >>> E.site_names, E.dim
        (('theta_trans', 'mu', 'tau'), 10)
    """
    y = _as_tensor(y, "y")
    sigma = _as_tensor(sigma, "sigma")
    if y.shape != (J,) or sigma.shape != (J,):
        raise ValueError(f"y and sigma must have length J={J}, got {len(y)} and {len(sigma)}")
    theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([J]).to_event(1))
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    theta = pyro.deterministic("theta", mu[..., None] + tau[..., None] * theta_trans, event_dim=1)
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def low_dim_gauss_mix(y: Sequence[float] | Tensor) -> None:
    r"""posteriordb's ``low_dim_gauss_mix`` in Pyro: a two-component Gaussian mixture with
    ordered means.

    .. math::

        \mu \in \{\mu_1 < \mu_2\},\ \mu_k \sim \mathcal N(0, 2),\quad
        \sigma_k \sim \mathrm{HalfNormal}(2),\quad \theta \sim \mathrm{Beta}(5, 5),\\
        p(y_n) = \theta\,\mathcal N(y_n \mid \mu_1, \sigma_1)
                 + (1 - \theta)\,\mathcal N(y_n \mid \mu_2, \sigma_2).

    ``mu`` is a :class:`SortedNormal` site: Stan's ``normal(0, 2)`` on both components restricted
    to the ordered set (support :data:`~pyro.distributions.constraints.ordered_vector`), which Pyro
    unconstrains with Stan's own ordered transform, ``mu = (x_1, x_1 + e^{x_2})``, and its
    log-Jacobian. Latent sites: ``mu`` ``(2,)``, ``sigma`` ``(2,)`` (positive) and ``theta`` (in
    ``(0, 1)``). Unlike an improper prior plus a factor, the model can also be run forward
    (prior predictive, Pyro's default ``init_to_uniform``).

    :param y: the observations (posteriordb's data set has 1000 points; load them from
        ``data.json`` of posteriordb, see :mod:`pyro_ebm.datasets.posteriors`).

    Example::

        >>> from pyro_ebm import ModelEnergy
        >>> E = ModelEnergy(low_dim_gauss_mix, (torch.tensor([-3.0, -2.0, 2.5, 3.0]),))
        >>> E.site_names, E.dim
        (('mu', 'sigma', 'theta'), 5)
    """
    y = _as_tensor(y, "y")
    mu = pyro.sample("mu", SortedNormal(0.0, 2.0, 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    # Stan's log_mix(theta, normal_lpdf(y | mu[1], sigma[1]), normal_lpdf(y | mu[2], sigma[2]))
    mix = dist.Categorical(probs=torch.stack([theta, 1.0 - theta], -1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.MixtureSameFamily(mix, dist.Normal(mu, sigma)), obs=y)


def label_switching_mixture(
    y: Sequence[float] | Tensor, scale: float = 1.0, prior_scale: float = 10.0
) -> None:
    r"""A two-component Gaussian mixture with exchangeable components: label switching.

    .. math::

        \mu_k \sim \mathcal N(0, s_0^2),\quad
        p(y_n) = \tfrac12\,\mathcal N(y_n \mid \mu_1, s) + \tfrac12\,\mathcal N(y_n \mid \mu_2, s),

    with equal known weights and known scale ``s``. The density is invariant under swapping
    ``mu[0]`` and ``mu[1]``, so with two well-separated clusters (from
    :func:`label_switching_data`) the posterior of ``mu`` has two symmetric modes, near
    :math:`(a, b)` and :math:`(b, a)`, each of mass exactly 1/2. A sampler that stays in one mode
    reports a posterior mean near :math:`(a, b)`; the correct marginal means of ``mu[0]`` and
    ``mu[1]`` are equal. The single latent site ``mu`` ``(2,)`` is unconstrained.

    :param y: observations.
    :param float scale: the known component standard deviation ``s``.
    :param float prior_scale: prior standard deviation ``s_0`` of each mean.
    """
    y = _as_tensor(y, "y")
    mu = pyro.sample("mu", dist.Normal(0.0, prior_scale).expand([2]).to_event(1))
    mix = dist.Categorical(probs=torch.full((2,), 0.5, dtype=y.dtype))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.MixtureSameFamily(mix, dist.Normal(mu, scale)), obs=y)


def label_switching_data(
    num_points: int = 100,
    means: tuple[float, float] = (-2.0, 2.0),
    scale: float = 1.0,
    seed: int = 0,
) -> Tensor:
    r"""Data for :func:`label_switching_mixture`: ``num_points`` draws, half from each of
    :math:`\mathcal N(\text{means}_k, \text{scale}^2)` (exactly balanced, so the two clusters
    are equally represented), from a seeded generator (the global RNG is untouched).

    :param int num_points: number of points (even).
    :param means: the two cluster centres.
    :param float scale: cluster standard deviation.
    :param int seed: seed of the local :class:`torch.Generator`.
    :return: a ``(num_points,)`` tensor in the default dtype.

    Example::

        >>> y = label_switching_data(100)
        >>> y.shape, bool((y < 0).sum() > 35 and (y > 0).sum() > 35)
        (torch.Size([100]), True)
    """
    if check_int("num_points", num_points, 2) % 2:
        raise ValueError(f"num_points must be an even integer >= 2, got {num_points!r}")
    check_positive("scale", scale)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    centres = torch.tensor(means, dtype=dtype).repeat_interleave(num_points // 2)
    return centres + scale * torch.randn(num_points, generator=gen, dtype=dtype)
