r"""Plots of a training run (matplotlib): the learned 2-D density against the data, the weight
of each mode over training, and the negatives.

Each function draws on ``ax`` (a new figure when ``None``) and returns the axes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyro_ebm.metrics import bounds_around, grid_log_density

from .history import History

__all__ = ["plot_density_2d", "plot_mode_weights", "plot_negatives"]


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4.5, 4))
    return ax


def _scatter(ax, x: Tensor, max_points: int, **kwargs) -> None:
    x = x.detach().cpu()
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_points]]
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, **kwargs)


def plot_density_2d(
    potential_fn: Callable[[Tensor], Tensor],
    data: Tensor | None = None,
    bounds: tuple | None = None,
    resolution: int = 200,
    max_points: int = 2000,
    ax=None,
):
    """The model density :math:`e^{-U}/Z` on a grid, with data points on top.

    :param bounds: ``(low, high)`` for both axes or ``((xlow, xhigh), (ylow, yhigh))``; by
        default ``(-5, 5)``, or, for data outside that square, the data's range on each axis
        with a 10% margin.

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> ax = plot_density_2d(lambda x: 0.5 * (x**2).sum(-1), resolution=50)
        >>> ax.get_title()
        'model density'
    """
    ax = _axes(ax)
    if bounds is None:
        bounds = (-5.0, 5.0) if data is None else bounds_around(data)
    pts, logp, _ = grid_log_density(potential_fn, bounds, resolution)
    img = logp.exp().reshape(resolution, resolution).T.cpu().numpy()
    xb, yb = (bounds, bounds) if isinstance(bounds[0], (int, float)) else bounds
    ax.imshow(img, origin="lower", extent=(*xb, *yb), cmap="viridis", aspect="equal")
    if data is not None:
        _scatter(ax, data, max_points, c="white", alpha=0.3)
    ax.set_xlim(*xb)
    ax.set_ylim(*yb)
    ax.set_title("model density")
    return ax


def plot_mode_weights(
    history: History | Sequence[History],
    truth: Tensor | Sequence[float] | None = None,
    key: str = "model_weights",
    labels: Sequence[str] | None = None,
    ax=None,
):
    """The weight of each mode against the training step, one line per mode (several
    histories, e.g. seeds or samplers, in different line styles), the truth dashed.

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History([{"step": 1, "model_weights": [0.4, 0.6]},
        ...              {"step": 2, "model_weights": [0.3, 0.7]}])
        >>> ax = plot_mode_weights(h, truth=[1 / 3, 2 / 3])
        >>> len(ax.lines)
        4
    """
    ax = _axes(ax)
    histories = [history] if isinstance(history, History) else list(history)
    styles = ["-", "--", ":", "-."]
    colors = [f"C{k}" for k in range(10)]
    for i, h in enumerate(histories):
        steps = [r["step"] for r in h if key in r]
        weights = torch.tensor([r[key] for r in h if key in r]).numpy()
        if len(steps) == 0:
            continue
        for k in range(weights.shape[1]):
            label = None
            if k == 0 and labels is not None:
                label = labels[i]
            ax.plot(steps, weights[:, k], styles[i % 4], color=colors[k % 10], label=label)
    if truth is not None:
        for k, w in enumerate(torch.as_tensor(truth).tolist()):
            ax.axhline(w, color=colors[k % 10], lw=0.8, ls=(0, (1, 3)))
    ax.set_xlabel("training step")
    ax.set_ylabel("mode weight")
    if labels is not None:
        ax.legend(fontsize="small")
    return ax


def plot_negatives(
    walkers: Tensor,
    data: Tensor | None = None,
    bounds: tuple | None = None,
    max_points: int = 2000,
    ax=None,
):
    """The negatives (walkers) over the data, first two coordinates; for 1-D points, their
    histograms.

    :param bounds: as in :func:`plot_density_2d`; by default ``(-5, 5)`` or, for points outside
        that square, their range (:func:`~pyro_ebm.metrics.bounds_around`).

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> ax = plot_negatives(torch.randn(100, 2), torch.randn(100, 2))
        >>> ax.get_title()
        'negatives (orange) and data (grey)'
        >>> ax = plot_negatives(torch.randn(100, 1) + 50, torch.randn(100, 1) + 50)  # 1-D
        >>> bool(ax.get_xlim()[0] > 40)
        True
    """
    ax = _axes(ax)
    points = walkers if data is None else torch.cat([walkers, data.to(walkers)])
    if walkers.shape[-1] == 1:
        lo, hi = points.min().item(), points.max().item()
        edges = torch.linspace(lo, hi, 41).tolist()
        if data is not None:
            ax.hist(data[:, 0].cpu().numpy(), bins=edges, density=True, color="0.6", alpha=0.5)
        ax.hist(walkers[:, 0].cpu().numpy(), bins=edges, density=True, color="C1", alpha=0.6)
        ax.set_title("negatives (orange) and data (grey)")
        return ax
    if bounds is None:
        bounds = bounds_around(points)
    xb, yb = (bounds, bounds) if isinstance(bounds[0], (int, float)) else bounds
    if data is not None:
        _scatter(ax, data, max_points, c="0.6", alpha=0.4)
    _scatter(ax, walkers, max_points, c="C1", alpha=0.6)
    ax.set_xlim(*xb)
    ax.set_ylim(*yb)
    ax.set_aspect("equal")
    ax.set_title("negatives (orange) and data (grey)")
    return ax
