r"""Many chains in one process: :class:`MCMC`, Pyro's ``MCMC`` with NumPyro's ``chain_method``.

Pyro runs chains in worker processes only when ``num_chains <= cpu_count() - 1`` and otherwise
one after another, so on a small machine ``num_chains=64`` costs 64 times one chain. The
kernels of :mod:`pyro_ebm.infer` move a ``(num_chains, dim)`` tensor: with
``chain_method="vectorized"`` (their default here) all chains advance together, one batched
potential (and gradient) evaluation per step for all of them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer.mcmc.api import MCMC as PyroMCMC
from pyro.infer.mcmc.api import AbstractMCMC, _UnarySampler
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.infer.mcmc.util import select_samples
from pyro.util import optional
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_choice, check_flag, check_int
from ..metrics import DEPTH_THRESHOLD, KHAT_THRESHOLD, format_summary, summarize
from .base import WalkerKernel
from .stats import deepest, worst_flow_checks

__all__ = ["CHAIN_METHODS", "MCMC"]

logger = logging.getLogger(__name__)

#: the values of ``chain_method`` (NumPyro's names)
CHAIN_METHODS = ("vectorized", "sequential", "parallel")


class MCMC(AbstractMCMC):
    r"""Markov chain Monte Carlo with many chains in one process.

    The constructor and methods of :class:`pyro.infer.mcmc.MCMC`, plus ``chain_method``:

    - ``"vectorized"`` (the default for the kernels of :mod:`pyro_ebm.infer` that move walkers:
      :class:`~pyro_ebm.infer.MALA`, :class:`~pyro_ebm.infer.FlowIMH`,
      :class:`~pyro_ebm.infer.FlowISIR`, :class:`~pyro_ebm.infer.AdaptiveFlowMCMC`,
      :class:`~pyro_ebm.infer.ChEESHMC`, :class:`~pyro_ebm.infer.FlowHMC`,
      :class:`~pyro_ebm.infer.FlowNUTS`): all ``num_chains`` chains advance as one
      ``(num_chains, dim)`` tensor, on the CPU or the GPU of the initial parameters.
      Adaptation during warmup may pool the chains (a mass matrix from their positions;
      FlowHMC's and FlowNUTS's one step size from their mean acceptance, where MALA adapts one
      per chain; :class:`~pyro_ebm.infer.AdaptiveFlowMCMC` trains one flow on all of them);
      after warmup everything is frozen and the chains are independent Markov chains.
    - ``"sequential"``: one chain after another, each from its own start.
    - ``"parallel"``: Pyro's driver with one worker process per chain (Pyro falls back to
      sequential chains when ``num_chains`` exceeds the cores less one).

    Kernels that cannot move chains as a batch (Pyro's own ``HMC``/``NUTS``) run through Pyro's
    driver; asking them for ``"vectorized"`` gives a warning saying so.

    Draws and per-draw statistics are kept in preallocated tensors; :meth:`summary` and
    :meth:`diagnostics` use FFT-based ESS and rank-normalised R-hat (linear in the number of
    draws; Pyro's own grow quadratically in memory). :func:`~pyro_ebm.infer.to_arviz` reads the
    run, chains as ArviZ chains.

    :param kernel: an MCMC kernel (``pyro_ebm.infer`` or Pyro's).
    :param num_samples: draws per chain after warmup.
    :param warmup_steps: adaptation steps per chain (default ``num_samples``, as Pyro).
    :param initial_params: ``{site: tensor}`` in unconstrained space; with ``num_chains > 1``
        each tensor has a leading dimension of size ``num_chains`` (one start per chain).
    :param num_chains: number of chains.
    :param hook_fn: ``hook_fn(kernel, params, stage, i)`` after each step, as Pyro's; with
        vectorized chains ``params`` holds every chain (a leading chain dimension).
    :param mp_context: multiprocessing context for ``"parallel"``.
    :param disable_progbar: hide the progress bar.
    :param disable_validation: disable Pyro's distribution validation while sampling.
    :param transforms: ``{site: transform}`` from the sampled (unconstrained) space to the
        reported one; default: the model's, or none for a ``potential_fn``.
    :param chain_method: ``"vectorized"``, ``"sequential"``, ``"parallel"`` or ``None`` (the
        kernel's best: vectorized when it can).

    Example::

        >>> import torch, pyro_ebm
        >>> from pyro_ebm.infer import MALA, MCMC
        >>> pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(2)))
        >>> mcmc = MCMC(MALA(potential_fn=pot), num_samples=100, warmup_steps=100,
        ...             num_chains=8, disable_progbar=True)
        >>> mcmc.run()
        >>> mcmc.get_samples(group_by_chain=True)["x"].shape
        torch.Size([8, 100, 2])

    References:

    - Phan, Pradhan, Jankowiak (2019), "Composable Effects for Flexible and Accelerated
      Probabilistic Programming in NumPyro", https://arxiv.org/abs/1912.11554 (``chain_method``).
    """

    def __init__(
        self,
        kernel: MCMCKernel,
        num_samples: int,
        warmup_steps: int | None = None,
        initial_params: dict[str, Tensor] | None = None,
        num_chains: int = 1,
        hook_fn: Callable | None = None,
        mp_context: str | None = None,
        disable_progbar: bool = False,
        disable_validation: bool = True,
        transforms: dict | None = None,
        chain_method: str | None = None,
        **numpyro_names,
    ) -> None:
        for name in numpyro_names:
            hint = _NUMPYRO_NAMES.get(name)
            hint = f" (NumPyro's name; here {hint}, Pyro's)" if hint else ""
            raise TypeError(f"MCMC got an unexpected keyword argument {name!r}{hint}")
        if not isinstance(kernel, MCMCKernel):
            raise TypeError(f"kernel must be an MCMC kernel, got {type(kernel).__name__}")
        num_chains = check_int("num_chains", num_chains, 1)
        super().__init__(kernel, num_chains, transforms)
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.warmup_steps = num_samples if warmup_steps is None else warmup_steps
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, 0)
        if chain_method is not None and chain_method not in CHAIN_METHODS:
            raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
        vectorizable = isinstance(kernel, WalkerKernel)
        if chain_method is None:
            chain_method = "vectorized" if vectorizable else "sequential"
        elif chain_method == "vectorized" and not vectorizable:
            warnings.warn(
                f"{type(kernel).__name__} cannot move chains as one batch: its chains run "
                "through Pyro's driver, one after another",
                stacklevel=2,
            )
            chain_method = "sequential"
        self.chain_method = chain_method
        if initial_params is not None:
            initial_params = _check_initial_params(initial_params, num_chains)
        self.initial_params = initial_params
        if hook_fn is not None and not callable(hook_fn):
            raise TypeError(f"hook_fn must be callable or None, got {type(hook_fn).__name__}")
        if transforms is not None and not isinstance(transforms, dict):
            raise TypeError(f"transforms must be a dict or None, got {type(transforms).__name__}")
        if mp_context is not None:
            check_choice("mp_context", mp_context, ("fork", "spawn", "forkserver"))
        self.hook_fn = hook_fn
        self.mp_context = mp_context
        self.disable_progbar = check_flag("disable_progbar", disable_progbar)
        self.disable_validation = disable_validation
        self._samples: dict[str, Tensor] | None = None
        self._diagnostics: list[dict] = [{} for _ in range(num_chains)]
        self._summary_of: dict | None = None  # the draws _summary_table was computed from
        self._summary_prob = 0.9
        self._summary_table: dict = {}
        self._args: tuple = ()
        self._kwargs: dict = {}

    # -- running ---------------------------------------------------------------------------
    @poutine.block
    def run(self, *args, **kwargs) -> None:
        r"""Run the chains; arguments go to the model (as for Pyro's ``MCMC.run``). Afterwards a
        kernel of :mod:`pyro_ebm.infer` is checked at the draws
        (:meth:`~pyro_ebm.infer.base.WalkerKernel.check_draws`: a flow kernel's flow, and every
        kernel's density depth; with ``chain_method="parallel"`` each worker checks its chain),
        and a warning names chains that
        stopped moving, NaN gradients, and draws that do not look converged (R-hat above
        :data:`RHAT_WARNING`, bulk ESS below :data:`ESS_PER_CHAIN` per chain), as Stan warns."""
        self._args, self._kwargs = args, kwargs
        args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        self._samples = None  # a run that does not finish leaves no draws, not the last run's
        self._diagnostics = [{} for _ in range(self.num_chains)]
        if hasattr(self.kernel, "_flow_check_cache"):  # check the flow once per run
            self.kernel._flow_check_cache = None
            self.kernel._score_check_cache = None
            self.kernel._draws_warned = None
            self.kernel._depth_warned = None
        with optional(
            pyro.validation_enabled(not self.disable_validation),
            self.disable_validation is not None,
        ):
            if self.chain_method == "vectorized":
                initial = None if self.initial_params is None else self._batched_initial()
                self._run_walkers(self.num_chains, initial, args, kwargs)
            elif self.chain_method == "sequential" and isinstance(self.kernel, WalkerKernel):
                self._run_sequential(args, kwargs)
            else:
                self._run_pyro(args, kwargs)
        self._warn_stuck()
        self._warn_nan_gradients()
        self._warn_convergence()

    def _warn_convergence(self) -> None:
        """Warn, as Stan does after a run, when the draws do not look converged: a rank-normalised
        split R-hat above :data:`RHAT_WARNING` (two chains or more), or a bulk ESS below
        :data:`ESS_PER_CHAIN` per chain, naming the worst sites (``summary()`` shows all)."""
        if self._samples is None or self.num_samples < 4:
            return
        try:
            table = self._summarize()
        except ValueError:  # draws summarize cannot take (non-finite): nothing to say here
            return
        rhat, ess = {}, {}
        for site, row in table.items():
            r = row["r_hat"][~torch.isnan(row["r_hat"])]  # nan: one chain, or constant draws
            if r.numel():
                rhat[site] = float(r.max())
            n = row["n_eff"][~torch.isnan(row["n_eff"])]
            if n.numel():
                ess[site] = float(n.min())
        problems = []
        if rhat and max(rhat.values()) > RHAT_WARNING:
            site = max(rhat, key=rhat.get)
            problems.append(
                f"R-hat up to {rhat[site]:.2f} (site {site!r}; above {RHAT_WARNING}, the "
                "chains disagree)"
            )
        floor = ESS_PER_CHAIN * self.num_chains
        if ess and min(ess.values()) < floor:
            site = min(ess, key=ess.get)
            problems.append(
                f"a bulk ESS as low as {ess[site]:.0f} (site {site!r}; below {floor:.0f}, "
                f"{ESS_PER_CHAIN} per chain, means and quantiles are unreliable)"
            )
        if not problems:
            return
        flows = any("flow k-hat" in d for d in self._diagnostics if isinstance(d, dict))
        logger.warning(
            "%s: the draws may not have converged: %s (summary() shows every site). What to do: "
            "run longer (more warmup_steps and num_samples); if the model is hierarchical and "
            "centred, non-centre it%s.",
            type(self.kernel).__name__,
            "; ".join(problems),
            ""
            if flows
            else "; a kernel that fits a flow (FlowNUTS, AdaptiveFlowMCMC) may mix better",
        )

    def _warn_nan_gradients(self) -> None:
        """Warn when the potential's gradient was NaN where its value was finite: the kernels
        reject such points, so the chains cannot enter that region, and the draws miss it."""
        counts = [d.get("nan gradients", 0) for d in self._diagnostics if isinstance(d, dict)]
        total = counts[0] if counts and self.chain_method == "vectorized" else sum(counts)
        moves = self.num_chains * (self.warmup_steps + self.num_samples)
        if total <= max(NAN_GRADIENTS_QUIET, NAN_GRADIENTS_QUIET_SHARE * moves):
            return  # a few points far in a tail: counted in diagnostics(), not worth a warning
        logger.warning(
            "%s: the potential's gradient was NaN at %d points where the potential itself was "
            "finite (diagnostics()['nan gradients']). Those proposals were rejected, so the "
            "chains cannot enter that region and the draws may miss part of the posterior. A "
            "few such points (e.g. during warmup) are usually numerical, far in a tail where a "
            "distribution's or the flow's computation overflows, and harmless; many usually "
            "mean a bug in the potential: e.g. torch.where whose unused branch is NaN (sqrt or "
            "log of a negative number), whose gradient is NaN; compute each branch on inputs "
            "where it is defined.",
            type(self.kernel).__name__,
            total,
        )

    def _warn_stuck(self) -> None:
        """Warn, naming them, about chains whose longest run of rejections is far longer than
        their acceptance rate implies (``diagnostics()["stuck"]``, kernels with per-draw
        statistics only)."""
        stuck = [
            i for i, d in enumerate(self._diagnostics) if isinstance(d, dict) and d.get("stuck")
        ]
        if not stuck:
            return
        runs = [self._diagnostics[i]["longest rejection run"] for i in stuck]
        if "flow k-hat" in self._diagnostics[stuck[0]]:
            khat = max(float(self._diagnostics[i]["flow k-hat"]) for i in stuck)
            seen = (
                "see diagnostics()['flow k-hat']"
                if not khat <= KHAT_THRESHOLD
                else f"which the flow's k-hat, {khat:.2f}, made from its own draws, need not show"
            )
            advice = (
                f"the flow under-covers where they stuck ({seen}): give a better flow, warm up "
                "longer, or non-centre the model if it is hierarchical"
            )
        else:
            advice = (
                "warm up longer, or reparameterise the model (non-centre it if it is a centred "
                "hierarchical one)"
            )
        logger.warning(
            "%s: chain(s) %s stopped moving: their longest runs of rejected draws (%s of %d) are "
            "far longer than their acceptance rates imply (diagnostics()['longest rejection "
            "run']), and their draws over-weight where they stuck. What to do: %s",
            type(self.kernel).__name__,
            ", ".join(str(i) for i in stuck),
            ", ".join(str(r) for r in runs),
            self.num_samples,
            advice,
        )

    def _run_walkers(
        self,
        num_chains: int,
        initial: dict[str, Tensor] | None,
        args: tuple,
        kwargs: dict,
        one_chain: bool = False,
    ) -> None:
        """All chains as one batch through the kernel's ``setup_chains``/``step_chains``
        (``one_chain``: a chain of a sequential run, whose hook sees no chain dimension)."""
        kernel = self.kernel
        if initial is not None:
            kernel.initial_params = initial
        kernel.setup_chains(num_chains, self.warmup_steps, args, kwargs, self.num_samples)
        layout = kernel.target.layout
        draws = None
        total = self.warmup_steps + self.num_samples
        bar = tqdm(total=total, disable=self.disable_progbar, desc="Warmup", dynamic_ncols=True)
        every = max(1, total // 200)
        try:
            for i in range(total):
                x, _, _ = kernel.step_chains()
                if i >= self.warmup_steps:
                    if draws is None:
                        draws = x.new_empty((num_chains, self.num_samples, layout.dim))
                    draws[:, i - self.warmup_steps] = x
                if self.hook_fn is not None:
                    stage = "Warmup" if i < self.warmup_steps else "Sample"
                    idx = i if i < self.warmup_steps else i - self.warmup_steps
                    self.hook_fn(kernel, layout.unflatten(x[0] if one_chain else x), stage, idx)
                if i == self.warmup_steps:
                    bar.set_description("Sample")
                if (i + 1) % every == 0 or i + 1 == total:
                    bar.set_postfix(kernel.logging(), refresh=False)
                    bar.update(i + 1 - bar.n)
        finally:
            bar.close()
        if draws is not None:
            kernel.check_draws(draws)
        self._store(draws, [kernel.diagnostics(c) for c in range(num_chains)], kernel, layout)

    def _run_sequential(self, args: tuple, kwargs: dict) -> None:
        """One chain at a time through the same batched path (a batch of one)."""
        draws, diags = [], []
        for c in range(self.num_chains):
            initial = None
            if self.initial_params is not None:
                initial = {k: v[c : c + 1] for k, v in self._batched_initial().items()}
            self._run_walkers(1, initial, args, kwargs, one_chain=True)
            draws.append(self._flat)
            diags.extend(self._diagnostics)
        layout = self.kernel.target.layout
        self._store(torch.cat(draws), diags, self.kernel, layout)

    def _run_pyro(self, args: tuple, kwargs: dict) -> None:
        """Pyro's own driver (processes for ``"parallel"``, else one chain after another)."""
        with warnings.catch_warnings():
            if self.chain_method == "sequential":  # (Pyro's note that chains run in turn)
                warnings.filterwarnings("ignore", "num_chains=.*sequentially", UserWarning)
            inner = PyroMCMC(
                self.kernel,
                self.num_samples,
                self.warmup_steps,
                initial_params=self.initial_params,
                num_chains=self.num_chains,
                hook_fn=self.hook_fn,
                mp_context=self.mp_context,
                disable_progbar=self.disable_progbar,
                disable_validation=self.disable_validation,
                transforms=self.transforms,
            )
        if self.chain_method == "sequential" and not isinstance(inner.sampler, _UnarySampler):
            inner.sampler.terminate(True)  # Pyro's process pool was started: stop its logger
            inner.sampler = _UnarySampler(
                self.kernel,
                self.num_samples,
                self.warmup_steps,
                self.num_chains,
                self.disable_progbar,
                initial_params=inner.sampler.initial_params,
                hook=self.hook_fn,
            )
        inner.run(*args, **kwargs)
        self._samples = inner._samples
        self._diagnostics = list(inner._diagnostics)
        self.transforms = inner.transforms

    def _batched_initial(self) -> dict[str, Tensor]:
        if self.num_chains == 1:
            return {k: v[None] for k, v in self.initial_params.items()}
        return self.initial_params

    def _store(self, flat: Tensor, diagnostics: list[dict], kernel, layout) -> None:
        self._flat = flat
        self._diagnostics = diagnostics
        transforms = self.transforms
        if transforms is None:
            transforms = kernel.transforms or {}
        samples = layout.unflatten(flat)
        self._samples = {
            k: transforms[k].inv(v) if k in transforms else v for k, v in samples.items()
        }
        if self.transforms is None:
            self.transforms = transforms

    # -- results ---------------------------------------------------------------------------
    def _check_run(self) -> None:
        if self._samples is None:
            raise RuntimeError("no draws: call run() first (a run that was interrupted keeps none)")

    def get_samples(
        self, num_samples: int | None = None, group_by_chain: bool = False
    ) -> dict[str, Tensor]:
        r"""The draws ``{site: tensor}``: ``(num_chains * num_samples, *shape)``, or
        ``(num_chains, num_samples, *shape)`` with ``group_by_chain``; ``num_samples`` draws
        with replacement when given (as Pyro's)."""
        self._check_run()
        return select_samples(self._samples, num_samples, group_by_chain)

    def diagnostics(self) -> dict:
        r"""``{site: {"n_eff": ..., "r_hat": ...}}`` (bulk ESS and rank-normalised split R-hat,
        shaped like the site), plus each kernel diagnostic per chain (``divergences``,
        ``acceptance rate`` as Pyro's and the mean acceptance of global and local moves,
        ``longest rejection run`` and ``stuck`` for the kernels that record per-draw statistics,
        ``flow k-hat``, ``flow IS ESS``, ``flow IS draws`` and ``flow score k-hat`` for the flow
        kernels; the per-draw statistics are left to :func:`~pyro_ebm.infer.to_arviz`).
        ``potential errors`` (how often the potential raised at a point of the chains' moves,
        warmup included, which was rejected; not at the draws of a flow's fit or checks) and
        ``nan gradients`` (points with a finite potential and a NaN gradient, rejected
        too) are per chain, except in a ``"vectorized"`` run, whose chains are evaluated as one
        batch: then they are the run's counts, under ``"all chains"``. A run whose chains
        stopped moving (``stuck``) logs a warning naming them."""
        self._check_run()
        table = self._summarize()
        diag: dict = {k: {"n_eff": v["n_eff"], "r_hat": v["r_hat"]} for k, v in table.items()}
        first = self._diagnostics[0] if self._diagnostics else {}
        for name in first or {}:
            if name == "sample_stats":
                continue
            if name in _RUN_COUNTS and self.chain_method == "vectorized":
                diag[name] = {"all chains": first[name]}  # one batch: one count, not per chain
                continue
            diag[name] = {f"chain {i}": d.get(name) for i, d in enumerate(self._diagnostics)}
        return diag

    def _summarize(self, prob: float | None = None) -> dict:
        """:func:`~pyro_ebm.metrics.summarize` of the draws, kept for the next call (ESS and
        R-hat do not depend on ``prob``; ``None``: any ``prob`` will do)."""
        stale = self._summary_of is not self._samples
        if stale or (prob is not None and prob != self._summary_prob):
            self._summary_prob = 0.9 if prob is None else prob
            self._summary_table = summarize(self._samples, self._summary_prob)
            self._summary_of = self._samples
        return self._summary_table

    def summary(self, prob: float = 0.9) -> None:
        r"""Print per site: mean, sd, median, the central ``prob`` interval, bulk ESS and R-hat
        (as Pyro's ``summary``), the number of divergences, for the flow kernels the flow's
        checks (:func:`~pyro_ebm.infer.stats.worst_flow_checks`; above 0.7 a k-hat says that
        the flow misses part of the target), and the density depth when it is above 2 (a
        funnel's neck, a spike or a mode no draw reached, see
        :meth:`~pyro_ebm.infer.base.WalkerKernel.check_depth`)."""
        self._check_run()
        print(format_summary(self._summarize(prob)))
        if self._diagnostics and all("divergences" in d for d in self._diagnostics):
            count = sum(len(d["divergences"]) for d in self._diagnostics)
            print(f"Number of divergences: {count}")
        checks = worst_flow_checks(self._diagnostics)
        depth = deepest(self._diagnostics)
        if checks:
            draws = checks.pop("flow IS draws", None)
            shown = [
                f"{k} {v:.0f}" if k.endswith("ESS") else f"{k} {v:.2f}" for k, v in checks.items()
            ]
            if draws is not None:  # "flow IS ESS 3862 of 4096"
                shown = [f"{t} of {draws}" if t.startswith("flow IS ESS") else t for t in shown]
            khats = [v for k, v in checks.items() if k.endswith("k-hat")]
            if any(v > KHAT_THRESHOLD for v in khats):
                verdict = f" (a k-hat above {KHAT_THRESHOLD}: the flow misses part of the target)"
            elif all(v <= KHAT_THRESHOLD for v in khats) and not depth > DEPTH_THRESHOLD:
                verdict = f" (k-hats at most {KHAT_THRESHOLD}: no sign that the flow misses part"
                verdict += " of the target)"
            elif all(v <= KHAT_THRESHOLD for v in khats):
                verdict = f" (k-hats at most {KHAT_THRESHOLD}, made where the draws went)"
            else:  # a check without enough draws
                verdict = ""
            print(f"Flow checks: {', '.join(shown)}{verdict}")
        if depth > DEPTH_THRESHOLD:
            print(
                f"Density depth: {depth:.2f} per dimension (above {DEPTH_THRESHOLD:.0f}: the "
                "target has a funnel's neck, a spike or a mode that no draw reached)"
            )


#: NumPyro's names of MCMC's arguments, and Pyro's (ours)
_NUMPYRO_NAMES = {
    "num_warmup": "warmup_steps",
    "init_params": "initial_params",
    "progress_bar": "disable_progbar",
    "postprocess_fn": "transforms",
}

#: after a run, a warning when the rank-normalised split R-hat of some parameter is above this
#: (Stan's threshold; Vehtari et al. 2021 recommend 1.01 for a final analysis)
RHAT_WARNING = 1.05
#: ... or when its bulk ESS is below this many per chain (Vehtari et al. 2021, as Stan warns)
ESS_PER_CHAIN = 100

#: at most this many NaN gradients in a run, or this share of its chains' moves, are counted in
#: ``diagnostics()`` without a warning: a point or two where a computation overflows far in a
#: tail (a walkthrough met single ones on a Weibull survival and a negative-binomial model,
#: with draws that matched Pyro's NUTS), where a bug in the potential gives hundreds
NAN_GRADIENTS_QUIET = 3
NAN_GRADIENTS_QUIET_SHARE = 1e-3

#: kernel diagnostics of a vectorized run's whole batch, one value rather than one per chain:
#: the counts over the potential's evaluations, and the density depth of all chains' draws
_RUN_COUNTS = ("potential errors", "nan gradients", "density depth")


def _check_initial_params(params: dict[str, Tensor], num_chains: int) -> dict[str, Tensor]:
    if not isinstance(params, dict) or not params:
        raise ValueError(f"initial_params must be a dict {{site: tensor}}, got {params!r}")
    out = {}
    for name, value in params.items():
        value = torch.as_tensor(value)
        if num_chains > 1 and (value.dim() == 0 or value.shape[0] != num_chains):
            raise ValueError(
                f"initial_params[{name!r}] must have a leading dimension of size "
                f"num_chains={num_chains} (one start per chain), got shape {tuple(value.shape)}"
            )
        out[name] = value
    return out
