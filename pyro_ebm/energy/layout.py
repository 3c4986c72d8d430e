r"""Flat vectors <-> dictionaries of named sites, as Pyro's MCMC kernels see them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["SiteLayout"]


class SiteLayout:
    r"""The layout of named tensor sites in one flat vector.

    Sites are concatenated in the given order, each flattened row-major, so that a sampler can
    work on a ``(num_walkers, dim)`` tensor while Pyro sees ``{site: tensor}`` dictionaries.

    :param site_shapes: ``{name: shape}`` in layout order.

    Example::

        >>> layout = SiteLayout({"mu": (), "theta": (2, 3)})
        >>> layout.dim
        7
        >>> params = layout.unflatten(torch.arange(7.0))
        >>> params["theta"].shape, layout.flatten(params).tolist() == list(range(7))
        (torch.Size([2, 3]), True)
    """

    def __init__(self, site_shapes: Mapping[str, tuple[int, ...] | torch.Size]) -> None:
        if not site_shapes:
            raise ValueError("site_shapes must name at least one site")
        self.site_names = tuple(site_shapes)
        self.site_shapes = {k: tuple(v) for k, v in site_shapes.items()}
        self.site_sizes = {k: int(torch.Size(v).numel()) for k, v in self.site_shapes.items()}
        self.dim = sum(self.site_sizes.values())

    def name_of(self, index: int) -> str:
        """The site and element of flat coordinate ``index``, e.g. ``"theta[1, 2]"`` (the
        site's name alone for a scalar site).

        Example::

            >>> layout = SiteLayout({"mu": (), "theta": (2, 3)})
            >>> layout.name_of(0), layout.name_of(6)
            ('mu', 'theta[1, 2]')
        """
        if not 0 <= index < self.dim:
            raise ValueError(f"index must be in [0, {self.dim}), got {index}")
        for name in self.site_names:
            if index < self.site_sizes[name]:
                shape = self.site_shapes[name]
                if not shape:
                    return name
                element = torch.unravel_index(torch.tensor(index), shape)
                return f"{name}[{', '.join(str(int(i)) for i in element)}]"
            index -= self.site_sizes[name]
        raise AssertionError("unreachable")

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor]) -> SiteLayout:
        """The layout of one point ``{site: tensor}`` (e.g. ``initial_params``)."""
        return cls({k: tuple(v.shape) for k, v in params.items()})

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        r"""Split flat ``(..., dim)`` vectors into ``{site: (..., *shape)}``."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        batch = x.shape[:-1]
        parts = torch.split(x, [self.site_sizes[k] for k in self.site_names], dim=-1)
        return {
            k: v.reshape(batch + self.site_shapes[k])
            for k, v in zip(self.site_names, parts, strict=True)
        }

    def flatten(self, params: Mapping[str, Tensor], what: str = "params") -> Tensor:
        r"""Inverse of :meth:`unflatten`: ``{site: (..., *shape)}`` to ``(..., dim)``; errors
        name the argument as ``what`` (e.g. ``"initial_params"``)."""
        missing = [k for k in self.site_names if k not in params]
        if missing:
            raise KeyError(f"{what} is missing sites {missing}")
        parts = []
        for name in self.site_names:
            v, shape = params[name], self.site_shapes[name]
            if v.dim() < len(shape) or tuple(v.shape[v.dim() - len(shape) :]) != shape:
                raise ValueError(
                    f"{what}[{name!r}] must end with the site's shape {shape}, got {tuple(v.shape)}"
                )
            parts.append(v.reshape(v.shape[: v.dim() - len(shape)] + (self.site_sizes[name],)))
        return torch.cat(parts, dim=-1)
