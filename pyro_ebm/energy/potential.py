r"""Energies inside Pyro: as a ``potential_fn`` for Pyro's HMC/NUTS (:func:`potential_fn`) and as
the (unnormalized) distribution of a site (:class:`EnergyDistribution`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape
from torch import Tensor

from .base import EnergyModel

__all__ = ["EnergyDistribution", "EnergyPotential", "potential_fn"]


class EnergyPotential:
    r"""Picklable Pyro ``potential_fn``: ``params[site] -> energy(x).sum()``.

    ``params[site]`` may have shape ``(dim,)`` or ``(..., dim)``; leading dimensions are
    flattened and the energies summed (independent copies of the same target).

    :param energy: callable ``(batch, dim) -> (batch,)``, usually an :class:`EnergyModel`.
    :param str site: name of the parameter in the dict passed by Pyro.
    """

    def __init__(self, energy: Callable[[Tensor], Tensor], site: str = "x") -> None:
        if not callable(energy):
            raise TypeError(f"energy must be callable, got {type(energy).__name__}")
        if not isinstance(site, str):
            raise TypeError(f"site must be a str, got {type(site).__name__}")
        self.energy = energy
        self.site = site

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        if self.site not in params:
            raise KeyError(f"site {self.site!r} is missing from params (keys: {sorted(params)})")
        x = params[self.site]
        if x.dim() == 0:
            raise ValueError(f"params[{self.site!r}] must have shape (..., dim), got ()")
        return self.energy(x.reshape(-1, x.shape[-1])).sum()


def potential_fn(energy: Callable[[Tensor], Tensor], site: str = "x") -> EnergyPotential:
    r"""Wrap an energy as a ``potential_fn`` for :class:`pyro.infer.mcmc.HMC` / ``NUTS``.

    The result is an :class:`EnergyPotential` (picklable, so it also works with
    ``MCMC(num_chains > 1)`` in worker processes). Pass the start point with
    ``MCMC(..., initial_params={site: x0})``.

    :param energy: an :class:`EnergyModel` or any callable ``(batch, dim) -> (batch,)``.
    :param str site: name of the latent in Pyro's parameter dict.

    Example::

        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro_ebm import GaussianEnergy
        >>> pot = potential_fn(GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(NUTS(potential_fn=pot), num_samples=5, warmup_steps=5,
        ...             initial_params={"x": torch.zeros(2)}, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([5, 2])
    """
    return EnergyPotential(energy, site)


class EnergyDistribution(TorchDistribution):
    r"""An energy as an **unnormalized** Pyro distribution: ``log_prob(x) = -energy(x)``.

    ``log_prob`` omits :math:`\log Z`, so the distribution is only fit for inference where the
    site is latent and the normaliser is constant (MCMC over ``x``); it must not be used as an
    observed likelihood of a learned energy. It has no ``sample``/``rsample``.

    **NUTS/HMC on a model with this site.** Pyro runs the model once with ordinary sampling to
    guess ``max_plate_nesting`` and its default ``init_to_uniform`` calls ``sample()`` to learn the
    site's shape; Pyro's own :class:`~pyro.distributions.ImproperUniform` fails the same way. Pass
    both ``max_plate_nesting`` and an init strategy that does not sample, e.g.
    ``NUTS(model, max_plate_nesting=0, init_strategy=init_to_value(values={"x": x0}))``.

    :param energy: an :class:`EnergyModel` (``energy.dim`` gives the event shape ``(dim,)``).
    :param batch_shape: batch shape (each batch element is an independent copy).

    Example::

        >>> import pyro
        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro.infer.autoguide.initialization import init_to_value
        >>> from pyro_ebm import GaussianEnergy
        >>> E = GaussianEnergy(torch.zeros(2))
        >>> def model():
        ...     pyro.sample("x", EnergyDistribution(E))
        >>> kernel = NUTS(model, max_plate_nesting=0,
        ...               init_strategy=init_to_value(values={"x": torch.zeros(2)}))
        >>> mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([5, 2])
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        energy: EnergyModel,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
    ) -> None:
        dim = getattr(energy, "dim", None)
        if not callable(energy) or not isinstance(dim, int):
            raise TypeError("energy must be a callable with an int attribute dim (an EnergyModel)")
        self.energy = energy
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> EnergyDistribution:
        new = self._get_checked_instance(EnergyDistribution, _instance)
        new.energy = self.energy
        super(EnergyDistribution, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[0]
        if value.dim() < 1 or value.shape[-1] != dim:
            raise ValueError(f"value must have shape (..., {dim}), got {tuple(value.shape)}")
        lp = -self.energy(value.reshape(-1, dim)).reshape(value.shape[:-1])
        return lp.expand(broadcast_shape(lp.shape, self.batch_shape))

    def _no_sampling(self):
        raise NotImplementedError(
            "EnergyDistribution is unnormalized and cannot be sampled directly: draw from it "
            "with MCMC (pyro_ebm.infer kernels or pyro.infer.mcmc.NUTS). Inside a Pyro model, "
            "give the kernel (any of them) init_strategy=init_to_value(values={site: start}), "
            "and NUTS/HMC also max_plate_nesting."
        )

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        self._no_sampling()

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        self._no_sampling()
