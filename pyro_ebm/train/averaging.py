r"""Parameter averaging for the trainers: :class:`Averager`, an EMA or the Polyak mean of the
last iterates, on ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

__all__ = ["Averager"]


class Averager:
    r"""Parameter averaging on ``torch.optim.swa_utils.AveragedModel``.

    - ``ema=d``: an exponential moving average, updated at every step, with the warm-up
      :math:`\min(d, (1 + t) / (10 + t))` at the average's ``t``-th update (its first update
      copies the weights); :attr:`module` is the averaged model, kept beside the trained one.
    - ``ema=None``: the Polyak-Ruppert mean of the iterates of the last fraction ``last`` of a
      run's steps, which replaces the trained weights after the run's last step.

    :param model: the trained module.
    :param ema: the EMA decay, or ``None`` for the mean.
    :param last: with ``ema=None``, the fraction of the steps, at the end, that are averaged.

    Example::

        >>> net = torch.nn.Linear(2, 1)
        >>> avg = Averager(net, ema=0.9)
        >>> avg.update(net, step=1, num_steps=10)
        >>> torch.equal(avg.module.weight, net.weight)
        True
    """

    def __init__(self, model: torch.nn.Module, ema: float | None = None, last: float = 1.0) -> None:
        self.ema, self.last = ema, float(last)
        multi_avg_fn = None if ema is None else self._ema_update
        self.averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=False)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (a copy of the trained one's architecture)."""
        return self.averaged.module

    @torch.no_grad()
    def _ema_update(self, averaged: list[Tensor], current: list[Tensor], count: Tensor) -> None:
        t = int(count) + 1  # (the first update, t = 1, copied the weights)
        decay = min(self.ema, (1 + t) / (10 + t))
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def update(self, model: torch.nn.Module, step: int, num_steps: int) -> None:
        """Fold in ``model``'s weights after step ``step`` of ``num_steps`` (the Polyak mean
        only over its last fraction, and it then replaces ``model``'s weights at the end)."""
        if self.ema is None and step <= num_steps * (1.0 - self.last):
            return
        self.averaged.update_parameters(model)
        if self.ema is None and step == num_steps:
            with torch.no_grad():
                for a, p in zip(self.module.parameters(), model.parameters(), strict=True):
                    p.copy_(a)

    def state_dict(self) -> dict:
        """The averaged weights and the count of averaged steps."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.averaged.load_state_dict(state)
