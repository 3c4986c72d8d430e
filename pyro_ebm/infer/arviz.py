r"""Convert a finished :class:`pyro.infer.mcmc.MCMC` run to ArviZ, with rich sample statistics.

:func:`to_arviz` replaces ``arviz.from_pyro``, which reads ``kernel.model`` (absent for a bare
``potential_fn``), writes only ``diverging``, misorders chains from 11 chains on, and does not exist
in the refactored ArviZ 1.x. It builds on ``from_dict``, which both ArviZ lines
offer: on ArviZ 0.x it returns an ``arviz.InferenceData``; on ArviZ 1.x (``arviz`` re-exports
``arviz_base``) or with only ``arviz_base`` installed it returns an :class:`xarray.DataTree`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.mcmc.api import AbstractMCMC

from .stats import deepest, worst_flow_checks

__all__ = ["to_arviz"]

_BACKENDS = (None, "arviz", "arviz_base")
#: dtypes of the statistics our kernels record (others are stored as they come)
_STAT_DTYPES = {
    "accept_prob": np.float64,
    "accepted": np.bool_,
    "potential_energy": np.float64,
    "is_global": np.bool_,
    "diverging": np.bool_,
}


def to_arviz(
    mcmc: AbstractMCMC,
    *,
    observed_data: Mapping[str, Any] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    backend: str | None = None,
) -> Any:
    r"""Convert a finished :class:`~pyro_ebm.infer.MCMC` or :class:`~pyro.infer.mcmc.MCMC` run
    to ArviZ.

    Groups:

    - ``posterior``: ``mcmc.get_samples(group_by_chain=True)``, i.e. the constrained values of
      every site, shape ``(chain, draw, *site_shape)``, chains in their order.
    - ``sample_stats``, shape ``(chain, draw)``. For the ``pyro_ebm`` kernels (they record
      ``diagnostics()["sample_stats"]``, see :data:`pyro_ebm.infer.SAMPLE_STATS`):
      ``accept_prob``, ``accepted`` (bool), ``potential_energy``, ``lp`` (:math:`= -U`, the name
      ArviZ reads), ``is_global`` (bool: a flow/global move rather than a local one) and
      ``diverging`` (bool: the proposal, for i-SIR every fresh candidate, had a non-finite
      potential). For other kernels (Pyro's
      ``HMC``/``NUTS``) only ``diverging``, from ``diagnostics()["divergences"]``; no
      ``sample_stats`` group when the kernel reports neither.
    - ``observed_data`` / ``constant_data`` when given (tensors are converted to NumPy).

    The ``posterior`` and ``sample_stats`` attributes name the sampler and, for the flow
    kernels, hold ``flow_khat`` (the Pareto :math:`\hat k` of the frozen flow as an importance
    sampler of the target, ``diagnostics()["flow k-hat"]``; above 0.7 the flow misses part of
    the target), ``flow_is_ess`` (its importance-sampling ESS) and ``flow_is_draws`` (of how
    many draws of the flow), and after a warmup
    ``flow_score_khat`` (``diagnostics()["flow score k-hat"]``, the flow checked at the chains'
    warmup draws and at their draws; above 0.7 likewise); when the chains checked different
    flows (Pyro's driver trains one flow per chain) the worst of them: the largest
    :math:`\hat k` and the smallest ESS. After a run of :class:`~pyro_ebm.infer.MCMC` with a
    kernel of :mod:`pyro_ebm.infer` they also hold ``density_depth``
    (``diagnostics()["density depth"]``, the largest of the chains': above 2 the target has a
    funnel's neck, a spike or a mode that no draw reached).

    Pyro keeps no warmup draws, so there are no warmup groups.

    :param mcmc: a :class:`~pyro_ebm.infer.MCMC` or :class:`~pyro.infer.mcmc.MCMC` after
        ``run()``, with any kernel.
    :param observed_data: optional ``{name: array}`` of observed data.
    :param constant_data: optional ``{name: array}`` of covariates and other constants.
    :param coords: coordinate values per dimension name, passed to ``from_dict``.
    :param dims: dimension names per variable, passed to ``from_dict``. Scalar sites need none;
        vector sites default to ``<name>_dim_0``, ... .
    :param backend: ``"arviz"`` (the ``arviz`` package: ``InferenceData`` on 0.x, ``DataTree`` on
        1.x), ``"arviz_base"`` (always a ``DataTree``) or ``None``: ``arviz`` when installed, else
        ``arviz_base``.
    :returns: ``arviz.InferenceData`` (ArviZ 0.x) or :class:`xarray.DataTree` (ArviZ 1.x /
        ``arviz_base``).
    :raises TypeError: if ``mcmc`` is not an ``MCMC``, or data arguments are not mappings.
    :raises ValueError: if ``mcmc`` has not been run or ``backend`` is unknown.
    :raises ImportError: if the chosen backend is not installed.

    References:

    - Kumar, Carroll, Hartikainen, Martin (2019), "ArviZ a unified library for exploratory
      analysis of Bayesian models in Python", https://doi.org/10.21105/joss.01143
    - ArviZ's InferenceData schema (``sample_stats`` names ``lp``, ``diverging``,
      ``acceptance_rate``), https://python.arviz.org/en/stable/schema/schema.html
    - ArviZ 1.x migration guide (DataTree), https://python.arviz.org/en/latest/user_guide/migration_guide.html

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro.infer import MCMC
        >>> from pyro_ebm.infer import MALA, to_arviz
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(MALA(potential_fn=pot), num_samples=30, warmup_steps=10,
        ...             initial_params={"x": torch.zeros(2)}, disable_progbar=True)
        >>> mcmc.run()
        >>> data = to_arviz(mcmc)
        >>> data["posterior"]["x"].shape
        (1, 30, 2)
        >>> sorted(data["sample_stats"].data_vars)
        ['accept_prob', 'accepted', 'diverging', 'is_global', 'lp', 'potential_energy']
    """
    if not isinstance(mcmc, AbstractMCMC) or not hasattr(mcmc, "get_samples"):
        raise TypeError(
            "mcmc must be a pyro_ebm.infer.MCMC or pyro.infer.mcmc.MCMC (after run()), got "
            f"{type(mcmc).__name__}"
        )
    if getattr(mcmc, "_samples", None) is None:
        raise ValueError("mcmc has not been run: call mcmc.run(...) before to_arviz(mcmc)")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    groups = {"posterior": _posterior(mcmc)}
    num_chains, num_draws = _chain_draw_shape(groups["posterior"])
    stats = _sample_stats(mcmc, num_chains, num_draws)
    if stats:
        groups["sample_stats"] = stats
    for name, value in (("observed_data", observed_data), ("constant_data", constant_data)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping {{name: array}}, got {type(value).__name__}")
        groups[name] = {k: _to_numpy(v) for k, v in value.items()}
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "sampler": type(mcmc.kernel).__name__,
        **_check_attrs(mcmc),
    }
    module, legacy = _load_backend(backend)
    if legacy:  # ArviZ 0.x: keyword groups, per-group attrs through **kwargs
        group_attrs = {f"{g}_attrs": dict(attrs) for g in ("posterior", "sample_stats")}
        return module.from_dict(**groups, coords=coords, dims=dims, **group_attrs)
    return module.from_dict(
        groups,
        coords=coords,
        dims=dims,
        attrs={g: dict(attrs) for g in ("posterior", "sample_stats") if g in groups},
    )


def _load_backend(backend: str | None) -> tuple[Any, bool]:
    """The module whose ``from_dict`` to call, and whether it is ArviZ 0.x (keyword groups)."""
    if backend is None:
        for name in ("arviz", "arviz_base"):
            try:
                return _load_backend(name)
            except ImportError:
                pass
        raise ImportError(
            "to_arviz needs ArviZ: pip install arviz (or arviz-base for the DataTree API)"
        )
    module = importlib.import_module(backend)  # ImportError when missing
    if backend == "arviz_base":
        return module, False
    major = int(str(module.__version__).split(".")[0])
    return module, major < 1


def _posterior(mcmc: AbstractMCMC) -> dict[str, np.ndarray]:
    samples = mcmc.get_samples(group_by_chain=True)
    if not samples:
        raise ValueError("mcmc has no sampled sites (get_samples() is empty)")
    return {name: _to_numpy(value) for name, value in samples.items()}


def _chain_draw_shape(posterior: dict[str, np.ndarray]) -> tuple[int, int]:
    first = next(iter(posterior.values()))
    return int(first.shape[0]), int(first.shape[1])


def _sample_stats(mcmc: AbstractMCMC, num_chains: int, num_draws: int) -> dict[str, np.ndarray]:
    """Per-draw statistics stacked to ``(chain, draw)``; ``{}`` when the kernel has none."""
    diags = list(getattr(mcmc, "_diagnostics", None) or [])
    if len(diags) != num_chains or any(not isinstance(d, Mapping) for d in diags):
        return {}
    if all(isinstance(d.get("sample_stats"), Mapping) for d in diags):  # pyro_ebm kernels
        names = [k for k in diags[0]["sample_stats"] if all(k in d["sample_stats"] for d in diags)]
        stats = {}
        for name in names:
            rows = [_to_numpy(d["sample_stats"][name]) for d in diags]
            if any(len(r) != num_draws for r in rows):
                warnings.warn(
                    f"sample stat {name!r} does not have one entry per draw ({num_draws}); "
                    "left out",
                    stacklevel=3,
                )
                continue
            stats[name] = np.stack(rows).astype(_STAT_DTYPES.get(name, rows[0].dtype))
        if "potential_energy" in stats and "lp" not in stats:
            stats["lp"] = -stats["potential_energy"]
        return stats
    if all("divergences" in d for d in diags):  # Pyro's HMC/NUTS: post-warmup draw indices
        diverging = np.zeros((num_chains, num_draws), dtype=bool)
        for chain, d in enumerate(diags):
            idx = np.asarray(list(d["divergences"]), dtype=np.int64)
            diverging[chain, idx[(idx >= 0) & (idx < num_draws)]] = True
        return {"diverging": diverging}
    return {}


#: attribute names of the flow checks
_ATTR_NAMES = {
    "flow k-hat": "flow_khat",
    "flow IS ESS": "flow_is_ess",
    "flow IS draws": "flow_is_draws",
    "flow score k-hat": "flow_score_khat",
}


def _check_attrs(mcmc: AbstractMCMC) -> dict[str, float]:
    """``flow_khat``, ``flow_is_ess``, ``flow_is_draws`` and ``flow_score_khat`` from the
    chains' diagnostics (:func:`~pyro_ebm.infer.stats.worst_flow_checks`), and
    ``density_depth`` (:func:`~pyro_ebm.infer.stats.deepest`), when they have them."""
    diagnostics = list(getattr(mcmc, "_diagnostics", None) or [])
    attrs = {_ATTR_NAMES[k]: v for k, v in worst_flow_checks(diagnostics).items()}
    depth = deepest(diagnostics)
    if not math.isnan(depth):
        attrs["density_depth"] = depth
    return attrs


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
