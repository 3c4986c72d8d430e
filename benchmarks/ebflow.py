"""EBFlow benchmarks (Chao et al. 2023, arXiv 2305.15267).

1. Time per training step (loss + backward + Adam) of the FC EBFlow (Dense, smooth leaky ReLU,
   Dense) for each objective at D = 784 and D = 3072, batch 100, synthetic data, one thread; the
   ratios ml / objective are measured in one run (medians over repeats, objectives interleaved).

Run from the repository root::

    python benchmarks/ebflow.py --dims 784 3072 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_ebm.ebflow import fc_ebflow
from pyro_ebm.ebflow.objectives import OBJECTIVES

CPU_REFERENCE = {
    784: {"ssm": 1.5, "dsm": 3.2, "fdssm": 3.2},
    3072: {"ssm": 5.4, "dsm": 9.0, "fdssm": 11.0},
}


def step_time(model, opt, loss_fn, x, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def bench_timing(dims, repeats: int, steps: int) -> None:
    print("\n## 1. Time per training step, FC EBFlow, batch 100 (ratio: ml time / objective)\n")
    print("| D | objective | median ms/step | ratio to ml | CPU reference ratio |")
    print("|---|---|---|---|---|")
    for dim in dims:
        torch.manual_seed(0)
        model = fc_ebflow((dim,))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(100, dim)
        names = list(OBJECTIVES)
        times = {n: [] for n in names}
        for n in names:  # warm-up
            step_time(model, opt, OBJECTIVES[n], x, 1)
        for _ in range(repeats):
            for n in names:
                times[n].append(step_time(model, opt, OBJECTIVES[n], x, steps))
        ml = statistics.median(times["ml"])
        for n in names:
            t = statistics.median(times[n])
            ref = CPU_REFERENCE.get(dim, {}).get(n, "-")
            print(f"| {dim} | {n} | {1e3 * t:.1f} | {ml / t:.2f} | {ref} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", nargs="*", type=int, default=[784, 3072])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_timing(args.dims, args.repeats, args.steps)


if __name__ == "__main__":
    main()
