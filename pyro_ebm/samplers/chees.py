r"""ChEES-HMC: many-chain HMC whose trajectory length is adapted by the ChEES criterion.

All ``C`` chains make the same number of leapfrog steps, so a transition is one batched tensor
operation per leapfrog step (:func:`chees_hmc_step`). :class:`ChEESAdapter` tunes, during
warmup and from the whole ensemble of chains at once,

- the step size, by dual averaging on the harmonic mean of the chains' acceptance
  probabilities;
- the trajectory length :math:`T`, by stochastic gradient ascent on the ChEES criterion
  (Change in the Estimator of the Expected Square)

  .. math::

      \mathrm{ChEES}(T) = \tfrac14\, \mathbb E\Big[\big(\lVert q' - \mathbb E q\rVert^2
          - \lVert q - \mathbb E q\rVert^2\big)^2\Big],

  with :math:`q` a chain's position before a transition and :math:`q'` its proposal;
- the inverse mass matrix, diagonal (the chains' variances) or dense (their covariance), in
  Stan's windows.

Each transition integrates for a jittered time :math:`uT`, with :math:`u \in (0, 1)` from a
Halton sequence shared by the chains (jitter avoids the resonances of a fixed trajectory length,
and is part of the sampler: it continues after warmup).

References:

- Hoffman, Radul, Sountsov (2021), "An Adaptive-MCMC Scheme for Setting Trajectory Lengths in
  Hamiltonian Monte Carlo", AISTATS, http://proceedings.mlr.press/v130/hoffman21a.html
- Hoffman, Gelman (2014), "The No-U-Turn Sampler", https://arxiv.org/abs/1111.4246 (dual
  averaging).
- Stan Reference Manual, "HMC algorithm parameters: automatic parameter tuning" (the warmup
  windows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int, check_positive
from .adaptation import MassMatrixAdapter, StepSizeAdapter
from .local import (
    MAX_ENERGY_ERROR,
    _check_inverse_mass,
    _kinetic,
    _leapfrog,
    _momentum,
    _per_walker,
    _velocity,
)
from .state import MoveInfo, PotentialFn, WalkerState, accept_reject

__all__ = ["ChEESAdapter", "ChEESProposal", "chees_hmc_step"]


class ChEESProposal(NamedTuple):
    r"""What :class:`ChEESAdapter` needs from one transition of ``C`` chains.

    :param x: proposed positions ``(C, D)`` (the end of each trajectory, accepted or not).
    :param velocity: :math:`\dot q = M^{-1} p` at the end of each trajectory, ``(C, D)``.
    :param x_init: positions at the start of the transition ``(C, D)``.
    :param accept_prob: Metropolis-Hastings acceptance probability of each proposal ``(C,)``.
    :param divergent: ``(C,)`` bool, the trajectory met a non-finite potential or gradient, or
        its energy error exceeded :data:`MAX_ENERGY_ERROR` (such a proposal is rejected).
    :param num_steps: the number of leapfrog steps of the transition.
    """

    x: Tensor
    velocity: Tensor
    x_init: Tensor
    accept_prob: Tensor
    divergent: Tensor
    num_steps: int


def chees_hmc_step(
    state: WalkerState,
    potential_fn: PotentialFn,
    step_size: float | Tensor,
    num_steps: int,
    inverse_mass: Tensor | None = None,
) -> tuple[WalkerState, MoveInfo, ChEESProposal]:
    r"""One HMC transition of all chains with ``num_steps`` leapfrog steps each.

    The momentum is :math:`p \sim \mathcal N(0, M)` with the mass :math:`M = A^{-1}`, :math:`A`
    the ``inverse_mass``: diagonal, :math:`M = \mathrm{diag}(1 / A)`, or dense, :math:`p =
    L^{-\top} z` with :math:`L L^\top = A`, :math:`z \sim \mathcal N(0, I)`; each position step
    of the leapfrog is :math:`q \leftarrow q + \epsilon A p`. The proposal, the end of the
    trajectory, is accepted with probability :math:`\min\{1, e^{H(q, p) - H(q', p')}\}`,
    :math:`H(q, p) = U(q) + \tfrac12 p^\top A p`. The math is that of
    :func:`~pyro_ebm.samplers.hmc_step` (the same random draws give the same chain), plus:

    - a proposal whose energy error :math:`H(q', p') - H(q, p)` exceeds
      :data:`MAX_ENERGY_ERROR` is a divergence and is rejected (its acceptance probability,
      below :math:`e^{-1000}`, is set to 0);
    - the step also returns a :class:`ChEESProposal`, what :meth:`ChEESAdapter.update` needs.

    A trajectory that meets a non-finite potential or gradient is rejected and flagged in
    ``info.nonfinite``; the other chains are unaffected.

    :param state: current state, with ``grad`` (:func:`~pyro_ebm.samplers.init_state`).
    :param potential_fn: batched potential ``U``, ``(C, D) -> (C,)``.
    :param step_size: leapfrog step size, a number or a ``(C,)`` tensor.
    :param num_steps: leapfrog steps, shared by all chains (jittered by
        :meth:`ChEESAdapter.num_steps`).
    :param inverse_mass: inverse mass matrix :math:`A`, diagonal ``(D,)`` or dense symmetric
        positive definite ``(D, D)`` (identity when ``None``); moved to the positions' device and
        dtype. A dense one that is not symmetric positive definite raises ``ValueError`` on the
        CPU (as in :func:`~pyro_ebm.samplers.mala_step`).
    :returns: ``(new_state, info, proposal)``.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import chees_hmc_step, init_state
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> state = init_state(U, torch.zeros(8, 2))
        >>> state, info, proposal = chees_hmc_step(state, U, 0.5, 3)
        >>> proposal.velocity.shape, proposal.divergent.any().item()
        (torch.Size([8, 2]), False)
    """
    num_steps = check_int("num_steps", num_steps, 1)
    if state.grad is None:
        raise ValueError("state.grad is None: build the state with init_state(..., with_grad=True)")
    _check_inverse_mass(inverse_mass, state.x, dense=True)
    eps = _per_walker(step_size, state.x)
    inv_m, p = _momentum(inverse_mass, state.x)
    kinetic0 = _kinetic(p, inv_m)
    x, p, u, g, ok = _leapfrog(potential_fn, state, p, eps, inv_m, num_steps)
    kinetic1 = _kinetic(p, inv_m)
    log_ratio = state.potential_energy + kinetic0 - u - kinetic1
    too_large = -log_ratio > MAX_ENERGY_ERROR  # False where nan (those are not ok anyway)
    log_ratio = torch.where(too_large, torch.full_like(log_ratio, -torch.inf), log_ratio)
    new_state, info = accept_reject(state._replace(log_q=None), WalkerState(x, u, g), log_ratio, ok)
    divergent = info.nonfinite | too_large
    proposal = ChEESProposal(
        x, _velocity(p, inv_m), state.x, info.accept_prob, divergent, num_steps
    )
    return new_state, info, proposal


def _halton(n: int) -> float:
    r"""The ``n``-th element (``n >= 1``) of the base-2 Halton (van der Corput) sequence, in
    ``(0, 1)``: 1/2, 1/4, 3/4, 1/8, 5/8, ..."""
    value, weight = 0.0, 0.5
    while n:
        value += weight * (n & 1)
        n >>= 1
        weight *= 0.5
    return value


class ChEESAdapter:
    r"""Warmup adaptation of ChEES-HMC: step size, trajectory length and mass matrix.

    Each iteration, run :func:`chees_hmc_step` with :attr:`step_size`, :meth:`num_steps` and
    :attr:`inverse_mass`, then pass its :class:`ChEESProposal` to :meth:`update`. After
    ``warmup_steps`` updates (or an explicit :meth:`freeze`) the parameters are frozen at their
    final values and :meth:`update` only advances the jitter, which continues: the number of
    leapfrog steps of iteration :math:`k` is

    .. math:: L_k = \min\{L_{\max}, \max(1, \lceil u_k T / \epsilon \rceil)\},

    with :math:`u_k` the :math:`k`-th element of the base-2 Halton sequence, shared by the chains.

    *Step size.* Nesterov dual averaging (:class:`~pyro_ebm.samplers.StepSizeAdapter`) toward
    ``target_accept`` on the harmonic mean :math:`(\frac1n \sum_c 1/a_c)^{-1}` of the acceptance
    probabilities of the ``n`` non-divergent chains (the harmonic mean is dominated by the
    chains that accept least, so no chain is left stuck); the final step size is the iterate
    average. The dual averaging restarts, from the current step size, after each update of the
    mass matrix.

    *Trajectory length.* Stochastic gradient ascent on :math:`\log T`. With :math:`m` the mean of
    the initial positions, :math:`m'` the mean of the proposals weighted by acceptance, and
    :math:`v'` the velocity at the end of the trajectory, chain :math:`c` contributes

    .. math::

        g_c = u_k T \big(\lVert q'_c - m'\rVert^2 - \lVert q_c - m\rVert^2\big)
              \,(q'_c - m')^\top v'_c,

    an unbiased estimate of :math:`\partial\,\mathrm{ChEES}(u T) / \partial \log T`; the
    gradient :math:`g = \sum_c a_c g_c / \sum_c a_c` (non-divergent chains) drives Adam
    (``learning_rate``, :math:`\beta_1 = 0`, :math:`\beta_2 = 0.95`), each step clipped to
    :math:`\pm 0.35`. :math:`T` is used clipped to :math:`[\epsilon, L_{\max}\epsilon]`; the
    iterate itself is bounded from above only, so that the large step sizes the dual averaging
    tries after a restart do not drag it up. The final :math:`T` is the exponential moving
    average of :math:`\log T` with weight :math:`k^{-\text{decay}}` at update :math:`k`.

    *Mass matrix.* At the end of each slow window of
    :func:`~pyro_ebm.samplers.warmup_windows` the inverse mass becomes the variance of the
    chains' positions at the start of each iteration, pooled over the chains and the
    iterations of the window (``n`` samples), regularised as Stan does:
    :math:`\frac{n}{n + 5}\hat\sigma^2 + 10^{-3}\frac{5}{n + 5}`. The trajectory length is
    carried over to the new metric: going from inverse mass :math:`a` to :math:`a'`, coordinate
    :math:`i` oscillates :math:`\sqrt{a'_i / a_i}` times faster, and ChEES weighs it by its
    variance squared (about :math:`a_i'^2`), so

    .. math::

        \log T \leftarrow \log T + \tfrac12 \sum_i w_i \log(a_i / a'_i),
        \qquad w_i = a_i'^2 / \textstyle\sum_j a_j'^2.

    Without it, a :math:`T` learnt under the old metric can stay near a local maximum of the
    oscillating ChEES objective of the new metric, far from its best value.

    With ``full_mass`` the inverse mass :math:`A` is dense: at a window's end it becomes the
    pooled covariance :math:`\frac{n}{n + 5}\hat\Sigma + 10^{-3}\frac{5}{n + 5} I`
    (:class:`~pyro_ebm.samplers.MassMatrixAdapter`), and the carry-over of :math:`T` is made in
    the normal modes of the change from :math:`A` to :math:`A' = L L^\top`: with
    :math:`(\mu_k, u_k)` the eigenpairs of :math:`L^{-1} A L^{-\top}`, mode :math:`k` (direction
    :math:`L u_k`, variance about :math:`s_k = \lVert L u_k\rVert^2`) oscillates
    :math:`\sqrt{\mu_k}` times slower under :math:`A'` than under :math:`A`, so
    :math:`\log T \leftarrow \log T + \tfrac12 \sum_k w_k \log \mu_k`,
    :math:`w_k = s_k^2 / \sum_j s_j^2` (the diagonal rule when both are diagonal).

    :param dim: dimension ``D`` of the positions.
    :param warmup_steps: number of warmup iterations; the adapter freezes after as many
        :meth:`update` calls.
    :param step_size: initial step size.
    :param trajectory_length: initial trajectory length :math:`T` (default: one step,
        ``step_size``).
    :param target_accept: harmonic-mean acceptance probability to aim for (0.651 is optimal
        for HMC in high dimension).
    :param max_num_steps: cap :math:`L_{\max}` on the leapfrog steps of one transition.
    :param learning_rate: Adam's learning rate for :math:`\log T`.
    :param decay: the moving average of :math:`\log T` gives weight :math:`k^{-\text{decay}}`
        to update :math:`k` (in ``(0, 1]``; 1 averages all updates equally).
    :param adapt_mass: adapt the inverse mass matrix.
    :param full_mass: a dense ``(D, D)`` inverse mass matrix (the chains' covariance) instead of
        a diagonal ``(D,)`` one (their variances).
    :param adapt_step_size: adapt the step size (else it stays ``step_size``).
    :param adapt_trajectory_length: adapt the trajectory length (else it stays
        ``trajectory_length``, clipped to :math:`[\epsilon, L_{\max}\epsilon]`; the jitter
        remains).
    :param inverse_mass: initial inverse mass ``(D,)``, or with ``full_mass`` a symmetric
        positive definite ``(D, D)`` (default: the identity).
    :param init_buffer, term_buffer, base_window: Stan's warmup windows, see
        :func:`~pyro_ebm.samplers.warmup_windows`.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import ChEESAdapter, chees_hmc_step, init_state
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> state = init_state(U, torch.randn(16, 3))
        >>> adapter = ChEESAdapter(dim=3, warmup_steps=30, step_size=0.5)
        >>> for _ in range(40):
        ...     state, info, proposal = chees_hmc_step(
        ...         state, U, adapter.step_size, adapter.num_steps(), adapter.inverse_mass
        ...     )
        ...     adapter.update(proposal)
        >>> adapter.frozen, adapter.num_steps() <= adapter.max_num_steps
        (True, True)
    """

    #: Adam's decay of the mean squared gradient (TFP's and the paper's)
    _BETA2 = 0.95
    #: bound on one update of log T (about log(2) / 2, TFP's)
    _MAX_LOG_UPDATE = 0.35

    def __init__(
        self,
        dim: int,
        warmup_steps: int,
        step_size: float = 0.1,
        trajectory_length: float | None = None,
        target_accept: float = 0.651,
        max_num_steps: int = 1000,
        learning_rate: float = 0.025,
        decay: float = 0.5,
        adapt_mass: bool = True,
        adapt_step_size: bool = True,
        adapt_trajectory_length: bool = True,
        inverse_mass: Tensor | None = None,
        init_buffer: int = 75,
        term_buffer: int = 50,
        base_window: int = 25,
        full_mass: bool = False,
    ) -> None:
        self.dim = check_int("dim", dim, 1)
        self.full_mass = bool(full_mass)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        step_size = check_positive("step_size", step_size)
        if trajectory_length is None:
            trajectory_length = step_size
        trajectory_length = check_positive("trajectory_length", trajectory_length)
        if not (isinstance(target_accept, float | int) and 0 < target_accept < 1):
            raise ValueError(f"target_accept must lie in (0, 1), got {target_accept!r}")
        self.max_num_steps = check_int("max_num_steps", max_num_steps, 1)
        self.learning_rate = check_positive("learning_rate", learning_rate)
        self.decay = check_positive("decay", decay)
        if self.decay > 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        if inverse_mass is None:
            inverse_mass = torch.eye(self.dim) if self.full_mass else torch.ones(self.dim)
        elif self.full_mass:
            if not (
                isinstance(inverse_mass, Tensor)
                and inverse_mass.shape == (self.dim, self.dim)
                and bool(torch.isfinite(inverse_mass).all())
                and torch.allclose(inverse_mass, inverse_mass.mT)
                and int(torch.linalg.cholesky_ex(inverse_mass)[1]) == 0
            ):
                raise ValueError(
                    f"inverse_mass must be a ({self.dim}, {self.dim}) symmetric positive "
                    f"definite tensor with full_mass=True, got {inverse_mass!r}"
                )
        elif not (
            isinstance(inverse_mass, Tensor)
            and inverse_mass.shape == (self.dim,)
            and bool(torch.isfinite(inverse_mass).all() and (inverse_mass > 0).all())
        ):
            raise ValueError(
                f"inverse_mass must be a ({self.dim},) tensor of positive finite numbers, "
                f"got {inverse_mass!r}"
            )
        self.target_accept = float(target_accept)
        self.adapt_mass = bool(adapt_mass)
        self.adapt_step_size = bool(adapt_step_size)
        self.adapt_trajectory_length = bool(adapt_trajectory_length)
        self._mass = MassMatrixAdapter(
            self.dim,
            self.warmup_steps if self.adapt_mass else 0,
            full_mass=self.full_mass,
            inverse_mass=inverse_mass,
            init_buffer=init_buffer,
            term_buffer=term_buffer,
            base_window=base_window,
        )
        #: iterations (0-based) at whose end the inverse mass is updated
        self.mass_update_iterations = self._mass.update_iterations
        self._step_size0 = step_size
        self._da = StepSizeAdapter(step_size, self.target_accept)
        self._log_t = self._clip_log_t(math.log(trajectory_length), step_size)
        self._log_t_avg = self._log_t
        self._sq_grad_avg = 0.0
        self._num_updates = 0  # adaptation updates made (the Adam and averaging counter)
        self._iteration = 0  # transitions made (the jitter index), warmup and after
        self._frozen = False
        self._final_step_size = step_size
        self._final_log_t = self._log_t
        #: harmonic-mean acceptance of the last update (nan before any)
        self.harmonic_accept = math.nan
        self._frozen = self.warmup_steps == 0  # no warmup: the parameters as given

    # -- parameters -------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        r"""Whether adaptation has ended (after ``warmup_steps`` updates, or :meth:`freeze`)."""
        return self._frozen

    @property
    def step_size(self) -> float:
        r"""Step size for the next transition."""
        return self._final_step_size if self._frozen else self._current_step_size()

    @property
    def trajectory_length(self) -> float:
        r"""Trajectory length :math:`T` before jitter, for the next transition."""
        if self._frozen:
            return math.exp(self._final_log_t)
        return math.exp(self._clip_log_t(self._log_t, self._current_step_size()))

    @property
    def inverse_mass(self) -> Tensor:
        r"""Inverse mass matrix for the next transition: ``(D,)`` (diagonal) or ``(D, D)``
        (``full_mass``)."""
        return self._mass.inverse_mass

    @property
    def final_step_size(self) -> float:
        r"""The step size :meth:`freeze` fixes (or fixed): the dual-averaging iterate average."""
        return self._final_step_size if self._frozen else self._averaged_step_size()

    @property
    def final_trajectory_length(self) -> float:
        r"""The trajectory length :meth:`freeze` fixes (or fixed): the moving average of
        :math:`\log T`, clipped to :math:`[\epsilon, L_{\max}\epsilon]` for the final step
        size."""
        if self._frozen:
            return math.exp(self._final_log_t)
        return math.exp(self._clip_log_t(self._log_t_avg, self.final_step_size))

    @property
    def iteration(self) -> int:
        r"""Number of :meth:`update` calls so far (warmup and after)."""
        return self._iteration

    def jitter(self) -> float:
        r"""The jitter fraction :math:`u_k \in (0, 1)` of the next transition."""
        return _halton(self._iteration + 1)

    def num_steps(self) -> int:
        r"""Leapfrog steps of the next transition,
        :math:`\min\{L_{\max}, \max(1, \lceil u_k T / \epsilon \rceil)\}` (the same until
        :meth:`update` is called)."""
        steps = math.ceil(self.jitter() * self.trajectory_length / self.step_size)
        return min(max(steps, 1), self.max_num_steps)

    def freeze(self) -> None:
        r"""End adaptation: fix :attr:`final_step_size`, :attr:`final_trajectory_length` and the
        current inverse mass. Called by :meth:`update` at the end of warmup."""
        if self._frozen:
            return
        self._final_step_size = self._averaged_step_size()
        self._final_log_t = self._clip_log_t(self._log_t_avg, self._final_step_size)
        self._frozen = True

    # -- adaptation -------------------------------------------------------------------------
    def update(self, proposal: ChEESProposal) -> None:
        r"""Record one transition of all chains (the :class:`ChEESProposal` returned by
        :func:`chees_hmc_step` run with this adapter's parameters) and adapt. Once frozen, only
        advance the jitter."""
        u, trajectory_length = self.jitter(), self.trajectory_length
        self._iteration += 1
        if self._frozen:
            return
        x0 = proposal.x_init.detach()
        fewest = 2 if self.adapt_trajectory_length else 1  # ChEES needs a spread of chains
        if x0.dim() != 2 or x0.shape[0] < fewest or x0.shape[1] != self.dim:
            raise ValueError(
                f"the proposal must hold at least {fewest} chain(s) of dimension {self.dim}, "
                f"got positions of shape {tuple(x0.shape)}"
            )
        self._num_updates += 1
        grad, harmonic = self._statistics(proposal, u * trajectory_length)
        self.harmonic_accept = harmonic if math.isfinite(harmonic) else 0.0  # all divergent: 0

        # step size: dual averaging on the harmonic-mean acceptance
        if self.adapt_step_size:
            self._da.update(torch.tensor(self.harmonic_accept))
        step_size = self._current_step_size()

        # trajectory length: Adam (beta1 = 0) ascent on log T, clipped
        if self.adapt_trajectory_length and math.isfinite(grad):
            b2 = self._BETA2
            self._sq_grad_avg = b2 * self._sq_grad_avg + (1 - b2) * grad**2
            sq_grad = self._sq_grad_avg / (1 - b2**self._num_updates)
            step = self.learning_rate * grad / math.sqrt(sq_grad + 1e-20)
            step = min(max(step, -self._MAX_LOG_UPDATE), self._MAX_LOG_UPDATE)
            # bounded above only: a transient leap of the dual averaging's step size must not
            # drag T up with it (T is clipped from below where it is used)
            self._log_t = min(self._log_t + step, math.log(self.max_num_steps * step_size))
        weight = self._num_updates ** (-self.decay)
        self._log_t_avg = weight * self._log_t + (1 - weight) * self._log_t_avg

        # mass matrix: pool the window's positions; update at the window's end
        old_inverse_mass = self._mass.inverse_mass
        if self.adapt_mass and self._mass.update(x0):
            if self.adapt_trajectory_length:
                new_inverse_mass = self._mass.inverse_mass
                self._rescale_log_t(old_inverse_mass.to(new_inverse_mass), new_inverse_mass)
            self._da.reset(step_size)

        if self._iteration >= self.warmup_steps:
            self.freeze()

    def _statistics(self, proposal: ChEESProposal, time: float) -> tuple[float, float]:
        r"""The ChEES gradient with respect to log T and the harmonic-mean acceptance (one
        device synchronisation)."""
        ok = ~proposal.divergent
        accept = torch.where(ok, proposal.accept_prob, torch.zeros_like(proposal.accept_prob))
        x1 = torch.where(ok[:, None], proposal.x, torch.zeros_like(proposal.x))
        v1 = torch.where(ok[:, None], proposal.velocity, torch.zeros_like(proposal.velocity))
        x0 = proposal.x_init
        total = accept.sum()
        c1 = x1 - (accept[:, None] * x1).sum(0) / (total + 1e-20)
        c0 = x0 - x0.mean(0)
        per_chain = (c1.pow(2).sum(-1) - c0.pow(2).sum(-1)) * (c1 * v1).sum(-1)
        per_chain = torch.where(ok & per_chain.isfinite(), per_chain, torch.zeros_like(per_chain))
        grad = time * (accept * per_chain).sum() / (total + 1e-20)
        # harmonic mean over the non-divergent chains: 0 if one of them has probability 0
        inv_mean = torch.where(ok, 1.0 / proposal.accept_prob, torch.zeros_like(accept)).sum()
        harmonic = ok.sum() / inv_mean
        grad, harmonic = torch.stack([grad, harmonic.to(grad.dtype)]).tolist()
        return grad, harmonic

    def _rescale_log_t(self, old: Tensor, new: Tensor) -> None:
        r"""Carry T over a change of the inverse mass from ``old`` to ``new``: coordinate i
        oscillates ``sqrt(new_i / old_i)`` times faster, and ChEES weighs it by its variance
        squared, about ``new_i**2``. Dense: the same in the normal modes of the change (see the
        class docstring)."""
        if new.dim() == 2:
            chol, info = torch.linalg.cholesky_ex(new)
            if int(info) != 0:
                return
            half = torch.linalg.solve_triangular(chol, old, upper=False)  # L^{-1} A
            b = torch.linalg.solve_triangular(chol, half.mT, upper=False)  # L^{-1} A L^{-T}
            mu, u = torch.linalg.eigh(0.5 * (b + b.mT))
            variance = (chol @ u).pow(2).sum(0)  # ||L u_k||^2
            ratio = mu.clamp_min(torch.finfo(mu.dtype).tiny)
        else:
            variance, ratio = new, old / new
        weight = variance.pow(2) / variance.pow(2).sum()
        shift = float(0.5 * (weight * ratio.log()).sum())
        self._log_t += shift
        self._log_t_avg += shift

    def _current_step_size(self) -> float:
        return float(self._da.step_size) if self.adapt_step_size else self._step_size0

    def _averaged_step_size(self) -> float:
        return float(self._da.final_step_size) if self.adapt_step_size else self._step_size0

    def _clip_log_t(self, log_t: float, step_size: float) -> float:
        low = math.log(step_size)
        return min(max(log_t, low), low + math.log(self.max_num_steps))
