r"""MCMC convergence diagnostics of many chains: rank-normalised split R-hat and effective sample
sizes (Vehtari et al. 2021), vectorised over many parameters, linear in the number of draws.

The paper's Table 2 reports the largest R-hat over dimensions of 128 negative chains: values
near 1 mean the chains agree (they mix between modes); values far above 1 mean chains stuck in
different modes. :func:`rhat` is ArviZ's ``az.rhat(..., method="rank")`` (the maximum of the
bulk and the folded R-hat) and :func:`effective_sample_size` is ArviZ's ``az.ess`` (methods
``"bulk"``, ``"tail"`` and ``"mean"``), written in torch so that they work the same on every
ArviZ version, on any device and on thousands of dimensions at once; the tests compare them with
ArviZ.

Memory and time are linear in the number of draws: the autocovariances come from an FFT and
Geyer's initial monotone sequence from a cumulative minimum (not from a ``(draws, draws)`` mask),
and parameters are processed in chunks of about a million values (or one parameter), so that the
sorts of the rank normalisation and the FFT never hold more than a bounded slab besides the
input.

References:

- Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
  localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis,
  https://arxiv.org/abs/1903.08008
- Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science 7(4), 473-483.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["effective_sample_size", "max_rhat", "rhat"]

# Values (num_chains * num_draws * parameters) per chunk, at least one parameter: each chunk's
# temporaries (float64 copy, split chains, sort values and indices, ranks, FFT) take about 80
# bytes per value, ~80 MiB (the memory tests measure it).
_CHUNK_ELEMENTS = 2**20
# ArviZ treats a series whose range is below numpy's float resolution as constant.
_RESOLUTION = torch.finfo(torch.float64).resolution
_ESS_METHODS = ("bulk", "tail", "mean")


def _check_shape(samples: Tensor, name: str = "samples") -> Tensor:
    """``samples`` as a 3-D tensor ``(num_chains, num_draws, dim)`` (a view, dtype unchanged)."""
    samples = torch.as_tensor(samples)
    if samples.dim() == 2:
        samples = samples[..., None]
    if samples.dim() != 3 or samples.shape[0] < 1 or samples.shape[1] < 4:
        raise ValueError(
            f"{name} must have shape (num_chains, num_draws, dim) with num_chains >= 1 and "
            f"num_draws >= 4, got {tuple(samples.shape)}"
        )
    if samples.is_complex():
        raise ValueError(f"{name} must be real, got dtype {samples.dtype}")
    return samples


def _chunk_width(samples: Tensor) -> int:
    """Parameters per chunk of ``samples`` ``(num_chains, num_draws, dim)``."""
    return max(1, _CHUNK_ELEMENTS // max(1, samples.shape[0] * samples.shape[1]))


def _float64_chunk(samples: Tensor, start: int, width: int, name: str = "samples") -> Tensor:
    """Parameters ``start:start + width`` of ``samples`` ``(num_chains, num_draws, dim)`` as a
    contiguous float64 tensor ``(width, num_chains, num_draws)`` (parameters first, so that the
    sorts and FFTs run over contiguous memory); raises if any value is not finite."""
    part = samples[..., start : start + width].permute(2, 0, 1)
    chunk = torch.empty(part.shape, dtype=torch.float64, device=samples.device).copy_(part)
    if not torch.isfinite(chunk).all():  # (ranked as ordinary values, nan gave R-hat 4.2)
        raise ValueError(f"{name} must be finite (found nan or inf)")
    return chunk


def _map_chunks(samples: Tensor, fn: Callable[[Tensor], Tensor], name: str = "samples") -> Tensor:
    """``fn`` applied to the float64 chunks ``(width, num_chains, num_draws)`` of the parameters
    of ``samples`` (checked for shape and finiteness), concatenated into a ``(dim,)`` tensor."""
    samples = _check_shape(samples, name)
    d = samples.shape[-1]
    out = torch.empty(d, dtype=torch.float64, device=samples.device)
    width = _chunk_width(samples)
    for j in range(0, d, width):
        out[j : j + width] = fn(_float64_chunk(samples, j, width, name))
    return out


# The helpers below take float64 chunks ``x`` of shape ``(d, c, n)``: d parameters, c chains,
# n draws.


def _split(x: Tensor) -> Tensor:
    """Split chains: the first and the last ``n // 2`` draws of each chain as two chains (the
    middle draw of an odd number is dropped, as in ArviZ)."""
    n = x.shape[-1] // 2
    return torch.cat([x[..., :n], x[..., x.shape[-1] - n :]], dim=1)


def _rank_normalize(x: Tensor, return_sorted: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Normal scores of the pooled ranks (average ranks for ties), per parameter.

    :param x: ``(d, c, n)`` float64.
    :param return_sorted: also return the pooled values sorted per parameter, ``(d, c * n)``.
    """
    d, c, n = x.shape
    s = c * n
    sorted_vals, order = x.reshape(d, s).sort(dim=-1)
    pos = torch.arange(1, s + 1, dtype=torch.float64, device=x.device)
    new = torch.ones_like(sorted_vals, dtype=torch.bool)  # first of a run of equal values
    new[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    if bool(new.all()):
        ranks_sorted = pos.expand(d, s)
    else:  # a run of ties from position a to b gets the average rank (a + b) / 2
        start = torch.where(new, pos, 0.0).cummax(dim=-1).values
        last = torch.ones_like(new)
        last[:, :-1] = new[:, 1:]
        end = torch.where(last, pos, math.inf).flip(-1).cummin(dim=-1).values.flip(-1)
        ranks_sorted = (start + end) / 2
        del start, end, last
    del new
    ranks = torch.empty_like(sorted_vals).scatter_(-1, order, ranks_sorted)
    del order, ranks_sorted
    z = torch.special.ndtri(ranks.sub_(0.375).div_(s + 0.25)).reshape(d, c, n)
    return (z, sorted_vals) if return_sorted else z


def _median_sorted(sorted_vals: Tensor) -> Tensor:
    """``numpy.median`` of each row from the sorted rows: the middle value, or the mean
    ``(a + b) / 2`` of the two middle ones (exactly halfway between them where that is
    representable, so that the folded draws ``|a - m|`` and ``|b - m|`` tie, as in ArviZ)."""
    s = sorted_vals.shape[-1]
    if s % 2:
        return sorted_vals[:, s // 2]
    return (sorted_vals[:, s // 2 - 1] + sorted_vals[:, s // 2]) / 2


def _rhat(x: Tensor) -> Tensor:
    n = x.shape[-1]
    chain_mean = x.mean(-1)
    chain_var = x.var(-1, unbiased=True)
    between = n * chain_mean.var(-1, unbiased=True)
    within = chain_var.mean(-1)
    var_hat = (n - 1) / n * within + between / n
    return (var_hat / within).sqrt()


def _split_rank_stats(x: Tensor, with_rhat: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """The rank-normalised split chains of a chunk ``x`` ``(d, c, n)``, their rank R-hat (the
    maximum of the bulk and the folded one; ``None`` unless ``with_rhat``) and the pooled split
    values sorted per parameter, ``(d, c * 2 * (n // 2))``."""
    xs = _split(x)
    z, sorted_vals = _rank_normalize(xs, return_sorted=True)
    if not with_rhat:
        return z, None, sorted_vals
    bulk = _rhat(z)
    folded = xs.sub_(_median_sorted(sorted_vals)[:, None, None]).abs_()
    del xs
    tail = _rhat(_rank_normalize(folded))
    return z, torch.maximum(bulk, tail), sorted_vals


def _rhat_chunk(x: Tensor) -> Tensor:
    return _split_rank_stats(x)[1]


def _next_fast_len(n: int) -> int:
    """The smallest ``2**a * 3**b * 5**c >= n`` (a fast FFT length, as ``scipy.fftpack``'s)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _mean_autocov(x: Tensor) -> Tensor:
    """Autocovariance at every lag averaged over chains, ``(d, n)``, by FFT (zero-padded to a
    fast length of at least ``2 n``, hence the linear, not circular, autocovariance)."""
    n = x.shape[-1]
    m = _next_fast_len(2 * n)
    f = torch.fft.rfft(x - x.mean(-1, keepdim=True), n=m, dim=-1)
    power = torch.view_as_real(f).square().sum(-1)
    del f
    return torch.fft.irfft(power, n=m, dim=-1)[..., :n].mean(1) / n


def _ess(x: Tensor) -> Tensor:
    """ESS of (split) chains ``x`` ``(d, c, n)`` with Geyer's initial monotone sequence, as
    ArviZ's and Stan's: vectorised over parameters, the sequential loops become a first
    non-positive pair and a cumulative minimum."""
    d, c, n = x.shape
    size = c * n
    constant = (x.amax((1, 2)) - x.amin((1, 2))) < _RESOLUTION
    mean_acov = _mean_autocov(x)  # (d, n)
    mean_var = mean_acov[:, 0] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if c > 1:
        var_plus = var_plus + x.mean(-1).var(-1, unbiased=True)
    # Pairs P_k = rho_2k + rho_2k+1, k = 0..kmax (the pairs ArviZ's loop can reach), where
    # rho_0 = 1. The initial positive sequence stops at K, the first k with P_k <= 0 (or kmax);
    # pairs 0..K-1 enter the sum through their running minimum (the monotone sequence), and
    # rho_2K too where P_K >= 0 or rho_2K > 0 (ArviZ's "improve estimation" step).
    kmax = max(0, (n - 3) // 2)
    rho = 1.0 - (mean_var[:, None] - mean_acov[:, : 2 * kmax + 2]) / var_plus[:, None]
    del mean_acov
    rho[:, 0] = 1.0
    pairs = rho.reshape(d, kmax + 1, 2).sum(-1)
    nonpositive = pairs <= 0
    first = nonpositive.to(torch.uint8).argmax(-1)
    k = torch.where(nonpositive.any(-1), first, torch.full_like(first, kmax))[:, None]
    monotone = pairs.cummin(-1).values.cumsum(-1)
    monotone = torch.cat([torch.zeros_like(monotone[:, :1]), monotone], -1).gather(-1, k)[:, 0]
    even = rho.gather(-1, 2 * k)[:, 0]
    last = torch.where((pairs.gather(-1, k)[:, 0] >= 0) | (even > 0), even, 0.0)
    tau = (-1.0 + 2.0 * monotone + last).clamp(min=1.0 / math.log10(size))
    ess = size / tau
    return torch.where(constant, torch.full_like(ess, float(size)), ess)


def _mquantile_sorted(sorted_vals: Tensor, prob: float) -> Tensor:
    """R's type-7 quantile of each row from the sorted rows, with the arithmetic of
    ``scipy.stats.mstats.mquantiles(alphap=1, betap=1)`` (ArviZ's quantile), so that an
    indicator ``x <= q`` at a data value is the same."""
    s = sorted_vals.shape[-1]
    aleph = s * prob + (1.0 - prob)
    k = math.floor(min(max(aleph, 1), s - 1))
    gamma = min(max(aleph - k, 0.0), 1.0)
    return (1.0 - gamma) * sorted_vals[:, k - 1] + gamma * sorted_vals[:, k]


def _ess_bulk_chunk(x: Tensor) -> Tensor:
    return _ess(_rank_normalize(_split(x)))


def _ess_tail_chunk(x: Tensor) -> Tensor:
    sorted_vals = x.reshape(x.shape[0], -1).sort(dim=-1).values
    q = [_mquantile_sorted(sorted_vals, p)[:, None, None] for p in (0.05, 0.95)]
    del sorted_vals
    return torch.minimum(*(_ess(_split((x <= qi).to(torch.float64))) for qi in q))


def _ess_mean_chunk(x: Tensor) -> Tensor:
    return _ess(_split(x))


_ESS_CHUNK = {"bulk": _ess_bulk_chunk, "tail": _ess_tail_chunk, "mean": _ess_mean_chunk}


def effective_sample_size(samples: Tensor, method: str = "bulk") -> Tensor:
    r"""Effective sample size of each dimension of MCMC chains, as ArviZ's ``az.ess``.

    All methods split each chain in two halves (the middle draw of an odd number is dropped)
    and estimate the autocorrelation of the split chains from their FFT autocovariances and the
    between-chain variance, truncated by Geyer's initial monotone sequence; as in Stan and ArviZ
    the ESS is capped at :math:`S \log_{10} S` for :math:`S` split draws in all, and a constant
    series has ESS :math:`S`. Memory and time are linear in the number of draws (parameters
    are processed in chunks).

    - ``"bulk"``: of the rank-normalised split chains (normal scores of the pooled ranks).
    - ``"tail"``: the smaller of the ESS of the indicators :math:`x \le q_{0.05}` and
      :math:`x \le q_{0.95}` (quantiles over all chains and draws).
    - ``"mean"``: of the split chains themselves (ArviZ's ``method="mean"``).

    :param samples: draws ``(num_chains, num_draws, dim)`` (or ``(num_chains, num_draws)``,
        treated as ``dim = 1``), finite, with ``num_draws >= 4``; any real dtype and device.
    :param method: ``"bulk"``, ``"tail"`` or ``"mean"``.
    :returns: ``(dim,)`` float64 tensor on the device of ``samples``.
    :raises ValueError: if ``samples`` has the wrong shape, too few draws or non-finite values,
        or ``method`` is unknown.

    References:

    - Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
      localization: an improved R-hat for assessing convergence of MCMC",
      https://arxiv.org/abs/1903.08008
    - Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science 7(4), 473-483.

    Example::

        >>> gen = torch.Generator().manual_seed(0)
        >>> iid = torch.randn(4, 1000, 2, generator=gen)
        >>> bool((effective_sample_size(iid) > 3000).all())
        True
        >>> sticky = iid.cumsum(1)  # random walks: strongly autocorrelated
        >>> bool((effective_sample_size(sticky, method="tail") < 100).all())
        True
    """
    if method not in _ESS_CHUNK:
        raise ValueError(f"method must be one of {_ESS_METHODS}, got {method!r}")
    return _map_chunks(samples, _ESS_CHUNK[method])


def rhat(samples: Tensor) -> Tensor:
    r"""Rank-normalised split R-hat of each dimension, the maximum of the bulk and the folded
    statistic (ArviZ's ``method="rank"``).

    Memory and time are linear in the number of draws (parameters are processed in chunks).
    With a single chain this is the R-hat of its two halves (ArviZ returns ``nan`` there).

    :param samples: draws ``(num_chains, num_draws, dim)`` (or ``(num_chains, num_draws)``),
        finite, with ``num_draws >= 4``.
    :returns: ``(dim,)`` float64 tensor; ``nan`` for a dimension that is constant.
    :raises ValueError: if ``samples`` has the wrong shape, too few draws or non-finite values.

    References:

    - Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
      localization: an improved R-hat for assessing convergence of MCMC",
      https://arxiv.org/abs/1903.08008

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
    return _map_chunks(samples, _rhat_chunk)


def max_rhat(samples: Tensor) -> float:
    r"""The largest :func:`rhat` over dimensions (Grenioux et al. 2023, Table 2).

    :param samples: draws ``(num_chains, num_draws, dim)``.

    References:

    - Grenioux, Moulines, Gabrié (2023), "Balanced Training of Energy-Based Models with Adaptive
      Flow Sampling", https://arxiv.org/abs/2306.00684

    Example::

        >>> draws = torch.randn(8, 500, 3, generator=torch.Generator().manual_seed(0))
        >>> max_rhat(draws) < 1.02
        True
    """
    return float(rhat(samples).max())
