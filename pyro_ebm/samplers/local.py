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

__all__ = ["MAX_ENERGY_ERROR", "hmc_step", "mala_step", "ula_step"]

#: an energy error :math:`H(q', p') - H(q, p)` above this is a divergence (as in Stan and Pyro)
MAX_ENERGY_ERROR = 1000.0


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


def _check_inverse_mass(inverse_mass: Tensor | None, x: Tensor, dense: bool = False) -> None:
    d = x.shape[-1]
    shapes = ((d,), (d, d)) if dense else ((d,),)
    if inverse_mass is not None and (
        not isinstance(inverse_mass, Tensor) or tuple(inverse_mass.shape) not in shapes
    ):
        shape = tuple(inverse_mass.shape) if isinstance(inverse_mass, Tensor) else inverse_mass
        also = f" or a ({d}, {d}) matrix" if dense else ""
        raise ValueError(f"inverse_mass must be a ({d},) tensor{also}, got {shape}")


class _Preconditioner:
    r"""The Langevin preconditioner :math:`A` (the inverse mass): the identity, a diagonal
    ``(D,)`` or a dense symmetric positive definite ``(D, D)`` matrix with its Cholesky factor
    :math:`L L^\top = A`, applied to the rows of ``(C, D)`` tensors."""

    def __init__(self, inverse_mass: Tensor | None, x: Tensor) -> None:
        _check_inverse_mass(inverse_mass, x, dense=True)
        self.dense = inverse_mass is not None and inverse_mass.dim() == 2
        self.a: Tensor | float = 1.0
        if inverse_mass is not None:
            self.a = inverse_mass.to(dtype=x.dtype, device=x.device)
        if self.dense:
            a = self.a
            # checked where it costs no device synchronisation; elsewhere a matrix that is not
            # positive definite gives a nan factor, hence non-finite proposals, all rejected
            if a.device.type == "cpu":
                scale = float(a.diagonal().abs().max())
                if not torch.allclose(a, a.mT, rtol=1e-5, atol=1e-5 * scale):
                    raise ValueError("inverse_mass must be a symmetric matrix")
            self.a = a = 0.5 * (a + a.mT)
            self.chol, info = torch.linalg.cholesky_ex(a)
            if a.device.type == "cpu" and int(info) != 0:
                raise ValueError("inverse_mass must be a positive definite matrix")

    def apply(self, v: Tensor) -> Tensor:
        r""":math:`A v` for each row ``v``."""
        return v @ self.a if self.dense else self.a * v

    def noise(self, z: Tensor, scale: Tensor) -> Tensor:
        r""":math:`\sqrt{s}\,L z` for each row ``z`` (:math:`L L^\top = A`): a draw of
        :math:`\mathcal N(0, s A)` from a standard normal ``z``; ``scale`` ``s`` is ``(C, 1)``."""
        if self.dense:
            return scale.sqrt() * (z @ self.chol.mT)
        return (scale * self.a).sqrt() * z

    def quad(self, r: Tensor) -> Tensor:
        r""":math:`r^\top A^{-1} r` for each row ``r``, ``(C,)``."""
        if self.dense:  # ||L^{-1} r||^2, as the rows of r L^{-T}
            w = torch.linalg.solve_triangular(self.chol.mT, r, upper=True, left=False)
            return w.pow(2).sum(-1)
        return (r**2 / self.a).sum(-1)


def _langevin_proposal(
    state: WalkerState, step_size: float | Tensor, inverse_mass: Tensor | None = None
) -> tuple[Tensor, Tensor, _Preconditioner]:
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    pre = _Preconditioner(inverse_mass, state.x)
    eps = _per_walker(step_size, state.x)
    noise = torch.randn_like(state.x)
    return state.x - eps * pre.apply(state.grad) + pre.noise(noise, 2 * eps), eps, pre


def ula_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of the unadjusted Langevin algorithm (no Metropolis correction).

    .. math:: x' = x - \epsilon A \nabla U(x) + \sqrt{2 \epsilon}\, L \xi, \qquad L L^\top = A,

    with :math:`A` the ``inverse_mass``, diagonal ``(D,)`` or dense ``(D, D)`` (identity when
    ``None``), a preconditioner as in :func:`mala_step`. The chain targets ``exp(-U)`` only as
    ``step_size -> 0``. A proposal with a non-finite potential or gradient is not taken.
    """
    x_new, _, _ = _langevin_proposal(state, step_size, inverse_mass)
    u_new, g_new = potential_and_grad(potential_fn, x_new)
    ok = _finite_rows(u_new, g_new)
    new_state = select(ok, WalkerState(x_new, u_new, g_new), state._replace(log_q=None))
    return new_state, MoveInfo(ok.to(u_new.dtype), ok, new_state.potential_energy, ~ok)


def _langevin_log_q(
    x_to: Tensor, x_from: Tensor, grad_from: Tensor, eps: Tensor, pre: _Preconditioner
) -> Tensor:
    # log N(x_to; x_from - eps A grad, 2 eps A) up to a constant shared by both directions
    return -pre.quad(x_to - x_from + eps * pre.apply(grad_from)) / (4 * eps[:, 0])


def mala_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo]:
    r"""One step of the Metropolis-adjusted Langevin algorithm, preconditioned.

    Proposal :math:`x' = x - \epsilon A \nabla U(x) + \sqrt{2\epsilon}\, L \xi`,
    :math:`\xi \sim \mathcal N(0, I)`, :math:`L L^\top = A`, accepted with probability
    :math:`\min\{1, e^{U(x) - U(x')} q(x \mid x') / q(x' \mid x)\}`, where
    :math:`q(x' \mid x) = \mathcal N(x'; x - \epsilon A \nabla U(x), 2 \epsilon A)`, so that

    .. math::

        \log\frac{q(x \mid x')}{q(x' \mid x)} = \frac{1}{4\epsilon}\Big(
            \lVert x' - x + \epsilon A \nabla U(x) \rVert_{A^{-1}}^2
            - \lVert x - x' + \epsilon A \nabla U(x') \rVert_{A^{-1}}^2\Big),
        \qquad \lVert r \rVert_{A^{-1}}^2 = r^\top A^{-1} r.

    :math:`A` is the ``inverse_mass`` :math:`M^{-1}`: ``None`` (identity), a diagonal ``(D,)``
    or a dense symmetric positive definite ``(D, D)`` matrix (its Cholesky factor is computed
    at each call; :math:`A^{-1}` is applied by triangular solves). A preconditioner, ideally
    the target's covariance (its diagonal: the per-coordinate variances), lets one step size
    suit coordinates of very different scales and, dense, strongly correlated ones; it is
    HMC's inverse mass matrix. In the parametrisation of Roberts & Rosenthal,
    :math:`x' = x - \tfrac{h^2}{2} A \nabla U + h L \xi`, ``step_size`` is
    :math:`\epsilon = h^2/2`. The optimal acceptance rate in high dimension is about 0.574.

    :param state: current state, with ``grad`` (:func:`~pyro_ebm.samplers.init_state`).
    :param potential_fn: batched potential ``U``, ``(C, D) -> (C,)``.
    :param step_size: :math:`\epsilon`, a number or a ``(C,)`` tensor (one per walker).
    :param inverse_mass: the preconditioner :math:`A`, ``(D,)`` or ``(D, D)`` (moved to the
        positions' device and dtype). A dense matrix that is not symmetric positive definite
        raises ``ValueError`` on the CPU; elsewhere (to avoid a device synchronisation) its
        proposals are non-finite and all rejected.
    :returns: ``(new_state, info)``; a proposal with a non-finite potential or gradient is
        rejected and flagged in ``info.nonfinite``.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import init_state, mala_step
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> s = init_state(U, torch.zeros(4, 2))
        >>> s, info = mala_step(s, U, 0.5)
        >>> info.accept_prob.shape
        torch.Size([4])
        >>> cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])  # a dense preconditioner
        >>> s, info = mala_step(s, U, 0.5, inverse_mass=cov)
        >>> s.x.shape
        torch.Size([4, 2])

    References: Roberts, Rosenthal (1998), "Optimal scaling of discrete approximations to
    Langevin diffusions", J. R. Statist. Soc. B 60(1), 255-268; Girolami, Calderhead (2011),
    "Riemann manifold Langevin and Hamiltonian Monte Carlo methods" (a constant metric).
    """
    x_new, eps, pre = _langevin_proposal(state, step_size, inverse_mass)
    u_new, g_new = potential_and_grad(potential_fn, x_new)
    ok = _finite_rows(u_new, g_new)
    log_ratio = (
        state.potential_energy
        - u_new
        + _langevin_log_q(state.x, x_new, g_new, eps, pre)
        - _langevin_log_q(x_new, state.x, state.grad, eps, pre)
    )
    return accept_reject(
        state._replace(log_q=None), WalkerState(x_new, u_new, g_new), log_ratio, ok
    )


def _hmc_metric(inverse_mass: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""A dense inverse mass :math:`A` ``(D, D)`` (moved to ``x``'s dtype and device, made exactly
    symmetric; checked as :func:`mala_step`'s) and a momentum draw :math:`p \sim \mathcal N(0,
    A^{-1})` for each row of ``x``: :math:`p = L^{-\top} z`, :math:`L L^\top = A`,
    :math:`z \sim \mathcal N(0, I)` (its covariance is :math:`L^{-\top} L^{-1} = A^{-1} = M`)."""
    pre = _Preconditioner(inverse_mass, x)
    z = torch.randn_like(x)
    # rows: p = z L^{-1}, i.e. p^T = L^{-T} z^T
    return pre.a, torch.linalg.solve_triangular(pre.chol, z, upper=False, left=False)


def _momentum(inverse_mass: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The inverse mass :math:`A` as the leapfrog takes it (``(D,)`` ones when ``None``, else
    diagonal ``(D,)`` or dense ``(D, D)``) and a momentum :math:`p \sim \mathcal N(0, A^{-1})`
    for each row of ``x``."""
    if inverse_mass is not None and inverse_mass.dim() == 2:
        return _hmc_metric(inverse_mass, x)
    inv_m = torch.ones_like(x[0]) if inverse_mass is None else inverse_mass.to(x)
    return inv_m, torch.randn_like(x) / inv_m.sqrt()


def _kinetic(p: Tensor, inv_m: Tensor) -> Tensor:
    r"""Kinetic energy :math:`\tfrac12 p^\top A p` of each row of ``p``, ``(C,)``; ``inv_m``
    :math:`A` diagonal ``(D,)`` or dense ``(D, D)``."""
    if inv_m.dim() == 2:
        return 0.5 * ((p @ inv_m) * p).sum(-1)
    return 0.5 * (p**2 * inv_m).sum(-1)


def _velocity(p: Tensor, inv_m: Tensor) -> Tensor:
    r""":math:`\dot q = A p` for each row of ``p``; ``inv_m`` :math:`A` ``(D,)`` or ``(D, D)``."""
    return p @ inv_m if inv_m.dim() == 2 else inv_m * p


def _leapfrog(
    potential_fn: PotentialFn,
    state: WalkerState,
    p: Tensor,
    eps: Tensor,
    inv_m: Tensor,
    num_steps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""``num_steps`` leapfrog steps from ``(state.x, p)``, all walkers in one batched op.

    ``inv_m`` is the inverse mass :math:`A`, diagonal ``(D,)`` or dense symmetric ``(D, D)``
    (see :func:`_hmc_metric`); a position step is :math:`x \leftarrow x + \epsilon A p`.

    Returns the end point ``(x, p, U(x), ∇U(x), ok)``, where ``ok`` ``(C,)`` is False for a
    walker whose trajectory met a non-finite potential or gradient: from there on its gradient is
    taken as zero (the walker coasts), so that ``nan`` does not spread through the arithmetic; its
    proposal must be rejected. Shared by :func:`hmc_step` and the ChEES step.
    """
    x, g = state.x, state.grad
    u = state.potential_energy
    ok = torch.ones_like(u, dtype=torch.bool)
    dense = inv_m.dim() == 2
    for _ in range(num_steps):
        p = p - 0.5 * eps * g
        if dense:
            x = x + eps * (p @ inv_m)
        else:
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

    :param inverse_mass: inverse mass matrix :math:`A = M^{-1}`, diagonal ``(D,)`` or dense
        symmetric positive definite ``(D, D)`` (identity when ``None``); the momentum is
        :math:`p \sim \mathcal N(0, M)` and the kinetic energy :math:`\tfrac12 p^\top A p`.

    A trajectory that meets a non-finite potential or gradient is rejected and flagged in
    ``info.nonfinite`` (a divergence, in Pyro's words).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    eps = _per_walker(step_size, state.x)
    inv_m, p = _momentum(inverse_mass, state.x)
    kinetic0 = _kinetic(p, inv_m)
    x, p, u, g, ok = _leapfrog(potential_fn, state, p, eps, inv_m, num_steps)
    kinetic1 = _kinetic(p, inv_m)
    log_ratio = state.potential_energy + kinetic0 - u - kinetic1
    return accept_reject(state._replace(log_q=None), WalkerState(x, u, g), log_ratio, ok)
