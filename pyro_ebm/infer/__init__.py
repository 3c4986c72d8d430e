r"""Pyro kernels over the vectorized MCMC core, a many-chain driver, and ArviZ conversion.

:class:`MCMC` is Pyro's ``MCMC`` with NumPyro's ``chain_method``; with this package's kernels
all chains advance as one batch::

    mcmc = MCMC(ChEESHMC(model), num_samples=1000, warmup_steps=1000, num_chains=64)
    mcmc.run(data); mcmc.summary(); idata = to_arviz(mcmc)

The kernels also plug into :class:`pyro.infer.mcmc.MCMC` (one chain at a time).
"""

from .adaptive import AdaptiveFlowMCMC
from .arviz import to_arviz
from .base import StanWarmupKernel, TargetKernel, WalkerKernel
from .chees import ChEESHMC
from .kernels import MALA, FlowIMH, FlowISIR
from .mcmc import CHAIN_METHODS, MCMC
from .neutra import (
    CompiledPotential,
    FlowHMC,
    FlowNUTS,
    LatentKernel,
    LatentPotential,
    compile_value_and_grad,
)
from .stats import SAMPLE_STATS, DrawStats

__all__ = [
    "CHAIN_METHODS",
    "MALA",
    "MCMC",
    "SAMPLE_STATS",
    "AdaptiveFlowMCMC",
    "ChEESHMC",
    "CompiledPotential",
    "DrawStats",
    "FlowHMC",
    "FlowIMH",
    "FlowISIR",
    "FlowNUTS",
    "LatentKernel",
    "LatentPotential",
    "StanWarmupKernel",
    "TargetKernel",
    "WalkerKernel",
    "compile_value_and_grad",
    "to_arviz",
]
