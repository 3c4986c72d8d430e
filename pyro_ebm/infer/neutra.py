r"""HMC and NUTS in a normalizing flow's latent space (NeuTra), many chains at once.

With a flow :math:`T: z \mapsto x` close to the target, the pulled-back potential
:math:`U(T(z)) - \log|\det J_T(z)|` is close to a standard Gaussian, so HMC/NUTS mix there far
better than on the original geometry. The flow is frozen (a copy, with gradients off); draws are
mapped back through ``T`` and reported in the original space (unconstrained per site, then
Pyro's transforms for a model's constrained sites).

Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` covers models with an ``AutoContinuous`` guide;
these kernels take any flow over the flat unconstrained space, a bare ``potential_fn`` included,
and move all chains as one ``(num_chains, dim)`` batch (:func:`~pyro_ebm.samplers.hmc_step`,
:func:`~pyro_ebm.samplers.nuts_step`) with Pyro's options and Stan's warmup. Pyro's own HMC/NUTS
can run in a latent space too, with :class:`LatentPotential` as their ``potential_fn``.

References:

- Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing Bad Geometry in
  Hamiltonian Monte Carlo Using Neural Transport", https://arxiv.org/abs/1903.03704
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.util import ignore_jit_warnings
from torch import Tensor

from .._checks import check_flag, check_int, check_positive, check_real
from ..flows import as_flow
from ..samplers import (
    REJECTED_ERRORS,
    MoveInfo,
    NanGradientRows,
    PullbackPotential,
    WalkerState,
    guarded,
    hmc_step,
    init_state,
    nuts_step,
)
from .base import StanWarmupKernel, WalkerKernel

__all__ = [
    "CompiledPotential",
    "FlowHMC",
    "FlowNUTS",
    "LatentKernel",
    "LatentPotential",
    "compile_value_and_grad",
]

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
                plain = self.potential(x.detach())
            try:
                compiled = _trace_graph(self._grad_and_value(), x, self.jit_options)
                _, value = compiled(x.detach())
                if not _same_values(value, plain):
                    # e.g. an autograd.Function inside the model (Pyro's enumeration) that
                    # torch.func cannot run: a guard in the model then returns inf, and the
                    # recorded graph is inf everywhere
                    raise RuntimeError("the recorded graph's values differ from the potential's")
                self._compiled[key] = compiled
            except Exception as error:  # not recordable (e.g. .item() or numpy inside)
                if not any(v is None for v in self._compiled.values()):  # once per potential
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


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two batches of potentials agree: non-finite in the same rows, and within a
    relative 1e-4 where finite (a traced graph may round differently)."""
    a, b = a.detach().to(b.dtype), b.detach()
    finite = torch.isfinite(a)
    if a.shape != b.shape or not torch.equal(finite, torch.isfinite(b)):
        return False
    close = (a - b).abs() <= 1e-4 * (1.0 + b.abs())
    return bool(close[finite].all())


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


class LatentKernel(WalkerKernel):
    r"""Base class of the kernels whose chains move in a frozen flow's latent space (NeuTra):
    :class:`FlowHMC`, :class:`FlowNUTS` and :class:`~pyro_ebm.infer.ChEESHMC`.

    With a flow :math:`T: z \mapsto x` the chains move in :math:`z` under the pulled-back
    potential :math:`U(T(z)) - \log|\det J_T(z)|` and report :math:`x = T(z)`. ``flow=None`` fits
    one at setup (:meth:`~pyro_ebm.infer.base.TargetKernel._flow_for_run`, once per run for all
    chains); a given flow is used as is (a frozen copy); ``flow=False`` (where the subclass allows
    it) moves the chains in the unconstrained space itself. ``jit_compile`` compiles the batched
    potential, model and flow, with its gradient (:class:`CompiledPotential`). Takes the arguments
    of :class:`~pyro_ebm.infer.base.TargetKernel`.
    """

    @property
    def _flow_khat_meaning(self) -> str:
        """What a large k-hat means for these kernels; it says which flow, since a user who left
        ``flow=None`` may not know that the kernel fitted one."""
        flow = "the flow"
        if getattr(self, "flow", 0) is None:
            off = "; flow=False runs without one" if self._allows_no_flow else ""
            flow = f"the flow {type(self).__name__} fitted at setup (flow=None, the default{off})"
        return (
            f"{flow} misses part of the target; the chains move in the flow's latent space, "
            "where the target is then far from a standard Gaussian (a bad geometry), so they "
            "will take small steps, diverge or mix slowly, and may not reach what the flow misses"
        )

    _starts_from_flow = True
    #: whether ``flow=False`` (no flow: the unconstrained space itself) is allowed
    _allows_no_flow = False

    def _init_latent(self, flow, jit_compile: bool, jit_options: dict | None) -> None:
        flow = flow if flow is False and self._allows_no_flow else as_flow(flow)
        if flow not in (None, False) and not (
            hasattr(flow, "forward") and hasattr(flow, "inverse")
        ):
            none = ", None or False" if self._allows_no_flow else " or None"
            raise TypeError(
                "flow must be a pyro_ebm.flows.Flow (forward/inverse), a Pyro AutoContinuous "
                f"guide{none}"
            )
        if jit_options is not None and not isinstance(jit_options, dict):
            raise TypeError(f"jit_options must be a dict or None, got {jit_options!r}")
        self.flow = flow
        self.jit_compile = check_flag("jit_compile", jit_compile)
        self.jit_options = jit_options

    def _latent_start(self, x0: Tensor | None) -> WalkerState:
        """Fit or copy the flow, build the latent potential and the chains' valid starts (a
        given start mapped to the latent space; else draws of the flow's base, or without a
        flow uniform in ``[-2, 2]``), then check the flow."""
        self._flow = None
        self._potential = self.target.potential
        if self.flow is not False:
            flow = self._flow_for_run(x0)
            if self.flow is None:  # fitted and frozen: no copy; start from it
                self._flow = flow
                x0 = None if not self._starts_given else x0
            else:
                self._flow = copy.deepcopy(flow).requires_grad_(False)
            self._potential = PullbackPotential(self.target.potential, self._flow)
        if self.jit_compile:
            self._potential = CompiledPotential(self._potential, self.jit_options)
        # errors raised in the flow or the compiled graph are rejected and counted too
        self._potential = guarded(self._potential, self.target.potential.errors)
        redraw = None  # spread out, as Pyro's init_to_uniform: R-hat then means something
        if self._flow is not None:

            def redraw(n: int) -> Tensor:
                return self._flow.base_dist.sample((n,))

        dim = self.target.layout.dim
        if x0 is None:
            z0 = redraw(self.num_chains) if redraw else self._uniform(self.num_chains, dim)
        else:
            z0 = self._latent(x0)
        state = self._valid_starts(self._potential, z0, True, redraw)
        if self._flow is not None:
            self._check_flow_quality(self._flow, self.flow_ if self.flow is None else self.flow)
        return state

    def _restart(self, x: Tensor) -> WalkerState:
        return init_state(self._potential, self._latent(x))

    def _latent(self, x: Tensor) -> Tensor:
        """Flat positions in the coordinates the chains move in (the flow's latent space)."""
        if self._flow is None:
            return x
        with torch.no_grad():
            return self._flow.inverse(x)[0]

    def _uniform(self, n: int, dim: int) -> Tensor:
        return 4.0 * torch.rand(n, dim, device=self.device) - 2.0

    def _positions(self, state: WalkerState) -> Tensor:
        if self._flow is None:
            return state.x
        with torch.no_grad():
            x, _ = self._flow.forward(state.x)
        return x


class FlowHMC(LatentKernel, StanWarmupKernel):
    r"""Hamiltonian Monte Carlo in the latent space of a frozen flow (NeuTra), all chains at
    once, with Pyro's :class:`~pyro.infer.mcmc.HMC` options and Stan's warmup.

    Each iteration integrates ``trajectory_length / step_size`` leapfrog steps (at most
    ``max_num_steps``) of every chain as one batched potential-and-gradient evaluation
    (:func:`~pyro_ebm.samplers.hmc_step`), so with :class:`pyro_ebm.infer.MCMC` ``num_chains``
    chains cost about what one costs. Warmup (:class:`~pyro_ebm.samplers.StanWarmup`) adapts one
    step size for all chains by dual averaging toward ``target_accept_prob`` (a trajectory that
    ran into a region where the potential is not finite, rejected whatever the step size, does
    not count toward it) and a diagonal (or
    dense) inverse mass matrix from the chains' positions in Stan's windows; a reasonable step
    size is searched at the start and after each new mass matrix, as Pyro does. After warmup
    everything is frozen and the chains are independent.

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
    :param init_strategy: Pyro init strategy for models.
    :param max_plate_nesting: as Pyro's (for models).
    :param step_size: initial step size (Pyro's default 1; searched from, when it adapts).
    :param trajectory_length: integration time per iteration. When neither it nor ``num_steps``
        is given it is 2, not Pyro's 2π: 2π is a full period of the standard Gaussian that a good
        flow's latent space resembles (the chain would come back where it started).
    :param num_steps: leapfrog steps per iteration; as in Pyro, it sets the trajectory length
        to ``step_size * num_steps``, which stays fixed while the step size adapts.
    :param adapt_step_size: adapt the step size during warmup.
    :param adapt_mass_matrix: adapt the inverse mass matrix during warmup (with fewer than 20
        warmup steps it stays the identity, as in Stan).
    :param full_mass: a dense inverse mass matrix instead of a diagonal one (a block structure,
        Pyro's list of sites, is not supported: the latent space is one flat vector).
    :param target_accept_prob: the mean acceptance to aim for (Pyro's 0.8).
    :param max_num_steps: the most leapfrog steps per iteration: with a fixed trajectory
        length, a step size adapted toward 0 (a target with an infinite region) would otherwise
        ask for an unbounded number.
    :param jit_compile: compile the batched latent potential, model and flow, together with its
        gradient into one graph per batch shape (:class:`CompiledPotential`; Pyro's own option
        would not reach it). On small models the Python of Pyro's model trace and autograd's
        bookkeeping dominate each gradient, so this is the main speed option; with it, a cheap
        flow such as ``AffineFlow(dim, sinh_arcsinh=True)`` can beat an expressive one in
        effective draws per second. Only valid for potentials without data-dependent control
        flow.
    :param dict jit_options: keyword arguments of :func:`torch.jit.trace`.

    At setup the flow is checked once per run: ``diagnostics()`` reports its Pareto
    :math:`\hat k` as an importance sampler of the target (``"flow k-hat"``) and the
    importance-sampling ESS (``"flow IS ESS"``), see
    :func:`~pyro_ebm.metrics.flow_importance_diagnostic`; above 0.7 a warning says that the
    latent geometry is bad; at the end of warmup, and after a run of
    :class:`~pyro_ebm.infer.MCMC`, it is checked again at the chains' draws (``"flow score
    k-hat"``, :func:`~pyro_ebm.metrics.flow_score_diagnostic`, the same warning). After setup,
    :attr:`step_size` and :attr:`inverse_mass_matrix` are the current ones (the latter over the
    latent space).

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MCMC
        >>> from pyro_ebm.flows import RealNVP
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(FlowHMC(potential_fn=pot, flow=RealNVP(2), num_steps=4), num_samples=20,
        ...             warmup_steps=20, num_chains=4, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples()["x"].shape
        torch.Size([80, 2])

    References:

    - Hoffman, Sountsov, Dillon, Langmore, Tran, Vasudevan (2019), "NeuTra-lizing Bad Geometry
      in Hamiltonian Monte Carlo Using Neural Transport", https://arxiv.org/abs/1903.03704
    - Neal (2011), "MCMC using Hamiltonian dynamics", https://arxiv.org/abs/1206.1901
    """

    #: the mean acceptance of one trial leapfrog step that the reasonable step size crosses
    #: (Pyro's and Stan's 0.8)
    _TRIAL_ACCEPT = 0.8

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        *,
        step_size: float = 1.0,
        trajectory_length: float | None = None,
        num_steps: int | None = None,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool = False,
        target_accept_prob: float = 0.8,
        max_num_steps: int = 1024,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        super().__init__(model, potential_fn, init_strategy, max_plate_nesting)
        self._init_latent(flow, jit_compile, jit_options)
        self.initial_step_size = check_positive("step_size", step_size)
        if num_steps is not None:
            num_steps = check_int("num_steps", num_steps, 1)
        if trajectory_length is not None:
            trajectory_length = check_positive("trajectory_length", trajectory_length)
        elif num_steps is not None:
            trajectory_length = step_size * num_steps
        else:
            trajectory_length = 2.0
        self.trajectory_length = float(trajectory_length)
        self.target_accept_prob = float(
            check_real(
                "target_accept_prob",
                target_accept_prob,
                0.0,
                1.0,
                low_open=True,
                high_open=True,
            )
        )
        self.adapt_step_size = check_flag("adapt_step_size", adapt_step_size)
        self.adapt_mass_matrix = check_flag("adapt_mass_matrix", adapt_mass_matrix)
        self.full_mass = check_flag("full_mass", full_mass)
        self.max_num_steps = check_int("max_num_steps", max_num_steps, 1)
        #: potential-and-gradient rows the transitions evaluated so far, warmup included: the
        #: batch's leapfrog steps times the chains (with NUTS, the deepest tree's steps)
        self.num_leapfrog = 0
        self._nan_gradient: Tensor | None = None  # the last trajectories that met NaN gradients

    @property
    def num_steps(self) -> int:
        """Leapfrog steps of the next iteration: ``trajectory_length / step_size``, at least 1
        and at most ``max_num_steps``."""
        steps = int(self.trajectory_length / self.step_size)
        return min(self.max_num_steps, max(1, steps))

    def _setup_chain(self, x0: Tensor | None) -> WalkerState:
        state = self._latent_start(x0)
        self._start_warmup(state.x.device, self._TRIAL_ACCEPT)
        self._warmup.start(state, self._trial)
        self.num_leapfrog = 0
        return state

    def _trial(self, state: WalkerState, step_size: float) -> Tensor:
        """Acceptance probabilities of one leapfrog step from ``state`` (the step-size search)."""
        _, info = hmc_step(state, self._potential, step_size, 1, self._warmup.inverse_mass)
        return info.accept_prob

    def _transition(self, state: WalkerState) -> tuple[WalkerState, MoveInfo]:
        steps = self.num_steps
        self.num_leapfrog += steps * state.x.shape[0]
        potential = NanGradientRows(self._potential)  # which trajectories met a NaN gradient
        new, info = hmc_step(
            state, potential, self._warmup.step_size, steps, self._warmup.inverse_mass
        )
        self._nan_gradient = potential.rows
        return new, info

    def _move(self, state: WalkerState, warmup: bool) -> tuple[WalkerState, MoveInfo, bool]:
        state, info = self._transition(state)
        if warmup:
            self._adapt(state, info)
        return state, info, False

    def _adapt(self, state: WalkerState, info: MoveInfo) -> None:
        """Stan's warmup, except that a trajectory which ran into a region where the potential
        is not finite (a wall, a region where it raises) does not count toward the step size
        (``StanWarmup.update``'s ``ignore``): with the trajectory length fixed it is rejected
        whatever the step size, which dual averaging would otherwise shrink toward 0, asking
        for ``max_num_steps`` leapfrog steps per iteration. A trajectory that met a finite
        potential with a NaN gradient is left out even when every chain's did (``neutral``):
        no step size avoids such a region, whereas a wall may be the overflow of a step too
        large."""
        self._warmup.update(
            self._t,
            state,
            info.accept_prob,
            self._trial,
            self._curvature,
            info.nonfinite,
            self._nan_gradient,
        )

    def _extra_logging(self) -> dict:
        return {"step size": self._step_size_text(), "steps": self.num_steps}


class FlowNUTS(FlowHMC):
    r"""The No-U-Turn sampler in the latent space of a frozen flow (NeuTra), all chains at once,
    with Pyro's :class:`~pyro.infer.mcmc.NUTS` options and Stan's warmup.

    Each iteration is :func:`~pyro_ebm.samplers.nuts_step` for every chain (multinomial NUTS, as
    Stan and Pyro): the chains build their trajectories in lockstep, one batched
    potential-and-gradient evaluation per leapfrog step, so an iteration costs the deepest
    chain's tree. Same arguments and warmup as :class:`FlowHMC` (``trajectory_length`` and
    ``num_steps`` aside), plus:

    :param max_tree_depth: at most ``2**max_tree_depth - 1`` leapfrog steps per iteration
        (Pyro's 10).

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MCMC
        >>> from pyro_ebm.flows import AffineFlow
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(FlowNUTS(potential_fn=pot, flow=AffineFlow(2)), num_samples=20,
        ...             warmup_steps=20, num_chains=4, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples(group_by_chain=True)["x"].shape
        torch.Size([4, 20, 2])

    References:

    - Hoffman, Gelman (2014), "The No-U-Turn Sampler", https://arxiv.org/abs/1111.4246
    - Betancourt (2017), "A Conceptual Introduction to Hamiltonian Monte Carlo",
      https://arxiv.org/abs/1701.02434
    """

    #: Stan's warmup as is: a tree that diverges stops, and its acceptance statistic averages
    #: the steps it made, so a wall does not drive the step size to 0
    _adapt = StanWarmupKernel._adapt
    _not_taken = {
        "num_steps": "NUTS builds each trajectory by doubling until it turns (max_tree_depth=)",
        "trajectory_length": "NUTS builds each trajectory by doubling until it turns "
        "(max_tree_depth=)",
    }

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        flow=None,
        init_strategy: Callable | None = None,
        max_plate_nesting: int | None = None,
        *,
        step_size: float = 1.0,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool = False,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        jit_compile: bool = False,
        jit_options: dict | None = None,
        **pyro_only,
    ) -> None:
        self._refuse(pyro_only)
        super().__init__(
            model,
            potential_fn,
            flow,
            init_strategy,
            max_plate_nesting,
            step_size=step_size,
            adapt_step_size=adapt_step_size,
            adapt_mass_matrix=adapt_mass_matrix,
            full_mass=full_mass,
            target_accept_prob=target_accept_prob,
            jit_compile=jit_compile,
            jit_options=jit_options,
        )
        self.max_tree_depth = check_int("max_tree_depth", max_tree_depth, 1)
        self._last_steps: Tensor | None = None

    @property
    def num_steps(self) -> float:
        """Mean leapfrog steps per chain of the last iteration (``nan`` before one)."""
        steps = self._last_steps
        return float("nan") if steps is None else float(steps.float().mean())

    def _transition(self, state: WalkerState) -> tuple[WalkerState, MoveInfo]:
        state, info, steps = nuts_step(
            state,
            self._potential,
            self._warmup.step_size,
            self._warmup.inverse_mass,
            self.max_tree_depth,
        )
        self._last_steps = steps
        self.num_leapfrog += int(steps.max()) * steps.shape[0]  # what the batch evaluated
        return state, info

    def _extra_logging(self) -> dict:
        return {"step size": self._step_size_text(), "steps": f"{self.num_steps:.1f}"}
