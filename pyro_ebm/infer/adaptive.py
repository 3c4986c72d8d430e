r"""The flowMC algorithm as a Pyro kernel: :class:`AdaptiveFlowMCMC`.

During warmup an ensemble of walkers runs the adaptive global-local sampler of
:mod:`pyro_ebm.samplers.adaptive` (global flow moves, local MALA/HMC moves, the flow refitted
online on the walkers' history, the step size adapted). The chains are the first walkers of the
ensemble: with :class:`pyro_ebm.infer.MCMC` and ``num_chains`` chains (vectorized) the ensemble
is the chains, topped up to ``num_walkers`` walkers, and every chain keeps drawing after warmup;
with one chain (Pyro's ``MCMC``) the ensemble helps during warmup and the chain then continues
alone. When warmup ends the flow and step size are frozen, and the chains are independent
draws of a time-homogeneous MCMC kernel that leaves the target invariant. Each step is one
move: a global move every ``num_local_steps + 1`` steps, local moves otherwise (the
``is_global`` sample statistic says which).

References:

- Gabrié, Rotskoff, Vanden-Eijnden (2022), https://arxiv.org/abs/2105.12603
- Wong, Gabrié, Foreman-Mackey (2023), "flowMC", https://arxiv.org/abs/2211.06397
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import NOT_GIVEN, check_flag, check_int, check_positive, check_real, renamed
from ..flows import GuideFlow, as_flow
from ..samplers import (
    GOOD_KHAT,
    AdaptiveFlowSampler,
    MoveInfo,
    WalkerState,
    isir_particles,
    sir_draws,
    valid_starts,
)
from .base import _PYRO_ONLY, WalkerKernel, check_flow, check_proposal

__all__ = ["AdaptiveFlowMCMC"]

logger = logging.getLogger(__name__)


class AdaptiveFlowMCMC(WalkerKernel):
    r"""Global-local MCMC whose normalizing flow is trained during warmup (flowMC in Pyro).

    No flow is needed: by default a RealNVP sized for the dimension is built for each run
    (a given ``flow`` is deep-copied per run, so the argument is not modified; the last run's
    trained flow is :attr:`flow_`, ready for
    :class:`~pyro_ebm.infer.FlowISIR` or :class:`~pyro_ebm.infer.FlowNUTS`). The flow is fitted
    in coordinates standardized by the walkers' mean and covariance (up to 256 dimensions, when
    the potential's gradients agree with it; else a per-coordinate scale, the width of the
    modes that the gradients measure), which also precondition the local moves (the flow is
    wrapped in :class:`~pyro_ebm.flows.Standardized`, see
    :class:`~pyro_ebm.samplers.AdaptiveFlowSampler`; ``standardize=False`` keeps a flow already
    fitted to the target in its own coordinates), so a posterior far narrower than the start,
    or strongly correlated, is learned as fast as a round one. At the end of warmup the
    trained flow is kept only if it is a better importance sampler than the standardization's
    Gaussian alone. Warmup must be long enough for the flow to learn the
    target: about 100 global-local cycles, i.e. ``warmup_steps`` of
    ``100 * (num_local_steps + 1)``, is a good start in up to ~16 dimensions; in more
    dimensions the flow needs more walkers (run more chains) and a longer warmup. Funnel-shaped
    posteriors (Neal's funnel, centred hierarchical models) are beyond it: the flow does not learn
    the funnel's neck, the chain never goes there and its ESS does not show it; non-centre such
    models first (as for NUTS).

    When warmup ends the frozen flow (with its defensive mixture, if any) is checked:
    ``diagnostics()`` reports its Pareto :math:`\hat k` as an importance sampler of the target
    (``"flow k-hat"``) and the importance-sampling ESS (``"flow IS ESS"``), see
    :func:`~pyro_ebm.metrics.flow_importance_diagnostic`; above 0.7 a warning says that the flow
    did not learn the target. After a long warmup the flow's own draws may no longer reach a
    funnel's neck that it misses, so the flow is also checked at the walkers' draws of the
    second half of warmup and, after a run of :class:`~pyro_ebm.infer.MCMC`, at the chains'
    draws (``"flow score k-hat"``, the larger of the two, see
    :func:`~pyro_ebm.metrics.flow_score_diagnostic`), with the same warning above 0.7: on the
    centred eight schools one of the two warnings fired on each of seeds 0-9 with warmups of
    200 and 500 steps (the score check alone on 19 of the 20 runs, :math:`\hat k` on 9), and
    neither on the non-centred model (score check at most 0.56).

    :param model: a Pyro model, or ``None``.
    :param potential_fn: a Pyro ``potential_fn``, or ``None`` (exactly one of the two).
    :param flow: optional flow over the flat unconstrained space (trained in a copy).
    :param num_walkers: size of the warmup ensemble (at least ``num_chains``: with more chains
        than walkers, the ensemble is the chains).
    :param init_scale: the chains start where ``initial_params`` (or a model's init strategy)
        put them; the other walkers, and the chains when no start is known, start at a chain's
        start (zero when none is known) plus ``N(0, init_scale^2 I)`` noise in the
        unconstrained space: broad enough to touch every mode's basin.
    :param global_move: ``"isir"`` or ``"imh"``.
    :param num_particles: i-SIR particles, the most used: during warmup as few as keep a
        walker moving 9 times in 10 (see :class:`~pyro_ebm.samplers.AdaptiveFlowSampler`'s
        ``adapt_num_particles``), and after it, when the frozen flow's Pareto k-hat is at most
        0.5, as few as do so by the importance weights of the end-of-warmup check
        (:func:`~pyro_ebm.samplers.isir_particles`; 2 for a flow close to the target, the
        move then being IMH): each particle costs a potential evaluation per chain and step.
        The i-SIR move accepts with the multiple-try Metropolis rule
        (:func:`~pyro_ebm.samplers.isir_step`).
    :param local_move: ``"mala"`` or ``"hmc"``.
    :param num_local_steps: local moves per cycle.
    :param production_local_steps: local moves per cycle after warmup (``None``: as in warmup).
        ``"auto"`` (default): ``0`` (pure i-SIR, or IMH) when the frozen flow is a good importance
        sampler of the target (Pareto k-hat at most 0.5, the check made at the end of warmup),
        else ``1``. One local move per global move draws the mode weights more precisely per
        draw than three, and the local move takes a chain off a point the flow under-covers;
        with a flow that covers the target, ``0`` gives the most effective draws per second
        and per draw.
    :param min_global_accept: if the ensemble's global acceptance with the flow kept at the end
        of warmup (see :meth:`~pyro_ebm.samplers.AdaptiveFlowSampler.freeze`) is below this, a
        ``production_local_steps`` smaller than ``num_local_steps`` is overridden (with a
        warning) and the warmup's local moves are kept, since a chain with a poor flow moves by
        its local moves.
    :param step_size: initial local step size (adapted during warmup when ``adapt_step_size``).
    :param defensive: after warmup, propose from the flow mixed with a broad Gaussian of this
        weight (a floor on the proposal density, see
        :class:`~pyro_ebm.samplers.DefensiveProposal`); 0 (default) disables it. It is for flows
        whose tails are much too light; it costs effective draws and may not remove occasional
        sticky stretches.
    :param init_strategy: Pyro init strategy for models.
    :param max_plate_nesting: as Pyro's (for models).
    :param target_accept_prob: mean acceptance probability of the local moves that the step-size
        adaptation aims for (``None``: 0.574 for MALA, 0.75 for HMC).
    :param num_steps: leapfrog steps of a local HMC move (``local_move="hmc"``; ``None``: 10;
        with ``local_move="mala"`` an error, rather than ignored).
    :param adapt_step_size: adapt the local step size during warmup (dual averaging toward
        ``target_accept_prob``, then frozen at its average); ``False`` keeps ``step_size``.
    :param sampler_kwargs: further options of :class:`~pyro_ebm.samplers.AdaptiveFlowSampler`
        (``flow_lr``, ``flow_steps``, ``flow_batch_size``, ``history``, ``block_size``,
        ``defensive_scale``, ``standardize``, ``precondition``, ``local_only_cycles``,
        ``forget_transient``, and
        ``reverse_kl_steps``/``reverse_kl_samples`` to add reverse-KL steps to the forward-KL
        fit of each cycle). The first two cycles of warmup make local moves only
        (``local_only_cycles``), so that the first global move is proposed by a flow fitted on
        the walkers. The sampler's ``target_accept`` and ``num_leapfrog`` are the deprecated
        names of ``target_accept_prob`` and ``num_steps`` here (a ``FutureWarning``; passing
        both names is a ``TypeError``).

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MCMC
        >>> from pyro_ebm.datasets import two_to_one
        >>> pot = pyro_ebm.potential_fn(two_to_one().potential)
        >>> mcmc = MCMC(AdaptiveFlowMCMC(potential_fn=pot), num_samples=60, warmup_steps=60,
        ...             num_chains=32, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples(group_by_chain=True)["x"].shape
        torch.Size([32, 60, 2])
    """

    _not_taken = {
        "adapt_mass_matrix": "the flow's standardization preconditions the local moves "
        "(precondition=)",
        "full_mass": "the standardization is dense up to 256 dimensions when the gradients "
        "confirm it (standardize=)",
        "jit_compile": "not offered yet",
    }
    _flow_khat_meaning = (
        "the flow trained during warmup did not learn the target (it misses part of it); its "
        "global moves rarely reach what it misses, the chains get there by local moves only, "
        "and their draws may under-represent it even where the ESS looks fine"
    )
    _flow_khat_advice = (
        "warm up longer (more warmup_steps; more chains give the flow more walkers), non-centre "
        "the model if its posterior is funnel-shaped (a centred hierarchical model), or give a "
        "flow fitted beforehand (flow=...)"
    )

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        num_walkers: int = 64,
        init_scale: float = 2.0,
        global_move: str = "isir",
        num_particles: int = 32,
        local_move: str = "mala",
        num_local_steps: int = 3,
        production_local_steps: int | str | None = "auto",
        min_global_accept: float = 0.1,
        step_size: float = 0.05,
        defensive: float = 0.0,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        target_accept_prob: float | None = None,
        num_steps: int | None = None,
        adapt_step_size: bool = True,
        **sampler_kwargs,
    ) -> None:
        name = type(self).__name__
        # Pyro's options that AdaptiveFlowSampler would refuse without the reason
        self._refuse(
            {k: v for k, v in sampler_kwargs.items() if k in _PYRO_ONLY or k in self._not_taken}
        )
        target_accept_prob = renamed(
            name,
            "target_accept_prob",
            target_accept_prob,
            target_accept_prob is not None,
            "target_accept",
            sampler_kwargs.pop("target_accept", NOT_GIVEN),
        )
        num_steps = renamed(
            name,
            "num_steps",
            num_steps,
            num_steps is not None,
            "num_leapfrog",
            sampler_kwargs.pop("num_leapfrog", NOT_GIVEN),
        )
        if target_accept_prob is not None:
            target_accept_prob = check_real(
                "target_accept_prob", target_accept_prob, 0.0, 1.0, low_open=True, high_open=True
            )
        if num_steps is not None:
            num_steps = check_int("num_steps", num_steps, 1)
            if local_move != "hmc":
                raise ValueError(
                    "num_steps sets the leapfrog steps of local HMC moves: give "
                    f"local_move='hmc' too (local_move={local_move!r} would ignore it)"
                )
        self.target_accept_prob = target_accept_prob
        self.num_steps = num_steps
        self.adapt_step_size = check_flag("adapt_step_size", adapt_step_size)
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        num_walkers = check_int("num_walkers", num_walkers, 2)
        init_scale = check_positive("init_scale", init_scale)
        self.flow = as_flow(flow)
        if self.flow is not None:
            check_proposal(self.flow)
        if isinstance(self.flow, GuideFlow):  # trained, in the model's scale: not re-standardized
            sampler_kwargs.setdefault("standardize", False)
        self.num_walkers = num_walkers
        if production_local_steps is not None and production_local_steps != "auto":
            if isinstance(production_local_steps, str):
                raise ValueError(
                    "production_local_steps must be an integer >= 0, 'auto' or None, got "
                    f"{production_local_steps!r}"
                )
            production_local_steps = check_int("production_local_steps", production_local_steps, 0)
        self.production_local_steps = production_local_steps
        min_global_accept = check_real("min_global_accept", min_global_accept, 0.0, 1.0)
        self.min_global_accept = min_global_accept
        self.init_scale = init_scale
        self.sampler_options = dict(
            global_move=global_move,
            num_particles=num_particles,
            local_move=local_move,
            num_local_steps=num_local_steps,
            step_size=step_size,
            defensive=defensive,
            target_accept=target_accept_prob,
            adapt_step_size=self.adapt_step_size,
            **sampler_kwargs,
        )
        if num_steps is not None:
            self.sampler_options["num_leapfrog"] = num_steps
        # validate the options now rather than at the first chain
        try:
            AdaptiveFlowSampler(lambda x: x.sum(-1), None, **self.sampler_options)
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            unknown = str(err).split("argument")[-1].strip()
            raise TypeError(f"{name} got an unexpected keyword argument {unknown}") from None
        self.flow_: torch.nn.Module | None = None

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        dim, chains = self.target.layout.dim, self.num_chains
        flow = None
        if self.flow is not None:
            check_flow(self.flow, dim, self.target.layout)
            flow = copy.deepcopy(self.flow)
        self.sampler = AdaptiveFlowSampler(self.target.potential, flow, **self.sampler_options)
        if x0 is None and chains == 1:
            x0 = torch.zeros(1, dim, device=self.device)
        # the warmup ensemble: the chains, plus walkers around their starts up to num_walkers
        n = max(self.num_walkers, chains)
        centres = torch.zeros(1, dim, device=self.device) if x0 is None else x0

        def around(m: int) -> Tensor:  # walkers around the chains' starts
            rows = centres[torch.randint(len(centres), (m,), device=centres.device)]
            return rows + self.init_scale * torch.randn_like(rows)

        walkers = centres[torch.arange(n, device=centres.device) % len(centres)]
        walkers = walkers + self.init_scale * torch.randn_like(walkers)
        if x0 is not None:
            walkers[:chains] = x0
        # starts where the potential or its gradient is not finite, or raises, are redrawn
        # (the chains' own only when the user did not give them)
        walkers[:chains] = self._valid_starts(
            self.target.potential, walkers[:chains], True, around
        ).x
        if n > chains:
            walkers[chains:] = valid_starts(
                self.target.potential, walkers[chains:], around, what="the warmup walkers"
            ).x
        self._ensemble = self.sampler.init(walkers)
        self.flow_ = self.sampler.flow
        if self._warmup_steps == 0:  # nothing learned to resample from: the chains' starts
            return self._freeze(self._ensemble, resample=False)
        return _rows(self._ensemble, chains)

    def _freeze(self, ensemble: WalkerState, resample: bool = True) -> WalkerState:
        self.sampler.freeze()  # may restore an earlier flow: see AdaptiveFlowSampler.freeze
        if resample:  # the end of warmup (without warmup: at the first move, see _move)
            proposal = self.sampler._proposal
            made = self.sampler.flow_check if proposal is self.sampler.flow else None
            self._check_flow_quality(proposal, cache=False, check=made)
        accept = self.sampler.final_global_accept or 0.0
        check = self.flow_check
        good = resample and check is not None and check.khat <= GOOD_KHAT
        local_steps = self.production_local_steps
        if local_steps == "auto":  # pure global moves with a flow that covers the target
            local_steps = 0 if good else 1
        known = good and check.log_weights is not None
        if known and self.sampler.adapt_num_particles:  # as many particles as the flow needs
            n = isir_particles(check.log_weights, self.sampler.num_particles)
            self.sampler.num_active_particles = n
        fewer = local_steps is not None and local_steps < self.sampler.num_local_steps
        if fewer and accept < self.min_global_accept:
            # a flow that has not learned the target would leave a chain with few local moves
            logger.warning(
                "AdaptiveFlowMCMC: global acceptance at the end of warmup is %.3f < %.2f; keeping "
                "%d local moves per cycle instead of production_local_steps=%d (a longer warmup "
                "trains the flow better)",
                accept,
                self.min_global_accept,
                self.sampler.num_local_steps,
                local_steps,
            )
            local_steps = None
        if local_steps is not None:
            self.sampler.num_local_steps = local_steps
        self._ensemble = None
        starts = self._production_starts(ensemble.x) if resample else ensemble.x
        return self.sampler.init(starts[: self.num_chains])

    def _production_starts(self, walkers: Tensor) -> Tensor:
        """Where the chains continue after warmup. One chain: walker 0. Several: draws
        resampled by importance weight from the frozen flow (:func:`~pyro_ebm.samplers.
        sir_draws`: rounds of ``num_particles`` candidates per chain, until the weights'
        effective sample size reaches 4 per chain, 16 rounds at most), whose mode weights are right
        even where the ensemble's are not (the flow and the ensemble can drift together toward
        the heavier mode during warmup, and the chains would then carry that excess into their
        draws for as long as they take to mix between modes); the ensemble's own walkers when
        the weights' effective sample size is below the number of chains (a flow that does not
        cover the target). With no warmup the chains start where they were put."""
        chains = self.num_chains
        if chains == 1:
            return walkers[:1]
        candidates = chains * self.sampler.num_particles
        x, ess = sir_draws(
            self.sampler.flow, self.target.potential, chains, candidates, 4 * chains, 16
        )
        if ess < chains:
            logger.warning(
                "AdaptiveFlowMCMC: the flow's importance weights at the end of warmup have an "
                "effective sample size of %.1f for %d chains; the chains continue from the "
                "warmup ensemble",
                ess,
                chains,
            )
            return walkers[:chains]
        return x

    def _restart(self, x: Tensor) -> WalkerState:
        if self._ensemble is not None:  # during warmup: move walker 0 only
            fresh = self.sampler.init(torch.cat([x, self._ensemble.x[1:]]))
            self._ensemble = fresh
            return _rows(fresh, 1)
        return self.sampler.init(x)

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        if warmup:
            self._ensemble, info, is_global = self.sampler.move(self._ensemble, self._t, adapt=True)
            chains = self.num_chains
            state = _rows(self._ensemble, chains)
            info = MoveInfo(*(f[:chains] for f in info))
            if self._t == self._warmup_steps - 1:
                state = self._freeze(self._ensemble)
            return state, info, is_global
        if self._t == 0:  # not in setup: Pyro's MCMC calls setup(0) for its transforms
            if self.flow is None:
                logger.warning("AdaptiveFlowMCMC with warmup_steps=0 and no flow: it is untrained")
            self._check_flow_quality(self.sampler._proposal, cache=False)
        return self.sampler.move(state, self._t, adapt=False)

    def _warmup_positions(self, x: Tensor) -> Tensor:
        """All walkers of the warmup ensemble (the score check's draws)."""
        return self._ensemble.x

    def _extra_logging(self) -> dict:
        return {"step size": f"{float(self.sampler.step_size):.2e}"}


def _rows(state: WalkerState, n: int) -> WalkerState:
    """The first ``n`` walkers of ``state``: the chains of an ensemble."""
    return WalkerState(*(None if f is None else f[:n] for f in state))
