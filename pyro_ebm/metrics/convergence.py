r"""Rank-normalised split R-hat (Vehtari et al. 2021), vectorised over many parameters.

The paper's Table 2 reports the largest R-hat over dimensions of 128 negative chains: values
near 1 mean the chains agree (they mix between modes); values far above 1 mean chains stuck in
different modes. This is ArviZ's ``az.rhat(..., method="rank")`` (the maximum of the bulk and
the folded R-hat), written in torch so that it works the same on every ArviZ version and on
thousands of dimensions at once; the tests compare it with ArviZ.

Reference: Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding,
and localization: an improved R-hat for assessing convergence of MCMC",
https://arxiv.org/abs/1903.08008
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["max_rhat", "rhat"]


def _check_chains(samples: Tensor) -> Tensor:
    samples = torch.as_tensor(samples)
    if samples.dim() == 2:
        samples = samples[..., None]
    if samples.dim() != 3 or samples.shape[1] < 4:
        raise ValueError(
            "samples must have shape (num_chains, num_draws, dim) with num_draws >= 4, "
            f"got {tuple(samples.shape)}"
        )
    if not torch.isfinite(samples).all():  # (ranked as ordinary values, nan gave R-hat 4.2)
        raise ValueError("samples must be finite (found nan or inf)")
    return samples.to(torch.float64)


def _split(x: Tensor) -> Tensor:
    n = x.shape[1] // 2
    return torch.cat([x[:, :n], x[:, x.shape[1] - n :]], dim=0)


def _rank_normalize(x: Tensor) -> Tensor:
    """Normal scores of the pooled ranks (average ranks for ties), per parameter."""
    c, n, d = x.shape
    flat = x.reshape(c * n, d)
    order = flat.argsort(0)
    sorted_vals = flat.gather(0, order)
    # average ranks over ties: for each value, mean of first and last position of equal values
    pos = torch.arange(1, c * n + 1, dtype=torch.float64).expand(d, -1).T.contiguous()
    first = torch.ones_like(sorted_vals, dtype=torch.bool)
    first[1:] = sorted_vals[1:] != sorted_vals[:-1]
    group = first.cumsum(0) - 1
    ranks_sorted = torch.zeros_like(pos)
    for j in range(d):  # ties are rare; per-column group means via scatter
        g = group[:, j]
        sums = torch.zeros(int(g.max()) + 1, dtype=torch.float64).scatter_add_(0, g, pos[:, j])
        cnts = torch.zeros_like(sums).scatter_add_(0, g, torch.ones_like(pos[:, j]))
        ranks_sorted[:, j] = (sums / cnts)[g]
    ranks = torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)
    s = c * n
    z = torch.special.ndtri((ranks - 0.375) / (s + 0.25))
    return z.reshape(c, n, d)


def _rhat(x: Tensor) -> Tensor:
    n = x.shape[1]
    chain_mean = x.mean(1)
    chain_var = x.var(1, unbiased=True)
    between = n * chain_mean.var(0, unbiased=True)
    within = chain_var.mean(0)
    var_hat = (n - 1) / n * within + between / n
    return (var_hat / within).sqrt()


def rhat(samples: Tensor) -> Tensor:
    r"""Rank-normalised split R-hat of each dimension, the maximum of the bulk and the folded
    statistic (ArviZ's ``method="rank"``).

    :param samples: draws ``(num_chains, num_draws, dim)`` (or ``(num_chains, num_draws)``).
    :returns: ``(dim,)`` float64 tensor; ``nan`` for a dimension that is constant.

    Example::

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mixed = torch.randn(4, 500, 2)
        >>> bool(rhat(mixed).max() < 1.02)
        True
        >>> stuck = mixed + torch.tensor([0.0, 0, 3, 3])[:, None, None]  # two chains elsewhere
        >>> bool(rhat(stuck).min() > 1.5)
        True
    """
    x = _split(_check_chains(samples))
    bulk = _rhat(_rank_normalize(x))
    folded = (x - x.reshape(-1, x.shape[-1]).quantile(0.5, dim=0)).abs()
    tail = _rhat(_rank_normalize(folded))
    return torch.maximum(bulk, tail)


def max_rhat(samples: Tensor) -> float:
    r"""The largest :func:`rhat` over dimensions (Grenioux et al. 2023, Table 2).

    :param samples: draws ``(num_chains, num_draws, dim)``.
    """
    return float(rhat(samples).max())
