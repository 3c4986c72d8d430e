"""Benchmark: adaptive global-local flow MCMC vs Pyro's NUTS on ``imbalanced_pair(d)``.

The target is 0.2 N(-4·1, I) + 0.8 N(+4·1, I) in ``d`` dimensions. For each dimension and seed
we report the weight of the heavy mode (truth 0.8) estimated from the draws, its Monte Carlo
standard error (from the ESS of the mode indicator), wall time, and the ESS per second of the
heavy-mode indicator and of the first coordinate (bulk ESS, ArviZ). Both samplers start from the
same broad initialisation ``N(0, 2^2 I)``; NUTS runs ``--nuts-chains`` chains through
``pyro.infer.mcmc.MCMC`` (sequentially, as on this 2-core machine).

Run from the repository root::

    python benchmarks/samplers.py                  # d = 2, 16, 64; 5 seeds
    python benchmarks/samplers.py --dims 16 --seeds 1 --nuts-samples 200   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

import arviz as az
import numpy as np
import torch
from pyro.infer import MCMC, NUTS

import pyro_ebm
from pyro_ebm.datasets import imbalanced_pair
from pyro_ebm.metrics import mode_indicator_ess, mode_weights_mcse
from pyro_ebm.samplers import AdaptiveFlowSampler


def _ess_first_coord(chains: torch.Tensor) -> float:
    """Bulk ESS of x[0] from ``(chains, draws, dim)``."""
    return float(az.ess(np.asarray(chains[..., 0].double().numpy()), method="bulk"))


def run_adaptive(d: int, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    target = imbalanced_pair(d)
    x0 = 2.0 * torch.randn(args.num_walkers, d)
    start = time.perf_counter()
    sampler = AdaptiveFlowSampler(target.potential, num_particles=args.num_particles)
    run = sampler.run(x0, args.warmup_steps, args.num_samples)
    seconds = time.perf_counter() - start
    chains = run.samples.transpose(0, 1)
    return _row("adaptive flow", d, seed, target, chains, seconds, run.global_accept[-1])


def run_nuts(d: int, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    target = imbalanced_pair(d)
    x0 = 2.0 * torch.randn(args.nuts_chains, d)
    start = time.perf_counter()
    chains = []
    for c in range(args.nuts_chains):  # one MCMC per chain: each gets its own start
        mcmc = MCMC(
            NUTS(potential_fn=pyro_ebm.potential_fn(target.potential)),
            num_samples=args.nuts_samples,
            warmup_steps=args.nuts_samples,
            initial_params={"x": x0[c]},
            disable_progbar=True,
        )
        mcmc.run()
        chains.append(mcmc.get_samples()["x"])
    seconds = time.perf_counter() - start
    return _row("Pyro NUTS", d, seed, target, torch.stack(chains), seconds, float("nan"))


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _row(name, d, seed, target, chains, seconds, global_accept) -> dict:
    w, se = mode_weights_mcse(chains, target)
    ess_mode = float(mode_indicator_ess(chains, target)[1])
    return {
        "method": name,
        "d": d,
        "seed": seed,
        "heavy": float(w[1]),
        "mcse": float(se[1]),
        "err": abs(float(w[1]) - 0.8),
        "seconds": seconds,
        "ess_mode_per_s": ess_mode / seconds,
        "ess_x0_per_s": _ess_first_coord(chains) / seconds,
        "global_accept": float(global_accept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-walkers", type=int, default=128)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--nuts-chains", type=int, default=4)
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--no-nuts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for d in args.dims:
        for seed in range(args.seeds):
            rows.append(run_adaptive(d, seed, args))
            print(rows[-1], flush=True)
            if not args.no_nuts:
                rows.append(run_nuts(d, seed, args))
                print(rows[-1], flush=True)

    print()
    print(
        "| method | d | heavy-mode weight per seed (truth 0.8) | max abs err | median s | "
        "median ESS/s (mode) | median ESS/s (x0) | global accept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("adaptive flow", "Pyro NUTS"):
        for d in args.dims:
            sel = [r for r in rows if r["method"] == name and r["d"] == d]
            if not sel:
                continue
            weights = " ".join(f"{r['heavy']:.3f}" for r in sel)
            print(
                f"| {name} | {d} | {weights} | {max(r['err'] for r in sel):.4f} | "
                f"{_median(sel, 'seconds'):.1f} | {_median(sel, 'ess_mode_per_s'):.0f} | "
                f"{_median(sel, 'ess_x0_per_s'):.0f} | "
                f"{_median(sel, 'global_accept'):.2f} |"
            )
    for d in args.dims:
        a = [r for r in rows if r["method"] == "adaptive flow" and r["d"] == d]
        n = [r for r in rows if r["method"] == "Pyro NUTS" and r["d"] == d]
        if a and n:
            ratio = statistics.median(r["seconds"] for r in a) / statistics.median(
                r["seconds"] for r in n
            )
            print(f"d={d}: wall-time ratio adaptive/NUTS = {ratio:.2f}")


if __name__ == "__main__":
    main()
