"""The density-depth check (issue 20, RESULTS section 16): every kernel of ``pyro_ebm.infer`` at
its defaults on funnels and on posteriors without one, with the warnings each run gave.

Each line: target, kernel, seed, ``diagnostics()["density depth"]``, the flow checks (the flow's
k-hat, the score check at the warmup draws and at the run's draws), the warnings that fired
(K the k-hat's, S the score check's at the warmup draws, D at the run's draws, Z the density
depth's, T a stuck chain, R draws that do not look converged; M: the descent ended at a mode,
``DepthCheck.at_mode``), the run's seconds and the depth check's alone.

Run from the repository root (float64, one thread; 500 warmup steps)::

    python benchmarks/depth.py imh,isir,hmc,nuts,chees,adaptive,mala es_c,hn_c 0 1 2
    C=16 N=100 python benchmarks/depth.py imh es_c 0 1 2 3 4 5 6 7 8 9
    python benchmarks/depth.py --khat imh es_c 2 4   # the flow's k-hat from up to 2^20 draws

``C`` chains (default 4) of ``N`` draws (default 500).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernels  # noqa: E402
from test_flow_check import eight_schools_centered  # noqa: E402

from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered  # noqa: E402
from pyro_ebm.infer import (  # noqa: E402
    MALA,
    MCMC,
    AdaptiveFlowMCMC,
    ChEESHMC,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
)
from pyro_ebm.infer.base import _thinned  # noqa: E402
from pyro_ebm.metrics import density_depth, flow_importance_diagnostic  # noqa: E402
from pyro_ebm.samplers import uncounted  # noqa: E402

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

KERNELS = {
    "imh": FlowIMH,
    "isir": FlowISIR,
    "hmc": FlowHMC,
    "nuts": FlowNUTS,
    "chees": ChEESHMC,
    "adaptive": AdaptiveFlowMCMC,
    "mala": MALA,
}


def neal(dim: int):
    """Neal's funnel: v ~ N(0, 3), dim - 1 coordinates x_i ~ N(0, e^{v/2})."""

    def model():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(torch.zeros(dim - 1), torch.exp(v / 2)).to_event(1))

    return model


def targets() -> dict:
    """name -> (model, args)."""
    g = torch.Generator().manual_seed(1234)
    groups = 15
    effects = 0.7 * torch.randn(groups, generator=g)
    y2 = effects[:, None] + 2.0 * torch.randn(groups, 2, generator=g)  # 2 observations a group

    def hier_normal_centred(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("g", groups):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta[:, None], 2.0).to_event(1), obs=y)

    def hier_normal_noncentred(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("g", groups):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal((mu + tau * z)[:, None], 2.0).to_event(1), obs=y)

    n_groups, n = 10, 10
    a_true = 0.6 * torch.randn(n_groups, generator=g)
    x = torch.randn(n_groups, n, generator=g)
    y01 = torch.bernoulli(torch.sigmoid(a_true[:, None] + x), generator=g)
    y200 = effects[:, None] + 2.0 * torch.randn(groups, 200, generator=g)  # well identified

    def hier_logistic_centred(x, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.5))
        tau = pyro.sample("tau", dist.HalfCauchy(2.5))
        b = pyro.sample("b", dist.Normal(0.0, 2.5))
        with pyro.plate("g", n_groups):
            a = pyro.sample("a", dist.Normal(mu, tau))
            pyro.sample("y", dist.Bernoulli(logits=a[:, None] + b * x).to_event(1), obs=y)

    def spike():  # 0.5 N(0, 0.01^2) + 0.5 N(0, 1) in each of 3 coordinates
        x = pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        narrow = dist.Normal(0.0, 0.01).log_prob(x)
        wide = dist.Normal(0.0, 1.0).log_prob(x)
        pyro.factor("spike", (torch.logaddexp(narrow, wide) - wide).sum(-1))

    def cauchy10():
        pyro.sample("x", dist.Cauchy(torch.zeros(10), 1.0).to_event(1))

    def mvt10():
        pyro.sample(
            "x", dist.MultivariateStudentT(torch.tensor(1.0), torch.zeros(10), torch.eye(10))
        )

    def scales():
        pyro.sample("x", dist.Normal(torch.zeros(5), torch.logspace(-2, 2, 5)).to_event(1))

    def banana():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a**2, 0.5))

    rows, predictors = 50, 10  # a horseshoe regression: 3 signals, 7 null coefficients
    xs = torch.randn(rows, predictors, generator=g)
    signal = torch.zeros(predictors)
    signal[:3] = torch.tensor([2.0, -1.5, 1.0])
    ys = xs @ signal + torch.randn(rows, generator=g)

    def horseshoe(centred: bool):
        def model(x, y):
            tau = pyro.sample("tau", dist.HalfCauchy(1.0))
            sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
            with pyro.plate("p", predictors):
                lam = pyro.sample("lam", dist.HalfCauchy(1.0))
                if centred:
                    beta = pyro.sample("beta", dist.Normal(0.0, tau * lam))
                else:
                    beta = tau * lam * pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(x @ beta, sigma).to_event(1), obs=y)

        return model

    eight = tuple(EIGHT_SCHOOLS_DATA.values())
    return {
        **kernels._default_targets(),
        **kernels._unseen_targets(),
        "es_c": (eight_schools_centered, eight),
        "es_n": (eight_schools_noncentered, eight),
        "hn_c": (hier_normal_centred, (y2,)),
        "hn_n": (hier_normal_noncentred, (y2,)),
        "hn_c_inf": (hier_normal_centred, (y200,)),
        "hl_c": (hier_logistic_centred, (x, y01)),
        "funnel3": (neal(3), ()),
        "funnel6": (neal(6), ()),
        "funnel10": (neal(10), ()),
        "hs_c": (horseshoe(True), (xs, ys)),
        "hs_n": (horseshoe(False), (xs, ys)),
        "spike": (spike, ()),
        "cauchy10": (cauchy10, ()),
        "mvt10": (mvt10, ()),
        "scales": (scales, ()),
        "banana": (banana, ()),
    }


class _Messages(logging.Handler):
    """Keeps the pyro_ebm loggers' messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


FLAGS = (
    ("K", "Pareto k-hat as an"),
    ("S", "warmup draws the flow's score"),
    ("S", "warmup draws also"),
    ("D", "of the draws the flow's score"),
    ("D", "of the draws also"),
    ("Z", "far higher density"),
    ("T", "stopped moving"),
    ("R", "may not have converged"),
)


def run(kind: str, name: str, seed: int, chains: int, draws: int):
    model, args = targets()[name]
    pyro.set_rng_seed(seed)
    kernel = KERNELS[kind](model)
    mcmc = MCMC(
        kernel, num_samples=draws, warmup_steps=500, num_chains=chains, disable_progbar=True
    )
    start = time.perf_counter()
    mcmc.run(*args)
    seconds = time.perf_counter() - start
    start = time.perf_counter()  # the check alone, made again at the same draws
    with uncounted(kernel.target.potential):
        density_depth(kernel._checks_potential(), _thinned(mcmc._flat))
    return kernel, seconds, time.perf_counter() - start


def main() -> None:
    warnings.filterwarnings("ignore")
    argv = sys.argv[1:]
    khat = argv[0] == "--khat"
    kinds, names, seeds = argv[khat].split(","), argv[khat + 1].split(","), argv[khat + 2 :]
    chains, draws = int(os.environ.get("C", 4)), int(os.environ.get("N", 500))
    handler = _Messages()
    log = logging.getLogger("pyro_ebm")
    log.addHandler(handler)
    log.propagate = False
    for name in names:
        for kind in kinds:
            for seed in map(int, seeds):
                handler.messages.clear()
                kernel, seconds, check = run(kind, name, seed, chains, draws)
                if khat:  # the frozen flow's k-hat from 4096 to 2^20 draws of it
                    proposal, potential = kernel._checked[0], kernel.target.potential
                    with uncounted(potential), torch.no_grad():
                        reads = [
                            flow_importance_diagnostic(proposal, potential, n, 32768).khat
                            for n in (4096, 32768, 262144, 1048576)
                        ]
                    print(name, kind, seed, " ".join(f"{k:.2f}" for k in reads), flush=True)
                    continue
                flags = {w for w, s in FLAGS if any(s in m for m in handler.messages)}
                if kernel.depth_check.at_mode:
                    flags.add("M")
                checks = (kernel.flow_check, kernel.flow_score_check, kernel.flow_draws_check)
                read = " ".join("-" if c is None else f"{c.khat:.2f}" for c in checks)
                print(
                    name,
                    kind,
                    seed,
                    f"depth {kernel.depth_check.depth:.2f}",
                    f"k {read}",
                    "".join(sorted(flags)) or "-",
                    f"{seconds:.0f}s",
                    f"check {check:.2f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
