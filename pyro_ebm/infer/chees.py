r"""Many-chain HMC with ChEES adaptation as a Pyro kernel: :class:`ChEESHMC`.

All chains make the same (jittered) number of leapfrog steps, so each step is one batched
potential-and-gradient evaluation for every chain; warmup tunes the step size, the trajectory
length and a diagonal (or, ``full_mass=True``, dense) mass matrix from the whole ensemble of
chains (:class:`~pyro_ebm.samplers.ChEESAdapter`). Run it with many chains through
:class:`pyro_ebm.infer.MCMC` (``chain_method="vectorized"``).

References:

- Hoffman, Radul, Sountsov (2021), "An Adaptive-MCMC Scheme for Setting Trajectory Lengths in
  Hamiltonian Monte Carlo", AISTATS, http://proceedings.mlr.press/v130/hoffman21a.html
- Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing Bad Geometry in
  Hamiltonian Monte Carlo Using Neural Transport", https://arxiv.org/abs/1903.03704 (``flow``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import Tensor

from .._checks import check_flag, check_int, check_positive, check_real
from ..samplers import (
    ChEESAdapter,
    MoveInfo,
    WalkerState,
    chees_hmc_step,
    find_reasonable_step_size,
)
from .neutra import LatentKernel

__all__ = ["ChEESHMC"]

logger = logging.getLogger(__name__)


class ChEESHMC(LatentKernel):
    r"""Hamiltonian Monte Carlo for many chains at once, tuned by the ChEES criterion.

    Every chain integrates for the same jittered time :math:`u_k T` (:math:`u_k` from a
    Halton sequence), so all chains advance as one ``(num_chains, dim)`` tensor. During warmup
    the step size follows dual averaging on the chains' harmonic-mean acceptance, the trajectory
    length :math:`T` ascends the ChEES criterion (the change in the expected squared distance
    from the mean, estimated over the chains), and the inverse mass matrix is set from the
    chains' variances (or, ``full_mass=True``, their covariance) in Stan's windows. After warmup
    all three are frozen (the jitter continues) and the chains are independent. A trajectory that
    meets a non-finite potential (or an energy error over 1000) rejects that chain's proposal
    only and is counted as a divergence. The number of leapfrog steps per iteration is capped
    by ``max_num_steps``.

    With a flow (by default one it fits itself) the chains run in the flow's latent space (NeuTra,
    as :class:`~pyro_ebm.infer.FlowHMC`): the potential there is :math:`U(T(z)) - \log|\det
    J_T(z)|`, the flow is frozen (a copy), and the draws are reported in the original space. The
    flow is checked once per run at setup: ``diagnostics()`` reports its Pareto :math:`\hat k` as an
    importance sampler of the target (``"flow k-hat"``) and the importance-sampling ESS (``"flow IS
    ESS"``), see :func:`~pyro_ebm.metrics.flow_importance_diagnostic`; above 0.7 a warning says that
    the latent geometry is bad. At the end of warmup, and after a run of
    :class:`~pyro_ebm.infer.MCMC`, it is checked again at the chains' draws (``"flow score
    k-hat"``, :func:`~pyro_ebm.metrics.flow_score_diagnostic`, the same warning).

    The trajectory length adapts from the spread of several chains: with one chain (Pyro's own
    ``MCMC``) it stays at ``trajectory_length`` and only the step size and mass matrix adapt.

    :param model: a Pyro model, or ``None``.
    :param potential_fn: a Pyro ``potential_fn``, or ``None`` (exactly one of the two).
    :param flow: a :class:`pyro_ebm.flows.Flow` over the flat unconstrained space, used as is (a
        frozen copy); ``False``: no flow, the chains move in the unconstrained space with the
        adapted mass matrix; or ``None`` (default): the kernel fits its own flow to the target at
        setup, before warmup, and keeps it frozen (:func:`~pyro_ebm.samplers.fit_flow`: the Laplace
        Gaussian at a mode, refined by reverse KL into a dense affine map, coupling layers only when
        that is not good enough, each stage until its loss stops falling), once per run for all
        chains; the fit is then in ``kernel.flow_`` and its report in ``kernel.flow_fit``. Reverse
        KL covers one mode: for a multimodal target use :class:`~pyro_ebm.infer.AdaptiveFlowMCMC`.
    :param step_size: initial step size (a reasonable one is searched for at the start, as
        Pyro's HMC does, when ``adapt_step_size``).
    :param trajectory_length: initial trajectory length :math:`T` (default 1).
    :param target_accept_prob: harmonic-mean acceptance to aim for.
    :param max_num_steps: cap on leapfrog steps per iteration.
    :param adapt_step_size: adapt the step size during warmup.
    :param adapt_trajectory_length: adapt :math:`T` during warmup (needs several chains).
    :param adapt_mass_matrix: adapt the inverse mass matrix during warmup (with fewer than 20
        warmup steps it stays the identity, as in Stan).
    :param full_mass: a dense ``(D, D)`` inverse mass matrix, the chains' pooled covariance,
        instead of a diagonal one, their variances (as Pyro's ``full_mass=True``; a block
        structure, Pyro's list of sites, is not supported). The momentum is then drawn through
        the matrix's Cholesky factor and each leapfrog step multiplies by it, ``O(D^2)`` per
        chain: for a strongly correlated target without a flow (``flow=False``); a flow already
        decorrelates its latent space.
    :param jit_compile: compile the batched potential (model and flow) together with its
        gradient into one graph per batch shape (:class:`~pyro_ebm.infer.CompiledPotential`):
        the Python of Pyro's model trace runs once, which makes small models several times
        faster. Only valid for potentials without data-dependent control flow.
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace`.
    :param init_strategy: Pyro init strategy for models. Without ``initial_params``, a bare
        ``potential_fn`` starts each chain uniformly in :math:`[-2, 2]^d` (the flow's latent
        space with ``flow``: a draw of the flow).
    :param max_plate_nesting: as Pyro's (for models).

    After :meth:`setup` (or a run), :attr:`inverse_mass_matrix` is the current inverse mass, over
    the flat unconstrained space (the flow's latent space with a flow), ``(D,)`` or ``(D, D)``.

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MCMC, ChEESHMC
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(3)))
        >>> mcmc = MCMC(ChEESHMC(potential_fn=pot), num_samples=50, warmup_steps=100,
        ...             num_chains=16, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples(group_by_chain=True)["x"].shape
        torch.Size([16, 50, 3])
    """

    _flow_khat_remedy = "run without a flow (flow=False)"
    _allows_no_flow = True
    _not_taken = {
        "num_steps": "ChEES sets the leapfrog steps from the trajectory length it adapts "
        "(trajectory_length=, max_num_steps=)",
        "max_tree_depth": "every chain takes the same (jittered) number of leapfrog steps, set "
        "by ChEES",
    }

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        step_size: float = 0.1,
        trajectory_length: float = 1.0,
        target_accept_prob: float = 0.651,
        max_num_steps: int = 256,
        adapt_step_size: bool = True,
        adapt_trajectory_length: bool = True,
        adapt_mass_matrix: bool = True,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        full_mass: bool = False,
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        for name, flag in (
            ("adapt_step_size", adapt_step_size),
            ("adapt_trajectory_length", adapt_trajectory_length),
            ("adapt_mass_matrix", adapt_mass_matrix),
            ("full_mass", full_mass),
            ("jit_compile", jit_compile),
        ):
            check_flag(name, flag)
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        self.step_size = check_positive("step_size", step_size)
        self.trajectory_length = check_positive("trajectory_length", trajectory_length)
        target_accept_prob = check_real(
            "target_accept_prob", target_accept_prob, 0.0, 1.0, low_open=True, high_open=True
        )
        self.target_accept_prob = float(target_accept_prob)
        self.max_num_steps = check_int("max_num_steps", max_num_steps, 1)
        self._init_latent(flow, jit_compile, jit_options)
        self.adapt_step_size = check_flag("adapt_step_size", adapt_step_size)
        self.adapt_trajectory_length = check_flag(
            "adapt_trajectory_length", adapt_trajectory_length
        )
        self.adapt_mass_matrix = check_flag("adapt_mass_matrix", adapt_mass_matrix)
        self.full_mass = check_flag("full_mass", full_mass)
        self.adapter: ChEESAdapter | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        dim = self.target.layout.dim
        state = self._latent_start(x0)
        step_size = self.step_size
        if self.adapt_step_size and self._warmup_steps > 0:
            step_size = self._reasonable_step_size(state, step_size)
        adapt_length = self.adapt_trajectory_length
        if self.num_chains == 1 and adapt_length and self._warmup_steps > 0:
            logger.info(
                "ChEESHMC adapts its trajectory length from several chains; with one chain it "
                "stays at trajectory_length=%g",
                self.trajectory_length,
            )
            adapt_length = False
        self.adapter = ChEESAdapter(
            dim,
            self._warmup_steps,
            step_size=step_size,
            trajectory_length=self.trajectory_length,
            target_accept=self.target_accept_prob,
            max_num_steps=self.max_num_steps,
            adapt_mass=self.adapt_mass_matrix,
            adapt_step_size=self.adapt_step_size,
            adapt_trajectory_length=adapt_length,
            full_mass=self.full_mass,
        )
        return state

    @property
    def inverse_mass_matrix(self) -> Tensor | None:
        r"""The current inverse mass matrix over the flat unconstrained space (the flow's latent
        space with a flow): ``(D,)`` (diagonal) or ``(D, D)`` (``full_mass``); ``None`` before
        :meth:`setup`."""
        return None if self.adapter is None else self.adapter.inverse_mass

    def _reasonable_step_size(self, state: WalkerState, step_size: float) -> float:
        """Double or halve the step size until one leapfrog step's mean acceptance crosses
        1/2 (Hoffman & Gelman's heuristic), from the chains' starts."""

        def trial(eps: float) -> Tensor:
            return chees_hmc_step(state, self._potential, eps, 1)[1].accept_prob

        return find_reasonable_step_size(trial, step_size, threshold=0.5)

    # -- moves -------------------------------------------------------------------------------
    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        adapter = self.adapter
        state, info, proposal = chees_hmc_step(
            state, self._potential, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        )
        adapter.update(proposal)
        info = info._replace(nonfinite=proposal.divergent)
        return state, info, False

    def _extra_logging(self) -> dict:
        adapter = self.adapter
        return {
            "step size": f"{adapter.step_size:.2e}",
            "steps": adapter.num_steps(),
            "T": f"{adapter.trajectory_length:.2g}",
        }
