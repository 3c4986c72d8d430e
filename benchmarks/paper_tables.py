"""Reproduction of the tables of Grenioux, Moulines, Gabrié (2023), "Balanced Training of
Energy-Based Models with Adaptive Flow Sampling" (arXiv 2306.00684), at CPU scale, with
``pyro_ebm.train.EBMTrainer``: the paper's method (``adaptive-flow``) and the baselines
(``neutra-mala`` = NT-EBM, ``ula`` = ULA-EBM, ``coopflow`` = CoopFlow) under the same number of
training steps, batch and walkers. Printed as markdown next to the paper's numbers.

- ``line4`` (Table 3): mode-weight MSE of the EBM against the truth (grid quadrature) and of the
  negatives against the EBM (negatives counted over ``--chain-steps`` states of every walker,
  sampled on the final, frozen model).
- ``density`` (Table 1): median squared error of the normalised log-density, ``eight_gaussians``
  and ``rings`` (see :func:`pyro_ebm.metrics.log_density_error` for where it is evaluated).
  ``--samplers exact-ml`` adds a reference that needs no sampler: the same MLP, tilt, data,
  batch and rate schedule trained by exact maximum likelihood, log Z by quadrature on a 200 x 200
  grid of [-5, 5]^2 at every step (what any sampler's gradient estimates at best).
- ``rhat`` (Table 2): max over dimensions of the rank-normalised R-hat of 128 negative chains,
  ``mixture_hd`` (``--dims``).
- ``fig1``: ``two_to_one``, the heavy mode's weight over training for several seeds, adaptive
  flow vs ULA-EBM; the curves are saved to ``benchmarks/fig1_two_to_one.png``.

Run from the repository root (one thread; each run's wall time is printed)::

    python benchmarks/paper_tables.py --only line4 --seeds 0 1 2
    python benchmarks/paper_tables.py --only density rhat fig1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pyro_ebm import MLPEnergy
from pyro_ebm.datasets import load
from pyro_ebm.metrics import log_density_error, max_rhat, mode_weights
from pyro_ebm.train import EBMTrainer
from pyro_ebm.train.trainer import base_scale

PAPER = {
    "line4": {"adaptive-flow": (4.29e-4, 3.12e-5), "neutra-mala": (9.87e-4, 3.85e-4)},
    "eight_gaussians": {"adaptive-flow": 0.94, "neutra-mala": 0.97},
    "rings": {"adaptive-flow": 0.40, "neutra-mala": 0.62},
    "rhat": {16: (1.01, 2.02), 32: (1.01, 2.50), 64: (1.05, 3.10)},
}

# Settings per data set (the paper: 60k points, 8192 walkers, 100 epochs)
CONFIG = {
    "line4": dict(num_data=60_000, steps=4000, batch=1024, walkers=1024, hidden=(128, 128)),
    "eight_gaussians": dict(
        num_data=60_000, steps=4000, batch=1024, walkers=1024, hidden=(128, 128)
    ),
    "rings": dict(num_data=60_000, steps=4000, batch=1024, walkers=1024, hidden=(128, 128)),
    "mixture_hd": dict(num_data=60_000, steps=3000, batch=1024, walkers=1024, hidden=(256, 256)),
    "two_to_one": dict(num_data=20_000, steps=1500, batch=1024, walkers=1024, hidden=(128, 128)),
}
SAMPLER_KWARGS = {
    "adaptive-flow": {"num_particles": 16, "num_mala_steps": 3},
    "neutra-mala": {"num_steps": 4},  # same number of gradient evaluations as 3 MALA + 1 i-SIR
    "ula": {"num_steps": 4},
    "coopflow": {"num_steps": 4},  # Langevin from fresh flow draws, the flow fitted to them
}


def train(
    name: str, sampler: str, seed: int, steps: int | None = None, lr: float = 1e-3, **ds_kwargs
):
    cfg = CONFIG[name]
    target = load(name, **ds_kwargs)
    data = target.sample(cfg["num_data"], torch.Generator().manual_seed(1000 + seed)).float()
    torch.manual_seed(seed)
    trainer = EBMTrainer(
        MLPEnergy(target.dim, hidden=cfg["hidden"]),
        sampler=sampler,
        num_walkers=cfg["walkers"],
        lr=lr,
        target=target,
        sampler_kwargs=SAMPLER_KWARGS[sampler],
        seed=seed,
    )
    num_steps = steps or cfg["steps"]
    start = time.perf_counter()
    trainer.fit(
        data,
        num_steps=num_steps,
        batch_size=cfg["batch"],
        eval_every=max(1, num_steps // 40),
        progress=False,
    )
    return trainer, target, time.perf_counter() - start


def train_exact_ml(name: str, seed: int, steps: int | None = None, lr: float = 1e-3):
    """The ``train`` reference without negatives: the tilted MLP energy of the trainer
    (``E(x) - log rho(x)``, rho the default flow's base) fitted by exact maximum
    likelihood, log Z by grid quadrature, Adam with the trainer's cosine decay. 2-D data only."""
    cfg = CONFIG[name]
    target = load(name)
    data = target.sample(cfg["num_data"], torch.Generator().manual_seed(1000 + seed)).float()
    torch.manual_seed(seed)
    energy = MLPEnergy(target.dim, hidden=cfg["hidden"])
    rho = torch.distributions.Normal(0.0, base_scale(data))  # the trainer's tilt
    g = torch.linspace(-5, 5, 200)
    grid = torch.cartesian_prod(g, g)
    log_cell, log_rho_grid = 2 * math.log(float(g[1] - g[0])), rho.log_prob(grid).sum(-1)
    optimizer = torch.optim.Adam(energy.parameters(), lr=lr)
    num_steps = steps or cfg["steps"]
    start = time.perf_counter()
    for i in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / num_steps))
        x = data[torch.randint(len(data), (cfg["batch"],))]
        log_z = torch.logsumexp(log_rho_grid - energy(grid), 0) + log_cell
        loss = (energy(x) - rho.log_prob(x).sum(-1)).mean() + log_z
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def potential(x):
        return energy(x) - rho.log_prob(x).sum(-1)

    return potential, target, time.perf_counter() - start


def _fmt(values) -> str:
    return ", ".join(f"{v:.1e}" for v in values)


def bench_line4(seeds, samplers, chain_steps, steps) -> None:
    print("\n## Table 3: line4, mode-weight MSE (EBM vs truth / negatives vs EBM)\n")
    print(
        "| sampler | EBM vs truth per seed | median | negatives vs EBM per seed | median "
        "| paper (ours' method / NT-EBM) | s per run |"
    )
    print("|---|---|---|---|---|---|---|")
    histories = {}
    for sampler in samplers:
        ebm, neg, secs = [], [], []
        for seed in seeds:
            trainer, target, t = train("line4", sampler, seed, steps)
            histories[(sampler, seed)] = trainer.history
            w_model = torch.tensor(trainer.history.last["model_weights"], dtype=torch.float64)
            ebm.append(float((w_model - target.weights).pow(2).mean()))
            chain = trainer.run_sampler(chain_steps)
            w_neg = mode_weights(chain, target).double()
            neg.append(float((w_neg - w_model).pow(2).mean()))
            secs.append(t)
            print(
                f"  [{sampler} seed {seed}: {ebm[-1]:.1e} / {neg[-1]:.1e} in {t:.0f} s]", flush=True
            )
        paper = PAPER["line4"].get(sampler)
        paper_s = f"{paper[0]:.2e} / {paper[1]:.2e}" if paper else "-"
        print(
            f"| {sampler} | {_fmt(ebm)} | {statistics.median(ebm):.1e} | {_fmt(neg)} | "
            f"{statistics.median(neg):.1e} | {paper_s} | {statistics.median(secs):.0f} |",
            flush=True,
        )
    _plot_curves(histories, samplers, seeds, load("line4").weights, "benchmarks/line4_weights.png")


def _plot_curves(histories, samplers, seeds, truth, path) -> None:
    """Mode weights vs step, one panel per sampler, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_ebm.train.plots import plot_mode_weights

    fig, axes = plt.subplots(
        1, len(samplers), figsize=(5 * len(samplers), 4), sharey=True, squeeze=False
    )
    for ax, sampler in zip(axes[0], samplers, strict=True):
        runs = [histories[(sampler, s)] for s in seeds]
        plot_mode_weights(runs, truth=truth, labels=[f"seed {s}" for s in seeds], ax=ax)
        ax.set_title(sampler)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"\ncurves: {path}")


def bench_density(seeds, samplers, steps, datasets=("eight_gaussians", "rings"), lr=1e-3) -> None:
    print("\n## Table 1: median squared log-density error\n")
    print("| data set | sampler | per seed | median | paper | s per run |")
    print("|---|---|---|---|---|---|")
    for name in datasets:
        for sampler in samplers:
            errs, secs = [], []
            for seed in seeds:
                if sampler == "exact-ml":
                    potential, target, t = train_exact_ml(name, seed, steps, lr=lr)
                else:
                    trainer, target, t = train(name, sampler, seed, steps, lr=lr)
                    potential = trainer.model
                errs.append(log_density_error(potential, target))
                secs.append(t)
            paper = PAPER[name].get(sampler, "-")
            print(
                f"| {name} | {sampler} | {', '.join(f'{e:.3g}' for e in errs)} | "
                f"{statistics.median(errs):.3g} | {paper} | {statistics.median(secs):.0f} |",
                flush=True,
            )


def bench_rhat(dims, seeds, samplers, chain_steps, steps) -> None:
    print("\n## Table 2: max R-hat of 128 negative chains, mixture_hd\n")
    print("| d | sampler | per seed | paper (method / NT-EBM) | s per run |")
    print("|---|---|---|---|---|")
    for d in dims:
        for sampler in samplers:
            vals, secs = [], []
            for seed in seeds:
                trainer, target, t = train("mixture_hd", sampler, seed, steps, dim=d)
                chain = trainer.run_sampler(chain_steps)[:, :128]  # (T, 128, d)
                vals.append(max_rhat(chain.transpose(0, 1)))
                secs.append(t)
            paper = PAPER["rhat"].get(d, ("-", "-"))
            print(
                f"| {d} | {sampler} | {', '.join(f'{v:.2f}' for v in vals)} | "
                f"{paper[0]} / {paper[1]} | {statistics.median(secs):.0f} |",
                flush=True,
            )


def bench_fig1(seeds, steps) -> None:
    print("\n## Fig. 1: two_to_one, heavy-mode weight (truth 2/3) during training\n")
    print("| sampler | seed | weight at 25% / 50% / 75% / 100% of training | s |")
    print("|---|---|---|---|")
    samplers = ("adaptive-flow", "ula")
    histories = {}
    for sampler in samplers:
        for seed in seeds:
            trainer, target, t = train("two_to_one", sampler, seed, steps)
            histories[(sampler, seed)] = h = trainer.history
            w = h["model_weights"]
            marks = [w[max(0, len(w) * q // 4 - 1)][1] for q in (1, 2, 3, 4)]
            print(
                f"| {sampler} | {seed} | {' / '.join(f'{m:.3f}' for m in marks)} | {t:.0f} |",
                flush=True,
            )
    _plot_curves(
        histories, samplers, seeds, load("two_to_one").weights, "benchmarks/fig1_two_to_one.png"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["line4", "density", "rhat", "fig1"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="*", default=["adaptive-flow", "neutra-mala", "ula"])
    parser.add_argument("--dims", nargs="*", type=int, default=[16])
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--chain-steps", type=int, default=200)
    parser.add_argument(
        "--datasets", nargs="*", default=["eight_gaussians", "rings"], help="Table 1 data sets"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Table 1: rate of EBM and flow")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "line4" in args.only:
        bench_line4(args.seeds, args.samplers, args.chain_steps, args.steps)
    if "density" in args.only:
        bench_density(args.seeds, args.samplers, args.steps, args.datasets, args.lr)
    if "rhat" in args.only:
        bench_rhat(args.dims, args.seeds, args.samplers, args.chain_steps, args.steps)
    if "fig1" in args.only:
        bench_fig1(args.seeds, args.steps)


if __name__ == "__main__":
    main()
