r"""HMC and NUTS in a normalizing flow's latent space (NeuTra) for :class:`pyro.infer.mcmc.MCMC`.

With a flow :math:`T: z \mapsto x` close to the target, the pulled-back potential
:math:`U(T(z)) - \log|\det J_T(z)|` is close to a standard Gaussian, so HMC/NUTS mix there far
better than on the original geometry. The flow is frozen (a copy, with gradients off); draws are
mapped back through ``T`` and reported in the original space (unconstrained per site, then
Pyro's transforms for a model's constrained sites).

Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` covers models with an ``AutoContinuous`` guide;
these kernels take any flow over the flat unconstrained space, a bare ``potential_fn`` included.
The HMC/NUTS math is Pyro's own (an inner :class:`~pyro.infer.mcmc.HMC`/``NUTS`` kernel on ``z``).

References:

- Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing Bad Geometry in
  Hamiltonian Monte Carlo Using Neural Transport", https://arxiv.org/abs/1903.03704
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pyro
import torch
from pyro.infer.mcmc import HMC, NUTS
from pyro.util import ignore_jit_warnings
from torch import Tensor

from .._checks import check_flag, check_int, check_positive, check_real
from ..flows import as_flow
from ..samplers import REJECTED_ERRORS, PullbackPotential, valid_starts
from .base import TargetKernel
from .stats import SAMPLE_STATS

__all__ = ["CompiledPotential", "FlowHMC", "FlowNUTS", "LatentPotential", "compile_value_and_grad"]

logger = logging.getLogger(__name__)


class LatentPotential:
    r"""Picklable ``potential_fn`` over the flow's latent ``z``: ``U(T(z)) - log|det J_T(z)|``.

    :param potential: batched potential over flat vectors, ``(C, dim) -> (C,)``.
    :param flow: a :class:`pyro_ebm.flows.Flow` (``forward(z) -> (x, log|det J|)``).
    :param bool jit_compile: compile the potential *and its gradient* on the first call (see
        :func:`compile_value_and_grad`): the Python of Pyro's model trace and of the flow runs
        once, and later calls run one recorded graph of forward and backward operations, with
        no autograd bookkeeping; the value returned carries that gradient for Pyro's
        integrator. Only valid when the potential has no data-dependent control flow (as
        for Pyro's own ``jit_compile``). The compiled gradient is exact but first-order only
        (no Hessians through it).
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace` (default
        ``{"check_trace": False}``).
    """

    def __init__(
        self,
        potential: Callable[[Tensor], Tensor],
        flow,
        jit_compile: bool = False,
        jit_options: dict | None = None,
    ) -> None:
        self.potential = potential
        self.flow = flow
        self._pullback = PullbackPotential(potential, flow)
        self.jit_compile = bool(jit_compile)
        self.jit_options = {"check_trace": False} if jit_options is None else dict(jit_options)
        self._compiled = None

    def _latent_potential(self, z: Tensor) -> Tensor:
        return self._pullback(z[None])[0]

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        z = params["z"]
        try:
            return self._value(z)
        except REJECTED_ERRORS as error:  # in the compiled graph, or the flow: reject the point
            errors = getattr(self.potential, "errors", None)
            if errors is not None:
                errors.record(error, 1)
            return torch.inf + 0.0 * z.sum()  # infinite energy, with a gradient for Pyro

    def _value(self, z: Tensor) -> Tensor:
        if not self.jit_compile:
            return self._latent_potential(z)
        if self._compiled is None:
            with torch.no_grad():  # fills the frozen flow's caches, which the compiled graph
                self.flow.forward(z.detach()[None])  # then holds as constants
            self._compiled = compile_value_and_grad(
                self._latent_potential, z.detach(), self.jit_options
            )
        grad, value = self._compiled(z.detach())
        # the value itself (z - z.detach() is exactly 0), with gradient `grad` with respect to z;
        # a non-finite gradient makes the value NaN, so Pyro rejects the point as divergent
        return value + (grad * (z - z.detach())).sum()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = None  # traced graphs do not pickle: traced again on first call
        return state


def compile_value_and_grad(
    fn: Callable[[Tensor], Tensor], z: Tensor, jit_options: dict | None = None
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    r"""Compile ``z -> (grad fn(z), fn(z))`` into one graph of tensor operations.

    :func:`torch.fx.experimental.proxy_tensor.make_fx` records the operations of
    :func:`torch.func.grad_and_value` of ``fn`` at ``z`` (the backward pass written out as
    ordinary operations), and :func:`torch.jit.trace` turns that graph into one TorchScript
    call. On small models each call then costs about what the forward and backward operations
    themselves cost, without autograd's bookkeeping. Like any
    trace, the graph is only valid when ``fn`` has no data-dependent control flow.
    Falls back to a :func:`torch.jit.trace` of ``fn`` alone, differentiated by autograd, when
    ``fn`` cannot be recorded this way.

    :param fn: scalar function of one tensor.
    :param z: an example input (its values fix any control flow).
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace`.
    :return: a function ``z -> (gradient, value)``.

    Example::

        >>> f = compile_value_and_grad(lambda z: (z**2).sum(), torch.ones(3))
        >>> f(torch.tensor([1.0, 2.0, 3.0]))
        (tensor([2., 4., 6.]), tensor(14.))
    """

    def scalar_fn(z: Tensor) -> Tensor:  # one positional argument, whatever fn's signature
        return fn(z)

    try:
        return _trace_graph(torch.func.grad_and_value(scalar_fn), z, jit_options)
    except Exception as error:  # not recordable (e.g. .item() or numpy inside fn)
        logger.warning("compiling the gradient failed (%s); tracing the value only", error)
        options = {"check_trace": False} if jit_options is None else dict(jit_options)
        with pyro.validation_enabled(False):
            traced = torch.jit.trace(ignore_jit_warnings()(fn), (z.detach(),), **options)
        return _AutogradValueAndGrad(traced)


def _trace_graph(fn: Callable, z: Tensor, jit_options: dict | None) -> Callable:
    """Record ``fn`` (``z -> tensors``, its backward pass written out by ``torch.func``) at
    ``z`` with :func:`~torch.fx.experimental.proxy_tensor.make_fx` and turn the graph into one
    TorchScript call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    options = {"check_trace": False} if jit_options is None else dict(jit_options)
    z = z.detach()
    with pyro.validation_enabled(False), torch.no_grad():
        graph = make_fx(fn)(z)
    # tensors that require grad (an energy still being trained, a model's pyro.param) are
    # recorded as attributes of the graph: held as detached buffers, the user's own tensors
    # left as they are
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            prefix, _, leaf = node.target.rpartition(".")
            owner = graph.get_submodule(prefix)
            value = getattr(owner, leaf)
            if isinstance(value, Tensor) and value.requires_grad:
                delattr(owner, leaf)
                owner.register_buffer(leaf, value.detach())
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x but still the
        # one tracer that runs such a graph without a compile step (torch.compile was slower
        # here on small models); the warning says nothing the user can act on
        warnings.filterwarnings("ignore", ".*torch.jit.trace", DeprecationWarning)
        return torch.jit.trace(graph, (z,), **options)


class CompiledPotential:
    r"""A batched potential ``(C, D) -> (C,)`` whose value and gradient run as one compiled
    graph per batch shape (recorded at the first call of each shape, as
    :func:`compile_value_and_grad` does for one point). The value returned carries the compiled
    gradient for autograd, so the samplers use it as any potential. Only valid when the
    potential has no data-dependent control flow and its rows are independent (row ``c`` of the
    value depends on row ``c`` of the input only). Falls back to the potential itself, with a
    warning, when it cannot be recorded.

    :param potential: batched potential ``(C, D) -> (C,)``.
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace`.

    Example::

        >>> U = CompiledPotential(lambda x: 0.5 * (x**2).sum(-1))
        >>> x = torch.ones(4, 2, requires_grad=True)
        >>> torch.autograd.grad(U(x).sum(), x)[0][0]
        tensor([1., 1.])
    """

    def __init__(self, potential: Callable[[Tensor], Tensor], jit_options: dict | None = None):
        self.potential = potential
        self.jit_options = jit_options
        self._compiled: dict[tuple, Callable | None] = {}

    def _grad_and_value(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        potential = self.potential

        def total(rows: Tensor) -> tuple[Tensor, Tensor]:
            u = potential(rows)
            return u.sum(), u

        grad_fn = torch.func.grad(total, has_aux=True)

        def grad_and_value(x: Tensor) -> tuple[Tensor, Tensor]:  # a plain function for make_fx
            return grad_fn(x)

        return grad_and_value

    def _get(self, x: Tensor) -> Callable | None:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._compiled:
            with torch.no_grad():  # decisions the potential makes on its first batch
                self.potential(x.detach())
            try:
                self._compiled[key] = _trace_graph(self._grad_and_value(), x, self.jit_options)
            except Exception as error:  # not recordable (e.g. .item() or numpy inside)
                logger.warning("compiling the potential failed (%s); running it as is", error)
                self._compiled[key] = None
        return self._compiled[key]

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U(x), grad U(x))``, shapes ``(C,)`` and ``(C, D)``, from the compiled graph."""
        compiled = self._get(x)
        if compiled is None:
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                u = self.potential(x)
                (grad,) = torch.autograd.grad(u.sum(), x)
            return u.detach(), grad
        grad, value = compiled(x.detach())
        return value, grad

    def __call__(self, x: Tensor) -> Tensor:
        compiled = self._get(x)
        if compiled is None:
            return self.potential(x)
        grad, value = compiled(x.detach())
        # the value itself, with gradient `grad` with respect to x (x - x.detach() is 0)
        return value + (grad * (x - x.detach())).sum(-1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = {}  # traced graphs do not pickle: traced again on first call
        return state


class _AutogradValueAndGrad:
    """``z -> (grad f(z), f(z))`` by autograd (the fallback of :func:`compile_value_and_grad`)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            value = self.fn(z)
            (grad,) = torch.autograd.grad(value, z)
        return grad, value.detach()


class _CappedHMC(HMC):
    """Pyro's HMC with at most ``max_num_steps`` leapfrog steps per iteration: with a fixed
    trajectory length, a step size adapted toward 0 (a target with an infinite region) would
    otherwise ask for an unbounded number."""

    def __init__(self, *args, max_num_steps: int = 1024, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_num_steps = check_int("max_num_steps", max_num_steps, 1)

    @property
    def num_steps(self) -> int:
        return min(self.max_num_steps, super().num_steps)


class _NeuTraKernel(TargetKernel):
    _inner_cls: type = _CappedHMC
    _starts_from_flow = True
    _flow_khat_meaning = (
        "the flow misses part of the target; in its latent space the target is far from the "
        "standard Gaussian NeuTra relies on (a bad geometry), so HMC/NUTS there will take small "
        "steps, diverge or mix slowly, and may not reach what the flow misses"
    )

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        flow = as_flow(flow)
        if flow is not None and not (hasattr(flow, "forward") and hasattr(flow, "inverse")):
            raise TypeError(
                "flow must be a pyro_ebm.flows.Flow (forward/inverse), a Pyro AutoContinuous "
                "guide, or None"
            )
        self.flow = flow
        if self._inner_cls is _CappedHMC and kwargs.get("num_steps") is kwargs.get(
            "trajectory_length"
        ):
            # Pyro's default trajectory (2π) is one full period of a standard Gaussian, which is
            # what a good flow's latent space looks like: the chain would return to its start
            kwargs["trajectory_length"] = 2.0
        # Pyro's HMC/NUTS check few of their options (a negative step size hangs, num_steps=0
        # and a string pass): the ones it takes are checked here, by name
        check_positive("step_size", kwargs.get("step_size", 1.0))
        if kwargs.get("num_steps") is not None:
            check_int("num_steps", kwargs["num_steps"], 1)
        if "max_tree_depth" in kwargs:
            check_int("max_tree_depth", kwargs["max_tree_depth"], 1)
        if kwargs.get("trajectory_length") is not None:
            check_positive("trajectory_length", kwargs["trajectory_length"])
        check_real(
            "target_accept_prob",
            kwargs.get("target_accept_prob", 0.8),
            0.0,
            1.0,
            low_open=True,
            high_open=True,
        )
        for name in ("adapt_step_size", "adapt_mass_matrix", "jit_compile"):
            check_flag(name, kwargs.get(name, False))
        self.inner_kwargs = kwargs
        if "full_mass" in kwargs:  # one flat latent site: a dense mass matrix or not
            kwargs["full_mass"] = check_flag("full_mass", kwargs["full_mass"])
        try:  # validate the HMC/NUTS options
            self._inner_cls(potential_fn=lambda p: 0.0, **kwargs)
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            unknown = str(err).split("argument")[-1].strip()
            raise TypeError(
                f"{type(self).__name__} got an unexpected keyword argument {unknown}"
            ) from None

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        given = self._user_initial is not None
        self._warmup_steps = warmup_steps  # before the fit: its budget depends on it
        self._build_target(args, kwargs)
        flow = self._flow_for_run(
            None if self.target.initial is None else self.target.initial[None]
        )
        if self.flow is None:  # fitted and frozen: no copy
            self._frozen_flow = flow
            if not given:  # start from the fitted flow, not the fit's starts
                self.target = self.target._replace(initial=None)
        else:
            self._frozen_flow = copy.deepcopy(self.flow).requires_grad_(False)
        base = self._frozen_flow.base_dist
        with torch.no_grad():
            if self.target.initial is None:
                z0 = base.sample((1,))
            else:
                z0, _ = self._frozen_flow.inverse(self.target.initial[None])
        # a start where the potential or its gradient is not finite, or raises, is redrawn
        # from the flow (100 tries, as Pyro and Stan do); a given start is only checked
        sites = ", ".join(repr(s) for s in self.target.layout.site_names)
        z0 = valid_starts(
            PullbackPotential(self.target.potential, self._frozen_flow),
            z0,
            None if given else (lambda n: base.sample((n,))),
            what=f"the chain's {'given ' if given else ''}start (sites {sites})",
        ).x
        self._check_flow_quality(self._frozen_flow, flow)
        latent = LatentPotential(
            self.target.potential,
            self._frozen_flow,
            jit_compile=self.inner_kwargs.get("jit_compile", False),
            jit_options=self.inner_kwargs.get("jit_options"),
        )
        self._inner = self._inner_cls(potential_fn=latent, **self.inner_kwargs)
        self._inner.initial_params = {"z": z0[0]}
        self._inner.setup(warmup_steps)
        self._z = self._inner.initial_params
        self._stats = {k: [] for k in SAMPLE_STATS}
        self._last = self._to_x(self._z)
        self._initial_params = self._last

    def _to_x(self, z: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            x, _ = self._frozen_flow.forward(z["z"][None])
        return self.target.layout.unflatten(x[0])

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if params is not self._last:  # moved from outside: pull the new point back to z
            with torch.no_grad():
                z, _ = self._frozen_flow.inverse(self.target.layout.flatten(params)[None])
            self._z = {"z": z[0]}
        inner = self._inner
        mean_before, count_before, div_before = (
            inner._mean_accept_prob,
            inner._accept_cnt,
            len(inner._divergences),
        )
        self._z = inner.sample(self._z)
        if inner._t > self._warmup_steps:
            n = inner._t - self._warmup_steps
            accept_prob = n * inner._mean_accept_prob - (n - 1) * mean_before
            diverging = len(inner._divergences) > div_before
            self._stats["accept_prob"].append(float(accept_prob))
            self._stats["accepted"].append(inner._accept_cnt > count_before)
            self._stats["potential_energy"].append(float(inner._potential_energy_last))
            self._stats["is_global"].append(False)
            self._stats["diverging"].append(diverging)
        self._last = self._to_x(self._z)
        return self._last

    def logging(self) -> OrderedDict:
        return self._inner.logging()

    def diagnostics(self) -> dict:
        r"""Pyro's ``divergences`` and ``acceptance rate`` of the inner kernel, ``potential
        errors`` (how often the potential raised and the point was rejected, warmup included),
        ``flow k-hat`` and ``flow IS ESS`` (the flow's Pareto :math:`\hat k` and
        importance-sampling ESS as a proposal for the target, checked at setup, see
        :func:`~pyro_ebm.metrics.flow_importance_diagnostic`), and ``sample_stats``
        (``potential_energy`` is that of the latent-space potential)."""
        return {
            **self._inner.diagnostics(),
            "potential errors": self.target.potential.errors.count,
            **self._flow_diagnostics(),
            "sample_stats": self._stats,
        }


class FlowHMC(_NeuTraKernel):
    r"""Pyro's :class:`~pyro.infer.mcmc.HMC` run in the latent space of a frozen flow (NeuTra).

    :param model: a Pyro model, or ``None``.
    :param potential_fn: a Pyro ``potential_fn``, or ``None`` (exactly one of the two).
    :param flow: a :class:`pyro_ebm.flows.Flow` over the flat unconstrained space, used as is (a
        frozen copy); or ``None`` (default): the kernel fits its own flow to the target at setup,
        before warmup, and keeps it frozen (:func:`~pyro_ebm.samplers.fit_flow`: the Laplace
        Gaussian at a mode, refined by reverse KL into a dense affine map, coupling layers only when
        that is not good enough, each stage until its loss stops falling), once per run for all
        chains; the fit is then in ``kernel.flow_`` and its report in ``kernel.flow_fit``. Reverse
        KL covers one mode: for a multimodal target use :class:`~pyro_ebm.infer.AdaptiveFlowMCMC`.
        Without ``initial_params`` (or, for a model, an ``init_strategy``) each chain starts from a
        draw of the flow.
    :param kwargs: options of :class:`~pyro.infer.mcmc.HMC` (``step_size``, ``num_steps``,
        ``trajectory_length``, ``adapt_step_size``, ``adapt_mass_matrix``, ...), and
        ``max_num_steps`` (default 1024), a cap on the leapfrog steps per iteration, which with
        a fixed trajectory length grow as the adapted step size shrinks. When neither
        ``num_steps`` nor ``trajectory_length`` is given, ``trajectory_length=2`` replaces Pyro's
        default 2π, which is a full period of the standard Gaussian a good flow's latent space
        resembles (the chain would come back where it started). ``jit_compile=True`` (and
        ``jit_options``) compiles the whole latent potential, model and flow, together with its
        gradient, into one traced graph (see :class:`LatentPotential` and
        :func:`compile_value_and_grad`); Pyro's own option would be ignored, since the inner
        kernel gets a ``potential_fn``. On small models the Python of Pyro's model trace and
        autograd's bookkeeping dominate each gradient, so this is the main speed option. With
        it, a cheap flow such as ``AffineFlow(dim, sinh_arcsinh=True)`` can beat an expressive
        one in effective draws per second.

    At setup the flow is checked once per run: ``diagnostics()`` reports its Pareto
    :math:`\hat k` as an importance sampler of the target (``"flow k-hat"``) and the
    importance-sampling ESS (``"flow IS ESS"``), see
    :func:`~pyro_ebm.metrics.flow_importance_diagnostic`; above 0.7 a warning says that the
    latent geometry is bad.

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro.infer import MCMC
        >>> from pyro_ebm.flows import RealNVP
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(FlowHMC(potential_fn=pot, flow=RealNVP(2), num_steps=4), num_samples=20,
        ...             warmup_steps=20, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([20, 2])
    """

    _inner_cls = _CappedHMC


class FlowNUTS(_NeuTraKernel):
    r"""Pyro's :class:`~pyro.infer.mcmc.NUTS` run in the latent space of a frozen flow (NeuTra).

    Same arguments as :class:`FlowHMC`; ``kwargs`` go to :class:`~pyro.infer.mcmc.NUTS`
    (``max_tree_depth``, ``target_accept_prob``, ...).
    """

    _inner_cls = NUTS
