r"""Local gradient-based moves: ULA, MALA and HMC, vectorized over walkers.

Each function takes a :class:`~pyro_ebm.samplers.state.WalkerState` whose ``grad`` is filled
(see :func:`~pyro_ebm.samplers.state.init_state`) and returns ``(new_state, info)``. ``step_size``
may be a float or a ``(C,)`` tensor (one step size per walker).

References:

- Roberts, Tweedie (1996), "Exponential convergence of Langevin distributions and their discrete
  approximations" (MALA/ULA).
- Neal (2011), "MCMC using Hamiltonian dynamics", https://arxiv.org/abs/1206.1901
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .state import (
    MoveInfo,
    PotentialFn,
    WalkerState,
    _finite_rows,
    accept_reject,
    potential_and_grad,
    select,
)

__all__ = ["hmc_step", "mala_step", "ula_step"]


def _per_walker(step_size: float | Tensor, x: Tensor) -> Tensor:
    # a number is checked here; a tensor (an adapter's, per walker) is not: that would cost a
    # device synchronisation every step
    if not isinstance(step_size, Tensor) and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be positive and finite, got {step_size!r}")
    eps = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    if eps.dim() == 0:
        eps = eps.expand(x.shape[0])
    if eps.shape != x.shape[:1]:
        raise ValueError(f"step_size must be a float or a ({x.shape[0]},) tensor")
    return eps[:, None]


def _check_inverse_mass(inverse_mass: Tensor | None, x: Tensor) -> None:
    if inverse_mass is not None and (
        not isinstance(inverse_mass, Tensor) or inverse_mass.shape != x.shape[-1:]
    ):
        shape = tuple(inverse_mass.shape) if isinstance(inverse_mass, Tensor) else inverse_mass
        raise ValueError(f"inverse_mass must be a ({x.shape[-1]},) tensor, got {shape}")


def _langevin_proposal(
    state: WalkerState, step_size: float | Tensor, inverse_mass: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    _check_inverse_mass(inverse_mass, state.x)
    eps = _per_walker(step_size, state.x)
    a = 1.0 if inverse_mass is None else inverse_mass
    noise = torch.randn_like(state.x)
    return state.x - eps * a * state.grad + (2 * eps * a).sqrt() * noise, eps


def ula_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of the unadjusted Langevin algorithm (no Metropolis correction).

    .. math:: x' = x - \epsilon A \nabla U(x) + \sqrt{2 \epsilon A}\, \xi

    with :math:`A` the diagonal ``inverse_mass`` (identity when ``None``), a preconditioner as
    in :func:`mala_step`. The chain targets ``exp(-U)`` only as ``step_size -> 0``. A proposal
    with a non-finite potential or gradient is not taken.
    """
    x_new, _ = _langevin_proposal(state, step_size, inverse_mass)
    u_new, g_new = potential_and_grad(potential_fn, x_new)
    ok = _finite_rows(u_new, g_new)
    new_state = select(ok, WalkerState(x_new, u_new, g_new), state._replace(log_q=None))
    return new_state, MoveInfo(ok.to(u_new.dtype), ok, new_state.potential_energy, ~ok)


def _langevin_log_q(
    x_to: Tensor, x_from: Tensor, grad_from: Tensor, eps: Tensor, inverse_mass: Tensor | None
) -> Tensor:
    # log N(x_to; x_from - eps A grad, 2 eps A) up to a constant shared by both directions
    a = 1.0 if inverse_mass is None else inverse_mass
    return -((x_to - x_from + eps * a * grad_from) ** 2 / a).sum(-1) / (4 * eps[:, 0])


def mala_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of the Metropolis-adjusted Langevin algorithm.

    Proposal :math:`x' = x - \epsilon A \nabla U(x) + \sqrt{2\epsilon A}\,\xi`, accepted
    with probability :math:`\min\{1, e^{U(x) - U(x')} q(x \mid x') / q(x' \mid x)\}`, where
    :math:`q(x' \mid x) = \mathcal N(x'; x - \epsilon A \nabla U(x), 2 \epsilon A)` and
    :math:`A` is the diagonal ``inverse_mass`` ``(D,)`` (identity when ``None``): a
    preconditioner, ideally the target's per-coordinate variances, so that one step size
    suits coordinates of very different scales (as HMC's inverse mass matrix).
    The optimal acceptance rate in high dimension is about 0.574.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import init_state, mala_step
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> s = init_state(U, torch.zeros(4, 2))
        >>> s, info = mala_step(s, U, 0.5)
        >>> info.accept_prob.shape
        torch.Size([4])
    """
    x_new, eps = _langevin_proposal(state, step_size, inverse_mass)
    u_new, g_new = potential_and_grad(potential_fn, x_new)
    ok = _finite_rows(u_new, g_new)
    log_ratio = (
        state.potential_energy
        - u_new
        + _langevin_log_q(state.x, x_new, g_new, eps, inverse_mass)
        - _langevin_log_q(x_new, state.x, state.grad, eps, inverse_mass)
    )
    return accept_reject(
        state._replace(log_q=None), WalkerState(x_new, u_new, g_new), log_ratio, ok
    )


def _leapfrog(
    potential_fn: PotentialFn,
    state: WalkerState,
    p: Tensor,
    eps: Tensor,
    inv_m: Tensor,
    num_steps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""``num_steps`` leapfrog steps from ``(state.x, p)``, all walkers in one batched op.

    Returns the end point ``(x, p, U(x), ∇U(x), ok)``, where ``ok`` ``(C,)`` is False for a
    walker whose trajectory met a non-finite potential or gradient: from there on its gradient is
    taken as zero (the walker coasts), so that ``nan`` does not spread through the arithmetic; its
    proposal must be rejected. Shared by :func:`hmc_step` and the ChEES step.
    """
    x, g = state.x, state.grad
    u = state.potential_energy
    ok = torch.ones_like(u, dtype=torch.bool)
    for _ in range(num_steps):
        p = p - 0.5 * eps * g
        x = x + eps * inv_m * p
        u, g = potential_and_grad(potential_fn, x)
        ok = ok & _finite_rows(u, g)
        # freeze diverged walkers so that nan does not spread through arithmetic
        g = torch.where(ok[:, None], g, torch.zeros_like(g))
        p = p - 0.5 * eps * g
    return x, p, u, g, ok


def hmc_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    num_steps: int,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of Hamiltonian Monte Carlo with ``num_steps`` leapfrog steps.

    :param inverse_mass: diagonal inverse mass matrix ``(D,)`` (identity when ``None``).

    A trajectory that meets a non-finite potential or gradient is rejected and flagged in
    ``info.nonfinite`` (a divergence, in Pyro's words).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    eps = _per_walker(step_size, state.x)
    inv_m = torch.ones_like(state.x[0]) if inverse_mass is None else inverse_mass
    p = torch.randn_like(state.x) / inv_m.sqrt()
    kinetic0 = 0.5 * (p**2 * inv_m).sum(-1)
    x, p, u, g, ok = _leapfrog(potential_fn, state, p, eps, inv_m, num_steps)
    kinetic1 = 0.5 * (p**2 * inv_m).sum(-1)
    log_ratio = state.potential_energy + kinetic0 - u - kinetic1
    return accept_reject(state._replace(log_q=None), WalkerState(x, u, g), log_ratio, ok)
