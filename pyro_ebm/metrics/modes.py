r"""Mode weights of samples of multi-modal targets and their Monte Carlo errors.

A point is assigned to a mode by the nearest-mode partition (the nearest mean in Euclidean
distance), or by the data set's own ``mode_index`` when a data set from
:mod:`pyro_ebm.datasets` is given (e.g. rings are partitioned by radius).

References:

- Grenioux, Moulines, Gabrié, *Balanced Training of Energy-Based Models with Adaptive Flow
  Sampling* (2023), https://arxiv.org/abs/2306.00684
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.ops.stats import effective_sample_size

from pyro_ebm.datasets import nearest_mean_index

__all__ = [
    "mode_indicator_ess",
    "mode_weight_mse",
    "mode_weights",
    "mode_weights_mcse",
]


def _mode_index(x: torch.Tensor, means_or_dataset: Any, chunk_size: int | None) -> tuple:
    """Mode index of every point of ``x`` ``(..., dim)`` and the number of modes ``K``."""
    if hasattr(means_or_dataset, "mode_index") and hasattr(means_or_dataset, "means"):
        idx = means_or_dataset.mode_index(x, chunk_size=chunk_size)
        return idx, means_or_dataset.means.shape[0]
    if isinstance(means_or_dataset, torch.Tensor) or hasattr(means_or_dataset, "__len__"):
        means = torch.as_tensor(means_or_dataset)
        if means.dim() != 2 or means.shape[0] == 0:
            raise ValueError(
                "means_or_dataset must be a (K, dim) tensor of means or a data set, "
                f"got shape {tuple(means.shape)}"
            )
        return nearest_mean_index(x, means, chunk_size), means.shape[0]
    raise ValueError(
        "means_or_dataset must be a (K, dim) tensor of means or a data set with mode_index, "
        f"got {type(means_or_dataset).__name__}"
    )


def _points(x: torch.Tensor, argname: str = "x") -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ValueError(f"{argname} must have shape (..., num_points, dim), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.to(torch.get_default_dtype())
    if not torch.isfinite(x).all():  # (a nan point would count as the first mode's)
        raise ValueError(f"{argname} must be finite (found nan or inf)")
    return x


def mode_weights(
    x: torch.Tensor, means_or_dataset: Any, chunk_size: int | None = None
) -> torch.Tensor:
    r"""Fraction of the points in each mode, by the nearest-mode partition.

    :math:`\hat w_k = \frac1n \#\{i : \arg\min_j |x_i - \mu_j| = k\}`, or with the data set's
    ``mode_index`` when a data set is given. Points are processed in chunks, so ``10**6`` points in
    dimension 64 fit in a few tens of MB.

    :param torch.Tensor x: points of shape ``(n, dim)``, or ``(..., n, dim)``: all leading
        dimensions (e.g. chains and draws) are pooled.
    :param means_or_dataset: mode locations ``(K, dim)``, or a data set from
        :mod:`pyro_ebm.datasets` (its ``mode_index`` is used).
    :param int chunk_size: rows per chunk (default: about ``4 * 10**6`` numbers per chunk).
    :returns: tensor of shape ``(K,)`` in the default dtype, summing to one.

    Example:

    >>> means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    >>> mode_weights(torch.tensor([[-0.9, 0.3], [1.2, 0.0], [2.0, 1.0], [0.5, 0.0]]), means)
    tensor([0.2500, 0.7500])
    """
    x = _points(x)
    idx, k = _mode_index(x, means_or_dataset, chunk_size)
    idx = idx.reshape(-1)
    if idx.numel() == 0:
        raise ValueError("x must contain at least one point")
    counts = torch.bincount(idx, minlength=k).to(torch.get_default_dtype())
    return counts / idx.numel()


def mode_weight_mse(
    x: torch.Tensor,
    means_or_dataset: Any,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> float:
    r"""Mean over modes of the squared error of the estimated mode weights,
    :math:`\frac1K \sum_k (\hat w_k - w_k)^2`.

    :param torch.Tensor x: points of shape ``(..., n, dim)`` (leading dimensions pooled).
    :param means_or_dataset: mode locations ``(K, dim)`` or a data set.
    :param torch.Tensor weights: true weights ``(K,)``; defaults to the data set's ``weights``.
    :param int chunk_size: rows per chunk.
    :returns: a Python float.

    Example:

    >>> from pyro_ebm.datasets import line4
    >>> ds = line4()
    >>> mse = mode_weight_mse(ds.sample(10_000, torch.Generator().manual_seed(0)), ds)
    >>> mse < 1e-4
    True
    """
    w_hat = mode_weights(x, means_or_dataset, chunk_size)
    if weights is None:
        if not hasattr(means_or_dataset, "weights"):
            raise ValueError("weights must be given when means_or_dataset is not a data set")
        weights = means_or_dataset.weights
    weights = torch.as_tensor(weights).to(w_hat)
    if weights.shape != w_hat.shape:
        raise ValueError(
            f"weights must have shape {tuple(w_hat.shape)}, got {tuple(weights.shape)}"
        )
    return float((w_hat - weights).pow(2).mean())


def _chain_indicators(samples: torch.Tensor, means_or_dataset: Any, chunk_size: int | None):
    samples = torch.as_tensor(samples)
    if samples.dim() != 3 or samples.shape[1] < 2 or samples.shape[0] < 1:
        raise ValueError(
            "samples must have shape (num_chains, num_draws, dim) with num_draws >= 2, "
            f"got {tuple(samples.shape)}"
        )
    samples = _points(samples, "samples")
    idx, k = _mode_index(samples, means_or_dataset, chunk_size)  # (C, N)
    ind = torch.nn.functional.one_hot(idx, k).to(torch.float64)  # (C, N, K)
    return ind


def _ess(ind: torch.Tensor) -> torch.Tensor:
    """ESS per mode of indicators ``(C, N, K)``; NaN where an indicator is constant."""
    constant = (ind == ind[:1, :1]).all(dim=1).all(dim=0)
    ess = effective_sample_size(ind, chain_dim=0, sample_dim=1)
    # Stan's safeguard, absent from Pyro: tau >= 1 / log10(total draws), i.e. ESS <= n log10(n)
    # (this also replaces the negative ESS Pyro returns for strongly anti-correlated chains).
    n = ind.shape[0] * ind.shape[1]
    cap = n * math.log10(n)
    ess = torch.where((ess < 0) | (ess > cap), torch.full_like(ess, cap), ess)
    return torch.where(constant, torch.full_like(ess, float("nan")), ess)


def mode_indicator_ess(
    samples: torch.Tensor, means_or_dataset: Any, chunk_size: int | None = None
) -> torch.Tensor:
    r"""Effective sample size of the indicator of each mode along MCMC chains.

    For each mode ``k`` the series :math:`\mathbb 1\{x_{c,t} \in \text{mode } k\}` of shape
    ``(num_chains, num_draws)`` is passed to :func:`pyro.ops.stats.effective_sample_size`
    (Geyer's initial monotone sequence on the multi-chain autocorrelation, as in Stan); chains
    stuck in different modes inflate the between-chain variance and so lower the ESS. As in Stan,
    the ESS is capped at :math:`n \log_{10} n` for ``n`` draws in all.

    **Degenerate case**: if an indicator is constant over all chains and draws (a mode never
    visited, or the only one visited), its variance is zero and the ESS is undefined: ``nan``
    is returned for that mode.

    :param torch.Tensor samples: draws of shape ``(num_chains, num_draws, dim)``.
    :param means_or_dataset: mode locations ``(K, dim)`` or a data set.
    :param int chunk_size: rows per chunk.
    :returns: tensor of shape ``(K,)`` in the default dtype.

    Example:

    >>> means = torch.tensor([[-1.0], [1.0]])
    >>> sticky = torch.tensor([-1.0, 1.0]).repeat_interleave(50).repeat(4)  # runs of 50 draws
    >>> ess = mode_indicator_ess(sticky.reshape(1, 400, 1), means)
    >>> bool((ess < 40).all())
    True
    """
    ind = _chain_indicators(samples, means_or_dataset, chunk_size)
    return _ess(ind).to(torch.get_default_dtype())


def mode_weights_mcse(
    samples: torch.Tensor, means_or_dataset: Any, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mode weights estimated from MCMC chains and their Monte Carlo standard errors.

    With :math:`I_k` the indicator of mode ``k`` along the chains (see
    :func:`mode_indicator_ess`), :math:`\hat w_k = \overline{I_k}` over all chains and draws and

    .. math:: \mathrm{MCSE}_k = \sqrt{\hat w_k (1 - \hat w_k) / \mathrm{ESS}_k}.

    For i.i.d. draws this is the binomial standard deviation
    :math:`\sqrt{w(1-w)/n}`. A statistical test of a sampler passes when
    ``abs(w - w_true) < z * mcse`` for every mode (with ``z`` from a Bonferroni split of the
    allowed failure rate).

    **Degenerate case**: if a mode was never visited (or was the only one visited), its ESS is
    undefined and its ``mcse`` is ``nan``; ``abs(w - w_true) < z * nan`` is then ``False``, so such
    a check fails, the safe outcome for a sampler that never moved between modes. Test with
    ``torch.isnan(mcse)`` to treat it otherwise.

    :param torch.Tensor samples: draws of shape ``(num_chains, num_draws, dim)``.
    :param means_or_dataset: mode locations ``(K, dim)`` or a data set.
    :param int chunk_size: rows per chunk.
    :returns: ``(weights, mcse)``, each of shape ``(K,)`` in the default dtype.

    Example:

    >>> from pyro_ebm.datasets import imbalanced_pair
    >>> ds = imbalanced_pair()
    >>> draws = ds.sample(4000, torch.Generator().manual_seed(0)).reshape(4, 1000, 2)
    >>> w, mcse = mode_weights_mcse(draws, ds)
    >>> bool(((w - ds.weights).abs() < 4 * mcse).all())
    True
    """
    ind = _chain_indicators(samples, means_or_dataset, chunk_size)
    w = ind.mean(dim=(0, 1))
    ess = _ess(ind)
    mcse = (w * (1 - w) / ess).sqrt()
    dtype = torch.get_default_dtype()
    return w.to(dtype), mcse.to(dtype)
