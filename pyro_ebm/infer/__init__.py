r"""Pyro kernels over the vectorized MCMC core, and ArviZ conversion.

Use them exactly as :class:`pyro.infer.mcmc.HMC`/``NUTS``::

    mcmc = MCMC(AdaptiveFlowMCMC(potential_fn=pot), num_samples=2000, warmup_steps=600)
    mcmc.run(); mcmc.summary(); idata = to_arviz(mcmc)
"""

from .adaptive import AdaptiveFlowMCMC
from .arviz import to_arviz
from .base import SAMPLE_STATS, TargetKernel, WalkerKernel
from .kernels import MALA, FlowIMH, FlowISIR
from .neutra import FlowHMC, FlowNUTS, LatentPotential, compile_value_and_grad

__all__ = [
    "MALA",
    "SAMPLE_STATS",
    "TargetKernel",
    "AdaptiveFlowMCMC",
    "FlowHMC",
    "FlowIMH",
    "FlowISIR",
    "FlowNUTS",
    "LatentPotential",
    "WalkerKernel",
    "compile_value_and_grad",
    "to_arviz",
]
