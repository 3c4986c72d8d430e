r"""Descent to a local mode of a potential: L-BFGS from one point.

Used where a point of high density is wanted: the Laplace stage of
:func:`~pyro_ebm.samplers.fit_flow` (the mode and the Hessian there), and the density-depth check
of :func:`~pyro_ebm.metrics.density_depth` (how far below the chains' draws the potential
goes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .state import potential_and_grad

__all__ = ["find_mode"]


def find_mode(
    potential: Callable[[Tensor], Tensor],
    x0: Tensor,
    max_iter: int = 200,
    stop_below: float | None = None,
) -> tuple[Tensor, float]:
    r"""L-BFGS (strong Wolfe line search) down the potential :math:`U` from ``x0``.

    Points where :math:`U` is not finite (or raises, for a guarded potential) are treated as a
    wall; a non-finite gradient as zero.

    :param potential: batched potential ``(n, D) -> (n,)`` (one with ``value_and_grad`` is called
        through it).
    :param x0: ``(D,)`` start with a finite potential.
    :param max_iter: the most L-BFGS iterations.
    :param stop_below: stop once :math:`U` is below this, checked every 20 iterations, which
        restart L-BFGS (its curvature history can stall the line search in a funnel's neck):
        enough for a verdict where the potential has no minimum (a neck goes down forever).
        The search also stops when 20 iterations bring no decrease.
    :returns: ``(x, U(x))``, the point reached and its potential; ``(x0, nan)`` when the search
        raises one of torch's errors or ends at a non-finite point.

    Example::

        >>> import torch
        >>> U = lambda x: ((x - 2.0) ** 2).sum(-1)
        >>> x, u = find_mode(U, torch.zeros(3))
        >>> x.round(decimals=4).tolist(), round(u, 8)
        ([2.0, 2.0, 2.0], 0.0)
    """
    x = x0.detach().clone().requires_grad_(True)
    chunk = max_iter if stop_below is None else min(20, max_iter)
    huge = torch.tensor(torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device)

    def closure() -> Tensor:
        u, grad = potential_and_grad(potential, x.detach()[None])
        if not torch.isfinite(u[0]):
            x.grad = torch.zeros_like(x)
            return huge
        x.grad = torch.where(torch.isfinite(grad[0]), grad[0], 0.0)
        return u[0]

    done, last = 0, math.inf
    try:
        while done < max_iter:
            # a fresh optimizer per chunk: in a neck's stiff curvature the line search can stall
            # with a stale curvature history, and a restart goes on down
            torch.optim.LBFGS(
                [x], lr=1.0, max_iter=chunk, line_search_fn="strong_wolfe", tolerance_change=1e-10
            ).step(closure)
            done += chunk
            if stop_below is None:
                break
            with torch.no_grad():
                value = float(potential(x.detach()[None])[0])
            if not stop_below <= value < last:  # deep enough, no progress, or not finite
                break
            last = value
    except (RuntimeError, ValueError, ArithmeticError):
        return x0.detach(), math.nan
    point = x.detach()
    with torch.no_grad():
        value = float(potential(point[None])[0])
    if not (torch.isfinite(point).all() and math.isfinite(value)):
        return x0.detach(), math.nan
    return point, value
