r"""Energy models and their adapters to Pyro.

Sign convention (Pyro's): ``potential = energy = -log unnormalized density``, so an energy
:math:`E` defines :math:`p(x) = e^{-E(x)} / Z`. An :class:`EnergyModel` maps a flat
``(batch, dim)`` tensor to ``(batch,)`` energies, which is also the ``potential_fn`` shape used by
:mod:`pyro_ebm.samplers`. The adapters connect energies and Pyro both ways:

- :func:`potential_fn` turns an energy into a ``potential_fn`` for :class:`pyro.infer.mcmc.HMC` /
  :class:`~pyro.infer.mcmc.NUTS` (a dict of tensors in, a scalar out);
- :class:`EnergyDistribution` makes an energy a (unnormalized) site of a Pyro model;
- :class:`ModelEnergy` turns a Pyro model into an energy over its flattened unconstrained latents.

References:

- Nijkamp, Hill, Han, Zhu, Wu (2020), "On the Anatomy of MCMC-Based Maximum Likelihood Learning
  of Energy-Based Models", https://arxiv.org/abs/1903.12370
- Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with Adaptive
  Flow Sampling", https://arxiv.org/abs/2306.00684

- :mod:`~pyro_ebm.energy.base`: :class:`EnergyModel`, :class:`MLPEnergy`, :class:`GaussianEnergy`;
- :mod:`~pyro_ebm.energy.transformed`: :class:`TiltedEnergy`, :class:`StandardizedEnergy`;
- :mod:`~pyro_ebm.energy.potential`: :func:`potential_fn`, :class:`EnergyPotential`,
  :class:`EnergyDistribution`;
- :mod:`~pyro_ebm.energy.model`: :class:`ModelEnergy`, over the
  :class:`~pyro_ebm.energy.layout.SiteLayout` of the model's sites;
- :mod:`~pyro_ebm.energy.images`: convolutional energies and flows for images, CIFAR-10.
"""

from .base import EnergyModel, GaussianEnergy, MLPEnergy
from .layout import SiteLayout
from .model import ModelEnergy
from .potential import EnergyDistribution, EnergyPotential, potential_fn
from .transformed import StandardizedEnergy, TiltedEnergy

__all__ = [
    "EnergyDistribution",
    "EnergyModel",
    "EnergyPotential",
    "GaussianEnergy",
    "MLPEnergy",
    "ModelEnergy",
    "SiteLayout",
    "StandardizedEnergy",
    "TiltedEnergy",
    "potential_fn",
]
