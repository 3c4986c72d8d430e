"""Benchmarks of the Pyro kernels of ``pyro_ebm.infer``, all run through ``pyro.infer.mcmc.MCMC``.

1. ``imbalanced_pair(d)`` (0.2 N(-4·1, I) + 0.8 N(+4·1, I)), d = 2, 16, 64: AdaptiveFlowMCMC vs
   Pyro's NUTS: heavy-mode weight (truth 0.8), its MCSE, wall time of ``MCMC.run`` (warmup and
   flow training included), over seeds.
2. posteriordb's eight schools (non-centered): bulk ESS per second (min over parameters) of
   FlowHMC, FlowNUTS, AdaptiveFlowMCMC and Pyro's NUTS, as ratios to NUTS measured in one run.
   The flow of FlowHMC/FlowNUTS is fitted by reverse KL first; that time is counted. The rows
   with ``jit_compile=True`` are also compared with Pyro's NUTS with ``jit_compile=True``.
3. Driver overhead: ms per step of FlowIMH vs Pyro's RandomWalkKernel on the same 2-D target
   (a Pyro model for both), and of FlowIMH on a bare ``potential_fn``.
4. Robustness of AdaptiveFlowMCMC (pure i-SIR after warmup) on eight schools over many seeds:
   min bulk ESS, distinct draws and the acceptance of the flow kept at the end of warmup.
5. Targets no test uses, with every option at its default (as a new user would run them):
   AdaptiveFlowMCMC and NUTS, 500 warmup steps + 2000 draws, on a Gaussian with scales 0.01 to
   100, a banana, Neal's funnel (10-D) and a logistic regression on scikit-learn's breast-cancer
   data (10 standardised features); summaries next to the truth (NUTS's for the regression).
6. The same logistic regression: posterior sds of three weights with their MCSE, NUTS and
   AdaptiveFlowMCMC over seeds (is a gap between the two a bias or Monte Carlo error?).
7. A negative-binomial regression (a positive dispersion, skewed on the log scale): NUTS
   against FlowNUTS/FlowHMC with ``AffineFlow(sinh_arcsinh=True)`` and ``jit_compile=True``.
8. The cost of one gradient of the potential on eight schools (each leapfrog step pays it):
   Pyro's own jit-compiled potential against FlowNUTS's latent potential in Python, traced and
   differentiated by autograd, and compiled with its gradient (``jit_compile=True``).
10. Every kernel at its defaults (issue 20): min bulk ESS per second, warmup and any flow fit
   counted, on eight schools (non-centred), posteriordb's low-dimensional Gaussian mixture (its
   data from ``../shared`` when there, else a synthetic set of the same shape) and Pyro's own
   MCMC test models (``tests/pyro_models.py``), 4 chains each, as ratios to Pyro's NUTS and to
   NUTS with ``jit_compile=True`` measured in the same run; with each flow kernel's k-hat.
11. ``fit_flow`` (what the flow kernels fit when given no flow) on Pyro's test models and on
    eight schools, centred and non-centred: the stages it took, reverse-KL steps, k-hat, IS ESS
    and seconds, from 16 uniform starts in [-2, 2] and no budget.
9. A Pyro model with a label-switching posterior (``pyro_ebm.datasets.label_switching_mixture``,
   two symmetric modes of mass 1/2 each): the weight of each mode with its MCSE and the wall time
   for AdaptiveFlowMCMC (one chain) and Pyro's NUTS (one chain, and 4 chains), over seeds.

Run from the repository root (``torch.set_num_threads(1)``; medians over seeds/repeats)::

    python benchmarks/kernels.py                 # everything
    python benchmarks/kernels.py --only 1 --dims 16 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, RandomWalkKernel
from pyro.util import ignore_jit_warnings

import pyro_ebm
from pyro_ebm.datasets import imbalanced_pair
from pyro_ebm.flows import AffineFlow, RealNVP
from pyro_ebm.infer import AdaptiveFlowMCMC, FlowHMC, FlowIMH, FlowNUTS
from pyro_ebm.metrics import mode_weights_mcse


def _timed_run(kernel, num_samples, warmup_steps, initial_params=None, num_chains=1, args=()):
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        initial_params=initial_params,
        disable_progbar=True,
    )
    start = time.perf_counter()
    mcmc.run(*args)
    return mcmc, time.perf_counter() - start


# -- 1. imbalanced pair ------------------------------------------------------------------------
def bench_imbalanced(dims, seeds, args) -> None:
    print("\n## 1. imbalanced_pair: heavy-mode weight (truth 0.8) through pyro.infer.mcmc.MCMC\n")
    print("| method | d | heavy weight per seed | max abs err | median mcse | median s |")
    print("|---|---|---|---|---|---|")
    for d in dims:
        target = imbalanced_pair(d)
        pot = pyro_ebm.potential_fn(target.potential)
        rows = {"AdaptiveFlowMCMC": [], "Pyro NUTS (4 chains)": []}
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            # d > 16: more walkers and local moves to train the flow, and one MALA move per
            # i-SIR move after warmup (pure i-SIR chains got stuck on flow-density holes)
            high = d > 16
            kernel = AdaptiveFlowMCMC(
                potential_fn=pot,
                num_walkers=128 if high else 64,
                num_particles=args.num_particles,
                num_local_steps=5 if high else 3,
                production_local_steps=1 if high else 0,
                **args.adaptive_kwargs,
            )
            warmup, samples = (600, 16000) if high else (args.warmup_steps, args.num_samples)
            mcmc, secs = _timed_run(kernel, samples, warmup, {"x": torch.zeros(d)})
            rows["AdaptiveFlowMCMC"].append(_weight_row(mcmc, target, secs))

            if args.skip_nuts:
                continue
            pyro.set_rng_seed(seed)
            x0 = 2.0 * torch.randn(4, d)
            mcmc, secs = _timed_run(
                NUTS(potential_fn=pot), args.nuts_samples, args.nuts_samples, {"x": x0}, 4
            )
            rows["Pyro NUTS (4 chains)"].append(_weight_row(mcmc, target, secs))
        for name, r in rows.items():
            if not r:
                continue
            weights = " ".join(f"{w:.3f}" for w, _, _ in r)
            err = max(abs(w - 0.8) for w, _, _ in r)
            mcse = statistics.median(s for _, s, _ in r)
            secs = statistics.median(t for _, _, t in r)
            print(f"| {name} | {d} | {weights} | {err:.4f} | {mcse:.4f} | {secs:.1f} |", flush=True)


def _weight_row(mcmc, target, secs):
    x = mcmc.get_samples(group_by_chain=True)["x"]
    w, se = mode_weights_mcse(x, target)
    return float(w[1]), float(se[1]), secs


# -- 2. eight schools --------------------------------------------------------------------------
# the flows of FlowHMC/FlowNUTS, (builder, reverse-KL learning rate): a 4-layer RealNVP; a
# Gaussian x = mean + L z (one matmul per gradient); the same after 2 small coupling layers;
# the affine map after an elementwise sinh-arcsinh (per-coordinate skew and tails)
_ES_FLOWS = {
    "realnvp": (lambda dim: RealNVP(dim, num_layers=4, hidden=(32, 32)), 5e-3),
    "affine": (lambda dim: AffineFlow(dim), 2e-2),
    "affine+2": (lambda dim: AffineFlow(dim, num_coupling_layers=2, hidden=(16, 16)), 2e-2),
    "sas": (lambda dim: AffineFlow(dim, sinh_arcsinh=True), 2e-2),
}


def bench_eight_schools(seeds, args) -> None:
    from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
    from pyro_ebm.flows import fit_reverse_kl

    data = EIGHT_SCHOOLS_DATA
    model_args = (data["J"], torch.tensor(data["y"]), torch.tensor(data["sigma"]))
    print("\n## 2. eight schools (non-centered): bulk ESS/s, min over parameters\n")
    results: dict[str, list[float]] = {}

    def wanted(name: str) -> bool:  # the two NUTS baselines always run
        return not args.es_variants or name in args.es_variants

    for seed in range(seeds):
        pyro.set_rng_seed(seed)
        energy = pyro_ebm.ModelEnergy(eight_schools_noncentered, model_args)
        runs = {}
        runs["Pyro NUTS"] = _timed_run(
            NUTS(eight_schools_noncentered), args.es_samples, args.es_warmup, args=model_args
        )
        # second baseline for the jit-compiled kernels below: Pyro's NUTS with its own jit
        runs["Pyro NUTS (jit)"] = _timed_run(
            NUTS(eight_schools_noncentered, jit_compile=True, ignore_jit_warnings=True),
            args.es_samples,
            args.es_warmup,
            args=model_args,
        )
        fitted: dict[str, tuple] = {}  # flow key -> (flow, seconds of its fit)
        jit = {"jit_compile": True}
        variants = (
            ("FlowNUTS", FlowNUTS, "realnvp", {}),
            ("FlowHMC", FlowHMC, "realnvp", {}),
            ("FlowHMC, AffineFlow", FlowHMC, "affine", {}),
            ("FlowHMC jit, AffineFlow", FlowHMC, "affine", jit),
            ("FlowNUTS jit, AffineFlow", FlowNUTS, "affine", jit),
            ("FlowNUTS jit, AffineFlow+2 couplings", FlowNUTS, "affine+2", jit),
            ("FlowHMC jit, AffineFlow+sinh-arcsinh", FlowHMC, "sas", jit),
            ("FlowNUTS jit, AffineFlow+sinh-arcsinh", FlowNUTS, "sas", jit),
        )
        for name, cls, key, kwargs in variants:
            if not wanted(name):
                continue
            if key not in fitted:  # fitted once per seed by reverse KL, that time counted
                build, lr = _ES_FLOWS[key]
                steps = args.es_flow_steps if key == "realnvp" else args.es_cheap_flow_steps
                start = time.perf_counter()
                fl = build(energy.dim)
                fit_reverse_kl(fl, energy, num_steps=steps, num_samples=256, lr=lr)
                fitted[key] = (fl, time.perf_counter() - start)
            fl, fit_secs = fitted[key]
            if cls is FlowHMC:
                # a trajectory near 2 avoids the ~2π period of a whitened Gaussian
                kwargs = {"trajectory_length": 2.0, **kwargs}
            mcmc, secs = _timed_run(
                cls(eight_schools_noncentered, flow=fl, **kwargs),
                args.es_samples,
                args.es_warmup,
                args=model_args,
            )
            runs[f"{name} (incl. {fit_secs:.1f} s flow fit)"] = (mcmc, secs + fit_secs)
        if wanted("AdaptiveFlowMCMC"):
            kernel = AdaptiveFlowMCMC(
                eight_schools_noncentered, num_particles=32, production_local_steps=0
            )
            runs["AdaptiveFlowMCMC"] = _timed_run(
                kernel, 10 * args.es_samples, 400, args=model_args
            )
        for name, (mcmc, secs) in runs.items():
            ess = _min_ess(mcmc)
            print(f"seed {seed}: {name}: {secs:.1f} s, min bulk ESS {ess:.0f}", flush=True)
            results.setdefault(name.split(" (incl.")[0], []).append(ess / secs)
    base = statistics.median(results["Pyro NUTS"])
    base_jit = statistics.median(results["Pyro NUTS (jit)"])
    print("\n| method | ESS/s per seed | median min bulk ESS/s | ratio to NUTS", end="")
    print(" | ratio to NUTS (jit) | per-seed ratios to the same seed's NUTS |")
    print("|---|---|---|---|---|---|")
    for name, v in results.items():
        med = statistics.median(v)
        per_seed = " ".join(f"{x:.1f}" for x in v)
        paired = " ".join(f"{x / b:.2f}" for x, b in zip(v, results["Pyro NUTS"], strict=True))
        print(
            f"| {name} | {per_seed} | {med:.1f} | {med / base:.2f} | {med / base_jit:.2f}", end=""
        )
        print(f" | {paired} |")


def _min_ess(mcmc) -> float:
    samples = mcmc.get_samples(group_by_chain=True)
    ess = []
    for v in samples.values():
        arr = v.reshape(v.shape[0], v.shape[1], -1).double().numpy()
        for j in range(arr.shape[-1]):
            ess.append(float(az.ess(np.ascontiguousarray(arr[..., j]), method="bulk")))
    return min(ess)


# -- 3. driver overhead ------------------------------------------------------------------------
class _Gauss2D(pyro_ebm.EnergyModel):
    def __init__(self):
        super().__init__(2)

    def energy(self, x):
        return 0.5 * (x**2).sum(-1)


def _model_2d():
    x = pyro.sample("x", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    pyro.factor("energy", -0.5 * (x**2).sum() + (0.5 * (x / 3.0) ** 2).sum())


def bench_overhead(repeats, args) -> None:
    print("\n## 3. driver overhead on a 2-D Gaussian: ms per MCMC step\n")
    flow = RealNVP(2, num_layers=4, hidden=(32, 32))
    n = args.overhead_steps
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        cases = {
            "RandomWalkKernel (model)": lambda: _timed_run(RandomWalkKernel(_model_2d), n, 0),
            "FlowIMH (model)": lambda: _timed_run(FlowIMH(_model_2d, flow=flow), n, 0),
            "FlowIMH (potential_fn)": lambda: _timed_run(
                FlowIMH(potential_fn=pyro_ebm.potential_fn(_Gauss2D()), flow=flow), n, 0
            ),
        }
        for name, fn in cases.items():
            _, secs = fn()
            times.setdefault(name, []).append(1000 * secs / n)
    base = statistics.median(times["RandomWalkKernel (model)"])
    print("| kernel | median ms/step | ratio to RandomWalkKernel |")
    print("|---|---|---|")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.3f} | {med / base:.2f} |")


def bench_adaptive_robustness(seeds, args) -> None:
    from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered

    data = EIGHT_SCHOOLS_DATA
    model_args = (data["J"], torch.tensor(data["y"]), torch.tensor(data["sigma"]))
    print("\n## 4. AdaptiveFlowMCMC on eight schools over seeds\n")
    print("| local steps after warmup | seed | s | min bulk ESS | ESS/s | distinct draws |", end="")
    print(" flow acceptance kept |")
    print("|---|---|---|---|---|---|---|")
    for local_steps in args.robust_local_steps:
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            kernel = AdaptiveFlowMCMC(
                eight_schools_noncentered,
                num_particles=32,
                production_local_steps=local_steps,
                defensive=args.robust_defensive,
            )
            mcmc, secs = _timed_run(kernel, 10 * args.es_samples, 400, args=model_args)
            ess = _min_ess(mcmc)
            distinct = len(torch.unique(mcmc.get_samples()["tau"]))
            accept = kernel.sampler.final_global_accept
            print(
                f"| {local_steps} | {seed} | {secs:.1f} | {ess:.0f} | {ess / secs:.0f} | "
                f"{distinct} | {accept:.2f} |",
                flush=True,
            )


# -- 5. targets no test uses, default settings ------------------------------------------------
_SCALES = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])


def _scales_model():
    pyro.sample("x", dist.Normal(torch.zeros(5), _SCALES).to_event(1))


def _banana_model():
    x1 = pyro.sample("x1", dist.Normal(0.0, 1.0))
    pyro.sample("x2", dist.Normal(x1**2, 0.5))


def _funnel_model(dim: int = 10):
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(dim - 1), torch.exp(v / 2)).to_event(1))


def _logistic_model(features, labels):
    w = pyro.sample("w", dist.Normal(torch.zeros(features.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("n", len(labels)):
        pyro.sample("y", dist.Bernoulli(logits=features @ w + b), obs=labels)


def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 10 features of scikit-learn's breast cancer data, standardised, and labels."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = features[:, :10]
    features = torch.tensor((features - features.mean(0)) / features.std(0), dtype=torch.float32)
    return features, torch.tensor(labels, dtype=torch.float32)


def bench_unseen_targets(args) -> None:
    features, labels = _breast_cancer()

    def sd(name, i=None):
        return lambda s: float((s[name] if i is None else s[name][:, i]).std())

    def mean(name, i=None):
        return lambda s: float((s[name] if i is None else s[name][:, i]).mean())

    targets = {  # name: (model, args, {summary: (function of the draws, truth or None)})
        "scales (5-D)": (
            _scales_model,
            (),
            {"sd x[0] (0.01)": (sd("x", 0), 0.01), "sd x[4] (100)": (sd("x", 4), 100.0)},
        ),
        "banana (2-D)": (
            _banana_model,
            (),
            {"mean x2": (mean("x2"), 1.0), "sd x2": (sd("x2"), 1.5)},
        ),
        "funnel (10-D)": (_funnel_model, (), {"mean v": (mean("v"), 0.0), "sd v": (sd("v"), 3.0)}),
        "logistic (11-D)": (
            _logistic_model,
            (features, labels),
            {
                "sd w[0]": (sd("w", 0), None),
                "sd w[2]": (sd("w", 2), None),
                "mean b": (mean("b"), None),
            },
        ),
    }
    print("\n## 5. Targets no test uses, default settings (500 warmup + 2000 draws)\n")
    print("| target | kernel | s | min bulk ESS | summaries (truth; NUTS's for the regression) |")
    print("|---|---|---|---|---|")
    for name, (model, model_args, summaries) in targets.items():
        reference = {}
        for kernel_name, make in (("NUTS", NUTS), ("AdaptiveFlowMCMC", AdaptiveFlowMCMC)):
            pyro.set_rng_seed(args.unseen_seed)
            mcmc, secs = _timed_run(make(model), 2000, 500, args=model_args)
            draws = mcmc.get_samples()
            cells = []
            for label, (fn, truth) in summaries.items():
                value = fn(draws)
                if kernel_name == "NUTS":
                    reference[label] = value
                truth = reference[label] if truth is None else truth
                cells.append(f"{label}: {value:.3g} ({truth:.3g})")
            print(
                f"| {name} | {kernel_name} | {secs:.0f} | {_min_ess(mcmc):.0f} | "
                + "; ".join(cells)
                + " |",
                flush=True,
            )


def bench_logistic_sds(args) -> None:
    """Posterior sds of the logistic regression of section 5 with their Monte Carlo standard
    errors (ArviZ ``mcse(method="sd")``), NUTS and AdaptiveFlowMCMC over seeds, to tell a bias
    from Monte Carlo error."""
    features, labels = _breast_cancer()
    print(f"\n## 6. Logistic regression: posterior sds +- MCSE, {args.logistic_draws} draws\n")
    print("| kernel | seed | s | sd w[0] | sd w[2] | sd w[3] | min ESS of w |")
    print("|---|---|---|---|---|---|---|")
    for kernel_name, make, seeds in (
        ("NUTS", NUTS, args.logistic_nuts_seeds),
        ("AdaptiveFlowMCMC", AdaptiveFlowMCMC, args.logistic_adaptive_seeds),
    ):
        for seed in seeds:
            pyro.set_rng_seed(seed)
            mcmc, secs = _timed_run(
                make(_logistic_model), args.logistic_draws, 500, args=(features, labels)
            )
            w = mcmc.get_samples(group_by_chain=True)["w"].double().numpy()
            data = az.convert_to_dataset(w)  # one variable "x" of shape (chain, draw, 10)
            mcse = az.mcse(data, method="sd")["x"].values
            ess = az.ess(data)["x"].values
            sds = w.reshape(-1, w.shape[-1]).std(0)
            cells = " | ".join(f"{sds[i]:.3f} +- {mcse[i]:.3f}" for i in (0, 2, 3))
            print(
                f"| {kernel_name} | {seed} | {secs:.0f} | {cells} | {ess.min():.0f} |", flush=True
            )


def _negbin_model(x, y):
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    phi = pyro.sample("phi", dist.HalfNormal(5.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.GammaPoisson(phi, phi / torch.exp(a + b * x)), obs=y)


def bench_neutra_negbin(args) -> None:
    """FlowNUTS/FlowHMC (jit, ``AffineFlow(sinh_arcsinh=True)`` fitted by 300 reverse-KL steps,
    counted) against NUTS on a negative-binomial regression (60 simulated points, intercept
    0.5, slope 0.8, dispersion 3): time, min bulk ESS and the posterior summaries."""
    from pyro_ebm.flows import fit_reverse_kl

    pyro.set_rng_seed(0)  # the data
    x = torch.randn(60)
    y = dist.GammaPoisson(3.0, 3.0 / torch.exp(0.5 + 0.8 * x)).sample()
    print("\n## 7. Negative-binomial regression: NUTS vs NeuTra with a cheap flow\n")
    print("| kernel | s | min bulk ESS | mean +- sd of a, b, phi |")
    print("|---|---|---|---|")
    for name in ("NUTS", "FlowNUTS", "FlowHMC"):
        pyro.set_rng_seed(args.unseen_seed)
        start = time.perf_counter()
        if name == "NUTS":
            kernel = NUTS(_negbin_model)
        else:
            flow = AffineFlow(3, sinh_arcsinh=True)
            energy = pyro_ebm.ModelEnergy(_negbin_model, (x, y))
            fit_reverse_kl(flow, energy, num_steps=300, num_samples=256, lr=2e-2)
            cls = FlowNUTS if name == "FlowNUTS" else FlowHMC
            kernel = cls(_negbin_model, flow=flow, jit_compile=True)
        mcmc, _ = _timed_run(kernel, 3000, 500, args=(x, y))
        secs = time.perf_counter() - start
        draws = mcmc.get_samples()
        cells = ", ".join(
            f"{float(draws[k].mean()):.3f} +- {float(draws[k].std()):.3f}"
            for k in ("a", "b", "phi")
        )
        print(f"| {name} | {secs:.1f} | {_min_ess(mcmc):.0f} | {cells} |", flush=True)


# -- 8. cost of one latent gradient ---------------------------------------------------------
def bench_gradient_cost(args) -> None:
    """Microseconds per call of Pyro's ``potential_grad`` (what each leapfrog step of HMC/NUTS
    pays) on eight schools: Pyro's own jit-compiled potential (NUTS with ``jit_compile=True``)
    and FlowNUTS's latent potential (model + ``AffineFlow(10, sinh_arcsinh=True)`` fitted by
    300 reverse-KL steps) in three forms: plain Python, the potential traced and differentiated
    by autograd (the form ``jit_compile=True`` took before ``compile_value_and_grad``), and
    value and gradient compiled together (``jit_compile=True`` now). Rounds interleaved."""
    from pyro.infer.mcmc.util import initialize_model
    from pyro.ops.integrator import potential_grad

    from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
    from pyro_ebm.flows import fit_reverse_kl
    from pyro_ebm.infer import LatentPotential

    data = EIGHT_SCHOOLS_DATA
    model_args = (data["J"], torch.tensor(data["y"]), torch.tensor(data["sigma"]))
    pyro.set_rng_seed(0)
    init, pyro_jit, _, _ = initialize_model(
        eight_schools_noncentered, model_args, jit_compile=True, skip_jit_warnings=True
    )
    flow = AffineFlow(10, sinh_arcsinh=True)
    fit_reverse_kl(
        flow, pyro_ebm.ModelEnergy(eight_schools_noncentered, model_args), 300, 256, lr=2e-2
    )
    flow.requires_grad_(False)  # frozen, as the kernels sample with it
    energy = pyro_ebm.ModelEnergy(eight_schools_noncentered, model_args)
    plain = LatentPotential(energy, flow)
    z = flow.base_dist.sample()
    with pyro.validation_enabled(False):
        traced = torch.jit.trace(
            ignore_jit_warnings()(plain._latent_potential), (z,), check_trace=False
        )
    compiled = LatentPotential(energy, flow, jit_compile=True)
    x0 = {k: v.detach() for k, v in init.items()}
    forms = {
        "Pyro NUTS potential, jit_compile=True": (pyro_jit, x0),
        "FlowNUTS latent potential, Python": (plain, {"z": z}),
        "FlowNUTS latent potential, traced + autograd (before)": (
            lambda p: traced(p["z"]),
            {"z": z},
        ),
        "FlowNUTS latent potential, jit_compile=True (compiled gradient)": (compiled, {"z": z}),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.grad_rounds):
        for name, (fn, params) in forms.items():
            calls = 50 if "Python" in name else 300
            for _ in range(10):
                potential_grad(fn, params)
            start = time.perf_counter()
            for _ in range(calls):
                potential_grad(fn, params)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    base = statistics.median(times["Pyro NUTS potential, jit_compile=True"])
    print("\n## 8. Microseconds per potential_grad call, eight schools\n")
    print("| form | median us | min us | median / Pyro's jit |")
    print("|---|---|---|---|")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"| {name} | {med:.0f} | {min(v):.0f} | {med / base:.2f} |")


# -- 9. label switching --------------------------------------------------------------------------
def bench_label_switching(seeds, args) -> None:
    from pyro_ebm.datasets import label_switching_data, label_switching_mixture

    y = label_switching_data(100, seed=0)
    a, b = float(y[:50].mean()), float(y[50:].mean())
    modes = torch.tensor([[a, b], [b, a]])
    print("\n## 9. Label switching: weight of the mode mu[0] < mu[1] (truth 0.5), one model\n")
    print("| method | weight per seed | max abs err | median mcse | median s |")
    print("|---|---|---|---|---|")
    methods = {
        "AdaptiveFlowMCMC (1 chain)": lambda: (
            AdaptiveFlowMCMC(label_switching_mixture, num_walkers=32, production_local_steps=0),
            1,
        ),
        "Pyro NUTS (1 chain)": lambda: (NUTS(label_switching_mixture), 1),
        "Pyro NUTS (4 chains)": lambda: (NUTS(label_switching_mixture), 4),
    }
    for name, build in methods.items():
        rows = []
        for seed in range(seeds):
            pyro.set_rng_seed(seed)
            kernel, chains = build()
            mcmc, secs = _timed_run(
                kernel, args.ls_samples, args.ls_warmup, num_chains=chains, args=(y,)
            )
            mu = mcmc.get_samples(group_by_chain=True)["mu"]
            # the nearest of the two modes: (a, b) has mu[0] < mu[1]
            w, se = mode_weights_mcse(mu, modes)
            rows.append((float(w[0]), float(se[0]), secs))
        weights = " ".join(f"{w:.3f}" for w, _, _ in rows)
        err = max(abs(w - 0.5) for w, _, _ in rows)
        mcse = statistics.median(s for _, s, _ in rows)
        secs = statistics.median(t for _, _, t in rows)
        print(f"| {name} | {weights} | {err:.3f} | {mcse:.4f} | {secs:.1f} |", flush=True)


# -- 10. every kernel at its defaults -----------------------------------------------------------
def _default_targets() -> dict:
    """name -> (model, args): eight schools, the low-dimensional mixture, Pyro's test models."""
    import sys
    from pathlib import Path

    from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered, low_dim_gauss_mix

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from pyro_models import MODELS

    shared = root.parent / "shared" / "posteriordb" / "low_dim_gauss_mix-low_dim_gauss_mix"
    if (shared / "data.json.zip").exists():
        import zipfile

        with zipfile.ZipFile(shared / "data.json.zip") as z:
            y = torch.tensor(json.loads(z.read(z.namelist()[0]))["y"])
    else:  # the same shape: 1000 points, two overlapping components
        g = torch.Generator().manual_seed(0)
        k = torch.rand(1000, generator=g) < 0.4
        y = torch.where(k, -0.75, 0.75) + torch.where(k, 1.0, 0.5) * torch.randn(1000, generator=g)
    targets = {
        "eight_schools": (eight_schools_noncentered, tuple(EIGHT_SCHOOLS_DATA.values())),
        "low_dim_gauss_mix": (low_dim_gauss_mix, (y,)),
    }
    for name in (
        "logistic_regression",
        "gamma_beta",
        "beta_bernoulli",
        "gaussian_chain2_obs10k",
        "gaussian_chain9",
        "bernoulli_latent",
    ):
        rec = MODELS[name](0)
        targets[name] = (rec.model, rec.args)
    targets.update(_unseen_targets())
    return targets


def _unseen_targets() -> dict:
    """Two posteriors no test uses, with generated data (seed 0): a robust regression (a
    Student-t likelihood with unknown degrees of freedom; 3 coefficients, a scale and nu, 200
    points) and a non-centred hierarchical Poisson regression (20 groups of 10 counts: an
    intercept, a slope, a group scale and 20 group effects)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    with torch.random.fork_rng():  # StudentT.sample takes no generator
        torch.manual_seed(0)
        noise = torch.distributions.StudentT(4.0).sample((200,))
    y = x @ torch.tensor([1.0, -0.5, 0.25]) + 0.5 * noise

    def student_t_regression(x, y):
        beta = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.StudentT(nu, x @ beta, sigma), obs=y)

    groups = torch.arange(20).repeat_interleave(10)
    covariate = torch.randn(200, generator=g)
    effects = 0.5 * torch.randn(20, generator=g)
    counts = torch.poisson((1.0 + 0.3 * covariate + effects[groups]).exp(), generator=g)

    def hierarchical_poisson(covariate, groups, counts):
        alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", 20):
            raw = pyro.sample("raw", dist.Normal(0.0, 1.0))
        rate = alpha + beta * covariate + tau * raw[groups]
        with pyro.plate("data", len(counts)):
            pyro.sample("counts", dist.Poisson(rate.exp()), obs=counts)

    return {
        "student_t_regression": (student_t_regression, (x, y)),
        "hierarchical_poisson": (hierarchical_poisson, (covariate, groups, counts)),
    }


def _default_kernels() -> dict:
    """name -> (factory(model), pyro_ebm's vectorized MCMC?)."""
    from pyro_ebm.infer import MALA, ChEESHMC, FlowISIR

    return {
        "NUTS": (lambda m: NUTS(m), False),
        "NUTS jit": (lambda m: NUTS(m, jit_compile=True, ignore_jit_warnings=True), False),
        "MALA": (lambda m: MALA(m), True),
        "ChEESHMC": (lambda m: ChEESHMC(m), True),
        "ChEESHMC flow=False": (lambda m: ChEESHMC(m, flow=False), True),
        "FlowIMH": (lambda m: FlowIMH(m), True),
        "FlowISIR": (lambda m: FlowISIR(m), True),
        "FlowHMC": (lambda m: FlowHMC(m), True),
        "FlowHMC jit": (lambda m: FlowHMC(m, jit_compile=True), True),
        "FlowNUTS": (lambda m: FlowNUTS(m), True),
        "FlowNUTS jit": (lambda m: FlowNUTS(m, jit_compile=True), True),
        "AdaptiveFlowMCMC": (lambda m: AdaptiveFlowMCMC(m), True),
    }


def bench_defaults(args) -> None:
    from pyro_ebm.infer import MCMC as VectorizedMCMC

    torch.set_default_dtype(torch.float64)  # as Pyro's tests (and tests/pyro_models.py) run
    targets, kernels = _default_targets(), _default_kernels()
    if args.def_models:
        targets = {k: v for k, v in targets.items() if k in args.def_models}
    if args.def_kernels:
        kernels = {k: v for k, v in kernels.items() if k in args.def_kernels or "NUTS" == k[:4]}
    print(
        f"\n## 10. every kernel at its defaults: {args.def_chains} chains, {args.def_warmup} "
        f"warmup steps, {args.def_samples} draws, seeds {args.def_seeds}"
    )
    print(
        "| target | kernel | min bulk ESS | R-hat max | s | ESS/s | x NUTS | x NUTS jit | k-hat |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for tname, (model, margs) in targets.items():
        rows = {}
        for kname, (factory, vectorized) in kernels.items():
            per_seed = []
            for seed in args.def_seeds:
                pyro.set_rng_seed(seed)
                kernel = factory(model)
                driver = VectorizedMCMC if vectorized else MCMC
                mcmc = driver(
                    kernel,
                    num_samples=args.def_samples,
                    warmup_steps=args.def_warmup,
                    num_chains=args.def_chains,
                    disable_progbar=True,
                )
                start = time.perf_counter()
                try:
                    mcmc.run(*margs)
                except Exception as error:  # a crash is a row of the table
                    print(f"| {tname} | {kname} | CRASH {type(error).__name__}: {error} |")
                    per_seed = []
                    break
                secs = time.perf_counter() - start
                samples = mcmc.get_samples(group_by_chain=True)
                rhat = max(
                    float(
                        np.nanmax(
                            az.rhat(
                                v.double().numpy().reshape(*v.shape[:2], -1).transpose(2, 0, 1)[j],
                                method="rank",
                            )
                        )
                    )
                    for v in samples.values()
                    for j in range(int(np.prod(v.shape[2:])) or 1)
                )
                khat = getattr(kernel, "flow_check", None)
                per_seed.append((_min_ess(mcmc), rhat, secs, khat.khat if khat else None))
            if not per_seed:
                continue
            ess = statistics.median(r[0] for r in per_seed)
            secs = statistics.median(r[2] for r in per_seed)
            rows[kname] = (ess, max(r[1] for r in per_seed), secs, ess / secs, per_seed)
        base, base_jit = rows.get("NUTS"), rows.get("NUTS jit")
        for kname, (ess, rhat, secs, rate, per_seed) in rows.items():
            ratio = f"{rate / base[3]:.2f}" if base else "-"
            ratio_jit = f"{rate / base_jit[3]:.2f}" if base_jit else "-"
            khats = [r[3] for r in per_seed if r[3] is not None]
            khat = f"{max(khats):.2f}" if khats else "-"
            print(
                f"| {tname} | {kname} | {ess:.0f} | {rhat:.3f} | {secs:.1f} | {rate:.1f} | "
                f"{ratio} | {ratio_jit} | {khat} |",
                flush=True,
            )


# -- 11. fit_flow ----------------------------------------------------------------------------------
def bench_fit_flow(args) -> None:
    from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA
    from pyro_ebm.infer import MALA
    from pyro_ebm.samplers import fit_flow

    torch.set_default_dtype(torch.float64)
    targets = _default_targets()
    targets.pop("low_dim_gauss_mix")

    def centred(J, y, sigma):  # the centred eight schools: a funnel in (log tau, theta)
        y, sigma = torch.as_tensor(y), torch.as_tensor(sigma)
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        loc, scale = mu[..., None], tau[..., None]
        shape = mu.shape + (int(J),)
        theta = pyro.sample("theta", dist.Normal(loc, scale).expand(shape).to_event(1))
        pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

    targets["eight_schools_centred"] = (centred, tuple(EIGHT_SCHOOLS_DATA.values()))
    if args.def_models:
        targets = {k: v for k, v in targets.items() if k in args.def_models}
    print(f"\n## 11. fit_flow, seeds {args.def_seeds}")
    print("| target | D | seed | stages | reverse-KL steps | k-hat | IS ESS / draws | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, margs) in targets.items():
        for seed in args.def_seeds:
            pyro.set_rng_seed(seed)
            kernel = MALA(model)  # (only for its target: the potential of the model)
            kernel.setup(0, *margs)
            dim = kernel.target.layout.dim
            fit = fit_flow(kernel.target.potential, 4 * torch.rand(16, dim) - 2)
            print(
                f"| {name} | {dim} | {seed} | {' + '.join(fit.stages)} | {fit.steps} | "
                f"{fit.khat:.2f} | {fit.ess / fit.num_draws:.2f} | {fit.seconds:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="+", default=list(range(1, 12)))
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=400)
    parser.add_argument("--num-samples", type=int, default=24000)
    parser.add_argument(
        "--adaptive-kwargs",
        type=json.loads,
        default={},
        help='section 1: more AdaptiveFlowMCMC options, JSON (e.g. {"precondition": false})',
    )
    parser.add_argument("--skip-nuts", action="store_true", help="section 1: no NUTS rows")
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--es-seeds", type=int, default=3)
    parser.add_argument("--es-samples", type=int, default=1000)
    parser.add_argument("--es-warmup", type=int, default=500)
    parser.add_argument("--es-flow-steps", type=int, default=1000)
    parser.add_argument("--es-cheap-flow-steps", type=int, default=300)
    parser.add_argument(
        "--es-variants",
        nargs="*",
        default=[],
        help="section 2: the rows to run besides the two NUTS baselines, by exact name "
        "(e.g. 'FlowNUTS jit, AffineFlow+sinh-arcsinh' AdaptiveFlowMCMC); all when empty",
    )
    parser.add_argument("--overhead-steps", type=int, default=2000)
    parser.add_argument("--robust-seeds", type=int, default=8)
    parser.add_argument("--robust-local-steps", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--robust-defensive", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grad-rounds", type=int, default=15)
    parser.add_argument("--unseen-seed", type=int, default=0)
    parser.add_argument("--logistic-draws", type=int, default=4000)
    parser.add_argument("--logistic-nuts-seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--logistic-adaptive-seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--ls-seeds", type=int, default=5)
    parser.add_argument("--ls-samples", type=int, default=1000)
    parser.add_argument("--ls-warmup", type=int, default=240)
    parser.add_argument("--def-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--def-chains", type=int, default=4)
    parser.add_argument("--def-warmup", type=int, default=500)
    parser.add_argument("--def-samples", type=int, default=1000)
    parser.add_argument("--def-models", nargs="*", default=[], help="section 10: by name")
    parser.add_argument("--def-kernels", nargs="*", default=[], help="section 10: by name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if 1 in args.only:
        bench_imbalanced(args.dims, args.seeds, args)
    if 2 in args.only:
        bench_eight_schools(args.es_seeds, args)
    if 3 in args.only:
        bench_overhead(args.repeats, args)
    if 4 in args.only:
        bench_adaptive_robustness(args.robust_seeds, args)
    if 5 in args.only:
        bench_unseen_targets(args)
    if 6 in args.only:
        bench_logistic_sds(args)
    if 7 in args.only:
        bench_neutra_negbin(args)
    if 8 in args.only:
        bench_gradient_cost(args)
    if 9 in args.only:
        bench_label_switching(args.ls_seeds, args)
    if 10 in args.only:
        bench_defaults(args)
    if 11 in args.only:
        bench_fit_flow(args)


if __name__ == "__main__":
    main()
