r"""State and info records shared by every move of the vectorized MCMC core.

All moves act on a batch of ``C`` independent walkers stored as one ``(C, D)`` tensor. A move is a
pure function ``step(state, ...) -> (state, info)`` in the style of BlackJAX: it never mutates its
input, and the :class:`MoveInfo` it returns records what happened to each walker.

Sign convention (Pyro's): ``potential_fn(x) = U(x) = -log p(x) + const`` for a ``(C, D)`` batch,
returning a ``(C,)`` tensor.

Non-finite potentials (``nan`` or ``+inf``, or a non-finite gradient) never enter a chain: the
proposal is rejected, the walker keeps its position, and ``info.nonfinite`` flags it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .guard import PotentialDefinitionError

__all__ = [
    "MoveInfo",
    "PotentialFn",
    "WalkerState",
    "accept_reject",
    "init_state",
    "potential_and_grad",
]

PotentialFn = Callable[[Tensor], Tensor]


class WalkerState(NamedTuple):
    r"""Positions of ``C`` walkers and what is known about them.

    :param x: positions, ``(C, D)``.
    :param potential_energy: ``U(x)``, ``(C,)``.
    :param grad: ``∇U(x)``, ``(C, D)``, or ``None`` if it has not been computed.
    :param log_q: the log-density of a flow proposal at ``x``, ``(C,)``, cached by the flow moves
        (``None`` when unknown; local moves reset it).
    """

    x: Tensor
    potential_energy: Tensor
    grad: Tensor | None = None
    log_q: Tensor | None = None


class MoveInfo(NamedTuple):
    r"""What one move did to each walker (all ``(C,)`` tensors).

    :param accept_prob: Metropolis-Hastings acceptance probability of the proposal (for i-SIR,
        the probability of leaving the current point).
    :param accepted: whether the walker moved.
    :param potential_energy: potential energy after the move.
    :param nonfinite: the proposal had a non-finite potential or gradient and was rejected
        (for i-SIR: every fresh candidate had; some non-finite candidates among valid ones are
        the normal state of a target with restricted support and lose the resampling anyway).
    """

    accept_prob: Tensor
    accepted: Tensor
    potential_energy: Tensor
    nonfinite: Tensor


def potential_and_grad(potential_fn: PotentialFn, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Evaluate ``U(x)`` and ``∇U(x)`` for a batch in one call.

    Gradients are taken with respect to ``x`` only (``torch.autograd.grad``), so the parameters of
    an energy model never accumulate ``.grad`` from sampling.

    :param potential_fn: batched potential, ``(C, D) -> (C,)``. One that offers
        ``value_and_grad(x) -> (U, grad)`` (a compiled potential, e.g.
        :class:`pyro_ebm.infer.CompiledPotential`) is called through it, without autograd.
    :param x: positions, ``(C, D)``.
    :returns: ``(U, grad)`` detached, shapes ``(C,)`` and ``(C, D)``.
    """
    value_and_grad = getattr(potential_fn, "value_and_grad", None)
    if value_and_grad is not None:
        u, grad = value_and_grad(x.detach())
        return u.detach(), grad.detach()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        u = potential_fn(x)
        if u.shape != x.shape[:1]:
            raise PotentialDefinitionError(
                f"potential_fn must map a ({x.shape[0]}, dim) batch to shape ({x.shape[0]},), "
                f"got {tuple(u.shape)}"
            )
        (grad,) = torch.autograd.grad(u.sum(), x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    return u.detach(), grad.detach()


def init_state(potential_fn: PotentialFn, x: Tensor, with_grad: bool = True) -> WalkerState:
    r"""Build the initial :class:`WalkerState` of walkers at ``x``.

    :param potential_fn: batched potential, ``(C, D) -> (C,)``.
    :param x: initial positions ``(C, D)``.
    :param with_grad: also compute ``∇U`` (needed by MALA, ULA and HMC).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a (num_walkers, dim) tensor, got shape {tuple(x.shape)}")
    if with_grad:
        u, g = potential_and_grad(potential_fn, x)
        return WalkerState(x.detach(), u, g)
    with torch.no_grad():
        u = potential_fn(x)
    if not isinstance(u, Tensor) or u.shape != x.shape[:1]:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise PotentialDefinitionError(
            f"potential_fn must return shape ({x.shape[0]},), got {shape}"
        )
    return WalkerState(x.detach(), u.detach())


def _finite_rows(u: Tensor, grad: Tensor | None = None) -> Tensor:
    ok = torch.isfinite(u)
    if grad is not None:
        ok = ok & torch.isfinite(grad).all(-1)
    return ok


def accept_reject(
    state: WalkerState,
    proposal: WalkerState,
    log_ratio: Tensor,
    proposal_ok: Tensor,
) -> tuple[WalkerState, MoveInfo]:
    r"""Metropolis-Hastings accept/reject, vectorized over walkers.

    A walker moves with probability ``min(1, exp(log_ratio))``. Proposals with
    ``proposal_ok == False`` (non-finite potential or gradient) are always rejected. A walker whose
    *current* potential is non-finite (a bad initial point) accepts any finite proposal.

    :param state: current state.
    :param proposal: proposed state (same fields filled as ``state``).
    :param log_ratio: log acceptance ratio, ``(C,)``; may be ``nan`` where ``proposal_ok`` is False.
    :param proposal_ok: ``(C,)`` bool mask of finite proposals.
    """
    current_bad = ~torch.isfinite(state.potential_energy)
    log_ratio = torch.where(proposal_ok, log_ratio, torch.full_like(log_ratio, -torch.inf))
    log_ratio = torch.where(current_bad & proposal_ok, torch.zeros_like(log_ratio), log_ratio)
    log_ratio = torch.nan_to_num(log_ratio, nan=-torch.inf)
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accepted = torch.rand_like(accept_prob) < accept_prob
    new_state = select(accepted, proposal, state)
    info = MoveInfo(accept_prob, accepted, new_state.potential_energy, ~proposal_ok)
    return new_state, info


def select(mask: Tensor, a: WalkerState, b: WalkerState) -> WalkerState:
    r"""Walker-wise ``where(mask, a, b)`` over every field of two states."""
    fields = []
    for fa, fb in zip(a, b, strict=True):
        if fa is None or fb is None:
            fields.append(None)
        elif fa.dim() == 2:
            fields.append(torch.where(mask[:, None], fa, fb))
        else:
            fields.append(torch.where(mask, fa, fb))
    return WalkerState(*fields)
