r"""Where a flow's shape departs from its target's, seen from the target's side: the score check
of the flow kernels.

The Pareto :math:`\hat k` of :mod:`~pyro_ebm.metrics.psis` weighs the flow's own draws. A
region the flow all but misses, a funnel's neck, is one its draws rarely reach, so their
weights cannot show it: on the centred eight schools the flows of the kernels gave
:math:`\hat k` 0.4-0.98 whatever their warmup, below 0.7 on about half the seeds. Draws of the
target, the chains' own, do reach it. At them the gradient of the log importance weight

.. math::

    \nabla \log w(x) = -\nabla U(x) - \nabla \log q(x)

is zero for a flow equal to the target up to a constant, and large wherever the flow's shape
departs from the target's; unlike the weight's value, the gradient is large already at the
entrance of a region the flow misses, where the chains go. In the draws' own scale (:math:`S`
their covariance) the matrix

.. math::

    M = S^{1/2}\, \mathbb E_p\big[\nabla \log w\, \nabla \log w^\top\big]\, S^{1/2}

is a Fisher divergence of the flow from the target per direction; its largest eigenvalue
:math:`\lambda` is the mismatch in the worst direction. The mean leaves out the 0.5% of the draws
with the largest mismatch (:data:`TRIM`), so that a handful of draws cannot make it. It is reported
on the scale of the Pareto :math:`\hat k`: a Gaussian proposal that is the target except for a scale
:math:`\sigma` times too small in one direction has :math:`\lambda = (\sigma^2 - 1)^2` and
importance weights of tail index :math:`k = 1 - 1/\sigma^2`, so the check reports

.. math::

    k_{\text{score}} = \frac{\sqrt\lambda}{1 + \sqrt\lambda},

which equals :math:`k` for that proposal and is at most 0.5 for a proposal too wide. Above 0.7
(:data:`~pyro_ebm.metrics.KHAT_THRESHOLD`, :math:`\lambda > 5.4`) the kernels warn as for
:math:`\hat k`. The mean in :math:`M` is dominated by the draws where the mismatch is largest,
which is what makes it see a funnel's neck, and the check is only as good as the chains' draws:
a region no chain reached is not seen either.

References:

- Hyvärinen (2005), "Estimation of non-normalized statistical models by score matching", JMLR
  6, 695-709 (the Fisher divergence).
- Yao, Vehtari, Simpson, Gelman (2018), "Yes, but did it work?: Evaluating variational
  inference", ICML, https://arxiv.org/abs/1802.02538
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int

__all__ = ["MIN_SCORE_DRAWS", "TRIM", "ScoreCheck", "flow_score_diagnostic"]

#: fewer finite draws than this give no score check (``khat`` is ``nan``)
MIN_SCORE_DRAWS = 10

#: the fraction of the draws, those with the largest :math:`\lVert S^{1/2} \nabla \log w
#: \rVert`, left out of :math:`M` (none below 200 draws): without it one in ten runs of
#: AdaptiveFlowMCMC on the non-centred eight schools read 0.69, from a few draws
TRIM = 0.005


class ScoreCheck(NamedTuple):
    r"""The score check of :func:`flow_score_diagnostic`.

    :param khat: :math:`\sqrt\lambda / (1 + \sqrt\lambda)`, the Pareto :math:`k` of a Gaussian
        proposal with the same worst-direction mismatch (``nan`` without enough draws).
    :param mismatch: :math:`\lambda`, the largest eigenvalue of :math:`M`.
    :param num_draws: the target's draws it was computed from (those with a finite potential,
        density and gradients).
    """

    khat: float
    mismatch: float
    num_draws: int


def flow_score_diagnostic(
    flow,
    potential: Callable[[Tensor], Tensor],
    draws: Tensor,
    batch_size: int = 1024,
) -> ScoreCheck:
    r"""How far ``flow``'s score departs from the target's at draws of the target (see the
    module's docstring).

    :param flow: proposal with a differentiable ``log_prob(x) -> (n,)``, e.g. a
        :class:`pyro_ebm.flows.Flow`.
    :param potential: batched potential :math:`U`, ``(n, D) -> (n,)``, of the target (one with
        ``value_and_grad``, a compiled potential, is called through it).
    :param draws: ``(n, D)`` draws of the target, e.g. the chains' positions in the second half
        of warmup; rows where the potential, the density or a gradient is not finite are left
        out.
    :param batch_size: rows per potential call.
    :returns: a :class:`ScoreCheck`.

    Example::

        >>> import torch
        >>> from pyro_ebm.flows import Flow
        >>> U = lambda x: 0.5 * (x**2).sum(-1)  # N(0, I)
        >>> x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        >>> good = flow_score_diagnostic(Flow(2, base_scale=1.0), U, x)
        >>> narrow = flow_score_diagnostic(Flow(2, base_scale=0.5), U, x)  # k = 1 - 0.5**2
        >>> wide = flow_score_diagnostic(Flow(2, base_scale=2.0), U, x)  # k < 0
        >>> good.khat, round(narrow.khat, 2), wide.khat < 0.5
        (0.0, 0.75, True)

    References: Hyvärinen (2005), "Estimation of non-normalized statistical models by score
    matching", JMLR 6, 695-709.
    """
    from ..samplers.state import potential_and_grad

    if not isinstance(draws, Tensor) or draws.dim() != 2:
        raise ValueError("draws must be a (n, D) tensor of the target's draws")
    batch_size = check_int("batch_size", batch_size, 1)
    rows, grads = [], []
    for start in range(0, draws.shape[0], batch_size):
        x = draws[start : start + batch_size].detach()
        u, grad_u = potential_and_grad(potential, x)
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            log_q = flow.log_prob(xg)
            (grad_q,) = torch.autograd.grad(log_q.sum(), xg, allow_unused=True)
        if grad_q is None:
            grad_q = torch.zeros_like(x)
        g = (-grad_u - grad_q).to(torch.float64)
        ok = torch.isfinite(u) & torch.isfinite(log_q.detach()) & torch.isfinite(g).all(-1)
        rows.append(x[ok].to(torch.float64))
        grads.append(g[ok])
    x, g = torch.cat(rows), torch.cat(grads)
    n = x.shape[0]
    if n < MIN_SCORE_DRAWS:
        return ScoreCheck(math.nan, math.nan, n)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T).reshape(x.shape[1], x.shape[1]))
    half = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T  # S^{1/2}
    h = g @ half
    drop = int(TRIM * n)  # a handful of draws must not make the check
    if drop:
        h = h[torch.argsort((h**2).sum(-1))[: n - drop]]
    mismatch = float(torch.linalg.eigvalsh(h.T @ h / h.shape[0])[-1].clamp_min(0))
    root = math.sqrt(mismatch)
    return ScoreCheck(root / (1.0 + root), mismatch, n)
