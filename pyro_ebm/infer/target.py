r"""What a kernel samples: a batched potential over one flat unconstrained vector.

Pyro's kernels see ``{site: tensor}`` dictionaries in unconstrained space; the vectorized core in
:mod:`pyro_ebm.samplers` sees ``(num_walkers, dim)`` tensors and a batched potential
``(num_walkers, dim) -> (num_walkers,)``. :func:`make_target` builds the bridge from either a
Pyro model or a Pyro-style ``potential_fn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from torch import Tensor

from ..energy import EnergyPotential, ModelEnergy
from ..energy.layout import SiteLayout
from ..energy.model import _agree, _initialize
from ..samplers.guard import PotentialDefinitionError, guarded

__all__ = ["FlatTarget", "make_target"]

logger = logging.getLogger(__name__)


class FlatTarget(NamedTuple):
    r"""A batched potential over flat unconstrained vectors.

    :param potential: ``(C, dim) -> (C,)``, a :class:`~pyro_ebm.samplers.GuardedPotential`:
        rows where the potential raises (a failed Cholesky, a distribution's argument check)
        or is not finite are ``+inf``, rejected by every move and counted in
        ``potential.errors``.
    :param layout: flat vector <-> ``{site: tensor}``.
    :param transforms: Pyro's constrained -> unconstrained transforms per site (``{}`` for a bare
        potential).
    :param initial: a flat initial point ``(dim,)``, or ``None`` when none is known.
    """

    potential: Callable[[Tensor], Tensor]
    layout: SiteLayout
    transforms: dict
    initial: Tensor | None


class _DictPotential:
    """A Pyro ``potential_fn`` (dict -> scalar) evaluated on a batch of flat vectors.

    Tries ``torch.func.vmap`` once (checked against the loop) and falls back to a Python loop.
    A single row is evaluated without ``vmap``: where ``vmap`` cannot evaluate a batch (e.g.
    argument validation that fails on a row), the guard splits the batch down to rows, whose
    errors are then the potential's own. Picklable when ``potential_fn`` is.
    """

    def __init__(self, potential_fn: Callable, layout: SiteLayout) -> None:
        self.potential_fn = potential_fn
        self.layout = layout
        self.vectorized: bool | None = None

    def _one(self, row: Tensor) -> Tensor:
        value = self.potential_fn(self.layout.unflatten(row))
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise PotentialDefinitionError(f"potential_fn must return a scalar tensor, got {shape}")
        return value.reshape(())

    def _loop(self, x: Tensor) -> Tensor:
        return torch.stack([self._one(row) for row in x])

    def __call__(self, x: Tensor) -> Tensor:
        if self.vectorized is None and x.shape[0] > 1:
            try:
                with torch.no_grad():
                    ok = _agree(torch.func.vmap(self._one)(x[:3]), self._loop(x[:3]))
            except Exception:  # not vmap-able (data-dependent control flow, .item(), ...)
                ok = False
            self.vectorized = bool(ok)
            logger.debug("potential_fn vectorized with vmap: %s", self.vectorized)
        if self.vectorized and x.shape[0] > 1:
            return torch.func.vmap(self._one)(x)
        return self._loop(x)  # one row as is: an error is the potential's own, not vmap's


class _EnergyOnSite:
    """The batched energy behind an :class:`EnergyPotential`, on flat vectors."""

    def __init__(self, energy: Callable, site_shape: tuple[int, ...]) -> None:
        self.energy = energy
        self.site_shape = site_shape

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape((-1,) + self.site_shape[-1:])
        out = self.energy(rows)
        if not isinstance(out, Tensor) or out.shape != rows.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise PotentialDefinitionError(
                f"the energy must return one value per row, shape ({len(rows)},) for input of "
                f"shape {tuple(rows.shape)}, got {shape}"
            )
        return out.reshape(x.shape[0], -1).sum(1)


def make_target(
    model: Callable | None,
    potential_fn: Callable | None,
    initial_params: dict[str, Tensor] | None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    init_strategy: Callable | None = None,
    dim: int | None = None,
    model_init: bool = True,
    num_chains: int | None = None,
    max_plate_nesting: int | None = None,
) -> FlatTarget:
    r"""Build the :class:`FlatTarget` of a Pyro model or of a ``potential_fn``.

    - ``model``: the potential of :class:`~pyro_ebm.energy.ModelEnergy` (Pyro's own HMC potential,
      batched in one model execution when the model broadcasts), initial point from
      ``initial_params`` (unconstrained, as for Pyro's HMC) or ``init_strategy``.
    - ``potential_fn`` from :func:`pyro_ebm.potential_fn`: its energy is called on the whole batch.
    - any other ``potential_fn`` (``dict -> scalar``): needs ``initial_params`` to know the sites;
      batched with ``torch.func.vmap`` when it works, else a loop.

    :param dim: the flat dimension when the caller knows it (e.g. from a flow), used for an
        :class:`EnergyPotential` whose energy has no ``dim`` attribute and no ``initial_params``.
    :param model_init: with a model and neither ``initial_params`` nor ``init_strategy``, start
        from Pyro's default init strategy (``True``) or leave ``initial`` ``None`` (``False``),
        for kernels that start from a draw of their flow.
    :param max_plate_nesting: a model's plate nesting, as for Pyro's HMC (guessed when ``None``;
        give it for a model with discrete sites to enumerate).
    :param num_chains: when given, ``initial_params`` carry a leading chain dimension of this
        size, a model's init strategy draws one start per chain, and ``initial`` is
        ``(num_chains, dim)``; when ``None``, one chain and ``initial`` is ``(dim,)``.
    """
    if (model is None) == (potential_fn is None):
        raise ValueError("exactly one of `model` and `potential_fn` must be given")
    one = initial_params
    if initial_params is not None and num_chains is not None:
        one = _one_chain(initial_params, num_chains)
    if model is not None:
        kwargs = {} if init_strategy is None else {"init_strategy": init_strategy}
        energy = ModelEnergy(
            model, model_args, model_kwargs, max_plate_nesting=max_plate_nesting, **kwargs
        )
        initial = None
        if model_init or init_strategy is not None:
            initial = energy.initial_params
            if num_chains is not None:
                initial = _model_starts(energy, num_chains, init_strategy)
        if initial_params is not None:
            unknown = sorted(set(initial_params) - set(energy.site_names))
            if unknown:
                raise ValueError(
                    f"initial_params has sites {unknown} that are not latent sample sites of "
                    f"the model (those are {list(energy.site_names)})"
                )
            initial = energy.flatten(initial_params, "initial_params").detach()
        return FlatTarget(guarded(energy), energy.layout, energy.transforms, initial)
    if isinstance(potential_fn, EnergyPotential):
        dim = _energy_dim(potential_fn.energy) or dim
        if initial_params is not None:
            layout = SiteLayout.from_params(one)
        elif dim is not None:
            layout = SiteLayout({potential_fn.site: (dim,)})
        else:
            raise ValueError(
                "initial_params is required: the energy of this potential_fn has no `dim` "
                "and the kernel has no flow to tell it"
            )
        if layout.site_names != (potential_fn.site,):
            raise ValueError(
                f"initial_params must hold exactly the site {potential_fn.site!r}, "
                f"got {list(layout.site_names)}"
            )
        site_shape = layout.site_shapes[potential_fn.site]
        energy_dim = _energy_dim(potential_fn.energy)
        if isinstance(energy_dim, int) and site_shape[-1:] != (energy_dim,):
            raise ValueError(
                f"initial_params[{potential_fn.site!r}] has shape {tuple(site_shape)} per chain "
                f"but the energy expects vectors of size {energy_dim}. With num_chains > 1, Pyro "
                "splits initial_params along its first dimension: pass one start per chain, "
                f"shape (num_chains, {energy_dim})"
            )
        potential = _EnergyOnSite(potential_fn.energy, site_shape)
    else:
        if initial_params is None:
            raise ValueError(
                "initial_params is required with a generic potential_fn: it tells the kernel "
                "the names and shapes of the sites (or wrap an energy with pyro_ebm.potential_fn)"
            )
        layout = SiteLayout.from_params(one)
        potential = _DictPotential(potential_fn, layout)
    initial = None
    if initial_params is not None:
        initial = layout.flatten(initial_params, "initial_params").detach()
    return FlatTarget(guarded(potential), layout, {}, initial)


def _one_chain(initial_params: dict[str, Tensor], num_chains: int) -> dict[str, Tensor]:
    """The first chain's initial params, after checking the leading chain dimension."""
    if not isinstance(initial_params, dict) or not initial_params:
        raise ValueError(f"initial_params must be a dict {{site: tensor}}, got {initial_params!r}")
    for name, value in initial_params.items():
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != num_chains:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"initial_params[{name!r}] must have a leading dimension of size "
                f"num_chains={num_chains} (one start per chain), got shape {shape}"
            )
    return {k: v[0] for k, v in initial_params.items()}


def _model_starts(energy: ModelEnergy, num_chains: int, init_strategy: Callable | None) -> Tensor:
    """``(num_chains, dim)`` starts from the model's init strategy, one draw per chain."""
    if num_chains == 1:
        return energy.initial_params[None]
    params = _initialize(
        energy.model,
        energy.model_args,
        energy.model_kwargs,
        init_to_uniform if init_strategy is None else init_strategy,
        energy._max_plate_nesting,
        num_chains,
    )[0]
    return energy.flatten(params).detach()


def _energy_dim(energy: Callable) -> int | None:
    """The ``dim`` of an energy, or of the object whose bound method it is (``target.potential``
    of a data set), or ``None``."""
    for owner in (energy, getattr(energy, "__self__", None)):
        dim = getattr(owner, "dim", None)
        if isinstance(dim, int) and not isinstance(dim, bool):
            return dim
    return None
