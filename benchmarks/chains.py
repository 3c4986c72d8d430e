"""Many chains in one process: ``pyro_ebm.infer.MCMC(..., chain_method="vectorized")`` (issue 19).

1. posteriordb's eight schools (non-centered): min bulk ESS per second over all parameters
   (ArviZ bulk ESS of ``get_samples(group_by_chain=True)``; wall time of the whole run, warmup
   included) of ``ChEESHMC`` (``jit_compile`` False and True), ``ChEESHMC`` with an
   ``AffineFlow(10, sinh_arcsinh=True)`` fitted by reverse KL first (jit; the fit is counted in
   the run's time), ``AdaptiveFlowMCMC`` and ``MALA``, at each ``--chains`` count of vectorized
   chains; against Pyro's NUTS (one chain; and with ``jit_compile=True``) and, when JAX and
   NumPyro import, NumPyro's NUTS with one chain and with ``chain_method="vectorized"`` at the
   same chain counts, "compile counted" (``jax.clear_caches()``, then a fresh ``MCMC`` object's
   run) and "compile not counted" (the same object run again, already compiled). Each row also
   gives the divergences, the max R-hat over parameters, the posterior means of mu and tau and
   the largest |z| of those means against posteriordb's reference draws (or Pyro's NUTS when
   ``../shared/posteriordb`` is absent): a fast but wrong sampler shows up there.
2. ``imbalanced_pair(d)`` (heavy-mode weight 0.8), every option at its default:
   ``MCMC(AdaptiveFlowMCMC(potential_fn=...), num_samples=1000, warmup_steps=1000,
   num_chains=64)``, over seeds: heavy-mode weight per seed, max abs error, its MCSE, seconds.
3. Scaling: min bulk ESS/s on eight schools against the number of vectorized chains (1 to 256)
   for ``ChEESHMC`` (jit) and ``MALA``, on the CPU, and on the GPU when
   ``torch.cuda.is_available()`` (that path has not been run on the project's machine, which
   has no GPU).
4. Memory: peak resident memory of a run of 64 chains x 10,000 draws of a 100-dimensional
   target (MALA on a Gaussian), ``run()``, ``summary()`` and ``diagnostics()`` included, in a
   fresh process.

NumPyro and JAX are optional: without them the NumPyro rows are left out. The process is pinned
to one CPU core (``--no-pin`` to leave it free) and JAX is asked for one thread (``XLA_FLAGS``),
as torch uses one (``torch.set_num_threads(1)``): unpinned, NumPyro's runs used about 1.5
cores.

Run from the repository root, with a Python that has NumPyro for its rows (medians over
``--repeats``/``--seeds``; methods interleaved within each repeat)::

    python benchmarks/chains.py --quick                 # smoke run of every section, ~2 min
    python benchmarks/chains.py --only 1                # eight schools, 4 16 64 256 chains, ~25 min
    python benchmarks/chains.py --only 1 --chains 4 64 --repeats 2
    python benchmarks/chains.py --only 2                # imbalanced_pair, d = 16 64 128, ~20 min
    python benchmarks/chains.py --only 2 --dims 128 --seeds 2
    python benchmarks/chains.py --only 3                # ~3 min
    python benchmarks/chains.py --only 4                # ~1 min
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

# one CPU thread for XLA as for torch; must be set before jax is imported
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
# ... and one core for the whole process (before torch and jax start their threads, which
# inherit it): even with those flags, NumPyro's runs used about 1.5 cores (CPU seconds 1.5 times
# the wall seconds) where torch's single thread uses one
if "--no-pin" not in sys.argv and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC as PyroMCMC  # noqa: E402
from pyro.infer import NUTS  # noqa: E402

import pyro_ebm  # noqa: E402
from pyro_ebm.datasets import (  # noqa: E402
    EIGHT_SCHOOLS_DATA,
    eight_schools_noncentered,
    imbalanced_pair,  # noqa: E402
)
from pyro_ebm.flows import AffineFlow, fit_reverse_kl  # noqa: E402
from pyro_ebm.infer import MALA, MCMC, AdaptiveFlowMCMC, ChEESHMC  # noqa: E402
from pyro_ebm.metrics import mode_weights_mcse  # noqa: E402

try:  # optional: the NumPyro rows
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import MCMC as NumPyroMCMC
    from numpyro.infer import NUTS as NumPyroNUTS
except ImportError:
    jax = None

POSTERIORDB = Path(__file__).resolve().parents[1] / ".." / "shared" / "posteriordb"
ES_REFERENCE = POSTERIORDB / "eight_schools-eight_schools_noncentered" / "reference_draws.json.zip"
REF_ESS = 10_000  # posteriordb's reference draws: ESS about 10,000 per parameter
#: a row of section 1 is "sane" when its max R-hat and the max |z| of its means of mu and tau
#: (against the reference) stay under these (R-hat: Vehtari et al. 2021's threshold)
MAX_RHAT, MAX_Z = 1.01, 4.0

logging.getLogger("arviz").setLevel(logging.ERROR)  # its warning on one-chain inputs


def _es_args(device: str = "cpu"):
    data = EIGHT_SCHOOLS_DATA
    return (
        data["J"],
        torch.tensor(data["y"], device=device),
        torch.tensor(data["sigma"], device=device),
    )


# -- summaries of a run ------------------------------------------------------------------------
class Run:
    """What one run gives: seconds (wall and CPU), min bulk ESS, max R-hat, divergences and the
    draws of mu and tau, from ``{site: (num_chains, num_draws, ...)}`` arrays."""

    def __init__(self, samples: dict, secs: float, cpu: float, divergences: int) -> None:
        ess, rhat = [], []
        for v in samples.values():
            arr = np.asarray(v, dtype=np.float64)
            arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
            for j in range(arr.shape[-1]):
                x = np.ascontiguousarray(arr[..., j])
                ess.append(float(az.ess(x, method="bulk")))
                rhat.append(float(az.rhat(_two_halves(x) if len(x) == 1 else x)))
        self.secs, self.cpu, self.divergences = secs, cpu, divergences
        self.min_ess, self.max_rhat = min(ess), max(rhat)
        self.ess_per_s = self.min_ess / secs
        self.mu = np.asarray(samples["mu"], dtype=np.float64)
        self.tau = np.asarray(samples["tau"], dtype=np.float64)

    def zscores(self, reference: dict) -> dict[str, float]:
        """(mean - reference mean) / its Monte Carlo SE, for mu and tau."""
        out = {}
        for name, x in (("mu", self.mu), ("tau", self.tau)):
            m_ref, s_ref, ref_ess = reference[name]
            ess = float(az.ess(np.ascontiguousarray(x), method="bulk"))
            out[name] = (x.mean() - m_ref) / (s_ref * math.sqrt(1 / ess + 1 / ref_ess))
        return out


def _two_halves(x: np.ndarray) -> np.ndarray:
    """One chain ``(1, n)`` as two chains ``(2, n // 2)``: ArviZ's R-hat needs two chains."""
    n = x.shape[1] // 2
    return np.ascontiguousarray(x[0, : 2 * n].reshape(2, n))


def _torch_run(mcmc, secs: float, cpu: float) -> Run:
    samples = {
        k: v.detach().cpu().numpy() for k, v in mcmc.get_samples(group_by_chain=True).items()
    }
    divergences = sum(len(d.get("divergences", [])) for d in mcmc._diagnostics)
    return Run(samples, secs, cpu, divergences)


def _timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def _reference() -> tuple[dict, str] | tuple[None, None]:
    """``{"mu": (mean, sd, ess), "tau": ...}`` of posteriordb's reference draws, if present."""
    if not ES_REFERENCE.is_file():
        return None, None
    with zipfile.ZipFile(ES_REFERENCE) as z:
        chains = json.loads(z.read(z.namelist()[0]))
    out = {}
    for name in ("mu", "tau"):
        x = np.array([c[name] for c in chains], dtype=np.float64).ravel()
        out[name] = (float(x.mean()), float(x.std(ddof=1)), REF_ESS)
    return out, "posteriordb"


# -- 1. eight schools ----------------------------------------------------------------------------
def _pyro_ebm_run(kernel, chains: int, args, model_args, extra_secs: float = 0.0) -> Run:
    mcmc = MCMC(
        kernel,
        num_samples=args.num_samples,
        warmup_steps=args.warmup_steps,
        num_chains=chains,
        chain_method="vectorized",
        disable_progbar=True,
    )
    _, secs, cpu = _timed(lambda: mcmc.run(*model_args))
    return _torch_run(mcmc, secs + extra_secs, cpu + extra_secs)


def _pyro_nuts_run(jit: bool, args, model_args) -> Run:
    kwargs = {"jit_compile": True, "ignore_jit_warnings": True} if jit else {}
    mcmc = PyroMCMC(
        NUTS(eight_schools_noncentered, **kwargs),
        num_samples=args.num_samples,
        warmup_steps=args.warmup_steps,
        disable_progbar=True,
    )
    _, secs, cpu = _timed(lambda: mcmc.run(*model_args))
    return _torch_run(mcmc, secs, cpu)


def _numpyro_model(J, y, sigma):
    theta_trans = numpyro.sample("theta_trans", ndist.Normal(jnp.zeros(J), 1.0).to_event(1))
    mu = numpyro.sample("mu", ndist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", ndist.HalfCauchy(5.0))
    numpyro.sample("y", ndist.Normal(mu + tau * theta_trans, sigma).to_event(1), obs=y)


def _numpyro_runs(chains: int, seed: int, args) -> tuple[Run, Run]:
    """("compile counted", "compile not counted"): JAX's caches cleared, then a fresh MCMC
    object's run (tracing and XLA compilation included); then the same object run again with
    another key (compiled already; NumPyro restarts warmup from scratch)."""
    data = EIGHT_SCHOOLS_DATA
    y, sigma = jnp.array(data["y"]), jnp.array(data["sigma"])
    jax.clear_caches()
    mcmc = NumPyroMCMC(
        NumPyroNUTS(_numpyro_model),
        num_warmup=args.warmup_steps,
        num_samples=args.num_samples,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    out = []
    for k in range(2):
        key = jax.random.PRNGKey(1000 * seed + k)

        def go(key=key):
            mcmc.run(key, data["J"], y, sigma)
            return jax.block_until_ready(mcmc.get_samples(group_by_chain=True))

        samples, secs, cpu = _timed(go)
        divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
        out.append(Run({k: np.asarray(v) for k, v in samples.items()}, secs, cpu, divergences))
    return out[0], out[1]


def _fit_flow(model_args, steps: int) -> tuple[AffineFlow, float]:
    """AffineFlow(10, sinh_arcsinh=True) by reverse KL, as benchmarks/kernels.py's "sas" flow."""

    def fit():
        flow = AffineFlow(10, sinh_arcsinh=True)
        energy = pyro_ebm.ModelEnergy(eight_schools_noncentered, model_args)
        fit_reverse_kl(flow, energy, num_steps=steps, num_samples=256, lr=2e-2)
        return flow

    flow, secs, _ = _timed(fit)
    return flow, secs


#: the vectorized pyro_ebm rows of section 1: name -> kernel builder (flow or None)
_ES_KERNELS = {
    "ChEESHMC": lambda m, flow: ChEESHMC(m),
    "ChEESHMC jit": lambda m, flow: ChEESHMC(m, jit_compile=True),
    "ChEESHMC jit + flow": lambda m, flow: ChEESHMC(m, flow=flow, jit_compile=True),
    "AdaptiveFlowMCMC": lambda m, flow: AdaptiveFlowMCMC(m),
    "MALA": lambda m, flow: MALA(m),
}
PYRO_NUTS, PYRO_NUTS_JIT = "Pyro NUTS", "Pyro NUTS jit"
NP_COUNTED, NP_WARM = "NumPyro NUTS (compile counted)", "NumPyro NUTS (compile not counted)"


def bench_eight_schools(args) -> None:
    model_args = _es_args()
    kernels = [k for k in _ES_KERNELS if not args.kernels or k in args.kernels]
    numpyro_ok = jax is not None and not args.no_numpyro
    print(
        f"\n## 1. eight schools (non-centered): min bulk ESS/s, {args.warmup_steps} warmup + "
        f"{args.num_samples} draws per chain, {args.repeats} repeats\n",
        flush=True,
    )
    if not numpyro_ok:
        print("(NumPyro rows left out: jax/numpyro not importable or --no-numpyro)\n")
    else:  # JAX's backend starts here, not inside the first timed run
        jnp.zeros(1).block_until_ready()
    runs: dict[tuple[str, int], list[Run]] = {}

    def add(name, chains, run):
        runs.setdefault((name, chains), []).append(run)
        print(
            f"repeat {rep}: {name}, {chains} chains: {run.secs:.1f} s (cpu {run.cpu:.1f}), "
            f"min ESS {run.min_ess:.0f}, ESS/s {run.ess_per_s:.1f}, R-hat {run.max_rhat:.3f}, "
            f"div {run.divergences}",
            flush=True,
        )

    for rep in range(args.repeats):
        pyro.set_rng_seed(rep)
        add(PYRO_NUTS, 1, _pyro_nuts_run(False, args, model_args))
        pyro.set_rng_seed(rep)
        add(PYRO_NUTS_JIT, 1, _pyro_nuts_run(True, args, model_args))
        if numpyro_ok:
            counted, warm = _numpyro_runs(1, rep, args)
            add(NP_COUNTED, 1, counted)
            add(NP_WARM, 1, warm)
        flow, fit_secs = None, 0.0
        if "ChEESHMC jit + flow" in kernels:
            pyro.set_rng_seed(rep)
            flow, fit_secs = _fit_flow(model_args, args.flow_steps)
            print(f"repeat {rep}: flow fitted in {fit_secs:.1f} s", flush=True)
        for chains in args.chains:
            for name in kernels:
                pyro.set_rng_seed(rep)
                kernel = _ES_KERNELS[name](eight_schools_noncentered, flow)
                extra = fit_secs if flow is not None and "flow" in name else 0.0
                add(name, chains, _pyro_ebm_run(kernel, chains, args, model_args, extra))
            if numpyro_ok:
                counted, warm = _numpyro_runs(chains, rep, args)
                add(NP_COUNTED, chains, counted)
                add(NP_WARM, chains, warm)

    reference, source = _reference()
    if reference is None:  # Pyro's NUTS, all repeats pooled as chains
        nuts = runs[(PYRO_NUTS, 1)]
        reference = {}
        for name in ("mu", "tau"):
            x = np.concatenate([getattr(r, name) for r in nuts])
            ess = sum(float(az.ess(np.ascontiguousarray(getattr(r, name)))) for r in nuts)
            reference[name] = (float(x.mean()), float(x.std(ddof=1)), ess)
        source = "Pyro's NUTS (all repeats)"
    ref_mu, ref_tau = reference["mu"][0], reference["tau"][0]
    base = statistics.median(r.ess_per_s for r in runs[(PYRO_NUTS, 1)])
    print(
        f"\nReference means ({source}): mu {ref_mu:.3f}, tau {ref_tau:.3f}. 'max |z|': the "
        "largest error of the mean of mu or tau over repeats, in units of its Monte Carlo SE "
        "(run's bulk ESS and the reference's); R-hat: max over parameters and repeats (ArviZ's "
        "rank-normalised split R-hat; one chain: of its two halves); divergences: median over "
        "repeats, all chains.\n"
    )
    print(
        "| method | chains | ESS/s per repeat | median ESS/s | ratio to Pyro NUTS | median s "
        "| median cpu s | median min ESS | divergences | max R-hat | mean mu | mean tau "
        "| max abs z |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    medians: dict[tuple[str, int], float] = {}
    sane: dict[tuple[str, int], bool] = {}
    for (name, chains), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(r.ess_per_s for r in rs)
        medians[(name, chains)] = med
        zmax = max(abs(z) for r in rs for z in r.zscores(reference).values())
        rhat = max(r.max_rhat for r in rs)
        sane[(name, chains)] = rhat < MAX_RHAT and zmax < MAX_Z
        per = " ".join(f"{r.ess_per_s:.1f}" for r in rs)
        print(
            f"| {name} | {chains} | {per} | {med:.1f} | {med / base:.2f} "
            f"| {statistics.median(r.secs for r in rs):.1f} "
            f"| {statistics.median(r.cpu for r in rs):.1f} "
            f"| {statistics.median(r.min_ess for r in rs):.0f} "
            f"| {statistics.median(r.divergences for r in rs):.0f} | {rhat:.3f} "
            f"| {statistics.median(r.mu.mean() for r in rs):.2f} "
            f"| {statistics.median(r.tau.mean() for r in rs):.2f} | {zmax:.1f} |"
        )

    print(
        f"\nBest vectorized pyro_ebm kernel per chain count (among rows with max R-hat < "
        f"{MAX_RHAT} and max |z| < {MAX_Z}; marked 'fails' when none passes) against Pyro's NUTS "
        "(1 chain) and NumPyro's vectorized NUTS with the same number of chains:\n"
    )
    print(
        "| chains | best kernel | median ESS/s | ratio to Pyro NUTS | NumPyro compile counted "
        "| ratio | NumPyro compile not counted | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for chains in args.chains:
        cands = [(medians[(k, chains)], k) for k in kernels if sane.get((k, chains))]
        if not cands:
            cands = [(medians[(k, chains)], f"{k} (fails)") for k in kernels]
        best, name = max(cands)
        cells = []
        for np_name in (NP_COUNTED, NP_WARM):
            if (np_name, chains) in medians:
                v = medians[(np_name, chains)]
                cells.append(f"{v:.1f} | {best / v:.2f}")
            else:
                cells.append("- | -")
        print(f"| {chains} | {name} | {best:.1f} | {best / base:.2f} | {' | '.join(cells)} |")


# -- 2. imbalanced pair ------------------------------------------------------------------------
def bench_imbalanced(args) -> None:
    print(
        f"\n## 2. imbalanced_pair: heavy-mode weight (truth 0.8), AdaptiveFlowMCMC with every "
        f"option at its default, {args.pair_chains} vectorized chains, {args.pair_warmup} warmup "
        f"+ {args.pair_samples} draws\n",
        flush=True,
    )
    print(
        "ESS of the mode indicator: w (1 - w) / mcse^2, all chains together; global acceptance: "
        "of the i-SIR moves after warmup, mean over chains.\n"
    )
    print(
        "| d | seeds | heavy weight per seed | max abs err | median mcse | median ESS of the "
        "mode indicator | median global acceptance | s per seed | max s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        target = imbalanced_pair(d)
        rows = []
        seeds = args.seeds if d <= 64 or args.seeds_high is None else args.seeds_high
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            mcmc = MCMC(
                AdaptiveFlowMCMC(potential_fn=pyro_ebm.potential_fn(target.potential)),
                num_samples=args.pair_samples,
                warmup_steps=args.pair_warmup,
                num_chains=args.pair_chains,
                disable_progbar=True,
            )
            _, secs, _ = _timed(mcmc.run)
            x = mcmc.get_samples(group_by_chain=True)["x"]
            w, se = mode_weights_mcse(x, target)
            w, se = float(w[1]), float(se[1])
            ess = w * (1 - w) / se**2
            accept = float(np.mean([c["global acceptance rate"] for c in mcmc._diagnostics]))
            rows.append((w, se, ess, accept, secs))
            print(
                f"d={d} seed {seed}: {w:.4f} +- {se:.4f}, indicator ESS {ess:.0f}, global "
                f"acceptance {accept:.3f}, {secs:.1f} s",
                flush=True,
            )
        weights = " ".join(f"{r[0]:.3f}" for r in rows)
        err = max(abs(r[0] - 0.8) for r in rows)
        times = " ".join(f"{r[4]:.0f}" for r in rows)
        print(
            f"| {d} | {seeds} | {weights} | {err:.4f} "
            f"| {statistics.median(r[1] for r in rows):.4f} "
            f"| {statistics.median(r[2] for r in rows):.0f} "
            f"| {statistics.median(r[3] for r in rows):.3f} | {times} "
            f"| {max(r[4] for r in rows):.0f} |",
            flush=True,
        )


# -- 3. scaling with the number of chains --------------------------------------------------------
def bench_scaling(args) -> None:
    print(
        f"\n## 3. Scaling: eight schools, min bulk ESS/s against the number of vectorized chains, "
        f"{args.warmup_steps} warmup + {args.num_samples} draws, {args.repeats} repeats\n",
        flush=True,
    )
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        print("(no GPU here: torch.cuda.is_available() is False, so CPU rows only)\n")
    kernels = {"ChEESHMC jit": _ES_KERNELS["ChEESHMC jit"], "MALA": _ES_KERNELS["MALA"]}
    results: dict[tuple[str, str, int], list[Run]] = {}
    for rep in range(args.repeats):
        for device in devices:
            model_args = _es_args(device)
            for chains in args.scaling_chains:
                for name, build in kernels.items():
                    pyro.set_rng_seed(rep)
                    with torch.device(device):  # the model's own tensors on that device
                        run = _pyro_ebm_run(
                            build(eight_schools_noncentered, None), chains, args, model_args
                        )
                    results.setdefault((device, name, chains), []).append(run)
                    print(
                        f"repeat {rep}: {device} {name} {chains} chains: {run.secs:.1f} s, "
                        f"ESS/s {run.ess_per_s:.1f}",
                        flush=True,
                    )
    print("\n| device | kernel | chains | median s | median min ESS | median ESS/s ", end="")
    print("| ESS/s / 1 chain |")
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for name in kernels:
            first = None
            for chains in args.scaling_chains:
                rs = results[(device, name, chains)]
                med = statistics.median(r.ess_per_s for r in rs)
                first = med if first is None else first
                print(
                    f"| {device} | {name} | {chains} | {statistics.median(r.secs for r in rs):.1f} "
                    f"| {statistics.median(r.min_ess for r in rs):.0f} | {med:.1f} "
                    f"| {med / first:.2f} |"
                )


def bench_memory(args) -> None:
    """Peak resident memory of a 64-chain x 10,000-draw run of a 100-dimensional target (MALA on
    a Gaussian), run(), summary() and diagnostics() included, in a fresh subprocess."""
    import subprocess
    import sys

    print("\n## 4. Memory: 64 chains x 10,000 draws x 100 dimensions\n")
    code = f"""
import resource, time, io, contextlib, torch
torch.set_num_threads(1)
import pyro_ebm
from pyro_ebm.infer import MALA, MCMC
def rss():  # this process's own peak (ru_maxrss can carry the parent's peak across fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
pot = pyro_ebm.potential_fn(pyro_ebm.GaussianEnergy(torch.zeros(100)))
mcmc = MCMC(MALA(potential_fn=pot), num_samples={args.mem_draws}, warmup_steps=200,
            num_chains={args.mem_chains}, disable_progbar=True)
t = time.time(); mcmc.run(); t_run = time.time() - t; after_run = rss()
t = time.time()
with contextlib.redirect_stdout(io.StringIO()):
    mcmc.summary()
mcmc.diagnostics(); t_diag = time.time() - t
print(f"{{base:.0f}} {{after_run:.0f}} {{rss():.0f}} {{t_run:.1f}} {{t_diag:.1f}}")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, after_run, peak, t_run, t_diag = out.stdout.split()
    print(
        "| chains x draws x dim | RSS after import (MB) | peak after run (MB) | "
        "peak after summary + diagnostics (MB) | run s | summary + diagnostics s |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.mem_chains} x {args.mem_draws} x 100 | {base} | {after_run} | {peak} | "
        f"{t_run} | {t_diag} |",
        flush=True,
    )


def _code_state() -> str:
    """Where pyro_ebm was imported from, and its git commit with any uncommitted changes."""
    root = Path(pyro_ebm.__file__).resolve().parents[1]

    def git(*cmd):
        out = subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return f"pyro_ebm from {root} (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "pyro_ebm")
    changed = ", ".join(line[3:] for line in dirty.splitlines()) if dirty else "none"
    return f"pyro_ebm from {root} at {commit}, uncommitted changes in pyro_ebm: {changed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every section")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the process to one CPU core"
    )
    parser.add_argument("--repeats", type=int, default=3, help="sections 1 and 3")
    parser.add_argument("--warmup-steps", type=int, default=1000, help="sections 1 and 3")
    parser.add_argument("--num-samples", type=int, default=1000, help="sections 1 and 3")
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument(
        "--kernels",
        nargs="*",
        default=[],
        help=f"section 1: the pyro_ebm rows to run, by name (all when empty): {list(_ES_KERNELS)}",
    )
    parser.add_argument("--no-numpyro", action="store_true", help="section 1: no NumPyro rows")
    parser.add_argument("--flow-steps", type=int, default=300, help="reverse-KL steps of the flow")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--seeds", type=int, default=5, help="section 2")
    parser.add_argument(
        "--seeds-high", type=int, default=None, help="section 2: seeds for d > 64 (default --seeds)"
    )
    parser.add_argument("--pair-chains", type=int, default=64)
    parser.add_argument("--pair-warmup", type=int, default=1000)
    parser.add_argument("--pair-samples", type=int, default=1000)
    parser.add_argument("--scaling-chains", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--mem-chains", type=int, default=64, help="section 4")
    parser.add_argument("--mem-draws", type=int, default=10_000, help="section 4")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup_steps, args.num_samples = 1, 100, 100
        args.chains, args.scaling_chains = [4, 16], [1, 16]
        args.flow_steps = 50
        args.dims, args.seeds, args.seeds_high = [16], 1, None
        args.pair_warmup, args.pair_samples = 200, 200
        args.mem_draws = 1000
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}", end="")
    if jax is not None:
        print(f", jax {jax.__version__}, numpyro {numpyro.__version__}", end="")
    print(f"; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    print(_code_state())
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"CPU cores this process may use: {cores}")
    if 1 in args.only:
        bench_eight_schools(args)
    if 2 in args.only:
        bench_imbalanced(args)
    if 3 in args.only:
        bench_scaling(args)
    if 4 in args.only:
        bench_memory(args)


if __name__ == "__main__":
    main()
