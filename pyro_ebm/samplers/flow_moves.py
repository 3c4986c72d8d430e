r"""Global moves with a normalizing-flow proposal: independent Metropolis-Hastings and i-SIR.

Both moves use *independent* proposals ``x' ~ q`` (a flow, or any object with
``sample_and_log_prob(n)`` and ``log_prob(x)``), so proposals for many future steps can be drawn and
scored ahead of time. :class:`FlowProposals` does exactly that: it draws a block of
``block_size`` steps' worth of proposals in one flow call, evaluates their potential in one
``potential_fn`` call, and serves them one step at a time. One flow call per step costs tens of
times more. Call :meth:`FlowProposals.reset` whenever the flow changes.

The importance log-weight of a point is :math:`\log w(x) = -U(x) - \log q(x)`.

References:

- Tierney (1994), "Markov chains for exploring posterior distributions" (independent MH).
- Andrieu, Lee, Vihola (2018), "Uniform ergodicity of the iterated conditional SMC and geometric
  ergodicity of particle Gibbs samplers", https://arxiv.org/abs/1312.6432 (i-SIR).
- Samsonov, Lagutin, Gabrié, Durmus, Naumov, Moulines (2022), "Local-Global MCMC kernels: the best
  of both worlds", https://arxiv.org/abs/2111.02702
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .._checks import check_int
from .state import (
    MoveInfo,
    PotentialFn,
    WalkerState,
    accept_reject,
    potential_and_grad,
    select,
)

__all__ = [
    "DefensiveProposal",
    "FlowDraw",
    "FlowProposals",
    "Proposal",
    "imh_step",
    "isir_particles",
    "isir_step",
    "leave_probability",
    "log_weights",
    "move_probability",
    "sir_draws",
]


class Proposal(Protocol):
    """What the flow moves need from a proposal distribution."""

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` draws ``(n, dim)`` and their log densities ``(n,)``."""
        ...

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of ``x`` ``(n, dim)``, shape ``(n,)``."""
        ...


class FlowDraw(NamedTuple):
    r"""``M`` scored proposals for each of ``C`` walkers.

    :param x: ``(C, M, D)``.
    :param potential_energy: ``(C, M)``.
    :param log_q: ``(C, M)``.
    """

    x: Tensor
    potential_energy: Tensor
    log_q: Tensor


def log_weights(potential_energy: Tensor, log_q: Tensor) -> Tensor:
    r"""Importance log-weights ``-U - log q``.

    A non-finite potential, or a ``nan``/``+inf`` proposal density, gives ``-inf`` (the point is
    never chosen). A finite potential where the proposal density underflows to 0
    (``log q = -inf``) has an infinite weight; it is capped at the largest finite float, so a
    walker there stays put rather than producing ``nan``.
    """
    lw = -potential_energy - log_q
    ok = torch.isfinite(potential_energy) & torch.isfinite(log_q)
    huge = torch.isfinite(potential_energy) & (log_q == -torch.inf)
    lw = torch.where(ok, lw, torch.full_like(lw, -torch.inf))
    return torch.where(huge, torch.full_like(lw, torch.finfo(lw.dtype).max), lw)


class FlowProposals:
    r"""Independent proposals from ``flow``, drawn and scored in blocks.

    :param flow: proposal with ``sample_and_log_prob(n)`` (and ``log_prob``).
    :param potential_fn: batched potential ``(n, D) -> (n,)``.
    :param num_walkers: ``C``.
    :param num_per_step: ``M`` proposals per walker and step (1 for IMH, ``N - 1`` for i-SIR with
        ``N`` particles).
    :param block_size: number of steps drawn at once.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_ebm.samplers import FlowProposals
        >>> class Gauss:
        ...     d = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        ...     def sample_and_log_prob(self, n):
        ...         x = self.d.sample((n,)); return x, self.d.log_prob(x)
        ...     def log_prob(self, x): return self.d.log_prob(x)
        >>> props = FlowProposals(Gauss(), lambda x: 0.5 * (x**2).sum(-1), 8, num_per_step=3)
        >>> props.draw().x.shape
        torch.Size([8, 3, 2])
    """

    def __init__(
        self,
        flow: Proposal,
        potential_fn: PotentialFn,
        num_walkers: int,
        num_per_step: int = 1,
        block_size: int = 16,
    ) -> None:
        for name, value in [
            ("num_walkers", num_walkers),
            ("num_per_step", num_per_step),
            ("block_size", block_size),
        ]:
            check_int(name, value, 1)
        self.flow = flow
        self.potential_fn = potential_fn
        self.num_walkers = num_walkers
        self.num_per_step = num_per_step
        self.block_size = block_size
        self.reset()

    def reset(self) -> None:
        """Forget the cached block (call this after the flow's parameters change)."""
        self._block: FlowDraw | None = None
        self._next = 0

    @torch.no_grad()
    def _refill(self) -> None:
        shape = (self.block_size, self.num_walkers, self.num_per_step)
        n = self.block_size * self.num_walkers * self.num_per_step
        x, log_q = self.flow.sample_and_log_prob(n)
        u = self.potential_fn(x)
        dim = x.shape[-1]
        self._block = FlowDraw(x.reshape(*shape, dim), u.reshape(shape), log_q.reshape(shape))
        self._next = 0

    def draw(self) -> FlowDraw:
        """The proposals for the next step, ``FlowDraw`` with shapes ``(C, M, ...)``."""
        if self._block is None or self._next >= self.block_size:
            self._refill()
        i = self._next
        self._next += 1
        return FlowDraw(*(t[i] for t in self._block))


class DefensiveProposal:
    r"""A flow mixed with a broad Gaussian: :math:`(1 - w)\, q + w\, g`.

    The Gaussian ``g`` is centred on the flow's mean with ``scale`` times its per-coordinate
    standard deviation (both estimated once from ``num_calibration`` flow draws). Since
    :math:`q_{mix} \ge w g`, importance weights :math:`e^{-U}/q_{mix}` are bounded wherever
    ``g`` is not tiny: a floor on the proposal density that stops IMH chains from sticking where
    the flow underestimates the target (Hesterberg 1995, "defensive importance sampling").

    :param flow: proposal with ``sample_and_log_prob`` and ``log_prob``.
    :param weight: mixture weight ``w`` of the Gaussian, in ``(0, 1)``.
    :param scale: width of ``g`` relative to the flow's spread.
    """

    def __init__(
        self, flow: Proposal, weight: float = 0.05, scale: float = 3.0, num_calibration: int = 4096
    ) -> None:
        if not 0.0 < weight < 1.0:
            raise ValueError(f"weight must lie in (0, 1), got {weight}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.flow = flow
        self.weight = weight
        with torch.no_grad():
            x, _ = flow.sample_and_log_prob(num_calibration)
        x = x[torch.isfinite(x).all(-1)]
        self.loc = x.mean(0)
        self.scale = scale * x.std(0).clamp(min=1e-6)
        self._log_w = torch.tensor([1.0 - weight, weight], dtype=x.dtype).log()

    def _log_g(self, x: Tensor) -> Tensor:
        z = (x - self.loc) / self.scale
        return (-0.5 * z**2 - self.scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def _mix(self, log_q: Tensor, x: Tensor) -> Tensor:
        return torch.logaddexp(self._log_w[0] + log_q, self._log_w[1] + self._log_g(x))

    @torch.no_grad()
    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` draws ``(n, dim)`` and their log densities ``(n,)``."""
        k = int(torch.distributions.Binomial(n, torch.tensor(self.weight)).sample())
        x_q, lq_q = self.flow.sample_and_log_prob(n - k)
        x_g = self.loc + self.scale * torch.randn(k, self.loc.shape[0], dtype=self.loc.dtype)
        x = torch.cat([x_q, x_g])
        log_q_flow = torch.cat([lq_q, self.flow.log_prob(x_g)])
        perm = torch.randperm(n)
        return x[perm], self._mix(log_q_flow, x)[perm]

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of ``x`` ``(n, dim)``, shape ``(n,)``."""
        return self._mix(self.flow.log_prob(x), x)


def _with_log_q(state: WalkerState, flow: Proposal) -> WalkerState:
    if state.log_q is None:
        with torch.no_grad():
            state = state._replace(log_q=flow.log_prob(state.x).detach())
    return state


def _finish(state: WalkerState, potential_fn: PotentialFn | None) -> WalkerState:
    if potential_fn is None:
        return state._replace(grad=None)
    u, g = potential_and_grad(potential_fn, state.x)
    return state._replace(potential_energy=u, grad=g)


def imh_step(
    state: WalkerState,
    proposal: FlowDraw,
    flow: Proposal,
    grad_potential_fn: PotentialFn | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One independent Metropolis-Hastings step with a flow proposal.

    Accepts ``x' ~ q`` with probability :math:`\min\{1, w(x') / w(x)\}`,
    :math:`w = e^{-U} / q`. Uses the first proposal of ``proposal`` for each walker.

    :param proposal: scored proposals (e.g. ``FlowProposals(...).draw()``), ``M >= 1``.
    :param flow: the proposal density, used to score the current point when ``state.log_q`` is
        unknown (after a local move).
    :param grad_potential_fn: if given, recompute ``U`` and ``∇U`` at the new positions (needed
        before a gradient-based local move); otherwise ``state.grad`` is set to ``None``.
    """
    state = _with_log_q(state, flow)
    prop = WalkerState(
        proposal.x[:, 0], proposal.potential_energy[:, 0], state.grad, proposal.log_q[:, 0]
    )
    lw_prop = log_weights(prop.potential_energy, prop.log_q)
    lw_cur = log_weights(state.potential_energy, state.log_q)
    ok = torch.isfinite(lw_prop)
    state, info = accept_reject(state, prop, lw_prop - lw_cur, ok)
    state = _finish(state, grad_potential_fn)
    return state, info._replace(potential_energy=state.potential_energy)


def isir_step(
    state: WalkerState,
    proposal: FlowDraw,
    flow: Proposal,
    grad_potential_fn: PotentialFn | None = None,
    metropolis: bool = True,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of iterated sampling-importance-resampling (i-SIR) with ``N = M + 1`` particles:
    the current point and ``M`` fresh proposals, weighted by :math:`w = e^{-U} / q`.

    With ``metropolis`` (the default), one of the ``M`` fresh proposals is chosen with
    probability proportional to its weight, :math:`w_j / S` with :math:`S = \sum_j w_j`, and
    accepted with probability :math:`\min\{1, S / (S - w_j + w_0)\}` (:math:`w_0`: the current
    point's weight): independent multiple-try Metropolis. Without it, the next state is one of
    all ``N`` particles, drawn with probability proportional to its weight (the i-SIR of
    Andrieu, Lee and Vihola). Both leave ``exp(-U)`` invariant for any ``M`` and, unlike IMH,
    still move when the flow is only roughly right, since ``M`` candidates compete. From the
    same proposals the Metropolis rule leaves the current point at least as often, toward
    every other point (Peskun's order: no estimate has a larger asymptotic variance): with a
    flow that is the target it always moves, where resampling stays with probability
    :math:`1 / N`. With ``M = 1`` it is IMH.
    ``info.accept_prob`` is the probability of leaving the current point
    (:func:`leave_probability`).

    :param proposal: scored proposals, ``(C, M, ...)``.
    :param flow: used to score the current point when ``state.log_q`` is unknown.
    :param grad_potential_fn: as in :func:`imh_step`.
    :param metropolis: the Metropolis rule above (``False``: resampling among all ``N``).

    References:

    - Liu, Liang, Wong (2000), "The multiple-try method and local optimization in Metropolis
      sampling", JASA 95(449), 121-134.
    - Martino (2018), "A review of multiple try MCMC algorithms for signal processing", Digital
      Signal Processing 75, 134-152, https://arxiv.org/abs/1801.09065 (the independent case).
    - Peskun (1973), "Optimum Monte-Carlo sampling using Markov chains", Biometrika 60(3).
    """
    state = _with_log_q(state, flow)
    lw_cur = log_weights(state.potential_energy, state.log_q)
    lw_fresh = log_weights(proposal.potential_energy, proposal.log_q)
    rows = torch.arange(lw_fresh.shape[0], device=lw_fresh.device)
    if metropolis:
        choose, accept = _metropolis_choice(lw_cur, lw_fresh)
        j = torch.multinomial(choose, 1)[:, 0]
        moved = torch.rand_like(lw_cur) < accept[rows, j]
        leave = (choose * accept).sum(1)
        fresh = WalkerState(
            proposal.x[rows, j], proposal.potential_energy[rows, j], None, proposal.log_q[rows, j]
        )
        picked = select(moved, fresh, state._replace(grad=None))
    else:
        probs = _resampling_probs(lw_cur, lw_fresh)
        idx = torch.multinomial(probs, 1)[:, 0]
        moved, leave = idx > 0, 1 - probs[:, 0]
        x = torch.cat([state.x[:, None], proposal.x], dim=1)
        u = torch.cat([state.potential_energy[:, None], proposal.potential_energy], dim=1)
        log_q = torch.cat([state.log_q[:, None], proposal.log_q], dim=1)
        picked = WalkerState(x[rows, idx], u[rows, idx], None, log_q[rows, idx])
    new_state = _finish(picked, grad_potential_fn)
    finite = torch.isfinite(proposal.potential_energy) & torch.isfinite(proposal.log_q)
    return new_state, MoveInfo(leave, moved, new_state.potential_energy, ~finite.any(1))


def _resampling_probs(lw_cur: Tensor, lw_fresh: Tensor) -> Tensor:
    """``(C, M + 1)`` resampling probabilities of the current point (column 0) and the fresh
    proposals; a walker whose particles all have weight 0 stays."""
    lw = torch.cat([lw_cur[:, None], lw_fresh], dim=1)
    all_bad = ~torch.isfinite(lw).any(1)
    lw = torch.where(all_bad[:, None] & (torch.arange(lw.shape[1], device=lw.device) == 0), 0.0, lw)
    return torch.softmax(lw, dim=1)


def _metropolis_choice(lw_cur: Tensor, lw_fresh: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(select, accept)``, both ``(C, M)``: the probability :math:`w_j / S` of choosing each
    fresh proposal and its acceptance :math:`\min\{1, S / (S - w_j + w_0)\}`. A walker whose
    fresh proposals all have weight 0 chooses uniformly and accepts none; one whose current
    weight is 0 accepts any other."""
    log_s = torch.logsumexp(lw_fresh, 1, keepdim=True)
    none = log_s == -torch.inf
    select = torch.exp(lw_fresh - log_s).clamp(max=1.0)
    log_rest = log_s + torch.log1p(-select)  # log(S - w_j)
    log_accept = (log_s - torch.logaddexp(log_rest, lw_cur[:, None])).clamp(max=0.0)
    accept = torch.where(lw_cur[:, None] <= lw_fresh, 1.0, log_accept.exp())  # exact
    accept = torch.where(none, 0.0, accept)
    select = torch.where(none, 1.0 / lw_fresh.shape[1], select)
    return select, accept


def leave_probability(lw_cur: Tensor, lw_fresh: Tensor, metropolis: bool = True) -> Tensor:
    r"""The probability that an i-SIR step (:func:`isir_step`) leaves each current point.

    :param lw_cur: ``(C,)`` importance log-weights of the current points.
    :param lw_fresh: ``(C, M)`` those of each point's fresh proposals (``-inf``: weight 0).
    :param metropolis: the rule of :func:`isir_step`.
    :returns: ``(C,)``.

    Example::

        >>> import torch
        >>> lw = torch.zeros(1, 3)  # a flow that is the target: equal weights
        >>> [round(float(leave_probability(torch.zeros(1), lw, m)), 6) for m in (True, False)]
        [1.0, 0.75]
    """
    if metropolis:
        select, accept = _metropolis_choice(lw_cur, lw_fresh)
        return (select * accept).sum(1)
    return 1 - _resampling_probs(lw_cur, lw_fresh)[:, 0]


#: :func:`isir_particles` aims at this probability of leaving the current point per i-SIR step,
#: on average and from the heaviest :data:`HEAVIEST` of the current points
MOVE_PROBABILITY = 0.9
#: the fraction of the heaviest current points that must also move (see :func:`isir_particles`)
HEAVIEST = 0.1


@torch.no_grad()
def move_probability(
    log_w: Tensor,
    num_particles: int,
    log_w_current: Tensor | None = None,
    metropolis: bool = True,
    num_trials: int = 4096,
    heaviest: float = 1.0,
) -> float:
    r"""The probability that an i-SIR step with ``num_particles`` particles leaves a point of
    the target, estimated from importance log-weights :math:`\log w = -U - \log q` of draws of
    the flow.

    Each trial pairs a current point with ``num_particles - 1`` weights drawn from ``log_w``
    (with replacement) and averages :func:`leave_probability`. The current points' weights are
    ``log_w_current`` (e.g. walkers that sample the target) or, by default, drawn from
    ``log_w`` with probability proportional to the weight: the weights of the target's points,
    since :math:`E_p[f(w)] = E_q[w f(w)] / E_q[w]`. A fixed seed: the same weights give the same
    estimate, and the global random stream is not touched.

    :param log_w: ``(S,)`` (or any shape) log-weights of independent draws of the flow.
    :param num_particles: ``N >= 2``.
    :param log_w_current: log-weights of current points (any shape).
    :param metropolis: the rule of :func:`isir_step`.
    :param num_trials: trials of the estimate (at least one per current point).
    :param heaviest: average over the trials whose current point is among this fraction of the
        heaviest (1: all). Points the flow under-covers have the largest weights, and a chain
        leaves them least often.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> q = torch.distributions.Normal(0.0, 1.1)  # a little wider than p = N(0, 1)
        >>> x = q.sample((4096,))
        >>> lw = -0.5 * x**2 - q.log_prob(x)
        >>> round(move_probability(lw, 2), 2), round(move_probability(lw, 2, metropolis=False), 2)
        (0.94, 0.5)
    """
    n = check_int("num_particles", num_particles, 2)
    lw = log_w.detach().reshape(-1).to(torch.float64).cpu()
    if not torch.isfinite(lw).any():
        return 0.0
    g = torch.Generator().manual_seed(0)
    if log_w_current is None:
        p = torch.softmax(lw, 0)
        cur = lw[torch.multinomial(p, num_trials, replacement=True, generator=g)]
    else:
        cur = log_w_current.detach().reshape(-1).to(torch.float64).cpu()
        cur = cur.repeat(max(1, -(-num_trials // cur.numel())))
    fresh = lw[torch.randint(lw.numel(), (cur.numel(), n - 1), generator=g)]
    leave = leave_probability(cur, fresh, metropolis)
    if heaviest < 1.0:
        leave = leave[cur >= torch.quantile(cur, 1.0 - heaviest)]
    return float(leave.mean())


def isir_particles(
    log_w: Tensor,
    most: int,
    log_w_current: Tensor | None = None,
    metropolis: bool = True,
    num_trials: int = 4096,
) -> int:
    r"""The fewest i-SIR particles, between 2 and ``most``, whose estimated probability of
    leaving a point of the target (:func:`move_probability`, from the importance log-weights
    ``log_w`` of draws of the flow) is at least 0.9 (:data:`MOVE_PROBABILITY`), both on average
    and from the heaviest tenth of the points (:data:`HEAVIEST`); ``most`` when none reaches it.

    A chain that moves 9 times in 10 makes nearly independent draws; more particles raise the
    chance of moving only a little and cost one potential evaluation each. With the Metropolis
    rule of :func:`isir_step` a flow close to the target needs 2 (IMH); resampling among all
    particles needs 10 even for a flow that is the target (it moves with probability
    :math:`(N - 1) / N`). The heaviest points are those the flow under-covers: a chain enters
    such a region at a rate, and leaves it with a probability, that grow with the particles,
    and the average over all points hardly sees them. On the centred eight schools (a funnel
    whose neck the flow under-covers) AdaptiveFlowMCMC with the average alone ran its warmup at
    2-7 particles and its draws put 0.128-0.16 of their mass at :math:`\tau < 1` (seeds 0-5;
    the reference 0.196); with the heaviest tenth too, at 32 particles, 0.159-0.168 (seeds
    0-2), as with 32 particles fixed.

    :param log_w: log-weights of independent draws of the flow.
    :param most: the largest count (at least 2).
    :param log_w_current: log-weights of points of the target (default: from ``log_w``; see
        :func:`move_probability`).
    :param metropolis: the rule of :func:`isir_step`.
    :param num_trials: trials of each estimate (:func:`move_probability`).

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> q = torch.distributions.Normal(0.0, 1.05)  # a little wider than p = N(0, 1)
        >>> x = q.sample((4096,))
        >>> lw = -0.5 * x**2 - q.log_prob(x)
        >>> isir_particles(lw, 32), isir_particles(lw, 32, metropolis=False)
        (2, 11)
    """
    most = check_int("most", most, 2)
    low, high = 2, most

    def moves(n: int) -> bool:
        args = (log_w, n, log_w_current, metropolis, num_trials)
        if move_probability(*args) < MOVE_PROBABILITY:
            return False
        return move_probability(*args, heaviest=HEAVIEST) >= MOVE_PROBABILITY

    if not moves(high):
        return most
    while low < high:  # the move probability grows with the particles
        mid = (low + high) // 2
        if moves(mid):
            high = mid
        else:
            low = mid + 1
    return low


def sir_draws(
    proposal: Proposal,
    potential_fn: PotentialFn,
    num_draws: int,
    num_candidates: int,
    min_ess: float = 0.0,
    max_rounds: int = 1,
) -> tuple[Tensor, float]:
    r"""Sampling-importance-resampling: ``num_draws`` points resampled (with replacement) from
    draws of ``proposal``, with probabilities proportional to their importance weights
    :math:`e^{-U}/q`.

    The draws are approximately from the target (the bias vanishes as the number of candidates
    grows), whatever the proposal's own weight on each mode, provided it covers the modes: a
    good start for chains whose proposal has learned the target's shape but not its mode
    weights exactly.

    :param proposal: with ``sample_and_log_prob(n)`` (a flow).
    :param potential_fn: batched potential ``(n, D) -> (n,)``.
    :param num_draws: points to return.
    :param num_candidates: proposal draws per round.
    :param min_ess: draw further rounds of candidates while the weights' effective sample size
        is below this ...
    :param max_rounds: ... up to this many rounds in all.
    :returns: ``(x, ess)``: the points ``(num_draws, D)`` and the effective sample size of the
        weights of all candidates, :math:`(\sum w)^2 / \sum w^2` (0 when no candidate has a
        finite weight, and then ``x`` is empty).

    Reference: Rubin (1988), "Using the SIR algorithm to simulate posterior distributions".

    Example::

        >>> import torch
        >>> from pyro_ebm.flows import Flow
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> x, ess = sir_draws(Flow(2), U, 8, 256)
        >>> x.shape, ess > 200
        (torch.Size([8, 2]), True)
    """
    xs, lws = [], []
    for _ in range(max(1, max_rounds)):
        with torch.no_grad():
            x, log_q = proposal.sample_and_log_prob(num_candidates)
            xs.append(x)
            lws.append(log_weights(potential_fn(x), log_q))
        lw = torch.cat(lws)
        finite = torch.isfinite(lw).any()
        ess = float(1.0 / (torch.softmax(lw, 0) ** 2).sum()) if finite else 0.0
        if ess >= min_ess:
            break
    if not finite:
        return xs[0][:0], 0.0
    return torch.cat(xs)[torch.multinomial(torch.softmax(lw, 0), num_draws, replacement=True)], ess
