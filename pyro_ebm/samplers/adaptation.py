r"""Warmup adaptation: the step size toward a target acceptance rate (Nesterov dual averaging,
:class:`StepSizeAdapter`; a starting value by :func:`find_reasonable_step_size`) and the inverse
mass matrix from the chains' positions in Stan's windows (:class:`MassMatrixAdapter`).

References:

- Hoffman, Gelman (2014), "The No-U-Turn Sampler", https://arxiv.org/abs/1111.4246, Alg. 4
  (a reasonable first step size) and Alg. 5 (dual averaging).
- Stan Reference Manual, "HMC algorithm parameters: automatic parameter tuning" (the warmup
  windows and the regularisation of the mass matrix).
- Chan, Golub, LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample
  variances" (pooling the chains' moments).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._checks import check_int, check_positive

__all__ = [
    "diagonal_curvature",
    "warmup_windows",
    "MassMatrixAdapter",
    "StanWarmup",
    "StepSizeAdapter",
    "StepSizeController",
    "TrackingStepSize",
    "find_reasonable_step_size",
    "stationary_start",
]


class StepSizeAdapter:
    r"""Dual-averaging adaptation of a step size toward ``target_accept``.

    Call :meth:`update` with each step's acceptance probabilities during warmup; it returns the
    step size to use next. After warmup use :attr:`final_step_size` (the iterate average), as
    Stan and Pyro do.

    :param step_size: initial step size.
    :param target_accept: acceptance rate to aim for (0.574 is optimal for MALA, 0.65-0.8 for HMC).
    :param per_walker: adapt one step size per walker (``(C,)`` tensor) instead of one shared
        step size driven by the mean acceptance. Shared is the default: it is what a single chain
        of Pyro's kernels would do, and it is far less noisy with many walkers.
    :param gamma, t0, kappa: dual-averaging constants (Hoffman & Gelman's defaults).

    Example::

        >>> adapter = StepSizeAdapter(0.1, target_accept=0.6)
        >>> import torch
        >>> eps = adapter.update(torch.tensor([1.0, 1.0]))  # accepting too often: grow
        >>> eps > 0.1
        True
    """

    def __init__(
        self,
        step_size: float,
        target_accept: float = 0.574,
        per_walker: bool = False,
        gamma: float = 0.05,
        t0: float = 10.0,
        kappa: float = 0.75,
    ) -> None:
        if not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a positive finite number, got {step_size}")
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
        self.target_accept = target_accept
        self.per_walker = per_walker
        self.gamma, self.t0, self.kappa = gamma, t0, kappa
        self.reset(step_size)

    def reset(self, step_size: float | Tensor) -> None:
        """Restart adaptation from ``step_size``."""
        log_eps = torch.as_tensor(step_size, dtype=torch.get_default_dtype()).log()
        self._mu = log_eps + math.log(10.0)
        self._log_eps = log_eps
        self._log_eps_bar = torch.zeros_like(log_eps)
        self._h_bar = torch.zeros_like(log_eps)
        self._t = 0

    @property
    def step_size(self) -> Tensor | float:
        """The step size to use for the next step."""
        return self._as_output(self._log_eps.exp())

    @property
    def final_step_size(self) -> Tensor | float:
        """The averaged step size to freeze after warmup."""
        if self._t == 0:
            return self.step_size
        return self._as_output(self._log_eps_bar.exp())

    def _as_output(self, eps: Tensor) -> Tensor | float:
        return eps if eps.dim() > 0 else float(eps)

    def update(self, accept_prob: Tensor) -> Tensor | float:
        """Record one step's acceptance probabilities ``(C,)``; return the next step size."""
        a = accept_prob.detach().to(self._h_bar.dtype).cpu().nan_to_num(0.0)
        if not self.per_walker:
            a = a.mean()
        elif self._h_bar.dim() == 0:  # first per-walker update: broadcast the shared state
            shape = a.shape
            self._mu, self._log_eps, self._log_eps_bar, self._h_bar = (
                t.expand(shape).clone()
                for t in (self._mu, self._log_eps, self._log_eps_bar, self._h_bar)
            )
        self._t += 1
        t = self._t
        w = 1.0 / (t + self.t0)
        self._h_bar = (1 - w) * self._h_bar + w * (self.target_accept - a)
        self._log_eps = self._mu - math.sqrt(t) / self.gamma * self._h_bar
        eta = t ** (-self.kappa)
        self._log_eps_bar = eta * self._log_eps + (1 - eta) * self._log_eps_bar
        return self.step_size


class TrackingStepSize:
    r"""Robbins-Monro control of one shared step size toward ``target_accept``:
    :math:`\log\epsilon \leftarrow \log\epsilon + \gamma(\bar a - a^*)`, clipped to
    :math:`[e^{-12}, e^2]`. Unlike dual averaging it never settles, which is what a sampler
    chasing a moving target (an EBM during training) needs. ``target_accept=None`` keeps the step
    size fixed. The interface of :class:`StepSizeController`.

    Example::

        >>> ctrl = TrackingStepSize(0.1, target_accept=0.6)
        >>> ctrl.update(torch.tensor([1.0, 1.0])) > 0.1  # accepting too often: grow
        True
    """

    def __init__(self, step_size: float, target_accept: float | None, rate: float = 0.05):
        self.target_accept = target_accept
        self.rate = rate
        self.reset(step_size)

    def reset(self, step_size: float) -> None:
        """Restart from ``step_size``."""
        self.log_step = math.log(step_size)

    @property
    def step_size(self) -> float:
        """The step size to use for the next step."""
        return math.exp(self.log_step)

    @property
    def final_step_size(self) -> float:
        """The current step size (tracking does not average)."""
        return self.step_size

    def update(self, accept_prob: Tensor) -> float:
        """Move the step size after a move whose acceptance probabilities were ``accept_prob``;
        return the next step size."""
        if self.target_accept is not None:
            a = float(accept_prob.float().nan_to_num(0.0).mean())
            self.log_step = min(max(self.log_step + self.rate * (a - self.target_accept), -12), 2)
        return self.step_size


@runtime_checkable
class StepSizeController(Protocol):
    """The interface of the step-size controllers, :class:`StepSizeAdapter` (dual averaging,
    which settles: warmup) and :class:`TrackingStepSize` (Robbins-Monro, which keeps tracking:
    a target that moves during training)."""

    @property
    def step_size(self) -> float | Tensor:
        """The step size to use for the next step."""
        ...

    @property
    def final_step_size(self) -> float | Tensor:
        """The step size to keep once adaptation stops."""
        ...

    def update(self, accept_prob: Tensor) -> float | Tensor:
        """Record one move's acceptance probabilities ``(C,)``; return the next step size."""
        ...

    def reset(self, step_size: float) -> None:
        """Restart adaptation from ``step_size``."""
        ...


def find_reasonable_step_size(
    accept_prob: Callable[[float | Tensor], Tensor],
    step_size: float | Tensor,
    threshold: float = 0.5,
    max_tries: int = 50,
) -> float | Tensor:
    r"""Double or halve ``step_size`` until the mean acceptance probability of one trial move
    crosses ``threshold`` (Hoffman & Gelman's Alg. 4; Stan runs it at the start of warmup and
    after each update of the mass matrix).

    :param accept_prob: ``step_size -> (C,)`` acceptance probabilities of one trial move of the
        ``C`` chains from their current positions (the trial is not taken).
    :param step_size: where to start (positive, finite): a number, shared by the chains and
        searched from their mean acceptance, or a ``(C,)`` tensor, one step size per chain,
        each searched from its own chain's acceptance (as each of Stan's chains does).
    :param threshold: the mean acceptance to cross, in ``(0, 1)``.
    :param max_tries: at most this many doublings or halvings.
    :returns: the first step size past the crossing (or after ``max_tries``); per chain, a
        ``(C,)`` tensor.

    Example::

        >>> import torch
        >>> accept = lambda eps: torch.tensor([min(1.0, 0.3 / eps)])  # 1/2 at eps = 0.6
        >>> find_reasonable_step_size(accept, 0.01)
        0.64
        >>> accept = lambda eps: (torch.tensor([0.3, 0.003]) / eps).clamp(max=1.0)
        >>> find_reasonable_step_size(accept, torch.tensor([0.01, 0.01]))
        tensor([0.6400, 0.0050])
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    max_tries = check_int("max_tries", max_tries, 1)
    if isinstance(step_size, Tensor):
        if not bool(((step_size > 0) & torch.isfinite(step_size)).all()):
            raise ValueError(f"step_size must be positive and finite, got {step_size!r}")
        step_size = step_size.detach().clone()
        direction = torch.zeros_like(step_size)
        searching = torch.ones_like(step_size, dtype=torch.bool)
        for _ in range(max_tries):
            accept = accept_prob(step_size).detach().nan_to_num(0.0).to(step_size)
            new_direction = torch.where(accept > threshold, 1.0, -1.0).to(step_size)
            searching &= (direction == 0) | (new_direction == direction)
            if not bool(searching.any()):
                break
            direction = torch.where(searching, new_direction, direction)
            step_size = torch.where(searching, step_size * 2.0**direction, step_size)
        return step_size
    step_size = check_positive("step_size", step_size)
    direction = 0
    for _ in range(max_tries):
        mean = float(accept_prob(step_size).detach().nan_to_num(0.0).mean())
        new_direction = 1 if mean > threshold else -1
        if direction and new_direction != direction:
            break
        direction = new_direction
        step_size = step_size * 2.0**direction
    return step_size


def warmup_windows(
    warmup_steps: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25
) -> tuple[int, ...]:
    r"""Iterations (0-based) at whose end the inverse mass matrix is updated, as in Stan.

    Warmup is split into an initial fast window of ``init_buffer`` iterations (step size and
    trajectory length only: the chains are still far from the typical set), slow windows whose
    length doubles from ``base_window`` (each ends with an update of the mass matrix from the
    samples of that window), and a terminal fast window of ``term_buffer`` iterations (the step
    size settles for the final mass matrix). A slow window that would leave less than twice its
    length before the terminal window is stretched to reach it. When the three do not fit in
    ``warmup_steps``, Stan's fallback is used: 15% initial, 10% terminal, the rest one slow
    window; with fewer than 20 warmup steps the mass matrix is not adapted (empty result).

    :param warmup_steps: number of warmup iterations.
    :param init_buffer: length of the initial fast window.
    :param term_buffer: length of the terminal fast window.
    :param base_window: length of the first slow window.
    :returns: the last iteration of each slow window, increasing.

    Example::

        >>> warmup_windows(1000)
        (99, 149, 249, 449, 949)
        >>> warmup_windows(300)
        (99, 249)
    """
    return tuple(
        end for _, end in _slow_windows(warmup_steps, init_buffer, term_buffer, base_window)
    )


def _slow_windows(
    warmup_steps: int, init_buffer: int, term_buffer: int, base_window: int
) -> tuple[tuple[int, int], ...]:
    r"""The slow windows of :func:`warmup_windows` as ``(first, last)`` iterations."""
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    init_buffer = check_int("init_buffer", init_buffer, 0)
    term_buffer = check_int("term_buffer", term_buffer, 0)
    base_window = check_int("base_window", base_window, 1)
    if warmup_steps < 20:
        return ()
    if init_buffer + base_window + term_buffer > warmup_steps:
        init_buffer = int(0.15 * warmup_steps)
        term_buffer = int(0.1 * warmup_steps)
        base_window = warmup_steps - init_buffer - term_buffer
    slow_end = warmup_steps - term_buffer
    windows = []
    start, size = init_buffer, base_window
    while True:
        end = start + size
        if end + 2 * size >= slow_end:
            end = slow_end
        windows.append((start, end - 1))
        if end == slow_end:
            return tuple(windows)
        start, size = end, 2 * size


class MassMatrixAdapter:
    r"""Stan's windowed estimate of the inverse mass matrix from the chains' positions.

    Warmup is cut into windows (the slow windows of
    :func:`~pyro_ebm.samplers.warmup_windows`: an initial buffer of ``init_buffer``
    iterations, windows doubling from ``base_window``, a terminal buffer of ``term_buffer``).
    Call :meth:`update` once per warmup iteration with the positions ``(C, D)`` of the ``C``
    chains. Within a slow window the positions are pooled over chains and iterations (one chain:
    that chain's history, as Stan; many chains advancing together: all of them) into a running
    mean and sum of squares (diagonal) or of cross-products (``full_mass``), merged with Chan et
    al.'s pairwise formula. At the end of a window the inverse mass becomes the sample
    (co)variance of its ``n`` positions, shrunk toward :math:`10^{-3} I` as Stan does,

    .. math::

        A = \frac{n}{n + 5}\,\hat\Sigma + 10^{-3}\,\frac{5}{n + 5}\, I

    (:math:`\hat\Sigma` the diagonal of the variances, or the full covariance), the statistics
    restart, and :meth:`update` returns ``True``: the caller then restarts its step-size
    adaptation (Stan does). After the last window the inverse mass is frozen.

    :param dim: dimension ``D`` of the positions.
    :param warmup_steps: number of warmup iterations (fewer than 20: no adaptation, as Stan).
    :param full_mass: estimate a dense ``(D, D)`` inverse mass instead of its diagonal ``(D,)``.
    :param inverse_mass: the inverse mass before the first window ends (default: identity),
        ``(D,)`` or, with ``full_mass``, ``(D, D)``.
    :param init_buffer, term_buffer, base_window: Stan's windows (its defaults).

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> adapter = MassMatrixAdapter(dim=2, warmup_steps=1000)
        >>> scale = torch.tensor([0.1, 10.0])
        >>> ends = [i for i in range(1000) if adapter.update(scale * torch.randn(4, 2))]
        >>> ends
        [99, 149, 249, 449, 949]
        >>> bool((adapter.inverse_mass / scale**2 - 1).abs().max() < 0.1)
        True
    """

    def __init__(
        self,
        dim: int,
        warmup_steps: int,
        full_mass: bool = False,
        inverse_mass: Tensor | None = None,
        init_buffer: int = 75,
        term_buffer: int = 50,
        base_window: int = 25,
    ) -> None:

        self.dim = check_int("dim", dim, 1)
        self.full_mass = bool(full_mass)
        shape = (self.dim, self.dim) if self.full_mass else (self.dim,)
        if inverse_mass is None:
            inverse_mass = torch.eye(self.dim) if self.full_mass else torch.ones(self.dim)
        elif not (
            isinstance(inverse_mass, Tensor)
            and inverse_mass.shape == shape
            and bool(torch.isfinite(inverse_mass).all())
        ):
            raise ValueError(
                f"inverse_mass must be a {shape} tensor of finite numbers, got {inverse_mass!r}"
            )
        self._inverse_mass = inverse_mass.detach().clone()
        #: the slow windows, ``(first, last)`` warmup iterations (0-based)
        self.windows = _slow_windows(warmup_steps, init_buffer, term_buffer, base_window)
        #: iterations (0-based) at whose end the inverse mass is updated
        self.update_iterations = tuple(last for _, last in self.windows)
        self._iteration = 0
        self._reset_window()

    @property
    def inverse_mass(self) -> Tensor:
        r"""The current inverse mass matrix, ``(D,)`` (diagonal) or ``(D, D)``."""
        return self._inverse_mass

    @property
    def iteration(self) -> int:
        r"""Number of :meth:`update` calls so far."""
        return self._iteration

    @property
    def num_window_samples(self) -> int:
        r"""Positions pooled in the current window so far."""
        return self._n

    def update(self, x: Tensor, curvature: Callable[[Tensor], Tensor] | None = None) -> bool:
        r"""Record the positions ``(C, D)`` of the chains after one warmup iteration; return
        whether this iteration ended a window (the inverse mass then changed).

        :param curvature: optional ``mean (D,) -> diagonal of the Hessian of the potential
            there (D,)`` (e.g. :func:`diagonal_curvature`), called once at each window's end
            (diagonal mass only): each variance is then at least the conditional variance
            :math:`1 / H_{ii}` where :math:`H_{ii} > 0`. For a Gaussian the conditional
            variance is at most the marginal one, so the floor never overshoots; it rescues a
            chain that barely moved in a short window (one chain, a tiny step size: its sample
            variance is then far too small, and the next window's moves smaller still)."""
        index = self._iteration
        self._iteration += 1
        if not any(first <= index <= last for first, last in self.windows):
            return False
        x = x.detach()
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (num_chains, {self.dim}), got {tuple(x.shape)}")
        self._accumulate(x)
        if index not in self.update_iterations:
            return False
        n = self._n
        if n >= 2:
            cov = self._m2 / (n - 1)
            shrink = 1e-3 * (5.0 / (n + 5.0))
            if self.full_mass:
                eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
                new = (n / (n + 5.0)) * cov + shrink * eye
                new = 0.5 * (new + new.T)  # exactly symmetric
            else:
                new = (n / (n + 5.0)) * cov + shrink
                if curvature is not None:
                    h = curvature(self._mean)
                    floor = torch.where(torch.isfinite(h) & (h > 0), 1.0 / h, 0.0)
                    new = torch.maximum(new, floor.to(new))
            self._inverse_mass = new
        self._reset_window()
        return n >= 2

    def _accumulate(self, x: Tensor) -> None:
        r"""Chan et al.'s pairwise update of the window's count, mean and sum of squares (or of
        cross-products)."""
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = centred.T @ centred if self.full_mass else centred.pow(2).sum(0)
        if self._n == 0:
            self._n, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        n = self._n + n_b
        delta = mean_b - self._mean
        spread = torch.outer(delta, delta) if self.full_mass else delta.pow(2)
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + spread * (self._n * n_b / n)
        self._n = n

    def _reset_window(self) -> None:
        self._n, self._mean, self._m2 = 0, None, None


class StanWarmup:
    r"""Stan's warmup of a gradient-based kernel over ``C`` chains advancing together: the step
    size adapted by dual averaging toward ``target_accept`` (:class:`StepSizeAdapter`), one per
    chain from its own acceptance (``per_chain``, as Stan's chains do) or one shared by the
    chains from their mean acceptance, and the inverse mass matrix estimated from their
    positions, pooled, in Stan's windows (:class:`MassMatrixAdapter`, the diagonal floored by
    the potential's curvature). At the start, and after each new mass matrix, the step size
    restarts from a reasonable value (:func:`find_reasonable_step_size`) and the dual averaging
    restarts there; at the end of warmup the averaged step size is frozen. The kernels
    :class:`~pyro_ebm.infer.MALA`, :class:`~pyro_ebm.infer.FlowHMC` and
    :class:`~pyro_ebm.infer.FlowNUTS` run their warmup through it.

    :param dim: dimension of the positions.
    :param warmup_steps: warmup iterations (fewer than 20: the mass matrix is not adapted).
    :param step_size: the initial step size.
    :param target_accept: the mean acceptance to aim for.
    :param adapt_step_size: adapt the step size.
    :param adapt_mass_matrix: adapt the inverse mass matrix.
    :param full_mass: a dense ``(D, D)`` inverse mass matrix instead of a diagonal one.
    :param device: where the inverse mass matrix lives.
    :param trial_threshold: the mean acceptance of one trial move that the reasonable step size
        crosses (MALA's trial move is the move itself: ``target_accept``; HMC's one leapfrog
        step: Pyro's 0.8).
    :param per_chain: one step size per chain, a ``(C,)`` tensor (:attr:`step_size`): a chain
        in a region of the posterior whose scale differs from the others' (a hierarchical
        scale's small values) is not left with a step size tuned for them, which it rejects.
        Otherwise one number for all chains, smoother with many chains.

    Example::

        >>> import torch
        >>> from pyro_ebm.samplers import init_state, mala_step
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> warmup = StanWarmup(2, warmup_steps=100, step_size=1e-3, target_accept=0.574)
        >>> state = init_state(U, torch.randn(8, 2))
        >>> def trial(state, eps):
        ...     return mala_step(state, U, eps, warmup.inverse_mass)[1].accept_prob
        >>> warmup.start(state, trial)
        >>> for t in range(100):
        ...     state, info = mala_step(state, U, warmup.step_size, warmup.inverse_mass)
        ...     warmup.update(t, state, info.accept_prob, trial)
        >>> 0.1 < warmup.step_size < 10.0
        True
    """

    def __init__(
        self,
        dim: int,
        warmup_steps: int,
        step_size: float,
        target_accept: float,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool = False,
        device: torch.device | str | None = None,
        trial_threshold: float | None = None,
        per_chain: bool = False,
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.adapt_step_size = bool(adapt_step_size)
        self.trial_threshold = target_accept if trial_threshold is None else trial_threshold
        self.per_chain = bool(per_chain)
        self._adapter = StepSizeAdapter(step_size, target_accept, per_walker=self.per_chain)
        identity = torch.eye(dim) if full_mass else torch.ones(dim)
        self._mass = MassMatrixAdapter(
            dim, warmup_steps if adapt_mass_matrix else 0, full_mass, identity.to(device)
        )
        #: the step size of the next move: a number, or with ``per_chain`` (once adapting) a
        #: ``(C,)`` tensor
        self.step_size: float | Tensor = step_size

    @property
    def inverse_mass(self) -> Tensor:
        r"""The current inverse mass matrix, ``(D,)`` or ``(D, D)``."""
        return self._mass.inverse_mass

    def start(self, state, trial: Callable) -> None:
        r"""Search a reasonable first step size from the chains' starts (when the step size
        adapts and there is a warmup). ``trial(state, step_size)`` returns the ``(C,)``
        acceptance probabilities of one trial move."""
        if self.adapt_step_size and self.warmup_steps > 0:
            self._restart(state, trial)

    def update(
        self,
        iteration: int,
        state,
        accept_prob: Tensor,
        trial: Callable,
        curvature: Callable[[Tensor], Tensor] | None = None,
        ignore: Tensor | None = None,
        neutral: Tensor | None = None,
    ) -> None:
        r"""After warmup move ``iteration`` (0-based) of the chains, now at ``state``, with
        acceptance probabilities ``accept_prob`` ``(C,)``: update the step size and the mass
        matrix. ``curvature``: the potential's diagonal curvature at a point (see
        :meth:`MassMatrixAdapter.update`). ``ignore``: ``(C,)`` chains whose acceptance no step
        size would change (a fixed-length trajectory that met a non-finite potential, rejected
        whatever the step): the step size follows the others' mean acceptance, or all chains'
        when every one is ignored (without a device synchronisation); per chain, an ignored
        chain's acceptance counts as on target. ``neutral``: ``(C,)`` chains rejected at a point
        whose potential is finite and gradient NaN (a region where the gradient is undefined,
        which rejects any step size; see :class:`~pyro_ebm.samplers.NanGradientRows`): left
        out like ``ignore``'s, but when no chain is left their acceptance counts as on target
        in the mean of all chains, so that such a region cannot drive the step size to 0. (A
        wall or an overflow, a non-finite potential, is ``ignore``'s: with every chain there,
        it still shrinks the step size, which may be too large.)"""
        target = torch.full_like(accept_prob, self._adapter.target_accept)
        if neutral is not None:
            ignore = neutral if ignore is None else ignore | neutral
        if ignore is not None and self.per_chain:
            accept_prob = torch.where(ignore, target, accept_prob)
        elif ignore is not None:
            kept = ~ignore
            count = kept.sum()
            mean = torch.where(kept, accept_prob, 0.0).sum() / count.clamp_min(1)
            # every chain ignored: their acceptance, but on target for the neutral ones
            fallback = accept_prob if neutral is None else torch.where(neutral, target, accept_prob)
            mean = torch.where(count > 0, mean, fallback.mean())
            accept_prob = mean.expand_as(accept_prob)
        if self.adapt_step_size:
            self.step_size = self._adapter.update(accept_prob)
        floor = None if self._mass.full_mass else curvature
        if self._mass.update(state.x, floor) and self.adapt_step_size:
            self._restart(state, trial)  # a new metric: restart the step size (Stan)
        if iteration == self.warmup_steps - 1 and self.adapt_step_size:
            self.step_size = self._adapter.final_step_size

    def _restart(self, state, trial: Callable) -> None:
        if self.per_chain:
            start = torch.as_tensor(self.step_size, dtype=torch.get_default_dtype())
            start = start.expand(state.x.shape[0]).clone()
        else:
            start = float(self.step_size)
        step_size = find_reasonable_step_size(
            lambda eps: trial(state, eps), start, threshold=self.trial_threshold
        )
        self._adapter.reset(step_size)
        self.step_size = step_size


def diagonal_curvature(
    potential: Callable[[Tensor], Tensor], x: Tensor, rel_step: float = 1e-4
) -> Tensor:
    r"""The diagonal of the Hessian of a batched potential at one point ``x`` ``(D,)``, by central
    differences of its gradient along each axis, in one batch of ``2 D`` gradient evaluations.

    :param potential: batched potential ``(n, D) -> (n,)``.
    :param x: the point, ``(D,)``.
    :param rel_step: the step along axis :math:`i` is ``rel_step * max(1, |x_i|)``.
    :returns: ``(D,)``; entries where the gradient is not finite are ``nan``.

    Example::

        >>> import torch
        >>> U = lambda x: 0.5 * (x**2 * torch.tensor([1.0, 4.0])).sum(-1)
        >>> diagonal_curvature(U, torch.tensor([0.3, -1.0])).round(decimals=2)
        tensor([1., 4.])
    """
    from .state import potential_and_grad

    x = x.detach()
    dim = x.shape[-1]
    step = rel_step * x.abs().clamp(min=1.0)
    shifts = torch.diag_embed(step)
    points = torch.cat([x + shifts, x - shifts])
    _, grad = potential_and_grad(potential, points)
    index = torch.arange(dim, device=x.device)
    return (grad[index, index] - grad[dim + index, index]) / (2 * step)


def stationary_start(
    potential_energy: Tensor, recent: int = 5, min_points: int = 64, shift: float = 1.0
) -> int:
    r"""The first iteration of a walker history that belongs to the walkers' present state:
    the end of the warmup transient, read off the walkers' potential energies :math:`U(x)`
    (the log-density trace, the usual burn-in diagnostic), so that what is fitted on the history
    (a standardization, a flow) is fitted on where the walkers are, not on where they came from.

    The last ``recent`` iterations (at least ``min_points`` walker positions) are the reference.
    The older iterations are grouped, newest first, into blocks of at least ``min_points``
    positions (the oldest block takes what is left); a block is *off* when its median potential
    lies more than ``shift`` reference standard deviations (from the interquartile range) from
    the reference median. Everything up to the newest off block is the transient. Walkers
    converging from a broad start onto a narrow posterior have potentials far above the typical
    set's; walkers started at a mode, far below it in more than a few dimensions. A stationary
    ensemble is not off: the median potentials of 64 walkers differ by about a sixth of a
    standard deviation, and a shift of the weights of separated modes of the same shape barely
    moves them (a mode of weight :math:`w` lies :math:`-\log w` higher; modes of very different
    widths lie at different potentials, and a large shift of their weights can cut the
    history). Medians, so that one walker stuck far out does not cut the history.

    :param potential_energy: ``(T, C)`` potential energies of ``C`` walkers over ``T``
        iterations, oldest first (non-finite values are ignored).
    :param recent: iterations pooled into the reference (more when they hold fewer than
        ``min_points`` positions).
    :param min_points: positions per block.
    :param shift: the largest difference of medians, in reference standard deviations.
    :returns: the index ``t`` such that ``potential_energy[t:]`` is stationary by this measure
        (0 when nothing is off).

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> typical = 2.5 + torch.randn(30, 64, generator=g)  # U of the walkers, converged ...
        >>> start = 1e3 * torch.rand(20, 64, generator=g)  # ... after a broad start
        >>> stationary_start(torch.cat([start, typical])), stationary_start(typical)
        (20, 0)
    """
    recent = check_int("recent", recent, 1)
    min_points = check_int("min_points", min_points, 1)
    shift = check_positive("shift", shift)
    if not isinstance(potential_energy, Tensor) or potential_energy.dim() != 2:
        raise ValueError("potential_energy must be a (T, C) tensor")
    steps, walkers = potential_energy.shape
    per_block = max(1, math.ceil(min_points / max(walkers, 1)))
    reference = max(recent, per_block)
    if steps <= reference:
        return 0
    u = potential_energy.detach()
    ref = u[-reference:].reshape(-1)
    ref = ref[torch.isfinite(ref)]
    if len(ref) < 2:
        return 0
    q1, median, q3 = torch.quantile(ref, ref.new_tensor([0.25, 0.5, 0.75]))
    floor = torch.finfo(ref.dtype).eps ** 0.5 * (1 + median.abs())
    sd = torch.maximum((q3 - q1) / 1.349, floor)  # the IQR of a normal is 1.349 sd
    end = steps - reference
    while end > 0:
        start = end - per_block if end >= 2 * per_block else 0  # (the oldest block: the rest)
        block = u[start:end].reshape(-1)
        block = block[torch.isfinite(block)]
        if len(block) and bool((block.median() - median).abs() > shift * sd):
            return end
        end = start
    return 0
