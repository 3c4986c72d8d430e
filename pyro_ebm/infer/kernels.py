r"""Flow-assisted and Langevin kernels for :class:`pyro.infer.mcmc.MCMC`.

Each kernel is a thin :class:`~pyro_ebm.infer.base.WalkerKernel` over the vectorized core in
:mod:`pyro_ebm.samplers`: :class:`FlowIMH` (independent Metropolis-Hastings with a flow proposal),
:class:`FlowISIR` (iterated sampling-importance-resampling with ``N`` flow particles) and
:class:`MALA` (Metropolis-adjusted Langevin with step-size adaptation during warmup; Pyro has
none).

References:

- Tierney (1994), "Markov chains for exploring posterior distributions".
- Andrieu, Lee, Vihola (2018), https://arxiv.org/abs/1312.6432 (i-SIR).
- Samsonov et al. (2022), https://arxiv.org/abs/2111.02702
- Hesterberg (1995), "Weighted average importance sampling and defensive mixture
  distributions" (the defensive component).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..samplers import (
    DefensiveProposal,
    FlowProposals,
    MoveInfo,
    StepSizeAdapter,
    WalkerState,
    imh_step,
    init_state,
    isir_step,
    mala_step,
)
from .base import WalkerKernel, check_finite_start, check_flow

__all__ = ["MALA", "FlowIMH", "FlowISIR"]


class FlowIMH(WalkerKernel):
    r"""Independent Metropolis-Hastings with a normalizing-flow proposal.

    Proposes ``x' ~ q`` (the flow, frozen) and accepts with probability
    :math:`\min\{1, w(x')/w(x)\}`, :math:`w = e^{-U}/q`. Proposals and their potentials are drawn
    and evaluated ``block_size`` steps at a time. Exact whatever the flow, and efficient when the
    flow is close to the target: train it first (e.g. :func:`pyro_ebm.flows.fit_reverse_kl`, or
    use :class:`AdaptiveFlowMCMC`, which trains its own).

    A known failure of flow IMH: where the flow's density is far too small, a proposal there has
    a huge weight, and the chain, once there, stays for a long time. ``defensive`` mixes a
    broad Gaussian into the proposal (weight ``defensive``, scale ``defensive_scale`` times the
    flow's base scale), which bounds the weights from above: a floor on the proposal density.

    :param flow: proposal with ``sample_and_log_prob`` and ``log_prob`` over the flat
        unconstrained space (``dim`` = total size of the latent sites). Without
        ``initial_params`` (or, for a model, an ``init_strategy``) each chain starts from a draw
        of the flow, not from Pyro's ``init_to_uniform``, whose points lie far out in a trained
        flow's tails.
    :param block_size: steps of proposals drawn at once.
    :param defensive: weight of the defensive Gaussian component (0 disables it).
    :param defensive_scale: its scale relative to the flow's base scale.

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro.infer import MCMC
        >>> from pyro_ebm.flows import RealNVP
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(FlowIMH(potential_fn=pot, flow=RealNVP(2)), num_samples=50,
        ...             warmup_steps=10, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([50, 2])
    """

    _num_proposals = 1
    _starts_from_flow = True

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        block_size: int = 256,
        defensive: float = 0.0,
        defensive_scale: float = 3.0,
        init_strategy: Callable | None = None,
    ) -> None:
        if flow is None:
            raise ValueError("flow is required (e.g. pyro_ebm.flows.RealNVP(dim), trained)")
        if not 0.0 <= defensive < 1.0:
            raise ValueError(f"defensive must lie in [0, 1), got {defensive}")
        super().__init__(model, potential_fn, init_strategy)
        self.flow = flow
        self.block_size = block_size
        self.defensive = defensive
        self.defensive_scale = defensive_scale

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        check_flow(self.flow, self.target.layout.dim)
        proposal = self.flow
        if self.defensive > 0:
            proposal = DefensiveProposal(self.flow, self.defensive, self.defensive_scale)
        self._proposal = proposal
        self._proposals = FlowProposals(
            proposal, self.target.potential, self.num_chains, self._num_proposals, self.block_size
        )
        if x0 is None:
            with torch.no_grad():
                x0 = self.flow.sample(self.num_chains)
        return self._restart(x0)

    def _restart(self, x: Tensor) -> WalkerState:
        return init_state(self.target.potential, x, with_grad=False)

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = imh_step(state, self._proposals.draw(), self._proposal)
        return state, info, True


class FlowISIR(FlowIMH):
    r"""Iterated sampling-importance-resampling with ``num_particles`` flow particles.

    Each step draws ``N - 1`` fresh flow proposals, adds the current point, and moves to one of
    the ``N`` particles with probability proportional to its importance weight
    :math:`e^{-U}/q`. Leaves the target invariant for any ``N``; with a rough flow it still moves
    where IMH would stall. Same arguments as :class:`FlowIMH`, plus:

    :param num_particles: ``N >= 2``.
    """

    def __init__(self, *args, num_particles: int = 16, **kwargs) -> None:
        if int(num_particles) != num_particles or num_particles < 2:
            raise ValueError(f"num_particles must be an integer >= 2, got {num_particles!r}")
        super().__init__(*args, **kwargs)
        self.num_particles = num_particles
        self._num_proposals = num_particles - 1

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = isir_step(state, self._proposals.draw(), self._proposal)
        return state, info, True


class MALA(WalkerKernel):
    r"""Metropolis-adjusted Langevin algorithm, with dual-averaging step-size adaptation toward
    ``target_accept`` during warmup (Pyro has no MALA kernel).

    :param step_size: initial step size.
    :param adapt_step_size: adapt during warmup, then freeze the averaged step size.
    :param target_accept: 0.574 is optimal in high dimension (Roberts & Rosenthal 1998).

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro.infer import MCMC
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(MALA(potential_fn=pot), num_samples=50, warmup_steps=50,
        ...             disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([50, 2])
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        step_size: float = 0.1,
        adapt_step_size: bool = True,
        target_accept: float = 0.574,
        init_strategy: Callable | None = None,
    ) -> None:
        super().__init__(model, potential_fn, init_strategy)
        self._adapter = StepSizeAdapter(step_size, target_accept)  # validates the arguments
        self.initial_step_size = step_size
        self.adapt_step_size = adapt_step_size
        self.target_accept = target_accept
        self.step_size = step_size

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        self.step_size = self.initial_step_size
        self._adapter.reset(self.initial_step_size)
        if x0 is None:
            x0 = torch.zeros(self.num_chains, self.target.layout.dim, device=self.device)
        state = self._restart(x0)
        check_finite_start(state.potential_energy)
        return state

    def _restart(self, x: Tensor) -> WalkerState:
        return init_state(self.target.potential, x)

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = mala_step(state, self.target.potential, self.step_size)
        if warmup and self.adapt_step_size:
            self.step_size = self._adapter.update(info.accept_prob)
            if self._t == self._warmup_steps - 1:
                self.step_size = self._adapter.final_step_size
        return state, info, False

    def _extra_logging(self) -> dict:
        return {"step size": f"{float(self.step_size):.2e}"}
