r"""A Pyro model as an energy over its flattened unconstrained latents (:class:`ModelEnergy`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.contract import contract_to_tensor
from torch import Tensor

from .base import EnergyModel
from .layout import SiteLayout

__all__ = ["ModelEnergy"]


@contextmanager
def _validation_disabled() -> Iterator[None]:
    """Turn off Pyro's validation and torch distributions' default argument/support checks (their
    ``if not valid.all(): raise`` is data-dependent control flow, which vmap cannot run), then
    restore both settings as they were."""
    torch_default = torch.distributions.Distribution._validate_args
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(torch_default)


class _InitContinuous(InitMessenger):
    """Pyro's init strategy for continuous sites; discrete sites sample as usual."""

    def _pyro_sample(self, msg: dict) -> None:
        support = getattr(msg["fn"], "support", None)  # none for a plate's subsample site
        if not msg["is_observed"] and support is not None and support.is_discrete:
            return
        super()._pyro_sample(msg)


def _guess_max_plate_nesting(
    model: Callable, args: tuple, kwargs: dict, init_strategy: Callable
) -> int:
    """Pyro guesses plate nesting by running the model with ``sample()``, which unnormalized
    sites such as :class:`EnergyDistribution` lack; run it under the init strategy instead
    (discrete sites, which no init strategy can place, are sampled: Pyro's HMC enumerates
    them)."""
    with poutine.block(), _validation_disabled():
        traced = poutine.trace(_InitContinuous(init_strategy)(model))
        trace = traced.get_trace(*args, **kwargs)
    nesting = [-f.dim for site in trace.nodes.values() for f in site.get("cond_indep_stack", ())]
    return max(nesting, default=0)


#: starts of the init strategy tried while the model raises at them (Pyro's and Stan's 100)
INIT_TRIES = 100


def _initialize(
    model: Callable,
    args: tuple,
    kwargs: dict,
    init_strategy: Callable,
    max_plate_nesting: int | None,
    num_chains: int = 1,
) -> tuple:
    """Pyro's ``initialize_model`` (after guessing ``max_plate_nesting`` when it is ``None``),
    tried again from new starts of ``init_strategy`` while the model raises at them: a Cholesky
    factor of a matrix that is singular at the start is a bad start, not a bad model (Stan's
    rule). After :data:`INIT_TRIES` starts, an error with the model's message."""
    from ..samplers.guard import REJECTED_ERRORS  # (the samplers import this package)

    last: BaseException | None = None
    for _ in range(INIT_TRIES):
        try:
            nesting = max_plate_nesting
            if nesting is None:
                nesting = _guess_max_plate_nesting(model, args, kwargs, init_strategy)
            return initialize_model(
                model,
                model_args=args,
                model_kwargs=kwargs,
                max_plate_nesting=nesting,
                num_chains=num_chains,
                init_strategy=init_strategy,
            )
        except REJECTED_ERRORS as error:
            if isinstance(error, NotImplementedError):  # a site no start can fix
                raise
            if "cannot find valid initial params" in str(error):  # Pyro's own 100 tries
                raise ValueError(
                    "the model's potential energy or its gradient is not finite at any of the "
                    f"{INIT_TRIES} starts of its init_strategy that Pyro tried; check the model "
                    "at typical values of its latent sites (e.g. a scale that can be 0 or a log "
                    "of a negative number), or give an init_strategy where it is finite"
                ) from error
            last = error
    raise ValueError(
        f"the model raised at each of {INIT_TRIES} starts of its init_strategy, the last time "
        f"{_blocker(last)}; check it at typical values of its latent sites, or give an "
        "init_strategy (e.g. init_to_value) where it is defined"
    ) from last


def _agree(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` equal up to rounding, relative to the largest entry of ``b`` (a sum of
    large terms that cancel carries the rounding of its terms). The band is ``1e-5`` relative,
    and ``1e4`` machine epsilons where that is wider (``1.2e-3`` in float32): a Cholesky of a
    GP's covariance amplifies float32 rounding past ``1e-5`` in a batched and a per-row run of
    the same model, while a model that does not batch right differs at order one."""
    if a.shape != b.shape:
        return False
    eps = torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
    rtol = max(1e-5, 1e4 * eps)
    scale = 1.0 + float(b.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
    return torch.allclose(a, b, rtol=rtol, atol=0.1 * rtol * scale, equal_nan=True)


def _blocker(exc: Exception) -> str:
    """An exception as ``Type: first line of its message``, for a warning."""
    lines = str(exc).strip().splitlines()
    msg = lines[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__.lstrip('_')}: {msg[:300]}{'...' if len(msg) > 300 else ''}"


class ModelEnergy(EnergyModel):
    r"""The potential energy of a Pyro model over its flattened unconstrained latents.

    Uses :func:`pyro.infer.mcmc.util.initialize_model`: ``energy(x)`` equals Pyro's own HMC
    potential (``-log joint`` in unconstrained space, including the log-Jacobians of the
    transforms and any observed sites) at ``unflatten(x)``. Latent sites are laid out in the
    order the model samples them, each flattened row-major. Parameters of the model
    (``pyro.param``) are not registered in this module.

    **Batches.** A batch of ``C > 1`` rows (chains, walkers, particles) is evaluated in the first
    of these ways that works, chosen once on the first such batch and kept in :attr:`batching`:

    - ``"plate"``: one model execution inside an extra outer ``pyro.plate`` left of the model's
      own plates, for models that broadcast that way (as Pyro's vectorized ELBOs also require);
    - ``"vmap"``: :func:`torch.func.vmap` of the per-row potential, which also runs the model's
      Python once per batch. It covers models that do not broadcast over an outer plate (a
      vector observed without a plate, ``.to_event``, ``X @ w``, ``torch.stack`` / ``torch.cat``
      of latents, ...). It runs the model without Pyro's ``poutine.enum`` wrapper (which reads
      ``value.data``, forbidden under vmap) and with Pyro's validation and torch distributions'
      default ``validate_args`` off (their checks are data-dependent control flow), restoring
      both afterwards;
    - ``"loop"``: one model execution per row, typically 10-100x slower. Models with enumerated
      discrete sites always use it; other models fall back to it when neither batched way
      works, with one warning that names what blocked each (vmap cannot run ``.item()``,
      Python ``if`` on a latent, in-place writes of a latent into another tensor, or boolean
      mask indexing such as in ``Multinomial.log_prob``).

    A batched way is kept only if it agrees with the loop on the first rows of that batch
    (values; for vmap also the gradients, ``torch.autograd.grad`` of the sum with respect to the
    batch, as the samplers take them). A single row is always one plain model execution.

    :param model: a Pyro model with continuous latents (discrete ones are enumerated out).
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param init_strategy: Pyro init strategy for :attr:`initial_params`.
    :param max_plate_nesting: passed to ``initialize_model`` (guessed if ``None``).

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        >>> E = ModelEnergy(model)
        >>> E.dim, E.site_names
        (2, ('mu', 'sigma'))
        >>> x = torch.zeros(3, 2)
        >>> E(x).shape, E.constrain(x)["sigma"]
        (torch.Size([3]), tensor([1., 1., 1.]))
        >>> E.batching  # plate-free scalar sites broadcast over an outer plate
        'plate'
        >>> def regression():  # X @ w does not broadcast over an outer plate
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     pyro.sample("y", dist.Normal(torch.ones(5, 2) @ w, 1.0).to_event(1),
        ...                 obs=torch.zeros(5))
        >>> R = ModelEnergy(regression)
        >>> R(torch.zeros(4, 2)).shape, R.batching
        (torch.Size([4]), 'vmap')

    :ivar batching: how batches of more than one row are evaluated: ``"plate"``, ``"vmap"`` or
        ``"loop"`` (see above); ``None`` until the first such batch.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        init_strategy: Callable = init_to_uniform,
        max_plate_nesting: int | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        init, pot, transforms, trace = _initialize(
            model, tuple(model_args), dict(model_kwargs or {}), init_strategy, max_plate_nesting
        )
        if not init:
            raise ValueError("model has no continuous latent sample sites")
        self.layout = SiteLayout.from_params(init)
        self.site_names = self.layout.site_names
        self.site_shapes = self.layout.site_shapes
        self.site_sizes = self.layout.site_sizes
        super().__init__(self.layout.dim)
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.transforms = transforms
        self._potential = pot
        nesting = [
            -f.dim for site in trace.nodes.values() for f in site.get("cond_indep_stack", ())
        ]
        self._max_plate_nesting = max(nesting, default=0)
        self._batch_ranks = {k: len(trace.nodes[k]["fn"].batch_shape) for k in init}
        self._enumerated = any(
            site["type"] == "sample" and site["infer"].get("enumerate")
            for site in trace.nodes.values()
        )
        self.batching: str | None = None  # "plate", "vmap" or "loop", decided on the first batch
        self.register_buffer("initial_params", self.flatten(init).detach())

    @classmethod
    def from_model(cls, model: Callable, *args, **kwargs) -> ModelEnergy:
        r"""Alias of the constructor: ``ModelEnergy.from_model(model, model_args=...)``."""
        return cls(model, *args, **kwargs)

    def energy(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        if x.shape[0] > 1:
            if self.batching is None:
                self.batching = self._choose_batching(x[:3])
            if self.batching == "plate":
                return self._batched_energy(x)
            if self.batching == "vmap":
                return self._vmapped_energy(x)
        return self._looped_energy(x)  # one row: one plain model execution, no outer plate

    def _looped_energy(self, x: Tensor) -> Tensor:
        return torch.stack([self._potential(self.unflatten(row)) for row in x])

    def _batched_energy(self, x: Tensor) -> Tensor:
        # one model execution for the whole batch, inside an outer plate left of all the
        # model's own plates (the model must broadcast correctly, as Pyro's vectorized
        # ELBOs also require); enumerated discrete sites take dimensions left of that plate
        n, nest = x.shape[0], self._max_plate_nesting
        u = self.unflatten(x)
        c = {k: self.transforms[k].inv(v) for k, v in u.items()}
        data = {  # (constrained shapes: a simplex has one entry more than its coordinates)
            k: v.reshape((n,) + (1,) * (nest - self._batch_ranks[k]) + v.shape[1:])
            for k, v in c.items()
        }
        model = poutine.condition(self.model, data)
        if self._enumerated:
            model = poutine.enum(config_enumerate(model), first_available_dim=-(nest + 2))
        with pyro.plate("_pyro_ebm_batch", n, dim=-(nest + 1)):
            tr = poutine.trace(model).get_trace(*self.model_args, **self.model_kwargs)
        if self._enumerated:
            log_joint = _enumerated_log_joint(tr, n)
        else:
            tr.compute_log_prob()
            log_joint = x.new_zeros(n)
            for site in tr.nodes.values():
                if site["type"] == "sample":
                    lp = site["log_prob"]
                    log_joint = log_joint + torch.broadcast_to(lp, (n,) + lp.shape[1:]).reshape(
                        n, -1
                    ).sum(1)
        for k, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(c[k], u[k]).reshape(n, -1).sum(1)
        return -log_joint

    def _row_energy(self, row: Tensor) -> Tensor:
        # Pyro's potential (see _PEMaker in pyro.infer.mcmc.util) without its poutine.enum
        # wrapper, which only matters for enumerated sites and reads value.data (not under vmap)
        u = self.unflatten(row)
        c = {k: self.transforms[k].inv(v) for k, v in u.items()}
        tr = poutine.trace(poutine.condition(self.model, c)).get_trace(
            *self.model_args, **self.model_kwargs
        )
        log_joint = tr.log_prob_sum()
        for k, t in self.transforms.items():
            log_joint = log_joint - t.log_abs_det_jacobian(c[k], u[k]).sum()
        return -log_joint

    def _vmapped_energy(self, x: Tensor) -> Tensor:
        # one execution of the model's Python for the whole batch, per-row semantics
        with _validation_disabled():
            return torch.func.vmap(self._row_energy)(x)

    def _choose_batching(self, x: Tensor) -> str:
        """The first of plate, vmap that agrees with the loop on the rows ``x``, else loop
        (an enumerated model: plate, else loop)."""
        with torch.inference_mode(False), torch.enable_grad():
            rows = x.detach().clone().requires_grad_(True)
            looped = self._looped_energy(rows)
            try:
                with torch.no_grad():
                    ok = _agree(self._batched_energy(rows), looped.detach())
                plate = None if ok else "results differ from the per-row model"
            except Exception as e:  # the model does not broadcast over an outer plate
                plate = _blocker(e)
            if plate is None:
                return "plate"
            vmap = "enumerated discrete sites" if self._enumerated else self._try_vmap(rows, looped)
            if vmap is None:
                return "vmap"
        warnings.warn(
            "ModelEnergy: batches of parameters (walkers, particles) are evaluated one model "
            "run per row, which is slow (each move of C chains costs C model runs, or more: "
            "minutes for a few hundred steps). The model does not broadcast over an extra batch "
            f"dimension left of its plates ({plate}), and torch.func.vmap of its potential "
            f"over the rows did not work ({vmap}). Write the model so that vmap can run it (no "
            ".item() or Python control flow on latents, no in-place writes of latents into "
            "other tensors) or so that batched latents broadcast (see Pyro's tensor shapes "
            "tutorial; an enumerated site used as an index, locs[z], broadcasts as "
            "Vindex(locs)[..., z], from pyro.ops.indexing).",
            stacklevel=3,
        )
        return "loop"

    def _try_vmap(self, rows: Tensor, looped: Tensor) -> str | None:
        """Why vmap cannot batch the model (``None`` when it agrees with the loop, gradients
        included)."""
        try:
            vmapped = self._vmapped_energy(rows)
            ok = _agree(vmapped.detach(), looped.detach())
            if ok:  # the samplers differentiate the batch's energies
                (g_vmap,) = torch.autograd.grad(vmapped.sum(), rows)
                (g_loop,) = torch.autograd.grad(looped.sum(), rows, retain_graph=True)
                ok = _agree(g_vmap, g_loop)
            return None if ok else "results differ from the per-row model"
        except Exception as e:  # .item(), control flow on a latent, in-place writes, ...
            return _blocker(e)

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        r"""Split flat unconstrained ``(..., dim)`` vectors into ``{site: (..., *shape)}``."""
        return self.layout.unflatten(x)

    def flatten(self, params: dict[str, Tensor], what: str = "params") -> Tensor:
        r"""Inverse of :meth:`unflatten`: ``{site: (..., *shape)}`` to ``(..., dim)`` (errors
        name the argument as ``what``)."""
        return self.layout.flatten(params, what)

    def constrain(self, x: Tensor) -> dict[str, Tensor]:
        r"""Map flat unconstrained ``(..., dim)`` vectors to constrained site values."""
        return {k: self.transforms[k].inv(v) for k, v in self.unflatten(x).items()}

    def unconstrain(self, values: dict[str, Tensor]) -> Tensor:
        r"""Inverse of :meth:`constrain`: constrained site values to flat ``(..., dim)``."""
        missing = [k for k in self.site_names if k not in values]
        if missing:
            raise KeyError(f"values is missing sites {missing}")
        return self.flatten({k: self.transforms[k](values[k]) for k in self.site_names})


def _enumerated_log_joint(trace, n: int) -> Tensor:
    r"""Per-row log joint ``(n,)`` of a batched trace whose enumerated discrete sites are summed
    out, as Pyro's HMC/NUTS potential does for one row (``TraceEinsumEvaluator``), contracted
    to the outer batch plate ``_pyro_ebm_batch`` instead of to a scalar."""
    trace.compute_log_prob()
    trace.pack_tensors()
    factors: dict = {}
    for site in trace.nodes.values():
        if site["type"] == "sample" and "packed" in site:
            ordinal = frozenset(
                trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    from collections import OrderedDict

    sum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    batch = frozenset({trace.plate_to_symbol["_pyro_ebm_batch"]})
    out = contract_to_tensor(OrderedDict(factors), sum_dims, target_ordinal=batch)
    return out.reshape(n)
