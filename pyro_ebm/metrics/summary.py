r"""Posterior summary of MCMC samples, per site and element, as Pyro's ``print_summary`` shows
it, with ArviZ's diagnostics: the bulk effective sample size and the rank-normalised split R-hat
of :mod:`~pyro_ebm.metrics.convergence`.

Memory and time are linear in the number of draws: elements of a site are processed in chunks,
and one sort of each chunk serves the median, the interval and the rank normalisation.

References:

- Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
  localization: an improved R-hat for assessing convergence of MCMC",
  https://arxiv.org/abs/1903.08008
- Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science 7(4), 473-483.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import product
from numbers import Real

import torch
from torch import Tensor

from .convergence import (
    _check_shape,
    _chunk_width,
    _ess,
    _float64_chunk,
    _median_sorted,
    _split_rank_stats,
)

__all__ = ["format_summary", "summarize"]


def _quantile_sorted(sorted_vals: Tensor, prob: float) -> Tensor:
    """``torch.quantile(x, prob, dim=-1)`` (linear interpolation, numpy's default) of each row
    from the sorted rows, without ``torch.quantile``'s limit of ``2**24`` values."""
    rank = prob * (sorted_vals.shape[-1] - 1)
    below = math.floor(rank)
    return torch.lerp(sorted_vals[:, below], sorted_vals[:, math.ceil(rank)], rank - below)


def _interval_names(prob: float) -> tuple[str, str]:
    return f"{50 * (1 - prob):.1f}%", f"{50 * (1 + prob):.1f}%"


def summarize(samples: Mapping[str, Tensor], prob: float = 0.9) -> dict[str, dict[str, Tensor]]:
    r"""Summary statistics and convergence diagnostics of each element of each site.

    For each site, over all chains and draws: ``mean``, ``std`` (with Bessel's correction),
    ``median`` (the mean of the two middle values for an even number, as ``numpy.median``),
    the ``(1 - prob) / 2`` and ``(1 + prob) / 2`` quantiles (linear interpolation, as
    ``numpy.quantile``), named like Pyro's ``print_summary`` (``"5.0%"`` and ``"95.0%"`` for
    ``prob=0.9``; Pyro's columns of those names hold a highest-density interval, these hold the
    equal-tailed one); ``n_eff``, the bulk effective sample size (ArviZ's ``ess_bulk``, see
    :func:`~pyro_ebm.metrics.convergence.effective_sample_size`); ``r_hat``, the rank-normalised
    split R-hat (ArviZ's ``r_hat``, see :func:`~pyro_ebm.metrics.convergence.rhat`), ``nan``
    for a single chain as in ArviZ.

    :param samples: site name to draws ``(num_chains, num_draws, *site_shape)``, finite, with
        ``num_draws >= 4``; any real dtype and device.
    :param prob: probability mass of the central interval, in ``(0, 1)``.
    :returns: site name to a dict of statistic name to a float64 tensor of shape
        ``site_shape`` on the device of the site's draws, in the order ``mean``, ``std``,
        ``median``, lower, upper, ``n_eff``, ``r_hat``.
    :raises ValueError: if ``prob`` is not in ``(0, 1)`` or a site's draws have the wrong shape,
        too few draws or non-finite values.

    References:

    - Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021), "Rank-normalization, folding, and
      localization: an improved R-hat for assessing convergence of MCMC",
      https://arxiv.org/abs/1903.08008
    - Geyer (1992), "Practical Markov chain Monte Carlo", Statistical Science 7(4), 473-483.

    Example::

        >>> gen = torch.Generator().manual_seed(0)
        >>> draws = {"theta": torch.randn(4, 500, 3, generator=gen), "tau": torch.ones(4, 500)}
        >>> s = summarize(draws)
        >>> list(s["theta"])
        ['mean', 'std', 'median', '5.0%', '95.0%', 'n_eff', 'r_hat']
        >>> s["theta"]["n_eff"].shape, s["tau"]["mean"].shape
        (torch.Size([3]), torch.Size([]))
        >>> bool((s["theta"]["r_hat"] < 1.02).all()), float(s["tau"]["std"])
        (True, 0.0)
    """
    if not isinstance(prob, Real) or not 0 < prob < 1:
        raise ValueError(f"prob must be a number in (0, 1), got {prob!r}")
    lower, upper = _interval_names(float(prob))
    result = {}
    for name, value in samples.items():
        label = f"samples[{name!r}]"
        value = torch.as_tensor(value)
        if value.dim() < 2:
            raise ValueError(
                f"{label} must have shape (num_chains, num_draws, *site_shape), "
                f"got {tuple(value.shape)}"
            )
        c, n, *site_shape = value.shape
        x = _check_shape(value.reshape(c, n, math.prod(site_shape)), label)
        d = x.shape[-1]
        stats = {
            key: torch.empty(d, dtype=torch.float64, device=x.device)
            for key in ("mean", "std", "median", lower, upper, "n_eff", "r_hat")
        }
        width = _chunk_width(x)
        for j in range(0, d, width):
            chunk = _float64_chunk(x, j, width, label)  # (w, c, n)
            part = slice(j, j + chunk.shape[0])
            pooled = chunk.reshape(chunk.shape[0], -1)
            stats["mean"][part] = pooled.mean(-1)
            stats["std"][part] = pooled.std(-1)
            z, r_hat, sorted_split = _split_rank_stats(chunk, with_rhat=c > 1)
            stats["n_eff"][part] = _ess(z)
            stats["r_hat"][part] = float("nan") if r_hat is None else r_hat
            del z
            # the split chains hold every draw unless num_draws is odd
            sorted_vals = sorted_split if n % 2 == 0 else pooled.sort(dim=-1).values
            del sorted_split
            stats["median"][part] = _median_sorted(sorted_vals)
            stats[lower][part] = _quantile_sorted(sorted_vals, (1 - prob) / 2)
            stats[upper][part] = _quantile_sorted(sorted_vals, (1 + prob) / 2)
        result[name] = {key: v.reshape(site_shape) for key, v in stats.items()}
    return result


def format_summary(summary: Mapping[str, Mapping[str, Tensor]]) -> str:
    r"""The table of a :func:`summarize` result, laid out as Pyro's ``print_summary`` prints it:
    one row per element (``theta[3]``, ``w[1,2]``; a scalar site by its name), one column per
    statistic, two decimals (without Pyro's blank lines before and after).

    :param summary: site name to statistic name to a tensor of the site's shape, e.g. from
        :func:`summarize`; the columns are the statistics of the first site.
    :returns: the table, lines separated by ``"\n"``; ``""`` for an empty ``summary``.

    Example::

        >>> gen = torch.Generator().manual_seed(0)
        >>> draws = {"theta": torch.randn(4, 500, 2, generator=gen), "tau": torch.ones(4, 500)}
        >>> s = summarize(draws)
        >>> print(format_summary(s))  # doctest: +ELLIPSIS
                        mean       std    median      5.0%     95.0%     n_eff     r_hat
          theta[0]     ...
          theta[1]     ...
               tau      1.00      0.00      1.00      1.00      1.00   2000.00       nan
    """
    if not summary:
        return ""
    shapes = {name: tuple(next(iter(stats.values())).shape) for name, stats in summary.items()}
    # Pyro's width: the longest of name[last index] (name[] for a scalar site), at least 10
    max_len = max(
        max(
            len(f"{name}[{','.join(str(s - 1) for s in shape)}]") for name, shape in shapes.items()
        ),
        10,
    )
    columns = list(next(iter(summary.values())))
    lines = [" " * max_len + "".join(f" {col:>9}" for col in columns)]
    for name, stats in summary.items():
        values = [torch.as_tensor(stats[col]).reshape(-1).tolist() for col in columns]
        shape = shapes[name]
        for i, idx in enumerate(product(*map(range, shape))):
            row = f"{name}[{','.join(map(str, idx))}]" if shape else name
            lines.append(f"{row:>{max_len}}" + "".join(f" {v[i]:>9.2f}" for v in values))
    return "\n".join(lines)
