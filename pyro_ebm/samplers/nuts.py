r"""The No-U-Turn sampler for many chains at once: :func:`nuts_step`.

Each chain builds its own trajectory, doubling it forward or backward in time until it makes a
U-turn, diverges or reaches ``2**max_tree_depth - 1`` leapfrog steps, and moves to a point of it
drawn with multinomial weights (Betancourt 2017, as Stan and Pyro do). The chains advance in
lockstep: every leapfrog step is one batched potential-and-gradient evaluation for all of them,
and a chain whose trajectory has ended waits, masked, until the longest one ends. With chains that
need trees of similar depth (a flow's latent space, a well-adapted mass matrix) little is wasted;
one chain with a deep tree makes every chain wait for it.

References:

- Hoffman, Gelman (2014), "The No-U-Turn Sampler", JMLR 15, https://arxiv.org/abs/1111.4246
- Betancourt (2017), "A Conceptual Introduction to Hamiltonian Monte Carlo",
  https://arxiv.org/abs/1701.02434 (multinomial sampling, the generalised U-turn criterion).
- Stan's ``base_nuts`` (the U-turn checks across the two halves of each merged subtree).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int
from .local import (
    MAX_ENERGY_ERROR,
    _check_inverse_mass,
    _kinetic,
    _momentum,
    _per_walker,
    _velocity,
)
from .state import MoveInfo, PotentialFn, WalkerState, _finite_rows, potential_and_grad

__all__ = ["nuts_step"]


class _Tree(NamedTuple):
    """A subtree, per chain: its far end (where the next extension starts), the point it
    proposes, its log total weight, the sum of its momenta, and its first and last momenta and
    velocities in the order they were integrated."""

    x: Tensor
    p: Tensor
    g: Tensor
    proposal: WalkerState
    log_weight: Tensor
    rho: Tensor
    p_beg: Tensor
    p_end: Tensor
    v_beg: Tensor
    v_end: Tensor
    valid: Tensor  # no divergence and no U-turn inside


class _Trajectory:
    """What every leaf of one :func:`nuts_step` shares: the potential, the metric, the signed
    step size of the current doubling, the initial energy and the counters of each chain."""

    def __init__(self, potential_fn: PotentialFn, inv_m: Tensor, h0: Tensor, x0: Tensor) -> None:
        self.potential_fn, self.inv_m, self.h0, self.x0 = potential_fn, inv_m, h0, x0
        self.eps = torch.zeros_like(x0[:, :1])
        self.num_steps = torch.zeros_like(h0, dtype=torch.long)
        self.sum_accept = torch.zeros_like(h0)
        self.diverging = torch.zeros_like(h0, dtype=torch.bool)
        #: uniforms of the current doubling's merges, ``(C, 2**depth - 1)`` (see :meth:`build`)
        self.uniforms = torch.zeros_like(x0[:, :0])

    def leaf(self, x: Tensor, p: Tensor, g: Tensor, live: Tensor) -> _Tree:
        """One leapfrog step of every chain; only ``live`` chains count it (the others are
        evaluated at their start, so that a finished chain cannot raise or overflow)."""
        eps = self.eps
        p = p - 0.5 * eps * g
        x = x + eps * _velocity(p, self.inv_m)
        x = torch.where(live[:, None], x, self.x0)
        u, g = potential_and_grad(self.potential_fn, x)
        ok = _finite_rows(u, g)
        g = torch.where(ok[:, None], g, torch.zeros_like(g))
        p = p - 0.5 * eps * g
        h = u + _kinetic(p, self.inv_m)
        h = torch.where(ok & ~torch.isnan(h), h, torch.full_like(h, torch.inf))
        log_weight = self.h0 - h  # -inf where the energy is not finite
        divergent = ~(-log_weight <= MAX_ENERGY_ERROR)
        self.num_steps += live
        self.sum_accept += torch.where(live, log_weight.clamp(max=0.0).exp(), 0.0)
        self.diverging |= live & divergent
        v = _velocity(p, self.inv_m)
        return _Tree(x, p, g, WalkerState(x, u, g), log_weight, p, p, p, v, v, ~divergent)

    def build(
        self, depth: int, x: Tensor, p: Tensor, g: Tensor, live: Tensor, node: int = 0
    ) -> _Tree:
        """A subtree of ``2**depth`` leapfrog steps from ``(x, p, g)`` in the direction of
        :attr:`eps`, its points drawn by weight (uniform progressive sampling). Its ``2**depth
        - 1`` merges use the columns from ``node`` on of :attr:`uniforms`, one fixed column per
        merge, so that a chain's random numbers do not depend on where the others stopped."""
        if depth == 0:
            return self.leaf(x, p, g, live)
        half = 2 ** (depth - 1) - 1  # merges in each half
        first = self.build(depth - 1, x, p, g, live, node)
        live = live & first.valid
        if not bool(live.any()):  # every live chain's first half diverged or turned
            return first._replace(valid=live)
        second = self.build(depth - 1, first.x, first.p, first.g, live, node + half)
        log_weight = torch.logaddexp(first.log_weight, second.log_weight)
        uniform = self.uniforms[:, node + 2 * half]
        take = uniform < (second.log_weight - log_weight).exp()
        rho = first.rho + second.rho
        valid = (
            first.valid
            & second.valid
            & _no_u_turn(first.v_beg, second.v_end, rho)
            & _no_u_turn(first.v_beg, second.v_beg, first.rho + second.p_beg)
            & _no_u_turn(first.v_end, second.v_end, second.rho + first.p_end)
        )
        return _Tree(
            second.x,
            second.p,
            second.g,
            _where(take, second.proposal, first.proposal),
            log_weight,
            rho,
            first.p_beg,
            second.p_end,
            first.v_beg,
            second.v_end,
            valid,
        )


def _no_u_turn(v_minus: Tensor, v_plus: Tensor, rho: Tensor) -> Tensor:
    r"""The generalised no-U-turn criterion of a trajectory whose momenta sum to ``rho`` and
    whose end velocities (:math:`A p`) are ``v_minus`` and ``v_plus``, per chain."""
    return ((v_minus * rho).sum(-1) > 0) & ((v_plus * rho).sum(-1) > 0)


def _replace_rows(mask: Tensor, new: tuple, old: tuple) -> tuple:
    return tuple(torch.where(mask[:, None], n, o) for n, o in zip(new, old, strict=True))


def _where(mask: Tensor, a: WalkerState, b: WalkerState) -> WalkerState:
    return WalkerState(
        torch.where(mask[:, None], a.x, b.x),
        torch.where(mask, a.potential_energy, b.potential_energy),
        torch.where(mask[:, None], a.grad, b.grad),
    )


def nuts_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    inverse_mass: Tensor | None = None,
    max_tree_depth: int = 10,
) -> tuple[WalkerState, MoveInfo, Tensor]:
    r"""One transition of the No-U-Turn sampler for each of ``C`` chains.

    Multinomial NUTS as in Stan: the trajectory doubles in a random direction; each new subtree's
    points are drawn by their weight :math:`e^{-H}` and the subtree's draw replaces the current
    one with probability :math:`\min(1, W_{new} / W_{old})` (biased progressive sampling); the
    doubling stops at a U-turn (the generalised criterion, checked across the whole trajectory
    and, as Stan does since 2.22, across the halves of every merged subtree), at a divergence
    (an energy error above :data:`~pyro_ebm.samplers.local.MAX_ENERGY_ERROR`, or a non-finite
    potential or gradient: the new subtree is discarded) or after ``max_tree_depth`` doublings.

    :param state: current state of the chains, with ``grad``; its potentials must be finite.
    :param potential_fn: batched potential ``(C, D) -> (C,)``.
    :param step_size: a float or a ``(C,)`` tensor (one per chain).
    :param inverse_mass: inverse mass matrix :math:`A`, diagonal ``(D,)`` or dense ``(D, D)``
        (identity when ``None``).
    :param max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per transition.
    :returns: ``(state, info, num_steps)``: ``info.accept_prob`` is the mean Metropolis
        acceptance of the trajectory's points (the statistic step-size adaptation targets, as in
        Stan and Pyro), ``info.accepted`` whether the chain moved, ``info.nonfinite`` whether it
        diverged; ``num_steps`` ``(C,)`` the leapfrog steps of each chain's trajectory.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import init_state
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> state = init_state(U, torch.zeros(4, 3))
        >>> state, info, num_steps = nuts_step(state, U, 0.5)
        >>> state.x.shape, bool((num_steps >= 1).all())
        (torch.Size([4, 3]), True)
    """
    check_int("max_tree_depth", max_tree_depth, 1)
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    _check_inverse_mass(inverse_mass, state.x, dense=True)
    x0, u0, g0 = state.x, state.potential_energy, state.grad
    eps = _per_walker(step_size, x0)
    inv_m, p0 = _momentum(inverse_mass, x0)
    trajectory = _Trajectory(potential_fn, inv_m, u0 + _kinetic(p0, inv_m), x0)
    v0 = _velocity(p0, inv_m)
    # the trajectory's two ends (x, p, grad, velocity), the sum of its momenta and its weight
    minus = plus = (x0, p0, g0, v0)
    rho = p0
    log_weight = torch.zeros_like(u0)  # the start's weight e^{H0 - H0}
    sample = WalkerState(x0, u0, g0)
    active = torch.isfinite(u0)
    moved = torch.zeros_like(active)
    # the doublings' random numbers come from a generator seeded once per transition, a block
    # of fixed shape per doubling: chain c's draws are then the same whatever the other chains
    # do (how deep their trees grow), as if each chain ran alone
    generator = torch.Generator(device=x0.device)
    generator.manual_seed(int(torch.randint(2**62, (), device=x0.device)))
    for depth in range(max_tree_depth):
        block = torch.rand(
            x0.shape[0], 2**depth + 1, generator=generator, dtype=x0.dtype, device=x0.device
        )
        forward = block[:, 0] < 0.5
        trajectory.uniforms = block[:, 2:]
        trajectory.eps = torch.where(forward[:, None], eps, -eps)
        start = [torch.where(forward[:, None], a, b) for a, b in zip(plus, minus, strict=True)]
        tree = trajectory.build(depth, *start[:3], active)
        grows = active & tree.valid
        take = grows & (block[:, 1] < (tree.log_weight - log_weight).exp())
        sample = _where(take, tree.proposal, sample)
        moved |= take
        log_weight = torch.where(grows, torch.logaddexp(log_weight, tree.log_weight), log_weight)
        # the U-turn checks of the whole trajectory, backward half then forward half
        fwd = forward[:, None]
        v_bck_bck = torch.where(fwd, minus[3], tree.v_end)
        v_bck_fwd = torch.where(fwd, plus[3], tree.v_beg)
        p_bck_fwd = torch.where(fwd, plus[1], tree.p_beg)
        rho_bck = torch.where(fwd, rho, tree.rho)
        v_fwd_bck = torch.where(fwd, tree.v_beg, minus[3])
        v_fwd_fwd = torch.where(fwd, tree.v_end, plus[3])
        p_fwd_bck = torch.where(fwd, tree.p_beg, minus[1])
        rho_fwd = torch.where(fwd, tree.rho, rho)
        new_rho = rho + tree.rho
        no_turn = (
            _no_u_turn(v_bck_bck, v_fwd_fwd, new_rho)
            & _no_u_turn(v_bck_bck, v_fwd_bck, rho_bck + p_fwd_bck)
            & _no_u_turn(v_bck_fwd, v_fwd_fwd, rho_fwd + p_bck_fwd)
        )
        rho = torch.where(grows[:, None], new_rho, rho)
        end = (tree.x, tree.p, tree.g, tree.v_end)
        plus = _replace_rows(grows & forward, end, plus)
        minus = _replace_rows(grows & ~forward, end, minus)
        active = grows & no_turn
        if not bool(active.any()):
            break
    accept_prob = trajectory.sum_accept / trajectory.num_steps.clamp(min=1)
    info = MoveInfo(accept_prob, moved, sample.potential_energy, trajectory.diverging)
    return sample, info, trajectory.num_steps
