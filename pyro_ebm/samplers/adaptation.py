r"""Step-size adaptation toward a target acceptance rate (Nesterov dual averaging).

References:

- Hoffman, Gelman (2014), "The No-U-Turn Sampler", https://arxiv.org/abs/1111.4246, Alg. 5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["StepSizeAdapter", "TrackingStepSize"]


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
    size fixed.

    Example::

        >>> ctrl = TrackingStepSize(0.1, target_accept=0.6)
        >>> ctrl.update(torch.tensor([1.0, 1.0]))  # accepting too often: grow
        >>> ctrl.value > 0.1
        True
    """

    def __init__(self, step_size: float, target_accept: float | None, rate: float = 0.05):
        self.log_step = math.log(step_size)
        self.target_accept = target_accept
        self.rate = rate

    @property
    def value(self) -> float:
        return math.exp(self.log_step)

    def update(self, accept_prob: Tensor) -> None:
        if self.target_accept is not None:
            a = float(accept_prob.float().nan_to_num(0.0).mean())
            self.log_step = min(max(self.log_step + self.rate * (a - self.target_accept), -12), 2)
