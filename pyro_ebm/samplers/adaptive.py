r"""Adaptive global-local sampling: fit the flow online on the walkers, then freeze it.

This is the flowMC algorithm (Gabrié et al. 2022; Wong et al. 2023) on the vectorized core:
during a *training phase* every iteration makes one global flow move (i-SIR or IMH) and
``num_local_steps`` local moves (MALA or HMC) for all walkers, adapts the local step size, stores
the walkers in a history buffer and takes a few maximum-likelihood (forward KL) gradient steps of
the flow on that history (in coordinates standardized by the history's mean and a
per-coordinate scale, as flowMC does), optionally followed by reverse-KL steps on the flow's own
draws, which need no walkers. The walkers start spread out, so between them they find modes that
no single local chain would visit; the global moves then move mass between modes so that the
history, and so the flow, come to carry the right relative weights. In the *production phase*
the flow and the step size are frozen and the same moves form a valid (time-homogeneous) MCMC
kernel.

References:

- Gabrié, Rotskoff, Vanden-Eijnden (2022), https://arxiv.org/abs/2105.12603
- Wong, Gabrié, Foreman-Mackey (2023), https://arxiv.org/abs/2211.06397
- Samsonov et al. (2022), https://arxiv.org/abs/2111.02702 (i-SIR in global-local kernels)
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_choice, check_flag, check_int, check_positive, check_real
from ..flows import RealNVP, Standardized, forward_kl_step, reverse_kl_step
from ..metrics.psis import FlowCheck, flow_importance_diagnostic, sharpened
from .adaptation import StepSizeAdapter, stationary_start
from .composite import GlobalLocalInfo, cycle_info, global_local_move
from .flow_fit import DENSE_MAX_DIM
from .flow_moves import (
    DefensiveProposal,
    FlowProposals,
    _with_log_q,
    imh_step,
    isir_particles,
    isir_step,
    log_weights,
    move_probability,
)
from .guard import uncounted
from .local import hmc_step, mala_step
from .state import MoveInfo, PotentialFn, WalkerState, init_state

__all__ = ["AdaptiveFlowSampler", "AdaptiveRun", "default_flow"]


def default_flow(dim: int) -> nn.Module:
    r"""The flow :class:`AdaptiveFlowSampler` builds when none is given: a RealNVP started at the
    identity, 6 coupling layers of two hidden layers of 64 units.

    The width does not grow with the dimension: the flow is fitted on a history of a few
    thousand walker positions, which a wider network overfits, and each fit and proposal costs
    the square of the width."""
    return RealNVP(dim, num_layers=6, hidden=(64, 64))


class AdaptiveRun(NamedTuple):
    r"""Result of :meth:`AdaptiveFlowSampler.run`.

    :param samples: production draws ``(num_samples, C, D)`` (one per global-local iteration).
    :param global_accept: mean acceptance probability of the global move, per iteration
        (training then production), ``(num_adapt_steps + num_samples,)``.
    :param local_accept: same for the local moves.
    :param state: final walker state (to continue sampling).
    """

    samples: Tensor
    global_accept: Tensor
    local_accept: Tensor
    state: WalkerState


class AdaptiveFlowSampler:
    r"""Global-local MCMC whose flow proposal is trained online on the walkers (flowMC).

    :param potential_fn: batched potential ``U``, ``(C, D) -> (C,)``.
    :param flow: an ``nn.Module`` flow with ``sample_and_log_prob``, ``log_prob`` and parameters
        (e.g. :class:`pyro_ebm.flows.RealNVP`). It is trained in place during the training phase.
        When ``None``, :func:`default_flow` builds one from the walkers' dimension in
        :meth:`init`.
    :param global_move: ``"isir"`` (default; robust when the flow is rough) or ``"imh"``.
    :param num_particles: particles ``N`` of i-SIR (``N - 1`` fresh proposals per step); with
        ``adapt_num_particles``, the most it uses during training.
    :param local_move: ``"mala"`` (default) or ``"hmc"``.
    :param num_local_steps: local moves after each global move.
    :param step_size: initial local step size (adapted during training when
        ``adapt_step_size``).
    :param target_accept: target acceptance of the local move (default 0.574 for MALA, 0.75 for
        HMC).
    :param num_leapfrog: leapfrog steps per HMC move.
    :param flow_lr: Adam learning rate of the flow for the first 25 training cycles; it then
        decays as ``1 / cycle`` (:attr:`current_flow_lr`; a Robbins-Monro schedule, so the
        adaptation diminishes). At a constant rate the fit can drift over a long warmup, the
        walkers drifting with it into the heavier mode.
    :param flow_steps: flow gradient steps per training iteration.
    :param flow_batch_size: minibatch size of each flow step, drawn from the history.
    :param reverse_kl_steps: reverse-KL gradient steps (:func:`~pyro_ebm.flows.reverse_kl_step`,
        :math:`E_q[\log q + U]` on ``reverse_kl_samples`` reparameterised flow draws) after the
        forward-KL steps of each training cycle; 0 (default) fits by forward KL only. Reverse KL
        needs a differentiable potential; it teaches the flow the target's shape where the
        walkers are too few to show it (a strong correlation, say), but is mode-seeking, so
        forward KL stays the part that weighs the modes.
    :param reverse_kl_samples: flow draws per reverse-KL step.
    :param history: number of past iterations of walker positions the flow is fitted on.
    :param block_size: global-move proposals are drawn and scored this many steps at a time.
    :param defensive: after :meth:`freeze`, propose from the flow mixed with a broad Gaussian of
        this weight (:class:`~pyro_ebm.samplers.DefensiveProposal`; 0 disables it): a floor on
        the proposal density, so that a chain that reaches a region the flow under-covers does
        not stick there.
    :param defensive_scale: width of that Gaussian relative to the flow's spread.
    :param standardize: wrap the flow in :class:`~pyro_ebm.flows.Standardized` and, before each
        fit, reset its location to the mean of the history and its scale to the history's
        spread, narrowed to the score-based scale of the walkers' gradients
        (:meth:`~pyro_ebm.flows.Standardized.standardize_`; the spread alone, when the training
        cycles have no local moves), so that the flow's layers see each mode at unit scale.
        ``True`` standardizes densely (the history's covariance, so that correlations are in
        the standardization and the local moves' preconditioner) up to
        :data:`~pyro_ebm.samplers.flow_fit.DENSE_MAX_DIM` (256) dimensions and diagonally
        above; ``"dense"`` or ``"diagonal"`` choose (on a strongly correlated target a
        diagonal standardization can leave the draws off). Should a scale move by more than a
        factor 2 from the one the flow was started under, the flow restarts from its initial
        state (:attr:`num_flow_restarts` counts it). The sd alone would measure the distance
        between separated modes, not their width (hence the narrowing). Without
        standardizing, a flow started at its unit base learns a posterior a hundred times
        narrower than that base only slowly, and the chains can stick. Set ``False`` for a
        flow already fitted to the target, whose own coordinates are to be kept. :attr:`flow`
        is then the wrapper.
    :param precondition: the local moves use the standardization's squared scales as a
        diagonal preconditioner (MALA's :math:`A`, HMC's inverse mass), so that one step size
        suits coordinates of very different scales; fixed with the flow at :meth:`freeze`.
    :param local_only_cycles: the first training cycles make local moves only, so that the
        first global move is proposed by a flow fitted on the walkers (twice, by default).
        Without them the first global moves, proposed by the flow's unfitted start, draw every
        walker into whatever mode lies under it. More is not better.
    :param adapt_step_size: adapt the local step size toward ``target_accept`` during training
        (dual averaging; its average is fixed at :meth:`freeze`); ``False`` keeps ``step_size``.
    :param adapt_num_particles: during training, i-SIR uses as few particles (2 to
        ``num_particles``) as leave a walker with a probability of moving of about 0.9
        (:attr:`num_active_particles`, :func:`~pyro_ebm.samplers.isir_particles`, estimated
        from the importance weights of the walkers and their proposals): a flow that has
        learned the target needs 2, and each particle costs a potential evaluation per walker
        and global move. Flows are scored (:meth:`freeze`, :attr:`recent_global_accept`) by
        the probability of moving that ``num_particles`` would have, estimated from the same
        weights; production uses ``num_particles`` (set :attr:`num_active_particles` after
        :meth:`freeze` for fewer).
    :param forget_transient: the history drops the iterations of the walkers' approach to the
        target (:func:`~pyro_ebm.samplers.stationary_start`): walkers started broadly converge
        onto a narrow posterior in a few dozen cycles, and a history that still holds their
        start standardizes the flow, and trains it, on a cloud many times wider than the
        target (on posteriordb's low-dimensional mixture, ten times wider for the 50 cycles
        the history remembers, then restarts as the start left it).
    """

    #: number of training cycles over which the global acceptance is averaged
    _WINDOW = 5
    #: the flow restarts when a standardization scale moves by more than this factor
    _RESTART_RATIO = 2.0
    #: trials of the per-cycle estimates of the probability of moving (``move_probability``)
    _TRIALS = 1024
    #: training cycles at the full ``flow_lr``; the rate then decays as 1 / cycle
    _LR_DECAY_AFTER = 25

    def __init__(
        self,
        potential_fn: PotentialFn,
        flow: nn.Module | None = None,
        global_move: str = "isir",
        num_particles: int = 32,
        local_move: str = "mala",
        num_local_steps: int = 5,
        step_size: float = 0.05,
        target_accept: float | None = None,
        num_leapfrog: int = 10,
        flow_lr: float = 5e-3,
        flow_steps: int = 5,
        flow_batch_size: int = 1024,
        reverse_kl_steps: int = 0,
        reverse_kl_samples: int = 256,
        history: int = 50,
        block_size: int = 16,
        defensive: float = 0.0,
        defensive_scale: float = 3.0,
        standardize: bool | str = True,
        precondition: bool = True,
        local_only_cycles: int = 2,
        adapt_step_size: bool = True,
        adapt_num_particles: bool = True,
        forget_transient: bool = True,
    ) -> None:
        check_choice("standardize", standardize, (True, False, "dense", "diagonal"))
        check_choice("global_move", global_move, ("isir", "imh"))
        check_choice("local_move", local_move, ("mala", "hmc"))
        num_particles = check_int("num_particles", num_particles, 2 if global_move == "isir" else 1)
        defensive = check_real("defensive", defensive, 0.0, 1.0, high_open=True)
        defensive_scale = check_positive("defensive_scale", defensive_scale)
        step_size = check_positive("step_size", step_size)
        flow_lr = check_positive("flow_lr", flow_lr)
        if target_accept is not None:
            target_accept = check_real(
                "target_accept", target_accept, 0.0, 1.0, low_open=True, high_open=True
            )
        for name, value, low in [
            ("local_only_cycles", local_only_cycles, 0),
            ("num_local_steps", num_local_steps, 0),
            ("num_leapfrog", num_leapfrog, 1),
            ("block_size", block_size, 1),
            ("history", history, 1),
            ("flow_batch_size", flow_batch_size, 1),
            ("flow_steps", flow_steps, 0),
            ("reverse_kl_steps", reverse_kl_steps, 0),
            ("reverse_kl_samples", reverse_kl_samples, 1),
        ]:
            check_int(name, value, low)
        self.potential_fn = potential_fn
        self.standardize = standardize
        self.precondition = check_flag("precondition", precondition)
        self.local_only_cycles = int(local_only_cycles)
        self._cycles = 0  # training cycles done
        self.flow = None if flow is None else self._wrap(flow)
        #: the given flow's weights, when it is not standardized (e.g. a trained Pyro guide):
        #: :meth:`freeze` keeps it if training made it worse
        self._given_flow: dict | None = (
            copy.deepcopy(flow.state_dict()) if flow is not None and not standardize else None
        )
        self.defensive = defensive
        self.defensive_scale = defensive_scale
        self._proposal = self.flow  # the flow, or after freeze its defensive mixture
        self.global_move = global_move
        self.num_particles = num_particles
        self.adapt_num_particles = check_flag("adapt_num_particles", adapt_num_particles)
        self.forget_transient = check_flag("forget_transient", forget_transient)
        #: i-SIR particles of the next global moves (see ``adapt_num_particles``); reset to
        #: ``num_particles`` by :meth:`freeze`, and taken up by :meth:`init` after it
        self.num_active_particles = num_particles
        self.local_move = local_move
        self.num_local_steps = num_local_steps
        self.num_leapfrog = num_leapfrog
        if target_accept is None:
            target_accept = 0.574 if local_move == "mala" else 0.75
        self.adapter = StepSizeAdapter(step_size, target_accept)
        self.adapt_step_size = check_flag("adapt_step_size", adapt_step_size)
        self.step_size = step_size
        self.flow_steps = flow_steps
        self.flow_batch_size = flow_batch_size
        self.reverse_kl_steps = reverse_kl_steps
        self.reverse_kl_samples = reverse_kl_samples
        self.history = history
        self.block_size = block_size
        self.flow_lr = flow_lr
        self.optimizer = None if flow is None else torch.optim.Adam(flow.parameters(), lr=flow_lr)
        self._buffer: Tensor | None = None  # (T, C, D) walker positions, oldest first
        self._u_buffer: Tensor | None = None  # (T, C) their potentials
        self._grad_buffer: Tensor | None = None
        self._initial_flow: dict | None = None  # to restart from (see _standardize)
        self._start_scale: Tensor | None = None
        #: how often training restarted the flow because its standardization moved
        self.num_flow_restarts = 0
        self._proposals: FlowProposals | None = None
        self._frozen = False
        self._candidate: dict | None = None  # flow state fitted last, not yet scored
        self._accepts: list[float] = []  # global acceptance of each training cycle
        #: importance log-weights (walkers ``(C,)``, their fresh proposals ``(C, M)``) of the
        #: last :attr:`_WINDOW` global moves of training
        self._weights: list[tuple[Tensor, Tensor]] = []
        self.best_global_accept: float | None = None
        self._best_flow: dict | None = None
        #: global acceptance (mean over :attr:`_WINDOW` cycles) of the flow kept at :meth:`freeze`
        self.final_global_accept: float | None = None
        #: the flow kept at :meth:`freeze` as an importance sampler (with ``standardize``)
        self.flow_check: FlowCheck | None = None
        #: whether :meth:`freeze` kept the flow's start over the trained flow
        self.kept_flow_start = False

    def _wrap(self, flow: nn.Module) -> nn.Module:
        if self.standardize and not isinstance(flow, Standardized):
            dense = self.standardize == "dense" or (
                self.standardize is True and flow.dim <= DENSE_MAX_DIM
            )
            return Standardized(flow, dense=dense)
        return flow

    # -- moves ------------------------------------------------------------------------------
    def init(self, x0: Tensor) -> WalkerState:
        """Initial state of walkers at ``x0`` ``(C, D)``; resets the history buffer (the flow and
        the step size are kept, so this also moves a trained sampler to new walkers)."""
        if x0.dim() != 2 or not torch.isfinite(x0).all():
            raise ValueError("x0 must be a finite (num_walkers, dim) tensor")
        self._buffer = self._u_buffer = self._grad_buffer = None
        self._weights = []
        if self.flow is None:
            self.flow = self._wrap(default_flow(x0.shape[-1]).to(x0))
            self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.flow_lr)
        if not self.frozen:
            self._proposal = self.flow
            if self.standardize and self._initial_flow is None:
                self._initial_flow = copy.deepcopy(self.flow.flow.state_dict())
        m = self.num_active_particles - 1 if self.global_move == "isir" else 1
        # while the flow changes every iteration, proposals are drawn one step at a time
        block = self.block_size if self.frozen else 1
        self._proposals = FlowProposals(self._proposal, self.potential_fn, x0.shape[0], m, block)
        return init_state(self.potential_fn, x0)

    def _global(self, state: WalkerState) -> tuple[WalkerState, MoveInfo]:
        grad_fn = self.potential_fn if self.num_local_steps > 0 else None  # for the local move
        draw = self._proposals.draw()
        if self.global_move == "imh":
            return imh_step(state, draw, self._proposal, grad_fn)
        if not self.frozen:  # the weights the particle count and the flows' scores come from
            state = _with_log_q(state, self._proposal)
            current = log_weights(state.potential_energy, state.log_q)
            fresh = log_weights(draw.potential_energy, draw.log_q)
            self._weights = [*self._weights[-(self._WINDOW - 1) :], (current, fresh)]
        return isir_step(state, draw, self._proposal, grad_fn)

    def _local(self, state: WalkerState) -> tuple[WalkerState, MoveInfo]:
        inv_mass = self._inverse_mass()
        if self.local_move == "mala":
            return mala_step(state, self.potential_fn, self.step_size, inv_mass)
        return hmc_step(state, self.potential_fn, self.step_size, self.num_leapfrog, inv_mass)

    def _inverse_mass(self) -> Tensor | None:
        """The local moves' diagonal preconditioner: the squared scales of the flow's
        standardization (``None`` without one, or with ``precondition=False``)."""
        if not (self.precondition and isinstance(self.flow, Standardized)):
            return None
        return self.flow.inverse_mass()

    def move(
        self, state: WalkerState, index: int, adapt: bool = False
    ) -> tuple[WalkerState, MoveInfo, bool]:
        r"""Move number ``index`` of the repeating cycle [1 global, ``num_local_steps`` local].

        With ``adapt``, local moves update the step size (when ``adapt_step_size``), and the last
        move of each cycle stores the walkers in the history and fits the flow on it.

        :returns: ``(state, info, is_global)``.
        """
        local_only = adapt and self._cycles < self.local_only_cycles
        state, info, is_global = global_local_move(
            state, index, self._global, self._local, self.num_local_steps, local_only
        )
        if adapt and is_global:
            self._score_candidate(self._as_configured(float(info.accept_prob.mean())))
            self._adapt_particles()
        elif adapt and self.adapt_step_size:
            self.step_size = self.adapter.update(info.accept_prob)
        if adapt and index % (self.num_local_steps + 1) == self.num_local_steps:
            self._cycles += 1
            self._push(state)
            self._fit_flow()
            state = state._replace(log_q=None)
        return state, info, is_global

    def step(self, state: WalkerState, adapt: bool = False) -> tuple[WalkerState, GlobalLocalInfo]:
        """One cycle: a global move then ``num_local_steps`` local moves (see :meth:`move`). In
        a local-only cycle (see ``local_only_cycles``) the global move's info has ``accept_prob``
        nan."""
        infos, kinds = [], []
        for i in range(self.num_local_steps + 1):
            state, info, is_global = self.move(state, i, adapt)
            infos.append(info)
            kinds.append(is_global)
        return state, cycle_info(infos, kinds)

    def _push(self, state: WalkerState) -> None:
        """Store the walkers (and their potentials, and their gradients while every stored
        state has them); with ``forget_transient``, drop the iterations of their approach."""
        x, u = state.x.detach()[None], state.potential_energy.detach()[None]
        grad = None if state.grad is None else state.grad.detach()[None]
        if self._buffer is None:
            self._buffer, self._u_buffer, self._grad_buffer = x, u, grad
            return
        keep = -(self.history - 1)
        self._buffer = torch.cat([self._buffer[keep:], x])
        self._u_buffer = torch.cat([self._u_buffer[keep:], u])
        if grad is None or self._grad_buffer is None:
            self._grad_buffer = None
        else:
            self._grad_buffer = torch.cat([self._grad_buffer[keep:], grad])
        if self.forget_transient:
            start = stationary_start(self._u_buffer)
            self._buffer, self._u_buffer = self._buffer[start:], self._u_buffer[start:]
            if self._grad_buffer is not None:
                self._grad_buffer = self._grad_buffer[start:]

    def _fit_flow(self) -> None:
        data = self._buffer.reshape(-1, self._buffer.shape[-1])
        if self.standardize:
            self._standardize(data)
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_flow_lr
        for _ in range(self.flow_steps):
            idx = torch.randint(0, data.shape[0], (min(self.flow_batch_size, data.shape[0]),))
            forward_kl_step(self.flow, self.optimizer, data[idx])
        with uncounted(self.potential_fn):  # the flow's draws are not the chains' moves
            for _ in range(self.reverse_kl_steps):
                reverse_kl_step(
                    self.flow, self.optimizer, self.potential_fn, self.reverse_kl_samples
                )
        self._proposals.reset()
        self._candidate = copy.deepcopy(self.flow.state_dict())

    def _standardize(self, data: Tensor) -> None:
        """Re-standardize the flow on the history; restart the flow from its initial state when
        a scale has moved by more than :attr:`_RESTART_RATIO` from the one it started under:
        a flow fitted in coordinates a hundred times too narrow or wide is worse than a fresh
        one (early in warmup walkers far out make the scales small)."""
        grad = None if self._grad_buffer is None else self._grad_buffer.reshape(data.shape)
        self.flow.standardize_(data, grad)
        if self._start_scale is None:
            self._start_scale = self.flow.scale_matrix()
        elif self.flow.scale_change(self._start_scale) > math.log(self._RESTART_RATIO):
            self.flow.flow.load_state_dict(self._initial_flow)
            self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.flow_lr)
            self._start_scale = self.flow.scale_matrix()
            self.num_flow_restarts += 1

    def _as_configured(self, accept: float) -> float:
        """The probability of moving of the global move just made, ``accept`` with
        :attr:`num_active_particles`, as it would be with ``num_particles``: estimated from its
        importance weights (:func:`~pyro_ebm.samplers.move_probability`; the walkers' own
        weights as the current points)."""
        if self.global_move != "isir" or self.num_active_particles == self.num_particles:
            return accept
        current, fresh = self._weights[-1]
        return move_probability(fresh, self.num_particles, current, num_trials=self._TRIALS)

    def _adapt_particles(self) -> None:
        """Set :attr:`num_active_particles` by :func:`~pyro_ebm.samplers.isir_particles` (a
        probability of moving of about 0.9), from the importance weights of the walkers and of
        their fresh proposals in the last :attr:`_WINDOW` cycles."""
        if not (self.adapt_num_particles and self.global_move == "isir"):
            return
        current = torch.cat([c for c, _ in self._weights])
        fresh = torch.cat([f.reshape(-1) for _, f in self._weights])
        n = isir_particles(fresh, self.num_particles, current, num_trials=self._TRIALS)
        self.num_active_particles = n
        self._proposals.num_per_step = self.num_active_particles - 1
        self._proposals.reset()

    def _score_candidate(self, accept: float) -> None:
        """The global move just made used the flow fitted last: keep that flow if the mean
        acceptance of the last :attr:`_WINDOW` cycles is the best so far."""
        self._accepts.append(accept)
        if self._candidate is None or len(self._accepts) < self._WINDOW:
            return
        recent = self.recent_global_accept
        if self.best_global_accept is None or recent > self.best_global_accept:
            self.best_global_accept = recent
            self._best_flow = self._candidate
        self._candidate = None

    @property
    def current_flow_lr(self) -> float:
        """The flow's learning rate at this training cycle: ``flow_lr`` for the first
        :attr:`_LR_DECAY_AFTER` cycles, then ``flow_lr * _LR_DECAY_AFTER / cycle``."""
        return self.flow_lr * min(1.0, self._LR_DECAY_AFTER / max(self._cycles, 1))

    @property
    def recent_global_accept(self) -> float | None:
        """Mean global acceptance of the last :attr:`_WINDOW` training cycles (``None`` before
        any)."""
        recent = self._accepts[-self._WINDOW :]
        return sum(recent) / len(recent) if recent else None

    @property
    def frozen(self) -> bool:
        """Whether the training phase has ended (:meth:`freeze`)."""
        return self._frozen

    def freeze(self, num_local_steps: int | None = None) -> None:
        """End the training phase: fix the step size and stop updating the flow. If the global
        acceptance of the last :attr:`_WINDOW` cycles has fallen below half of the best such mean
        seen in training, the flow of that best stretch is restored: flow training with a constant
        learning rate can blow up late. Otherwise the final flow is kept (early flows can score
        well on a walker ensemble that has not spread out yet). With ``standardize``, that flow
        is then compared, as an importance sampler of the target
        (:func:`~pyro_ebm.metrics.flow_importance_diagnostic`, 4096 draws each), with the
        flow's start (the identity, for the default flow) standardized on the history, and the
        one with the larger importance-sampling ESS is kept (:attr:`flow_check` holds its
        check); a given flow that is not standardized (a trained Pyro guide) is compared with
        itself as given, so that training on the walkers never leaves it worse. On a
        near-Gaussian target the history's
        Gaussian alone (its mean and covariance, without the gradients' narrowing, which makes
        its tails too light) is the better proposal, and the couplings fitted on a history of
        a few thousand correlated walker positions only add noise. The choice depends on the
        training phase only, so the chain after it is a valid MCMC chain.

        :param num_local_steps: local moves per cycle from now on (default: unchanged). With a
            good flow, pure i-SIR (0) is the cheapest per effective draw; local moves matter
            where the flow is poor.
        """
        if self.flow is None:
            raise RuntimeError("freeze() needs a flow: run() (or init()) builds the default one")
        if num_local_steps is not None:
            if num_local_steps < 0:
                raise ValueError(f"num_local_steps must be >= 0, got {num_local_steps}")
            self.num_local_steps = num_local_steps
        if self.adapt_step_size:
            self.step_size = self.adapter.final_step_size
        self.num_active_particles = self.num_particles
        recent = self.recent_global_accept
        if self._best_flow is not None and recent < 0.5 * self.best_global_accept:
            self.flow.load_state_dict(self._best_flow)
            self.final_global_accept = self.best_global_accept
        else:
            self.final_global_accept = recent
        if (self.standardize and self._initial_flow is not None) or self._given_flow is not None:
            self.flow_check = self._keep_better_than_start()
        self._buffer = self._u_buffer = self._grad_buffer = None
        self._candidate = self._best_flow = None
        self._weights = []
        self._frozen = True
        if self.defensive > 0:
            self._proposal = DefensiveProposal(self.flow, self.defensive, self.defensive_scale)
        if self._proposals is not None:
            self._proposals.flow = self._proposal
            self._proposals.block_size = self.block_size
            self._proposals.reset()

    def _keep_better_than_start(self) -> FlowCheck:
        """Keep the trained flow or its start, whichever has the larger importance-sampling ESS
        (see :meth:`freeze`); the kept one's check (a new one, up to
        :data:`~pyro_ebm.metrics.MAX_CHECK_DRAWS` draws near k-hat 0.7). The start is the
        flow's start standardized on the history without the gradients' narrowing (for the
        default flow: the history's Gaussian), or a given flow that is not standardized as it
        was given."""
        with uncounted(self.potential_fn):  # the checks' draws are not the chains' moves
            trained = flow_importance_diagnostic(self.flow, self.potential_fn)
            start = copy.deepcopy(self.flow)
            if self._given_flow is not None:
                start.load_state_dict(self._given_flow)
            else:
                start.flow.load_state_dict(self._initial_flow)
                if self._buffer is not None:
                    start.standardize_(self._buffer.reshape(-1, self._buffer.shape[-1]))
            start_check = flow_importance_diagnostic(start, self.potential_fn)
            kept, check = self.flow, trained
            start_is_better = not (trained.ess >= start_check.ess or not start_check.ess > 0)
            if start_is_better:  # (a trained ESS that is not a number too)
                self.flow.load_state_dict(start.state_dict())
                self.kept_flow_start, kept, check = True, start, start_check
            return sharpened(check, kept, self.potential_fn)  # (its warning: more draws near 0.7)

    # -- driver -----------------------------------------------------------------------------
    def run(
        self,
        x0: Tensor,
        num_adapt_steps: int,
        num_samples: int,
        progress: bool = False,
    ) -> AdaptiveRun:
        r"""Training phase of ``num_adapt_steps`` iterations, then ``num_samples`` production
        iterations with the flow frozen.

        :param x0: initial walkers ``(C, D)``, spread widely enough to touch every mode's basin.
        :param progress: show a tqdm progress bar with the acceptance rates.
        """
        if num_adapt_steps < 0 or num_samples < 0 or num_adapt_steps + num_samples == 0:
            raise ValueError(
                "num_adapt_steps and num_samples must be >= 0 with a positive sum, got "
                f"{num_adapt_steps} and {num_samples}"
            )
        state = self.init(x0)
        g_acc, l_acc, samples = [], [], []
        bar = tqdm(
            total=num_adapt_steps + num_samples, disable=not progress, desc="adaptive flow MCMC"
        )
        for i in range(num_adapt_steps + num_samples):
            adapt = i < num_adapt_steps
            if i == num_adapt_steps:
                self.freeze()
            state, info = self.step(state, adapt=adapt)
            g_acc.append(info.global_info.accept_prob.mean())
            l_acc.append(info.local_info.accept_prob.mean())
            if not adapt:
                samples.append(state.x)
            bar.set_postfix(glob=f"{g_acc[-1]:.2f}", loc=f"{l_acc[-1]:.2f}", refresh=False)
            bar.update()
        bar.close()
        return AdaptiveRun(
            torch.stack(samples) if samples else x0.new_zeros((0, *x0.shape)),
            torch.stack(g_acc),
            torch.stack(l_acc),
            state,
        )
