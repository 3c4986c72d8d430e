r"""The potential of a target pulled back through a flow into its latent space (NeuTra).

With :math:`x = T(z)`, the density of :math:`z` is :math:`p(T(z))\,|\det J_T(z)|`, so the latent
potential is :math:`U(T(z)) - \log|\det J_T(z)|`. When the flow is close to the target this is
close to the flow's Gaussian base, and local samplers mix far better there.

Reference: Hoffman et al. (2019), "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using
Neural Transport", https://arxiv.org/abs/1903.03704
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["PullbackPotential"]


class PullbackPotential:
    r"""Batched, picklable latent potential ``z -> U(T(z)) - log|det J_T(z)|``.

    :param potential_fn: batched potential over ``x``, ``(C, D) -> (C,)``.
    :param flow: a flow with ``forward(z) -> (x, log|det J_T(z)|)``.

    Example::

        >>> import torch
        >>> from pyro_ebm.flows import Flow
        >>> U = PullbackPotential(lambda x: 0.5 * (x**2).sum(-1), Flow(2))
        >>> U(torch.ones(3, 2))
        tensor([1., 1., 1.])
    """

    def __init__(self, potential_fn: Callable[[Tensor], Tensor], flow) -> None:
        self.potential_fn = potential_fn
        self.flow = flow

    def __call__(self, z: Tensor) -> Tensor:
        x, log_det = self.flow.forward(z)
        return self.potential_fn(x) - log_det
