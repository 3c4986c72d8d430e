r"""How far below the chains' draws the potential goes: the density-depth check of a run.

Every check made from draws (R-hat, ESS, a flow's :math:`\hat k` at its own draws or its score
at the chains') sees only where the draws went. A funnel's neck (a centred hierarchical model
whose group scale can shrink towards 0) is a region of ever higher density and little mass; a
chain that rarely enters it leaves no trace there, and its estimates of small scales are biased
without a sign. The neck is found instead by going down the potential: L-BFGS from the draws'
best point (the lowest potential :math:`U_{\min}^{\text{draws}}`) descends into it, while on a
target without one it stops at the mode next to the draws. The check reports the drop per
dimension,

.. math::

    \text{depth} = \frac{U_{\min}^{\text{draws}} - U(x^\ast)}{D},

:math:`x^\ast` the point reached. For a log-concave target (every Gaussian, logistic or Poisson
regression with Gaussian priors, ...) it is at most 1: the mean potential of a log-concave
density lies at most :math:`D` above its minimum (Bobkov and Madiman 2011), and the lowest draw
lies below the mean. Above :data:`DEPTH_THRESHOLD`, twice that bound, the target has points
of density :math:`e^{D \cdot \text{depth}}` times that of every draw, which no log-concave
target has: a funnel's neck, or a narrow spike the chains did not reach. (The bound holds for
draws of the target: chains stuck far from the mode can exceed 1, and did, at 1.02 on a 2-D
Gaussian whose flow proposals missed it; hence the factor of two.) Heavy tails do not raise it (a
product of Cauchy distributions has a mean potential 1.39 per dimension above its minimum,
and its lowest draws are near the minimum); a centred hierarchical model whose groups are
well identified by their data does not either, since the descent stops at the mode next to the
draws (the neck lies beyond a ridge of low likelihood).

The same descent can end at a mode far below the draws, which chains stuck elsewhere (a
mixture's label or cluster configuration) did not find; :attr:`DepthCheck.at_mode` tells the
two apart where the descent converged (the gradient vanishes there), though a funnel whose
neck has a bottom (Neal's in 6 dimensions, at :math:`v = -22.5`) ends at a mode too.

What it cannot see: a neck that is shallow per dimension. On a centred horseshoe regression (22
dimensions) the potential falls by only 3-4 nats per unit of the log global scale, so 2 per
dimension lies 11-15 units of that log scale below the draws, beyond the descent's budget; the
depth reads 0.3-0.5 there (R-hat and a flow's score check see that model's trouble). A spike
the chains do visit reads near 0, as it should.

References:

- Bobkov, Madiman (2011), "The entropy per coordinate of a random vector is highly constrained
  under convexity conditions", IEEE Trans. Inf. Theory 57(8), 4940-4954,
  https://arxiv.org/abs/1006.2883
- Betancourt, Girolami (2015), "Hamiltonian Monte Carlo for hierarchical models", in Current
  Trends in Bayesian Methodology with Applications, https://arxiv.org/abs/1312.0906
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int

__all__ = ["DEPTH_THRESHOLD", "MAX_DEPTH", "MODE_GRADIENT", "DepthCheck", "density_depth"]

#: a depth per dimension above this is a neck or a spike: twice the most a log-concave target
#: has at its own draws (Bobkov and Madiman 2011)
DEPTH_THRESHOLD = 2.0

#: the descent stops once this deep per dimension (a neck may go down forever): the reported
#: depth is then a lower bound
MAX_DEPTH = 2 * DEPTH_THRESHOLD

#: fewer finite draws than this give no check (``depth`` is ``nan``)
MIN_DEPTH_DRAWS = 10

#: the descent ended at a mode when a move of one of the draws' standard deviations along any
#: coordinate changes the potential there by at most this, to first order (at draws of the
#: target such a move changes it by about 1; float32 rounding leaves a converged descent at
#: up to 0.04 on a 150-point mixture; a neck's slope is several per standard deviation)
MODE_GRADIENT = 0.1


class DepthCheck(NamedTuple):
    r"""The check of :func:`density_depth`.

    :param depth: :math:`(U_{\min}^{\text{draws}} - U(x^\ast)) / D`, ``nan`` without enough
        finite draws or when the descent fails.
    :param draws_potential: :math:`U_{\min}^{\text{draws}}`, the lowest potential at the draws.
    :param point_potential: :math:`U(x^\ast)` at the point the descent reached.
    :param point: :math:`x^\ast`, ``(D,)``.
    :param coordinate: the coordinate of :math:`x^\ast` furthest from the draws' mean, in
        their standard deviations (the flat index :math:`i`).
    :param distance: that distance with its sign, :math:`(x^\ast_i - \bar x_i) / s_i`.
    :param num_draws: the draws with a finite potential it used.
    :param at_mode: whether the descent ended at a local mode: a move of one of the draws'
        standard deviations along any coordinate changes :math:`U` there by at most
        :data:`MODE_GRADIENT` to first order (:math:`\max_i |\partial_i U(x^\ast)|\, s_i`).
        A funnel's neck mostly has no bottom, so a descent into one is still going down when it
        stops; a deep point where the gradient vanishes is a mode or a narrow spike the draws
        did not find, or the bottom of a neck that has one (Neal's funnel in 6 dimensions).
    """

    depth: float
    draws_potential: float
    point_potential: float
    point: Tensor
    coordinate: int
    distance: float
    num_draws: int
    at_mode: bool = False


def density_depth(
    potential: Callable[[Tensor], Tensor],
    draws: Tensor,
    max_iter: int = 200,
    batch_size: int = 1024,
) -> DepthCheck:
    r"""How far below the draws' lowest potential L-BFGS goes from there, per dimension (see the
    module's docstring; above :data:`DEPTH_THRESHOLD`: a funnel's neck, a spike or a mode the
    draws did not reach; :attr:`DepthCheck.at_mode` tells whether the descent ended at a mode).

    :param potential: batched potential :math:`U`, ``(n, D) -> (n,)`` (one with
        ``value_and_grad`` is called through it).
    :param draws: ``(n, D)`` draws of the target, e.g. the chains' draws in the unconstrained
        space; rows with a non-finite potential are left out.
    :param max_iter: the most L-BFGS iterations (the descent also stops at :data:`MAX_DEPTH`).
    :param batch_size: rows per potential call at the draws.
    :returns: a :class:`DepthCheck`.

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> v = 3 * torch.randn(2000, 1, generator=g)  # Neal's funnel, exact draws
        >>> funnel = torch.cat([v, torch.exp(v / 2) * torch.randn(2000, 9, generator=g)], -1)
        >>> def U(x):
        ...     v, z = x[:, 0], x[:, 1:]
        ...     return v**2 / 18 + 4.5 * v + 0.5 * (z**2).sum(-1) * torch.exp(-v)
        >>> density_depth(U, funnel).depth > DEPTH_THRESHOLD  # the neck, v << 0
        True
        >>> gauss = torch.randn(2000, 10, generator=g)
        >>> density_depth(lambda x: 0.5 * (x**2).sum(-1), gauss).depth < DEPTH_THRESHOLD
        True

    References: Bobkov, Madiman (2011), "The entropy per coordinate of a random vector is
    highly constrained under convexity conditions", https://arxiv.org/abs/1006.2883
    """
    from ..samplers.mode import find_mode
    from ..samplers.state import potential_and_grad

    if not isinstance(draws, Tensor) or draws.dim() != 2:
        raise ValueError("draws must be a (n, D) tensor of the target's draws")
    max_iter = check_int("max_iter", max_iter, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    draws = draws.detach()
    with torch.no_grad():
        starts = range(0, len(draws), batch_size)
        u = torch.cat([potential(draws[s : s + batch_size]) for s in starts])
    ok = torch.isfinite(u)
    x, u = draws[ok], u[ok]
    dim = draws.shape[-1]
    if len(u) < MIN_DEPTH_DRAWS:
        nowhere = draws.new_full((dim,), math.nan)
        return DepthCheck(math.nan, math.nan, math.nan, nowhere, 0, math.nan, len(u))
    best = int(torch.argmin(u))
    lowest = float(u[best])
    point, value = find_mode(potential, x[best], max_iter, stop_below=lowest - MAX_DEPTH * dim)
    depth = (lowest - value) / dim  # nan when the descent failed
    x64 = x.to(torch.float64)
    spread = x64.std(0).clamp_min(torch.finfo(torch.float64).tiny)
    away = (point.to(torch.float64) - x64.mean(0)) / spread
    coordinate = int(torch.argmax(away.abs()))
    at_mode = False
    if math.isfinite(value):
        _, grad = potential_and_grad(potential, point[None])
        change = grad[0].to(torch.float64).abs() * spread  # per sd of the draws, first order
        at_mode = bool(torch.isfinite(change).all() and change.max() <= MODE_GRADIENT)
    away_i = float(away[coordinate])
    return DepthCheck(depth, lowest, value, point, coordinate, away_i, len(u), at_mode)
