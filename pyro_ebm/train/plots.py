r"""Plots of a training run (matplotlib): the learned 2-D density against the data, the weight
of each mode over training, the negatives, and :func:`plot_runs`, which compares runs (e.g.
two samplers) side by side on shared axes.

Each function draws on ``ax`` (a new figure when ``None``) and returns the axes (the figure
for :func:`plot_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyro_ebm.metrics import bounds_around, grid_log_density

from .history import History

__all__ = ["plot_density_2d", "plot_mode_weights", "plot_negatives", "plot_runs"]


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
    title: str = "model density",
    vmax: float | None = None,
    colorbar: bool = True,
):
    """The model density :math:`e^{-U}/Z` on a grid (with a colour bar), data points on top.

    :param bounds: ``(low, high)`` for both axes or ``((xlow, xhigh), (ylow, yhigh))``; by
        default ``(-5, 5)``, or, for data outside that square, the data's range on each axis
        with a 10% margin.
    :param title: the axes' title (name the model or sampler in it).
    :param vmax: the top of the colour scale (default: the density's maximum); give several
        plots the same one to compare them.

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
    image = ax.imshow(
        img, origin="lower", extent=(*xb, *yb), cmap="viridis", aspect="equal", vmin=0, vmax=vmax
    )
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="density", shrink=0.8)
    if data is not None:
        _scatter(ax, data, max_points, c="white", alpha=0.3, label="data")
        ax.legend(loc="upper right", fontsize="small", markerscale=4)
    ax.set_xlim(*xb)
    ax.set_ylim(*yb)
    ax.set_title(title)
    return ax


def plot_mode_weights(
    history: History | Sequence[History],
    truth: Tensor | Sequence[float] | None = None,
    key: str = "model_weights",
    labels: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
):
    """The weight of each mode against the training step, one colour per mode (several
    histories, e.g. seeds or samplers, in different line styles), the truth dotted, with a
    legend.

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History([{"step": 1, "model_weights": [0.4, 0.6]},
        ...              {"step": 2, "model_weights": [0.3, 0.7]}])
        >>> ax = plot_mode_weights(h, truth=[1 / 3, 2 / 3])
        >>> len(ax.lines), [t.get_text() for t in ax.get_legend().get_texts()]
        (4, ['mode 0', 'mode 1', 'truth'])
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
            label = f"mode {k}" if i == 0 else None
            ax.plot(steps, weights[:, k], styles[i % 4], color=colors[k % 10], label=label)
        if labels is not None:  # the line style of each history
            ax.plot([], [], styles[i % 4], color="0.3", label=labels[i])
    if truth is not None:
        for k, w in enumerate(torch.as_tensor(truth).tolist()):
            label = "truth" if k == 0 else None
            ax.axhline(w, color=colors[k % 10], lw=0.8, ls=(0, (1, 3)), label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("mode weight")
    if title is not None:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", ncol=2)
    return ax


def plot_negatives(
    walkers: Tensor,
    data: Tensor | None = None,
    bounds: tuple | None = None,
    max_points: int = 2000,
    ax=None,
    title: str = "negatives and data",
):
    """The negatives (walkers) over the data, first two coordinates; for 1-D points, their
    histograms; with a legend.

    :param bounds: as in :func:`plot_density_2d`; by default ``(-5, 5)`` or, for points outside
        that square, their range (:func:`~pyro_ebm.metrics.bounds_around`).

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> ax = plot_negatives(torch.randn(100, 2), torch.randn(100, 2))
        >>> ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()]
        ('negatives and data', ['data', 'negatives'])
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
            x = data[:, 0].cpu().numpy()
            ax.hist(x, bins=edges, density=True, color="0.6", alpha=0.5, label="data")
        x = walkers[:, 0].cpu().numpy()
        ax.hist(x, bins=edges, density=True, color="C1", alpha=0.6, label="negatives")
        ax.legend(fontsize="small")
        ax.set_title(title)
        return ax
    if bounds is None:
        bounds = bounds_around(points)
    xb, yb = (bounds, bounds) if isinstance(bounds[0], (int, float)) else bounds
    if data is not None:
        _scatter(ax, data, max_points, c="0.6", alpha=0.4, label="data")
    _scatter(ax, walkers, max_points, c="C1", alpha=0.6, label="negatives")
    ax.set_xlim(*xb)
    ax.set_ylim(*yb)
    ax.set_aspect("equal")
    ax.legend(fontsize="small", markerscale=4)
    ax.set_title(title)
    return ax


def plot_runs(
    runs: dict,
    data: Tensor | None = None,
    truth: Tensor | Sequence[float] | None = None,
    resolution: int = 150,
):
    """Compare training runs (e.g. two samplers on the same data): one row per run, its learnt
    density (2-D data; the same axes and colour scale in every row) and the weight of each
    mode over training (the same axes). Returns the figure.

    :param runs: ``{name: trainer}`` (anything with ``potential``, ``history``).
    :param data: the training data, drawn over the densities and fixing their square.
    :param truth: the true mode weights.

    Example::

        >>> import matplotlib; matplotlib.use("Agg")
        >>> class Run:
        ...     history = History([{"step": 1, "model_weights": [0.5, 0.5]}])
        ...     def potential(self, x):
        ...         return 0.5 * (x**2).sum(-1)
        >>> fig = plot_runs({"a": Run(), "b": Run()}, data=torch.randn(50, 2), resolution=20)
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]
        ['a: model density', 'a: mode weights', 'b: model density', 'b: mode weights']
    """
    import matplotlib.pyplot as plt

    names = list(runs)
    two_d = data is None or data.shape[1] == 2
    weights = any("model_weights" in r for run in runs.values() for r in run.history)
    cols = int(two_d) + int(weights)
    if cols == 0:
        raise ValueError("plot_runs needs 2-D data or runs with mode weights to show")
    fig, axes = plt.subplots(
        len(names), cols, figsize=(5 * cols, 4 * len(names)), squeeze=False, sharey="col"
    )
    bounds, vmax = None, None
    if two_d:
        bounds = (-5.0, 5.0) if data is None else bounds_around(data)
        vmax = max(
            float(grid_log_density(runs[n].potential, bounds, resolution)[1].exp().max())
            for n in names
        )
    for row, name in zip(axes, names, strict=True):
        run = runs[name]
        if two_d:
            plot_density_2d(
                run.potential,
                data,
                bounds,
                resolution,
                ax=row[0],
                vmax=vmax,
                title=f"{name}: model density",
            )
        if weights:
            plot_mode_weights(run.history, truth, ax=row[-1], title=f"{name}: mode weights")
    if weights and len(names) > 1:  # (the mode weights share their x axis too)
        top = max(r["step"] for run in runs.values() for r in run.history)
        for row in axes:
            row[-1].set_xlim(0, top)
    fig.tight_layout()
    return fig
