r"""pyro_ebm: energy-based models for Pyro.

- :mod:`pyro_ebm.energy`: energies as Pyro potentials and sites, a Pyro model as an energy
  (re-exported here), convolutional energies for images.
- :mod:`pyro_ebm.flows`: normalizing flows (RealNVP, spline, affine, standardized, adapters to
  zuko and to Pyro's autoguides) and their fitting; their transforms are Pyro
  ``TransformModule`` objects.
- :mod:`pyro_ebm.coordinates`: the affine change of coordinates (standardization, whitening).
- :mod:`pyro_ebm.samplers`: the one vectorized MCMC core (MALA, ULA, HMC, flow IMH, i-SIR,
  global-local, step-size adaptation, the adaptive flowMC driver).
- :mod:`pyro_ebm.datasets`, :mod:`pyro_ebm.metrics`: targets with known answers (the toy data
  sets of Grenioux et al. 2023, reference Pyro models) and mode-weight metrics.
- :mod:`pyro_ebm.infer`: the flow-assisted kernels for ``pyro.infer.mcmc.MCMC``.
- :mod:`pyro_ebm.train`: balanced EBM training; :mod:`pyro_ebm.ebflow`: energy-based
  normalizing flows trained by score matching.
"""

from . import coordinates, datasets, ebflow, flows, infer, metrics, samplers, train
from .energy import (
    EnergyDistribution,
    EnergyModel,
    EnergyPotential,
    GaussianEnergy,
    MLPEnergy,
    ModelEnergy,
    StandardizedEnergy,
    TiltedEnergy,
    potential_fn,
)

__version__ = "0.1.0"

__all__ = [
    "EnergyDistribution",
    "EnergyModel",
    "EnergyPotential",
    "GaussianEnergy",
    "MLPEnergy",
    "ModelEnergy",
    "StandardizedEnergy",
    "TiltedEnergy",
    "coordinates",
    "datasets",
    "ebflow",
    "flows",
    "infer",
    "metrics",
    "potential_fn",
    "samplers",
    "train",
]
