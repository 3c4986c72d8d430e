r"""How well a normalizing flow covers its target: the Pareto :math:`\hat k` of the flow as an
importance sampler, and the importance-sampling effective sample size.

Draws :math:`x_s \sim q` from the flow are weighted by :math:`w_s = e^{-U(x_s)} / q(x_s)`. When
:math:`q` misses part of the target (a mode, a funnel's neck, tails much lighter than the
target's), the weights are heavy-tailed: a few draws carry almost all of the mass. Pareto
smoothed importance sampling (PSIS) fits a generalized Pareto distribution to the largest
weights; its shape :math:`\hat k` measures that: :math:`\hat k < 0.5` is a proposal that covers
the target, :math:`0.5 \le \hat k \le 0.7` a usable one, and :math:`\hat k > 0.7` one whose
importance-sampling estimates are unreliable, whatever their effective sample size says (the
variance of the weights is infinite for :math:`k > 0.5`, and the ESS estimate with it). It is
the check of Yao et al. (2018) for a variational approximation, which a flow trained by reverse
or forward KL is.

The Pareto fit is ArviZ's PSIS (``arviz.psislw`` on ArviZ 0.x, ``arviz_stats`` on ArviZ 1.x),
not a rewrite of it.

References:

- Vehtari, Simpson, Gelman, Yao, Gabry (2024), "Pareto smoothed importance sampling", JMLR
  25(72), 1-58, https://arxiv.org/abs/1507.02646
- Yao, Vehtari, Simpson, Gelman (2018), "Yes, but did it work?: Evaluating variational
  inference", ICML, https://arxiv.org/abs/1802.02538
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .._checks import check_int

__all__ = [
    "KHAT_THRESHOLD",
    "MAX_CHECK_DRAWS",
    "FlowCheck",
    "flow_importance_diagnostic",
    "near_threshold",
    "pareto_khat",
    "sharpened",
]

#: above this :math:`\hat k` importance sampling from the proposal is unreliable (Vehtari et al.
#: 2024; their sample-size dependent threshold :math:`1 - 1/\log_{10} S` is 0.7 from
#: :math:`S \approx 2200` draws on)
KHAT_THRESHOLD = 0.7

#: the standard deviation of :math:`\hat k` from 4096 draws of one flow near 0.5-0.7
#: (0.10-0.13 measured); it falls as :math:`S^{-1/4}` with the draws :math:`S` (the Pareto tail
#: is fitted to :math:`3 \sqrt S` of them)
_KHAT_SD_4096 = 0.13

#: the draws the kernels' checks go up to near :data:`KHAT_THRESHOLD`
#: (:func:`flow_importance_diagnostic`'s ``max_draws``)
MAX_CHECK_DRAWS = 32768


class FlowCheck(NamedTuple):
    r"""The flow-quality diagnostic of :func:`flow_importance_diagnostic`.

    :param khat: Pareto :math:`\hat k` of the importance weights (``inf`` when fewer than five
        draws have a finite weight, ``-inf`` when all weights are equal: the flow is the
        target up to a constant).
    :param ess: effective sample size of the Pareto-smoothed normalised weights,
        :math:`1 / \sum_s \tilde w_s^2` (0 when no draw has a finite weight).
    :param num_draws: draws of the flow it was computed from.
    :param log_weights: their ``(num_draws,)`` float64 log importance weights (``-inf``: weight
        0), e.g. for :func:`~pyro_ebm.samplers.isir_particles`; ``None`` when not kept.
    """

    khat: float
    ess: float
    num_draws: int
    log_weights: Tensor | None = None

    def __repr__(self) -> str:  # the weights are too many to print
        return f"FlowCheck(khat={self.khat!r}, ess={self.ess!r}, num_draws={self.num_draws!r})"


def pareto_khat(log_weights: Tensor | np.ndarray) -> tuple[float, np.ndarray]:
    r"""Pareto-smooth one vector of importance log-weights with ArviZ's PSIS.

    :param log_weights: ``(S,)`` log importance ratios :math:`\log w_s` of independent draws
        (``-inf`` for a draw of weight zero; at least five must be finite).
    :returns: ``(khat, smoothed)``: the Pareto shape estimate and the smoothed, normalised log
        weights (``smoothed`` sums to 1 after ``exp``).

    ArviZ 0.x's ``arviz.psislw(log_weights, reff)`` takes the log ratios; ArviZ 1.x's
    ``arviz_stats`` ``psislw(ary, r_eff)`` takes log-likelihoods and smooths their negation,
    so it is given :math:`-\log w`. The draws are independent, so the relative efficiency is 1.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = 0.3 * rng.normal(size=4000)  # q = N(0, 0.3^2) for p = N(0, 1)
        >>> lw = -0.5 * x**2 + 0.5 * (x / 0.3) ** 2
        >>> khat, smoothed = pareto_khat(lw)
        >>> bool(khat > 0.7), bool(abs(np.exp(smoothed).sum() - 1) < 1e-9)
        (True, True)
    """
    if isinstance(log_weights, Tensor):
        log_weights = log_weights.detach().cpu().to(torch.float64).numpy()
    lw = np.array(log_weights, dtype=np.float64).reshape(-1)  # a copy: PSIS writes into it
    with np.errstate(all="ignore"):
        try:  # ArviZ 0.x
            from arviz import psislw

            smoothed, khat = psislw(lw, reff=1.0)
        except ImportError:  # ArviZ 1.x
            from arviz_stats.base import array_stats

            smoothed, khat = array_stats.psislw(-lw, r_eff=1.0)
    return float(khat), np.asarray(smoothed, dtype=np.float64)


def flow_importance_diagnostic(
    flow,
    potential: Callable[[Tensor], Tensor],
    num_draws: int = 4096,
    batch_size: int = 4096,
    max_draws: int | None = None,
) -> FlowCheck:
    r"""The Pareto :math:`\hat k` and importance-sampling ESS of ``flow`` as a proposal for the
    target :math:`\propto e^{-U}`.

    Draws ``num_draws`` points from the flow, weights them by :math:`\log w = -U(x) - \log q(x)`
    (a non-finite potential or density gives :math:`w = 0`), and fits ArviZ's PSIS to the
    weights (:func:`pareto_khat`). :math:`\hat k > 0.7` (:data:`KHAT_THRESHOLD`): the flow
    misses part of the target, and estimates that rely on it (an independent proposal's
    acceptance, i-SIR's resampling, NeuTra's latent geometry) are unreliable. The ESS is that of
    the Pareto-smoothed weights (as ``loo``'s ``psis_n_eff``): with :math:`\hat k > 0.7` it is
    an overestimate, read it together with :math:`\hat k`.

    The default of 4096 draws puts the sample-size dependent threshold of Vehtari et al. (2024),
    :math:`\min(1 - 1/\log_{10} S, 0.7)`, at 0.7, and fits the Pareto tail to the largest
    :math:`3\sqrt{S} \approx 190` weights. It costs 4096 potential evaluations without
    gradients, in one batch: what :class:`~pyro_ebm.infer.FlowISIR` with 16 chains and 16
    particles evaluates in 17 steps, or :class:`~pyro_ebm.infer.FlowIMH` with 16 chains in 256:
    usually a small part of a sampler's run. Near :math:`k = 1` the estimate from 4096 draws
    has a standard deviation of about 0.13; pass more draws for a sharper one. With
    ``max_draws``, while :math:`\hat k` lies within two standard errors of 0.7 (the warning's
    :data:`KHAT_THRESHOLD`; the standard error is taken as :math:`0.13 (4096 / S)^{1/4}` from
    :math:`S` draws, since the tail fitted grows as :math:`\sqrt S`), the draws are doubled,
    up to ``max_draws``. Eight times the draws make the estimate only about 1.5 times sharper:
    for a proposal with :math:`k = 0.6` (a Gaussian of 0.4 times the target's covariance) the
    sd over 100 seeds was 0.10 from 4096 draws and 0.07 from 32768; one flow trained on eight
    schools ranged over 0.24-0.58 in eight repeats of 4096 draws and over 0.51-0.61 of 32768
    (from few draws :math:`\hat k` also runs low). The kernels' checks use
    :data:`MAX_CHECK_DRAWS`, so that their warning rests on the sharper estimate; their choice
    at 0.5 of fewer i-SIR particles, a matter of speed, does not (with more draws near 0.5 too,
    FlowISIR took 16.1 s on Pyro's logistic regression, against 9.8 s without; one run each).
    Runs under :func:`torch.no_grad`.

    :param flow: proposal with ``sample_and_log_prob(n) -> (x (n, D), log q (n,))``, e.g. a
        :class:`pyro_ebm.flows.Flow`.
    :param potential: batched potential ``(n, D) -> (n,)`` of the target.
    :param num_draws: draws of the flow (at least 5).
    :param batch_size: draws evaluated per potential call (bounds the memory of the check).
    :param max_draws: the most draws when :math:`\hat k` is near 0.7 (``None``,
        the default, or at most ``num_draws``: no more draws).
    :returns: a :class:`FlowCheck` (``num_draws`` is the number of draws used).

    Example::

        >>> import torch
        >>> from pyro_ebm.flows import Flow
        >>> U = lambda x: 0.5 * (x**2).sum(-1)  # N(0, I)
        >>> good = flow_importance_diagnostic(Flow(2, base_scale=1.2), U)
        >>> narrow = flow_importance_diagnostic(Flow(2, base_scale=0.3), U)
        >>> good.khat < 0.5 < 0.7 < narrow.khat, good.ess > narrow.ess
        (True, True)

    References:

    - Vehtari, Simpson, Gelman, Yao, Gabry (2024), "Pareto smoothed importance sampling", JMLR
      25(72), 1-58, https://arxiv.org/abs/1507.02646
    - Yao, Vehtari, Simpson, Gelman (2018), "Yes, but did it work?: Evaluating variational
      inference", ICML, https://arxiv.org/abs/1802.02538
    """
    num_draws = check_int("num_draws", num_draws, 5)
    batch_size = check_int("batch_size", batch_size, 1)
    max_draws = num_draws if max_draws is None else check_int("max_draws", max_draws, 1)
    lw = _log_weights(flow, potential, num_draws, batch_size)
    check = _check(lw)
    while len(lw) < max_draws and _worth_more_draws(check):
        more = _log_weights(flow, potential, min(len(lw), max_draws - len(lw)), batch_size)
        lw = torch.cat([lw, more])
        check = _check(lw)
    return check


def near_threshold(khat: float, num_draws: int) -> bool:
    """Whether ``khat`` from ``num_draws`` draws lies within two standard errors of
    :data:`KHAT_THRESHOLD` (see :func:`flow_importance_diagnostic`)."""
    se = _KHAT_SD_4096 * (4096 / num_draws) ** 0.25
    return math.isfinite(khat) and abs(khat - KHAT_THRESHOLD) < 2 * se


def _worth_more_draws(check: FlowCheck) -> bool:
    r"""Whether a check would be refined by more draws: :math:`\hat k` near 0.7
    (:func:`near_threshold`), or above it while the smoothed weights' ESS is at least 90% of
    the draws. Nearly equal weights with a high :math:`\hat k` are a Pareto fit to noise: on
    Pyro's beta-bernoulli model one flow's 4096 log weights spanned 1.3 and gave
    :math:`\hat k` 1.30 (ESS 4075), its 32768 draws 0.15-0.23 in three repeats."""
    n = check.num_draws
    noise = check.khat > KHAT_THRESHOLD and check.ess >= 0.9 * n
    return near_threshold(check.khat, n) or (math.isfinite(check.khat) and noise)


def sharpened(
    check: FlowCheck, flow, potential: Callable[[Tensor], Tensor], max_draws: int = MAX_CHECK_DRAWS
) -> FlowCheck:
    r"""``check`` (of ``flow`` for ``potential``), or, when its :math:`\hat k` is near 0.7
    (:func:`near_threshold`), a new check of up to ``max_draws`` draws: the kernels' final
    check of a flow chosen on checks of 4096 draws.

    Example::

        >>> import torch
        >>> from pyro_ebm.flows import Flow
        >>> U = lambda x: 0.5 * (x**2).sum(-1)
        >>> good = flow_importance_diagnostic(Flow(2, base_scale=1.2), U)
        >>> sharpened(good, Flow(2, base_scale=1.2), U) is good  # far from 0.7: kept
        True
    """
    if check.num_draws >= max_draws or not _worth_more_draws(check):
        return check
    return flow_importance_diagnostic(flow, potential, check.num_draws, max_draws=max_draws)


@torch.no_grad()
def _log_weights(flow, potential: Callable[[Tensor], Tensor], n: int, batch_size: int) -> Tensor:
    """``(n,)`` float64 log importance weights of ``n`` draws of ``flow`` (``-inf`` where the
    potential or density is not finite)."""
    chunks = []
    for start in range(0, n, batch_size):
        x, log_q = flow.sample_and_log_prob(min(batch_size, n - start))
        lw = -potential(x).to(torch.float64) - log_q.to(torch.float64)
        chunks.append(torch.where(torch.isfinite(lw), lw, -torch.inf))
    return torch.cat(chunks)


def _check(lw: Tensor) -> FlowCheck:
    """The :class:`FlowCheck` of log weights ``lw``."""
    num_draws = len(lw)
    finite = torch.isfinite(lw)
    count = int(finite.sum())
    if count == 0:
        return FlowCheck(math.inf, 0.0, num_draws, lw)
    if count < 5:  # no tail to fit: a handful of draws carry all of the mass
        ess = float(1.0 / (torch.softmax(lw, 0) ** 2).sum())
        return FlowCheck(math.inf, ess, num_draws, lw)
    spread = lw[finite].max() - lw[finite].min()
    if spread <= 1e-12 * max(1.0, float(lw[finite].abs().max())):  # equal weights: q = p
        return FlowCheck(-math.inf, float(count), num_draws, lw)
    khat, smoothed = pareto_khat(lw)
    ess = float(1.0 / np.exp(2.0 * smoothed).sum())
    return FlowCheck(khat, ess, num_draws, lw)
