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

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import (
    NOT_GIVEN,
    DefaultValue,
    check_flag,
    check_int,
    check_positive,
    check_real,
    renamed,
)
from ..flows import as_flow
from ..metrics.psis import FlowCheck
from ..samplers import (
    GOOD_KHAT,
    DefensiveProposal,
    FlowProposals,
    MoveInfo,
    WalkerState,
    guarded,
    imh_step,
    init_state,
    isir_particles,
    isir_step,
    mala_step,
)
from .base import StanWarmupKernel, WalkerKernel, check_proposal
from .neutra import CompiledPotential

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

    :param flow: proposal with ``sample_and_log_prob`` and ``log_prob`` over the flat unconstrained
        space (``dim`` = total size of the latent sites), used as is; or ``None`` (default): the
        kernel fits its own flow to the target at setup, before warmup, and keeps it frozen
        (:func:`~pyro_ebm.samplers.fit_flow`: the Laplace Gaussian at a mode, refined by reverse KL
        into a dense affine map, coupling layers only when that is not good enough, each stage until
        its loss stops falling), once per run for all chains; the fit is then in ``kernel.flow_``
        and its report in ``kernel.flow_fit``. Reverse KL covers one mode: for a multimodal target
        use :class:`~pyro_ebm.infer.AdaptiveFlowMCMC`. Without ``initial_params`` (or, for a model,
        an ``init_strategy``) each chain starts from a draw of the flow, not from Pyro's
        ``init_to_uniform``, whose points lie far out in a trained flow's tails.
    :param block_size: steps of proposals drawn at once.
    :param defensive: weight of the defensive Gaussian component (0 disables it).
    :param defensive_scale: its scale relative to the flow's base scale.

    At setup the proposal (the flow, with its defensive mixture) is checked once per run:
    ``diagnostics()`` reports its Pareto :math:`\hat k` as an importance sampler of the target
    (``"flow k-hat"``) and the importance-sampling ESS (``"flow IS ESS"``), see
    :func:`~pyro_ebm.metrics.flow_importance_diagnostic`; above 0.7 a warning says that the
    chains will stick. At the end of a warmup, and after a run of
    :class:`~pyro_ebm.infer.MCMC` at its draws, it is checked again from the chains' side
    (``"flow score k-hat"``, :func:`~pyro_ebm.metrics.flow_score_diagnostic`, the same
    warning). ``diagnostics()`` also reports each chain's ``longest rejection run``.

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

    _starts_from_flow = True
    _flow_khat_meaning = (
        "the flow misses part of the target; its proposals rarely reach what it misses, and a "
        "chain that gets there sticks (long runs of rejections): the chains will mix slowly and "
        "may under-represent that part"
    )
    #: the start of the remedy that comes before the defensive component's (FlowISIR's)
    _remedy_first = ""
    _not_taken = {
        **dict.fromkeys(
            ("step_size", "adapt_step_size", "target_accept_prob"),
            "it has no step size: every move is a draw of the flow",
        ),
        **dict.fromkeys(
            ("num_steps", "trajectory_length", "max_tree_depth"),
            "it has no trajectory: every move is a draw of the flow",
        ),
        **dict.fromkeys(
            ("adapt_mass_matrix", "full_mass"), "it has no mass matrix: the flow proposes"
        ),
        "jit_compile": "not offered: its moves need no gradient",
    }

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        block_size: int = 256,
        defensive: float = 0.0,
        defensive_scale: float = 3.0,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        block_size = check_int("block_size", block_size, 1)
        defensive = check_real("defensive", defensive, 0.0, 1.0, high_open=True)
        defensive_scale = check_positive("defensive_scale", defensive_scale)
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        self.flow = as_flow(flow)
        if self.flow is not None:
            check_proposal(self.flow)
        self.block_size = block_size
        self.defensive = defensive
        self.defensive_scale = defensive_scale

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        self._flow = self._flow_for_run(x0)
        if self.flow is None and not self._starts_given:  # start from the fitted flow
            x0 = None
        proposal = self._flow
        if self.defensive > 0:
            proposal = DefensiveProposal(self._flow, self.defensive, self.defensive_scale)
        self._proposal = proposal
        check = self._check_flow_quality(
            proposal, (self._flow, self.defensive, self.defensive_scale)
        )
        self._proposals = FlowProposals(
            proposal,
            self.target.potential,
            self.num_chains,
            self._proposals_per_step(check),
            self.block_size,
        )
        if x0 is None:
            x0 = self._flow_draws(self.num_chains)
        return self._valid_starts(self.target.potential, x0, False, self._flow_draws)

    @property
    def _flow_khat_remedy(self) -> str:
        """The k-hat warning's remedy: a defensive component, or a larger one than given."""
        if self.defensive > 0:
            given = f"defensive={self.defensive:g}, defensive_scale={self.defensive_scale:g}"
            first = self._remedy_first or "use "
            return f"{first}a larger or wider defensive component (now {given})"
        return f"{self._remedy_first}add a defensive component (defensive=0.05)"

    def _proposals_per_step(self, check: FlowCheck) -> int:
        """Fresh flow proposals per chain and step."""
        return 1

    def _flow_draws(self, n: int) -> Tensor:
        with torch.no_grad():
            return self._flow.sample(n)

    def _restart(self, x: Tensor) -> WalkerState:
        return init_state(self.target.potential, x, with_grad=False)

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = imh_step(state, self._proposals.draw(), self._proposal)
        return state, info, True


class FlowISIR(FlowIMH):
    r"""Iterated sampling-importance-resampling with ``num_particles`` flow particles.

    Each step draws ``N - 1`` fresh flow proposals, chooses one with probability proportional
    to its importance weight :math:`e^{-U}/q` and accepts it with the multiple-try Metropolis
    probability (:func:`~pyro_ebm.samplers.isir_step`, which also explains why this rule rather
    than resampling among all ``N`` particles with the current point). Leaves the target
    invariant for any ``N``; with a rough flow it still moves where IMH would stall. Same
    arguments as :class:`FlowIMH`, plus:

    :param num_particles: ``N >= 2``, or ``"auto"`` (default): chosen once per run from the
        flow check made at setup, the fewest between 2 and 16 whose probability of leaving a
        point of the target, estimated from the check's importance weights, is at least 0.9,
        on average and from the heaviest tenth of the points
        (:func:`~pyro_ebm.samplers.isir_particles`); 16 when the flow's k-hat is above 0.5
        (heavy-tailed weights make that estimate optimistic). A flow close to the target needs
        2 (the move is then IMH), and each particle costs one potential evaluation per step.
        The count used is :attr:`num_particles_`.
    """

    _flow_khat_meaning = (
        "the flow misses part of the target; its particles rarely reach what it misses, and a "
        "chain that gets there sticks (long runs on one particle): the chains will mix slowly "
        "and may under-represent that part"
    )
    _remedy_first = "use more particles or "

    #: the most particles of ``num_particles="auto"``
    MAX_AUTO_PARTICLES = 16

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        block_size: int = 256,
        defensive: float = 0.0,
        defensive_scale: float = 3.0,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        *,
        num_particles: int | str = "auto",
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        if isinstance(num_particles, str) and num_particles != "auto":
            raise ValueError(
                f"num_particles must be an integer >= 2 or 'auto', got {num_particles!r}"
            )
        if num_particles != "auto":
            num_particles = check_int("num_particles", num_particles, 2)
        super().__init__(
            model,
            potential_fn,
            flow,
            block_size,
            defensive,
            defensive_scale,
            init_strategy,
            max_plate_nesting,
        )
        self.num_particles = num_particles
        #: the particle count of the last run (``num_particles``, or the one ``"auto"`` chose)
        self.num_particles_: int | None = None

    def _proposals_per_step(self, check: FlowCheck) -> int:
        n = self.num_particles
        if n == "auto":
            most = self.MAX_AUTO_PARTICLES
            good = check.khat <= GOOD_KHAT
            known = good and check.log_weights is not None
            n = isir_particles(check.log_weights, most) if known else most
        self.num_particles_ = n
        return n - 1

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = isir_step(state, self._proposals.draw(), self._proposal)
        return state, info, True


class MALA(StanWarmupKernel):
    r"""Metropolis-adjusted Langevin algorithm with Stan's warmup: dual-averaging step-size
    adaptation toward ``target_accept_prob``, one step size per chain, and a windowed estimate
    of the inverse mass matrix (Pyro has no MALA kernel; the argument names are those of Pyro's
    ``HMC``).

    Each move is :func:`~pyro_ebm.samplers.mala_step` with the preconditioner
    :math:`A = M^{-1}`: :math:`x' = x - \epsilon A \nabla U(x) + \sqrt{2\epsilon}\, L\xi`,
    :math:`L L^\top = A`, with the Metropolis-Hastings correction for that proposal. During
    warmup (:class:`~pyro_ebm.samplers.MassMatrixAdapter`), in Stan's slow windows, the
    positions of the chains after each move are pooled (one chain: its history; many chains
    advancing together, as in :class:`pyro_ebm.infer.MCMC`: all of them) and at each window's
    end :math:`A` becomes their variances (``full_mass=False``) or covariance
    (``full_mass=True``), shrunk toward :math:`10^{-3} I` with weight :math:`5 / (n + 5)`. The
    step sizes then restart: a reasonable one is searched for from each chain's position
    (:func:`~pyro_ebm.samplers.find_reasonable_step_size`, doubling or halving until its
    acceptance crosses ``target_accept_prob``) and the dual averaging restarts there, as Stan
    does. Each chain adapts its own step size, as each of Stan's and NumPyro's chains does: a
    chain that starts where the posterior is narrower than where the others are (a
    hierarchical scale near 0) gets a step size it can move with. After warmup the step sizes
    (the dual-averaging iterate averages) and :math:`A` are frozen.

    :param model: a Pyro model, or ``None``.
    :param potential_fn: a Pyro ``potential_fn``, or ``None`` (exactly one of the two).
    :param step_size: initial step size :math:`\epsilon` (``h^2 / 2`` in Roberts & Rosenthal's
        notation).
    :param adapt_step_size: adapt the step size during warmup, then freeze the averaged one.
    :param adapt_mass_matrix: adapt the inverse mass matrix during warmup (with fewer than 20
        warmup steps it stays the identity, as in Stan).
    :param full_mass: a dense inverse mass matrix instead of a diagonal one (a block structure,
        as Pyro's list of sites, is not supported).
    :param target_accept_prob: mean acceptance probability to aim for; 0.574 is optimal in high
        dimension (Roberts & Rosenthal 1998).
    :param init_strategy: Pyro init strategy for models.
    :param max_plate_nesting: as Pyro's (for models).
    :param jit_compile: compile the batched potential together with its gradient into one graph
        per batch shape (:class:`~pyro_ebm.infer.CompiledPotential`, as
        :class:`~pyro_ebm.infer.ChEESHMC` does): the Python of Pyro's model trace runs once,
        which makes small models several times faster. Only valid for potentials without
        data-dependent control flow; a potential that cannot be recorded runs as is (a
        warning).
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace`.
    :param target_accept: deprecated name of ``target_accept_prob`` (a ``FutureWarning``;
        passing both is a ``TypeError``).

    After :meth:`setup` (or a run), :attr:`inverse_mass_matrix` is the current :math:`A` over the
    flat unconstrained space, ``(D,)`` or ``(D, D)``, and :attr:`step_size` the current step size,
    a ``(C,)`` tensor when ``C > 1`` chains move together.

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MCMC
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> kernel = MALA(potential_fn=pot, full_mass=True)
        >>> mcmc = MCMC(kernel, num_samples=50, warmup_steps=100, num_chains=4,
        ...             disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape, kernel.inverse_mass_matrix.shape
        (torch.Size([200, 2]), torch.Size([2, 2]))

    References:

    - Roberts, Rosenthal (1998), "Optimal scaling of discrete approximations to Langevin
      diffusions", J. R. Statist. Soc. B 60(1), 255-268.
    - Stan Reference Manual, "HMC algorithm parameters: automatic parameter tuning" (the warmup
      windows, the regularisation of the mass matrix, the step-size restarts).
    - Hoffman, Gelman (2014), "The No-U-Turn Sampler", https://arxiv.org/abs/1111.4246 (dual
      averaging).
    """

    _not_taken = dict.fromkeys(
        ("num_steps", "trajectory_length", "max_tree_depth"),
        "it has no trajectory: each move is one gradient step",
    )
    per_chain_step_size = True

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        step_size: float = 0.1,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool = False,
        target_accept_prob: float = DefaultValue(0.574),
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        *,
        target_accept: float | None = None,
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        target_accept_prob = renamed(
            "MALA",
            "target_accept_prob",
            target_accept_prob,
            type(target_accept_prob) is not DefaultValue,
            "target_accept",
            NOT_GIVEN if target_accept is None else target_accept,
        )
        for name, flag in (
            ("adapt_step_size", adapt_step_size),
            ("adapt_mass_matrix", adapt_mass_matrix),
            ("full_mass", full_mass),
            ("jit_compile", jit_compile),
        ):
            check_flag(name, flag)
        if jit_options is not None and not isinstance(jit_options, dict):
            raise TypeError(f"jit_options must be a dict or None, got {jit_options!r}")
        step_size = check_positive("step_size", step_size)
        target_accept_prob = check_real(
            "target_accept_prob", target_accept_prob, 0.0, 1.0, low_open=True, high_open=True
        )
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        self.initial_step_size = step_size
        self.adapt_step_size = bool(adapt_step_size)
        self.adapt_mass_matrix = bool(adapt_mass_matrix)
        self.full_mass = bool(full_mass)
        self.target_accept_prob = float(target_accept_prob)
        self.jit_compile = bool(jit_compile)
        self.jit_options = jit_options

    @property
    def target_accept(self) -> float:
        """Deprecated name of :attr:`target_accept_prob` (a ``FutureWarning``)."""
        warnings.warn(
            "MALA's target_accept is deprecated: use target_accept_prob (Pyro's name)",
            FutureWarning,
            stacklevel=2,
        )
        return self.target_accept_prob

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        self._start_warmup(self.device)
        self._potential = self.target.potential
        if self.jit_compile:
            # errors raised in the compiled graph are rejected and counted too
            self._potential = guarded(
                CompiledPotential(self._potential, self.jit_options), self.target.potential.errors
            )
        if x0 is None:
            x0 = torch.zeros(self.num_chains, self.target.layout.dim, device=self.device)
        return self._valid_starts(self._potential, x0)

    def _restart(self, x: Tensor) -> WalkerState:
        return init_state(self._potential, x)

    def _checks_potential(self) -> Callable[[Tensor], Tensor]:
        return self._potential  # the compiled one with jit_compile=True

    def _trial(self, state: WalkerState, step_size: float | Tensor) -> Tensor:
        _, info = mala_step(state, self._potential, step_size, self._warmup.inverse_mass)
        return info.accept_prob

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = mala_step(
            state, self._potential, self._warmup.step_size, self._warmup.inverse_mass
        )
        if warmup:
            self._adapt(state, info)
        return state, info, False

    def _extra_logging(self) -> dict:
        return {"step size": self._step_size_text()}
