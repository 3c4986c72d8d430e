r"""The shared shell of the ``pyro_ebm`` kernels: Pyro's ``MCMCKernel`` over a batch of chains.

:class:`WalkerKernel` handles what every kernel needs, both inside
:class:`pyro.infer.mcmc.MCMC` (one chain per kernel call) and inside
:class:`pyro_ebm.infer.MCMC` with ``chain_method="vectorized"`` (all chains advance as one
``(num_chains, dim)`` tensor): ``model`` xor ``potential_fn``, Pyro's transforms for constrained
sites, initial parameters (user-given per chain, else from the model's init strategy, else from
the subclass), per-run reset in :meth:`setup` (Pyro's ``MCMC`` reuses the kernel object for
sequential chains), counting warmup steps (``end_warmup`` is never called), ``logging()`` for
the progress bar and ``diagnostics()`` with ``divergences``, per-draw sample statistics kept
in preallocated tensors and the longest run of rejections of each chain (a chain that has
stopped moving). Subclasses implement one move of a ``(num_chains, dim)`` walker state with the
functions of :mod:`pyro_ebm.samplers`.

The flow kernels check their frozen flow once per run (:meth:`TargetKernel._check_flow_quality`):
the Pareto :math:`\hat k` of the flow as an importance sampler of the target and the
importance-sampling ESS (:func:`~pyro_ebm.metrics.flow_importance_diagnostic`), reported by
``diagnostics()`` as ``"flow k-hat"`` and ``"flow IS ESS"``, with a warning above 0.7.

References:

- Vehtari, Simpson, Gelman, Yao, Gabry (2024), "Pareto smoothed importance sampling", JMLR
  25(72), 1-58, https://arxiv.org/abs/1507.02646
- Yao, Vehtari, Simpson, Gelman (2018), "Yes, but did it work?: Evaluating variational
  inference", ICML, https://arxiv.org/abs/1802.02538
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from .._checks import check_int
from ..energy.layout import SiteLayout
from ..metrics.depth import DEPTH_THRESHOLD, DepthCheck, density_depth
from ..metrics.psis import (
    KHAT_THRESHOLD,
    MAX_CHECK_DRAWS,
    FlowCheck,
    flow_importance_diagnostic,
)
from ..metrics.score import ScoreCheck, flow_score_diagnostic
from ..samplers import (
    GOOD_KHAT,
    FlowFit,
    MoveInfo,
    StanWarmup,
    WalkerState,
    diagonal_curvature,
    fit_flow,
    guarded,
    uncounted,
    valid_starts,
)
from .stats import DrawStats
from .target import FlatTarget, make_target

__all__ = [
    "FLOW_CHECK_DRAWS",
    "SCORE_CHECK_DRAWS",
    "StanWarmupKernel",
    "TargetKernel",
    "WalkerKernel",
    "check_flow",
    "check_proposal",
]

logger = logging.getLogger(__name__)

#: draws of the frozen flow for its k-hat check (see
#: :func:`~pyro_ebm.metrics.flow_importance_diagnostic`: at 4096 the sample-size dependent
#: threshold of PSIS is 0.7, and the check costs one batched potential evaluation)
FLOW_CHECK_DRAWS = 4096

#: added to the score check's warning when the flow's own k-hat is good: the check scales the
#: flow's score by the draws' overall spread, which several modes or a thin curved ridge inflate
#: (AdaptiveFlowMCMC read 0.88-0.90 on a posterior with two ridges that it sampled right)
_SCORE_CAVEAT = (
    " If the posterior has several modes or a thin curved ridge, a good flow (as its k-hat says) "
    "can read high here: the check measures the flow's score in the draws' overall spread, which "
    "the distance between the modes inflates; compare the chains' R-hat and the draws instead."
)

#: the most warmup draws (rows, all chains) kept for the score check of the flow
#: (:meth:`WalkerKernel._check_flow_score`): the second half of warmup, thinned to this many
SCORE_CHECK_DRAWS = 4096

#: starts of the flow's fit when neither the user nor the model's init strategy gives any
_FIT_STARTS = 16

#: the reverse-KL budget of a kernel's flow fit: rows of the potential per warmup step and chain
#: (a 500-step warmup of 4 chains: 512,000 rows, 4000 steps of 128 draws; Pyro's 200 steps of one
#: chain: 400 steps)
_FIT_EVALS_PER_STEP = 256


#: Pyro's HMC/NUTS options that no kernel here takes, and why
_PYRO_ONLY = {
    "transforms": "the kernels take a model's transforms from the model (and move in a flow's "
    "latent space where they have one)",
    "ignore_jit_warnings": "jit_compile=True records the graph without Pyro's tracer, whose "
    "warnings this option silences",
    "use_multinomial_sampling": "NUTS here always draws from the trajectory by multinomial "
    "sampling (as Stan)",
    "min_stepsize": "the step size is searched and adapted without bounds",
    "max_stepsize": "the step size is searched and adapted without bounds",
}


class TargetKernel(MCMCKernel):
    r"""What every ``pyro_ebm`` kernel shares: ``model`` xor ``potential_fn``, Pyro's transforms,
    per-chain initial parameters, and the :class:`~pyro_ebm.infer.target.FlatTarget`.

    :param model: a Pyro model, or ``None``; discrete latent sites are enumerated as by Pyro's
        HMC/NUTS (``config_enumerate`` them).
    :param potential_fn: a Pyro ``potential_fn`` (``dict -> scalar``), e.g.
        :func:`pyro_ebm.potential_fn`, or ``None``. Exactly one of ``model`` and
        ``potential_fn`` must be given.
    :param init_strategy: Pyro init strategy for models (default ``init_to_uniform``; kernels
        with a user-given flow start from a draw of the flow instead, see
        :attr:`_starts_from_flow`).
    :param max_plate_nesting: as for Pyro's HMC/NUTS: the model's plate nesting, guessed when
        ``None``; give it for a model with enumerated discrete sites.

    Every kernel takes ``init_strategy`` and ``max_plate_nesting`` after its own options.
    """

    #: without ``initial_params`` or ``init_strategy``, start a model's chain from a draw of the
    #: kernel's flow rather than from Pyro's ``init_to_uniform``: a uniform start in ``[-2, 2]``
    #: of the unconstrained space is far out in the flow's tails, where the importance weight of
    #: an independent proposal's current point can be so large that the chain never leaves it
    _starts_from_flow = False

    #: what a flow k-hat above 0.7 means for this kernel, and what to do (the warning of
    #: :meth:`_check_flow_quality`)
    _flow_khat_meaning = "the flow misses part of the target"
    #: a remedy specific to the kernel, part of the warning's advice (e.g. a defensive component)
    _flow_khat_remedy = ""
    #: the warning's whole advice when a kernel needs its own (else :meth:`_flow_khat_advice_for`)
    _flow_khat_advice: str | None = None

    #: Pyro's options this kernel does not take, and why (beside :data:`_PYRO_ONLY`)
    _not_taken: dict[str, str] = {}

    def _refuse(self, options: dict) -> None:
        """A ``TypeError`` for keyword arguments the kernel does not take, saying why when they
        are Pyro's."""
        for name in options:
            reason = self._not_taken.get(name, _PYRO_ONLY.get(name))
            kernel = type(self).__name__
            if reason is None:
                raise TypeError(f"{kernel}.__init__() got an unexpected keyword argument {name!r}")
            raise TypeError(f"{kernel} does not take Pyro's {name!r} option: {reason}")

    def _flow_khat_advice_for(self, fitted: bool) -> str:
        """What to do when the flow's k-hat is large: for a flow the kernel fitted itself
        (``fitted``) or one it was given."""
        if self._flow_khat_advice is not None:
            return self._flow_khat_advice
        remedy = f"{self._flow_khat_remedy}, " if self._flow_khat_remedy else ""
        if fitted:
            return (
                "the flow was fitted by reverse KL (fit_flow), which covers one mode of a "
                "multimodal target (all chains start from that flow, so R-hat will not show a "
                "missed mode) and cannot follow a funnel: non-centre the model if its "
                f"posterior is funnel-shaped, {remedy}use AdaptiveFlowMCMC (its flow learns from "
                "many walkers) for several modes, or give a flow (flow=...) trained for longer"
            )
        return (
            "give a better flow (train it longer, e.g. with fit_reverse_kl, or use "
            f"AdaptiveFlowMCMC and its trained flow_), {remedy}or non-centre the model if its "
            "posterior is funnel-shaped"
        )

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("exactly one of `model` and `potential_fn` must be given")
        for name, fn in (("model", model), ("potential_fn", potential_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if init_strategy is not None and not callable(init_strategy):
            raise TypeError(
                "init_strategy must be a Pyro init strategy (a callable, e.g. init_to_median), "
                f"got {init_strategy!r}"
            )
        if max_plate_nesting is not None:
            check_int("max_plate_nesting", max_plate_nesting, 0)
        self.max_plate_nesting = max_plate_nesting
        self.model = model
        self.potential_fn = potential_fn
        self.init_strategy = init_strategy
        # MCMC reads kernel.transforms: {} for a bare potential, the model's after setup
        self.transforms = {} if model is None else None
        self._user_initial: dict[str, Tensor] | None = None
        self._initial_params: dict[str, Tensor] | None = None
        self.target: FlatTarget | None = None
        #: the flow-quality check of the current run (flow kernels; ``None`` before it is made)
        self.flow_check: FlowCheck | None = None
        self._flow_check_cache: tuple | None = None
        #: the score check of the current run's flow at the chains' warmup draws (walker
        #: kernels; ``None`` before it is made, or without warmup)
        self.flow_score_check: ScoreCheck | None = None
        self._score_check_cache: tuple | None = None
        #: the score check of the current run's flow at the run's draws (after a run of
        #: :class:`~pyro_ebm.infer.MCMC`, see :meth:`WalkerKernel.check_flow_at_draws`)
        self.flow_draws_check: ScoreCheck | None = None
        self._draws_warned: tuple | None = None  # the flow whose draws check has warned
        #: the density-depth check at the run's draws (walker kernels, after a run of
        #: :class:`~pyro_ebm.infer.MCMC`, see :meth:`WalkerKernel.check_depth`)
        self.depth_check: DepthCheck | None = None
        self._depth_warned: tuple | None = None  # the run (its key) whose depth has warned
        self._checked: tuple | None = None  # (proposal, cache key) of the flow check
        self._run_key: tuple = ()
        #: with ``flow=None``: the flow fitted for the current target (:meth:`_flow_for_run`)
        self.flow_fit: FlowFit | None = None
        self._fit_cache: tuple | None = None
        super().__init__()

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        # MCMC sets this before setup() for each chain: keep it for the next setup only
        self._user_initial = params
        self._initial_params = params

    def _build_target(self, args: tuple, kwargs: dict, num_chains: int | None = None) -> FlatTarget:
        """Build the target; consumes the user's initial params (the next run draws its own
        unless ``MCMC`` sets them again). With ``num_chains``, initial params carry a leading
        chain dimension and ``target.initial`` is ``(num_chains, dim)``; without, ``(dim,)``."""
        self.target = make_target(
            self.model,
            self.potential_fn,
            self._user_initial,
            args,
            kwargs,
            self.init_strategy,
            dim=getattr(getattr(self, "flow", None), "dim", None),
            # a flow to fit starts from the model's init strategy
            model_init=not self._starts_from_flow or getattr(self, "flow", None) in (None, False),
            num_chains=num_chains,
            max_plate_nesting=self.max_plate_nesting,
        )
        self.target.potential.errors.owner = type(self).__name__  # named in its message
        if self.model is not None:
            self.transforms = self.target.transforms
        self._user_initial = None
        self.flow_check = None
        self.flow_score_check = None
        self.flow_draws_check = None
        self.depth_check = None
        self._checked = None
        # what the target depends on, for the flow check's cache (a new run() of
        # pyro_ebm.infer.MCMC passes new tensors: the check is made again)
        self._run_key = (
            id(self.model),
            id(self.potential_fn),
            tuple(_state_key(a) for a in args),
            tuple((k, _state_key(v)) for k, v in sorted(kwargs.items())),
        )
        self._run_refs = (self.model, self.potential_fn, args, kwargs)  # ids stay theirs
        return self.target

    def _flow_for_run(self, starts: Tensor | None) -> object:
        r"""The flow of this run: the user's ``flow`` (checked), or with ``flow=None`` one fitted
        to the target by :func:`~pyro_ebm.samplers.fit_flow` from ``starts`` (``(n, D)``, e.g.
        the model's init strategy; else uniform in :math:`[-2, 2]^D`; non-finite ones redrawn),
        kept in :attr:`flow_` and :attr:`flow_fit`. One fit per target: the chains that Pyro's
        ``MCMC`` sets up one at a time share it."""
        dim = self.target.layout.dim
        if self.flow is not None:
            check_flow(self.flow, dim, self.target.layout)
            return self.flow
        if self._fit_cache is not None and self._fit_cache[0] == self._run_key:
            self.flow_fit = self._fit_cache[1]
        else:
            device = _device_of(self.target.potential) if starts is None else starts.device

            def uniform(n: int) -> Tensor:
                return 4.0 * torch.rand(n, dim, device=device) - 2.0

            starts = uniform(_FIT_STARTS) if starts is None else starts.reshape(-1, dim)
            sites = ", ".join(repr(s) for s in self.target.layout.site_names)
            starts = valid_starts(
                self.target.potential,
                starts.detach(),
                uniform,
                with_grad=False,
                what=f"the starts of the flow's fit (sites {sites})",
            ).x
            chains = getattr(self, "num_chains", 1)
            budget = _FIT_EVALS_PER_STEP * max(1, self._warmup_steps) * chains
            with uncounted(self.target.potential):  # not the chains' moves
                self.flow_fit = fit_flow(self.target.potential, starts, max_evals=budget)
            self._fit_cache = (self._run_key, self.flow_fit, self._run_refs)
            fit = self.flow_fit
            logger.info(
                "%s: fitted a flow (%s) in %.1f s, %d reverse-KL steps: k-hat %.2f, IS ESS "
                "%.0f of %d",
                type(self).__name__,
                " + ".join(fit.stages),
                fit.seconds,
                fit.steps,
                fit.khat,
                fit.ess,
                fit.num_draws,
            )
        self.flow_ = self.flow_fit.flow
        return self.flow_

    def _check_flow_quality(
        self, proposal, flow=None, cache: bool = True, check: FlowCheck | None = None
    ) -> FlowCheck:
        r"""Check the kernel's frozen flow once per run: the Pareto :math:`\hat k` and IS ESS of
        ``proposal`` as an importance sampler of the target
        (:func:`~pyro_ebm.metrics.flow_importance_diagnostic` with :data:`FLOW_CHECK_DRAWS`
        draws, up to :data:`~pyro_ebm.metrics.MAX_CHECK_DRAWS` near 0.7), kept in
        :attr:`flow_check` for ``diagnostics()``; a warning when :math:`\hat k > 0.7` says what
        it means for this kernel and what to do.

        With ``cache``, a check of the same ``flow`` (default ``proposal``; parameters
        unchanged) on the same target (same model or potential and arguments) is reused, so that
        the chains of one run that Pyro's ``MCMC`` sets up one at a time share one check and
        one warning. ``check``: a check of ``proposal`` already made (no new draws).
        """
        flow = proposal if flow is None else flow
        key = (self._run_key, _state_key(flow), type(self).__name__)
        self._checked = (proposal, key if cache else None)  # for the score check
        if cache and self._flow_check_cache is not None and self._flow_check_cache[0] == key:
            self.flow_check = self._flow_check_cache[1]
            return self.flow_check
        fit = self.flow_fit
        if check is None and fit is not None and proposal is fit.flow:  # checked by the fit
            check = fit.check
        elif check is None:
            with uncounted(self.target.potential):
                check = flow_importance_diagnostic(
                    proposal, self.target.potential, FLOW_CHECK_DRAWS, max_draws=MAX_CHECK_DRAWS
                )
        self.flow_check = check
        self._flow_check_cache = (key, check) if cache else None
        if not check.khat <= KHAT_THRESHOLD:  # nan too
            if check.ess >= 0.5 * check.num_draws:  # the bulk is fine: a few huge weights
                remedy = f"{self._flow_khat_remedy}, or " if self._flow_khat_remedy else ""
                meaning = (
                    "the importance-sampling ESS is high, so the flow fits the bulk of the "
                    "target, but a tail of the target is heavier than the flow's (often a "
                    "half-Cauchy scale, a Student-t's degrees of freedom, or a bounded "
                    "parameter near its bound), which the draws may under-represent"
                )
                advice = f"{remedy}compare the draws' tails with a longer run"
            else:
                meaning = self._flow_khat_meaning
                advice = self._flow_khat_advice_for(
                    fit is not None and getattr(self, "flow", 0) is None
                )
            logger.warning(
                "%s: the flow's Pareto k-hat as an importance sampler of the target is %.3f > "
                "%.1f (importance-sampling ESS %.1f of %d draws): %s. What to do: %s.",
                type(self).__name__,
                check.khat,
                KHAT_THRESHOLD,
                check.ess,
                check.num_draws,
                meaning,
                advice,
            )
        return check

    def _flow_diagnostics(self) -> dict:
        """``{"flow k-hat": ..., "flow IS ESS": ..., "flow IS draws": ...}`` once the flow is
        checked, else ``{}``; with ``"flow score k-hat"`` once a score check is made: the larger
        of the checks at the warmup draws and at the run's draws (``nan`` only if both are)."""
        out = {}
        if self.flow_check is not None:
            check = self.flow_check
            out = {
                "flow k-hat": check.khat,
                "flow IS ESS": check.ess,
                "flow IS draws": check.num_draws,
            }
        scores = [c.khat for c in (self.flow_score_check, self.flow_draws_check) if c is not None]
        if scores:
            finite = [k for k in scores if not math.isnan(k)]
            out["flow score k-hat"] = max(finite) if finite else math.nan
        return out


class WalkerKernel(TargetKernel):
    r"""Base class: a Pyro kernel whose chains are walkers of the vectorized core.

    In Pyro's :class:`~pyro.infer.mcmc.MCMC` each kernel call moves one chain; in
    :class:`pyro_ebm.infer.MCMC` (``chain_method="vectorized"``) :meth:`setup_chains` and
    :meth:`step_chains` move all chains at once. Takes the arguments of :class:`TargetKernel`.
    """

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Pyro's entry point: one chain (initial params without a chain dimension)."""
        if self._user_initial is not None:
            self._user_initial = {k: v[None] for k, v in self._user_initial.items()}
        self.setup_chains(1, warmup_steps, args, kwargs)
        self._last = self.target.layout.unflatten(self._positions(self._state)[0])
        self._initial_params = self._last

    def setup_chains(
        self,
        num_chains: int,
        warmup_steps: int,
        args: tuple = (),
        kwargs: dict | None = None,
        num_samples: int | None = None,
    ) -> None:
        r"""Start ``num_chains`` chains.

        :param num_chains: number of chains, advanced together.
        :param warmup_steps: moves that adapt before the draws start.
        :param args, kwargs: the model's arguments.
        :param num_samples: draws after warmup, when known (to preallocate the statistics).

        Initial params set before (``kernel.initial_params = ...``) carry a leading chain
        dimension of size ``num_chains``.
        """
        self.num_chains = check_int("num_chains", num_chains, 1)
        self._warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        #: the user gave the starts: they are checked, never redrawn
        self._starts_given = self._user_initial is not None
        x0 = self._build_target(tuple(args), dict(kwargs or {}), num_chains).initial
        #: where chains with no given start begin: the start's device, else the energy's
        self.device = x0.device if x0 is not None else _device_of(self.target.potential)
        self._t = 0
        self._warmup_draws: list[Tensor] = []
        self._driver_draws: list[Tensor] = []  # a chain's draws under Pyro's driver (sample())
        self._driver_every = 1
        self.stats = DrawStats(num_chains, 1024 if num_samples is None else num_samples)
        self._accept_sums = {"global": [0.0, 0], "local": [0.0, 0]}  # for the progress bar
        self._state = self._setup_chain(x0)

    def step_chains(self) -> tuple[Tensor, MoveInfo, bool]:
        r"""Move every chain once; returns the flat positions ``(num_chains, dim)``, the move's
        :class:`~pyro_ebm.samplers.MoveInfo` and whether it was a global move. Statistics of
        post-warmup moves are recorded in :attr:`stats`."""
        warmup = self._t < self._warmup_steps
        if self._t == self._warmup_steps:  # the progress bar shows the draws' rates from here
            self._accept_sums = {"global": [0.0, 0], "local": [0.0, 0]}
        self._state, info, is_global = self._move(self._state, warmup)
        kind = self._accept_sums["global" if is_global else "local"]
        kind[0] = kind[0] + info.accept_prob.detach().mean()  # a tensor: no sync per step
        kind[1] += 1
        if not warmup:
            self.stats.record(info, is_global)
        x = self._positions(self._state)
        if warmup and self._warmup_steps // 2 <= self._t < self._warmup_steps - 1:
            self._keep_warmup_draws(x)  # (the last warmup move may already freeze the flow)
        self._t += 1
        if self._t == self._warmup_steps:
            self._check_flow_score()
        return x, info, is_global

    def _keep_warmup_draws(self, x: Tensor) -> None:
        """Keep the chains' positions ``x`` (:meth:`_warmup_positions`) of the second half of
        warmup, thinned to at most :data:`SCORE_CHECK_DRAWS` rows, for the score check of a
        kernel with a flow."""
        if getattr(self, "flow", False) is False:  # MALA, ChEESHMC(flow=False): no flow
            return
        x = self._warmup_positions(x)
        half = self._warmup_steps - self._warmup_steps // 2
        every = max(1, math.ceil(half * x.shape[0] / SCORE_CHECK_DRAWS))
        if (self._t - self._warmup_steps // 2) % every == 0:
            self._warmup_draws.append(x.detach())

    def _check_flow_score(self) -> None:
        r"""At the end of warmup, check the frozen flow (the proposal of the flow check) from the
        target's side: :func:`~pyro_ebm.metrics.flow_score_diagnostic` at the chains' draws of
        the second half of warmup, kept in :attr:`flow_score_check` for ``diagnostics()``
        (``"flow score k-hat"``); above 0.7 a warning says that the flow misses the shape of
        the target where the chains went, what that means for this kernel and what to do (or,
        when the k-hat check has warned already, only the value).
        Reused, as the flow check, by the chains of one run that Pyro's ``MCMC`` sets up one
        at a time."""
        draws, self._warmup_draws = self._warmup_draws, []
        if self._checked is None or not draws:
            return
        proposal, key = self._checked
        cache = self._score_check_cache
        if key is not None and cache is not None and cache[0] == key:
            self.flow_score_check = cache[1]
            return
        with uncounted(self.target.potential):  # the check's gradients are not the chains'
            check = flow_score_diagnostic(proposal, self.target.potential, torch.cat(draws))
        self.flow_score_check = check
        self._score_check_cache = (key, check) if key is not None else None
        self._warn_flow_score(check, "the chains' warmup draws", self.flow_check.khat)

    def check_draws(self, draws: Tensor) -> None:
        r"""After a run: the checks at the run's draws ``(num_chains, num_samples, dim)`` (the
        chains' positions in the flat unconstrained space; one chain's, for each chain of a
        ``"sequential"`` run), which :class:`~pyro_ebm.infer.MCMC` calls when its chains have
        finished (under Pyro's ``MCMC``, :meth:`diagnostics` calls it with the chain's draws,
        at most :data:`SCORE_CHECK_DRAWS`, evenly thinned): the flow's score
        (:meth:`check_flow_at_draws`, flow kernels) and the density depth
        (:meth:`check_depth`, every kernel)."""
        self.check_flow_at_draws(draws)
        self.check_depth(draws)

    def check_depth(self, draws: Tensor) -> DepthCheck | None:
        r"""After a run: how far below the draws' lowest potential L-BFGS goes from there, per
        dimension (:func:`~pyro_ebm.metrics.density_depth`, at up to :data:`SCORE_CHECK_DRAWS`
        of the ``(num_chains, num_samples, dim)`` draws), kept in :attr:`depth_check` and
        reported by ``diagnostics()["density depth"]``.

        Above 2 (:data:`~pyro_ebm.metrics.DEPTH_THRESHOLD`, twice the most of a log-concave
        target) the target has points of far higher density than every draw: a funnel's neck or a
        spike that the chains did not reach, which no check made at draws can see (R-hat,
        ESS, a flow's k-hat and score). A warning then says so, once per run, naming the site
        the descent went furthest along. On the centred eight schools it read 4.1-6.8 for
        every kernel and seed tried, on 15 posteriors without a funnel at most 0.38. Returns
        the check (``None`` without draws)."""
        if draws.numel() == 0:
            return None
        potential = self._checks_potential()
        with uncounted(potential):  # not the chains' evaluations
            check = density_depth(potential, _thinned(draws))
        self.depth_check = check
        if check.depth > DEPTH_THRESHOLD and self._depth_warned != self._run_key:
            self._depth_warned = self._run_key  # the other chains of this run say nothing
            self._warn_depth(check)
        return check

    def _warn_depth(self, check: DepthCheck) -> None:
        """The warning of :meth:`check_depth` above the threshold: where the descent went, what
        it means for this kernel and what to do."""
        site = self.target.layout.name_of(check.coordinate)
        if self._checked is not None:  # a flow kernel
            checks = {
                "k-hat": self.flow_check,
                "score at the warmup draws": self.flow_score_check,
                "score at the draws": self.flow_draws_check,
            }
            values = {name: c.khat for name, c in checks.items() if c is not None}
            read = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
            meaning = f"{self._flow_khat_meaning}; the flow's checks read {read}"
            if all(v <= KHAT_THRESHOLD for v in values.values()):
                meaning += f", at most {KHAT_THRESHOLD}: they are made where the draws went"
                meaning += ", and cannot see it"
        else:
            example = "" if check.at_mode else " (e.g. small scales)"
            meaning = (
                "the chains rarely or never enter it, so their draws under-represent it"
                f"{example}, which R-hat and the ESS need not show"
            )
        non_centre = (
            "non-centre the model if it is a centred hierarchical one (theta = mu + tau * z "
            "with z ~ Normal(0, 1), e.g. pyro.infer.reparam.LocScaleReparam)"
        )
        if check.at_mode:  # the descent converged: a mode, or a neck with a bottom
            what = (
                "The descent stopped at a local mode (the gradient vanishes there): a mode "
                "that the chains did not find, a narrow spike, or the bottom of a funnel's neck"
            )
            advice = (
                f"{non_centre}; otherwise start chains near that point "
                "(kernel.depth_check.point, unconstrained; e.g. init_to_value) and from more "
                "places (more chains; AdaptiveFlowMCMC's walkers can cover several modes), and "
                "compare the runs: the draws may have missed much of the mass"
            )
        else:
            what = (
                "It was still going down when it stopped: this is a funnel's neck (a centred "
                "hierarchical model whose scale can shrink towards 0) or a narrow spike, which "
                "the chains did not reach"
            )
            advice = (
                f"{non_centre}; otherwise read estimates involving {site.split('[')[0]} with "
                "caution and compare longer runs"
            )
        logger.warning(
            "%s: the target has points of far higher density than any draw: going down the "
            "potential from the draws' lowest point (%.1f), L-BFGS reached %.1f, %.2f nats "
            "of log density per dimension lower (diagnostics()['density depth']; a "
            "log-concave target goes at most 1 per dimension below its draws), ending with %s "
            "(unconstrained) %.1f standard deviations of the draws %s their mean. %s: %s. "
            "What to do: %s.",
            type(self).__name__,
            check.draws_potential,
            check.point_potential,
            check.depth,
            site,
            abs(check.distance),
            "below" if check.distance < 0 else "above",
            what,
            meaning,
            advice,
        )

    def check_flow_at_draws(self, draws: Tensor) -> ScoreCheck | None:
        r"""After a run: the score check of the frozen flow at the run's draws.

        Called through :meth:`check_draws` once the chains have finished, with ``draws``
        ``(num_chains, num_samples, dim)``, the chains' positions in the flat unconstrained
        space (one chain's, for each chain of a ``"sequential"`` run or of Pyro's driver). It
        checks the flow of
        the k-hat check by :func:`~pyro_ebm.metrics.flow_score_diagnostic` at up to
        :data:`SCORE_CHECK_DRAWS` of the draws (every k-th draw of each chain), keeps it in
        :attr:`flow_draws_check` (``diagnostics()["flow score k-hat"]`` is then the larger of
        the two score checks) and, above 0.7, warns as the check at the end of warmup does,
        unless a check of this flow in this run has warned already.

        The draws reach further than warmup's, where a flow fails (a funnel's neck), and an
        independence kernel's chain that stuck there repeats its point, as the Markov chain's
        average should: on the centred eight schools this check fired on runs whose warmup
        checks read below 0.7. Returns the check (``None`` for a kernel without a checked flow
        or without draws).
        """
        if self._checked is None or draws.numel() == 0:
            return None
        proposal, key = self._checked
        with uncounted(self.target.potential):  # not the chains' gradients
            check = flow_score_diagnostic(proposal, self.target.potential, _thinned(draws))
        self.flow_draws_check = check
        warmup = self.flow_score_check
        earlier = [self.flow_check.khat] + ([warmup.khat] if warmup is not None else [])
        if key is not None and self._draws_warned == key:  # an earlier chain's draws warned
            return check
        if all(k <= KHAT_THRESHOLD for k in earlier):  # else the warning was given at warmup
            if self._warn_flow_score(check, "the draws", self.flow_check.khat, warmup):
                self._draws_warned = key
        return check

    def _warn_flow_score(
        self, check: ScoreCheck, where: str, own: float, warmup: ScoreCheck | None = None
    ) -> bool:
        """Warn when the score ``check`` (made at ``where``) reads above 0.7: what it means for
        this kernel and what to do, or only the value when the flow's own k-hat ``own`` has
        warned already; ``warmup``: the check at the warmup draws, quoted. Returns whether it
        warned."""
        if not check.khat > KHAT_THRESHOLD:
            return False
        if not own <= KHAT_THRESHOLD:  # its warning has said what it means and what to do
            logger.warning(
                "%s: the flow's score at %d of %s also reads as a Pareto k-hat of %.3f > %.1f "
                "(diagnostics()['flow score k-hat']).",
                type(self).__name__,
                check.num_draws,
                where,
                check.khat,
                KHAT_THRESHOLD,
            )
            return True
        fit = self.flow_fit
        logger.warning(
            "%s: at %d of %s the flow's score (the gradient of its log density) departs from "
            "the target's as much as that of a Gaussian proposal with Pareto k-hat %.3f > %.1f "
            "(diagnostics()['flow score k-hat']; %sthe flow's own draws gave k-hat %.2f: they "
            "rarely reach where it misses the target's shape, e.g. a funnel's neck or a tail "
            "longer than the flow's): %s. What to do: %s.%s",
            type(self).__name__,
            check.num_draws,
            where,
            check.khat,
            KHAT_THRESHOLD,
            "" if warmup is None else f"at the warmup draws it read {warmup.khat:.2f}; ",
            own,
            self._flow_khat_meaning,
            self._flow_khat_advice_for(fit is not None and getattr(self, "flow", 0) is None),
            _SCORE_CAVEAT if own <= GOOD_KHAT else "",
        )
        return True

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pyro's entry point: one move of the (single) chain."""
        if params is not self._last:  # moved by someone else: restart from there
            self._state = self._restart(self.target.layout.flatten(params).detach()[None])
        x, _, _ = self.step_chains()
        self._last = self.target.layout.unflatten(x[0])
        drawn = self._t - self._warmup_steps  # draws so far
        if drawn > 0 and (drawn - 1) % self._driver_every == 0:  # for the checks at the draws
            self._driver_draws.append(x.detach())
            if len(self._driver_draws) > SCORE_CHECK_DRAWS:  # keep every other, and thin more
                self._driver_draws = self._driver_draws[::2]
                self._driver_every *= 2
        return self._last

    def logging(self) -> OrderedDict:
        out = OrderedDict()
        for kind, (total, count) in self._accept_sums.items():
            if count:
                out[f"acc. {kind}"] = f"{float(total) / count:.3f}"
        out.update(self._extra_logging())
        return out

    def diagnostics(self, chain: int = 0) -> dict:
        r"""Of chain ``chain`` (Pyro calls it with one chain): ``divergences`` (post-warmup draw
        indices whose proposal had a non-finite potential), the post-warmup acceptance rates
        (see :meth:`DrawStats.diagnostics`), ``potential errors`` (how often the potential
        raised at the chains' moves, warmup included, not at the draws of a flow's fit or
        checks, and the point was rejected; with vectorized chains the count of all chains,
        which are evaluated as one batch), ``nan gradients`` (points with a finite potential
        and a NaN gradient, rejected too; counted likewise) and ``sample_stats``: per-draw
        tensors of :data:`SAMPLE_STATS`; ``longest rejection run`` and ``stuck`` (see
        :meth:`DrawStats.diagnostics`); for the flow kernels, once the flow is frozen,
        ``flow k-hat``, ``flow IS ESS`` and ``flow IS draws`` (see :meth:`_check_flow_quality`:
        one check for all chains of a vectorized run), and at the end of warmup
        ``flow score k-hat`` (see :meth:`_check_flow_score`; after a run of
        :class:`~pyro_ebm.infer.MCMC` the larger of it and the check at the draws, see
        :meth:`check_flow_at_draws`), and ``density depth`` after a run (see
        :meth:`check_depth`). Under Pyro's ``MCMC``, which calls this once a chain has finished,
        the first call makes the checks at that chain's draws (:meth:`check_draws`)."""
        if getattr(self, "_driver_draws", None):  # Pyro's driver: the chain has finished
            draws, self._driver_draws = torch.cat(self._driver_draws), []
            self.check_draws(draws[None])
        return {
            **self.stats.diagnostics(chain),
            "potential errors": self.target.potential.errors.count,
            "nan gradients": int(self.target.potential.errors.nan_gradients),
            **self._flow_diagnostics(),
            **({} if self.depth_check is None else {"density depth": self.depth_check.depth}),
        }

    # -- subclass hooks ----------------------------------------------------------------------
    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        """Reset per-run state and return the initial state of :attr:`num_chains` chains;
        ``x0`` is ``(num_chains, dim)`` or ``None`` when neither the user nor the model gave a
        start."""
        raise NotImplementedError

    def _restart(self, x: Tensor) -> WalkerState:
        """A fresh state at ``x`` ``(1, dim)`` (Pyro's driver moved the chain)."""
        raise NotImplementedError

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        """One move; returns ``(state, info, is_global)``."""
        raise NotImplementedError

    def _valid_starts(
        self,
        potential: Callable[[Tensor], Tensor],
        x0: Tensor,
        with_grad: bool = True,
        redraw: Callable[[int], Tensor] | None = None,
    ) -> WalkerState:
        """The chains' initial state at ``x0`` (in the coordinates ``potential`` takes), each
        start whose potential or gradient is not finite, or raised, redrawn by ``redraw``
        (default: uniform in ``[-2, 2]`` per coordinate, as Pyro's ``init_to_uniform`` in the
        unconstrained space) up to 100 times; starts the user gave are checked, not redrawn
        (see :func:`~pyro_ebm.samplers.valid_starts`)."""
        if redraw is None:

            def redraw(n: int) -> Tensor:
                return 4.0 * torch.rand(n, x0.shape[-1], dtype=x0.dtype, device=x0.device) - 2.0

        sites = ", ".join(repr(s) for s in self.target.layout.site_names)
        what = f"the chains' {'given ' if self._starts_given else ''}starts (sites {sites})"
        return valid_starts(
            guarded(potential, self.target.potential.errors),
            x0,
            None if self._starts_given else redraw,
            with_grad,
            what=what,
        )

    def _checks_potential(self) -> Callable[[Tensor], Tensor]:
        """The potential of the flat unconstrained space for the checks after a run (a kernel
        that compiled it gives the compiled one)."""
        return self.target.potential

    def _positions(self, state: WalkerState) -> Tensor:
        """The chains' positions in the flat unconstrained space (``state.x`` unless the kernel
        moves in other coordinates, e.g. a flow's latent space)."""
        return state.x

    def _warmup_positions(self, x: Tensor) -> Tensor:
        """Draws of the current warmup step for the score check: the chains' positions ``x`` (a
        kernel with more walkers than chains gives them all)."""
        return x

    def _extra_logging(self) -> dict:
        return {}


class StanWarmupKernel(WalkerKernel):
    r"""Base class of the gradient kernels with Stan's warmup
    (:class:`~pyro_ebm.samplers.StanWarmup`: the step size by dual averaging, a windowed mass
    matrix): :class:`~pyro_ebm.infer.MALA`, :class:`~pyro_ebm.infer.FlowHMC` and
    :class:`~pyro_ebm.infer.FlowNUTS`. A subclass sets ``initial_step_size``,
    ``target_accept_prob``, ``adapt_step_size``, ``adapt_mass_matrix``, ``full_mass`` and
    ``_potential``, and implements :meth:`_trial`; ``per_chain_step_size`` gives each chain its
    own step size."""

    _warmup: StanWarmup | None = None
    per_chain_step_size: bool = False

    @property
    def step_size(self) -> float | Tensor:
        """The current step size (before :meth:`setup`, the initial one); with a step size per
        chain and several chains, a ``(C,)`` tensor."""
        if self._warmup is None:
            return self.initial_step_size
        step_size = self._warmup.step_size
        if isinstance(step_size, Tensor) and step_size.numel() > 1:
            return step_size
        return float(step_size)

    def _step_size_text(self) -> str:
        """The step size for the progress bar (per chain: the smallest and the largest)."""
        step_size = self.step_size
        if isinstance(step_size, Tensor):
            return f"{float(step_size.min()):.2e}-{float(step_size.max()):.2e}"
        return f"{step_size:.2e}"

    @property
    def inverse_mass_matrix(self) -> Tensor | None:
        r"""The current inverse mass matrix :math:`A` over the coordinates the chains move in:
        ``(D,)`` or ``(D, D)`` (``full_mass``); ``None`` before :meth:`setup`."""
        return None if self._warmup is None else self._warmup.inverse_mass

    def _start_warmup(self, device: torch.device, trial_threshold: float | None = None) -> None:
        """A fresh warmup for this run (the initial step size, an identity mass)."""
        self._warmup = StanWarmup(
            self.target.layout.dim,
            self._warmup_steps,
            self.initial_step_size,
            self.target_accept_prob,
            self.adapt_step_size,
            self.adapt_mass_matrix,
            self.full_mass,
            device,
            trial_threshold,
            self.per_chain_step_size,
        )

    def _trial(self, state: WalkerState, step_size: float) -> Tensor:
        """Acceptance probabilities ``(C,)`` of one trial move from ``state`` (the search for a
        reasonable step size)."""
        raise NotImplementedError

    def _curvature(self, mean: Tensor) -> Tensor:
        """The potential's diagonal curvature at the window's mean: a floor on the variances
        (see :meth:`~pyro_ebm.samplers.MassMatrixAdapter.update`)."""
        return diagonal_curvature(self._potential, mean)

    def _adapt(self, state: WalkerState, info: MoveInfo) -> None:
        """After a warmup move: update the step size and the mass matrix."""
        self._warmup.update(self._t, state, info.accept_prob, self._trial, self._curvature)


def _thinned(draws: Tensor) -> Tensor:
    """Every k-th draw of each chain of ``draws`` ``(num_chains, num_samples, dim)``, at most
    :data:`SCORE_CHECK_DRAWS` rows in all, as ``(n, dim)``: the rows of the checks at a run's
    draws."""
    every = max(1, math.ceil(draws.shape[0] * draws.shape[1] / SCORE_CHECK_DRAWS))
    return draws[:, ::every].reshape(-1, draws.shape[-1]).detach()


def _state_key(obj) -> tuple:
    """Identity of ``obj`` and, for a module or tensor, of its values (tensor versions count
    in-place updates, e.g. an optimizer's steps); numbers and strings by value, tuples and lists
    item by item."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return (obj,)
    if isinstance(obj, tuple | list):
        return tuple(_state_key(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        tensors = (*obj.parameters(), *obj.buffers())
        return (id(obj), tuple(t._version for t in tensors))
    if isinstance(obj, Tensor):
        return (id(obj), obj._version)
    inner = getattr(obj, "flow", None)  # e.g. a DefensiveProposal
    return (id(obj),) if inner is None else (id(obj), _state_key(inner))


def _device_of(potential: Callable) -> torch.device:
    """The device of a potential's tensors (an energy module's, or its ``energy``'s, under a
    :class:`~pyro_ebm.samplers.GuardedPotential`), else the CPU."""
    inner = getattr(potential, "potential", potential)
    for owner in (inner, getattr(inner, "energy", None)):
        if isinstance(owner, torch.nn.Module):
            for tensor in (*owner.parameters(), *owner.buffers()):
                return tensor.device
    return torch.device("cpu")


def check_proposal(flow) -> None:
    """Raise ``TypeError`` unless ``flow`` offers what a proposal needs (checked when a kernel
    is built; :func:`check_flow` checks its dimension and sites at the run)."""
    if not (hasattr(flow, "sample_and_log_prob") and hasattr(flow, "log_prob")):
        raise TypeError(
            "flow must offer sample_and_log_prob(n) and log_prob(x), e.g. RealNVP, or be a "
            f"Pyro AutoContinuous guide, got {type(flow).__name__}"
        )


def check_flow(flow, dim: int, layout: SiteLayout | None = None) -> None:
    """Raise if ``flow`` cannot serve as a proposal over the ``dim``-dimensional flat space
    (with ``layout``, the target's sites: a flow that names its sites, a
    :class:`~pyro_ebm.flows.GuideFlow`, must have the same sites in the same order)."""
    check_proposal(flow)
    sites = getattr(flow, "site_shapes", None)
    if (
        layout is not None
        and sites is not None
        and list(sites.items()) != list(layout.site_shapes.items())
    ):
        ours = dict(layout.site_shapes)
        raise ValueError(
            f"flow (a {type(flow).__name__}) is over the sites {sites} but the model's latent "
            f"sites are {ours}, in this order: train the guide on the same model"
        )
    flow_dim = getattr(flow, "dim", dim)
    if flow_dim != dim:
        raise ValueError(f"flow has dim {flow_dim} but the target has {dim} unconstrained dims")
