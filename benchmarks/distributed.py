"""Data-parallel EBM training on 1 and 2 processes (CPU, gloo, one thread each).

For each case and number of processes, ``torchrun`` (``python -m torch.distributed.run``) runs
this script's worker, which trains :class:`pyro_ebm.train.EBMTrainer` with the paper-table
settings (adaptive-flow sampler, 16 particles, 3 MALA steps; ``num_walkers`` and
``batch_size`` per process) and prints one JSON line: training seconds (the trainer's
``elapsed``: the steps without the evaluations), steps per second, walker updates per second
(processes x walkers x (1 i-SIR + 3 MALA moves) x steps / seconds), and the quality: the final
mode-weight MSE (``line4``) or the max R-hat of 128 negative chains over 200 further sampler
steps (``mixture_hd``, 16-D). The table reports medians over seeds and the ratio of 2 processes
to 1.

``--profile`` measures where the time of 2 processes goes instead (``line4``, 100 steps): the
step time of one process alone (mean and sd), two independent single-process runs side by side
(what sharing the machine costs before any communication), and 2 processes with the seconds
they spend in collectives (waiting for each other included).

Usage::

    python benchmarks/distributed.py --cases line4 --seeds 0 1 2
    python benchmarks/distributed.py --cases mixture_hd --seeds 0 --steps 2000
    python benchmarks/distributed.py --profile
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys

CASES = {
    "line4": dict(dataset="line4", kwargs={}, steps=4000, hidden=(128, 128)),
    "mixture_hd": dict(dataset="mixture_hd", kwargs={"dim": 16}, steps=2000, hidden=(256, 256)),
}
MOVES_PER_STEP = 1 + 3  # one i-SIR move and three MALA moves per training step


def _timed(obj, name: str, times: list) -> None:
    """Wrap ``obj.name`` so that each call's seconds are appended to ``times``."""
    import time

    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return out

    setattr(obj, name, timed)


def worker(case: str, seed: int, steps: int, profile: bool = False) -> None:
    import statistics

    import torch

    from pyro_ebm import MLPEnergy
    from pyro_ebm.datasets import load
    from pyro_ebm.metrics import rhat
    from pyro_ebm.train import EBMTrainer
    from pyro_ebm.train.distributed import DataParallel

    torch.set_num_threads(1)
    cfg = CASES[case]
    target = load(cfg["dataset"], **cfg["kwargs"])
    data = target.sample(60_000, torch.Generator().manual_seed(1000 + seed)).float()
    torch.manual_seed(seed)
    trainer = EBMTrainer(
        MLPEnergy(target.dim, hidden=cfg["hidden"]),
        num_walkers=1024,
        target=target,
        sampler_kwargs={"num_particles": 16, "num_mala_steps": 3},
        seed=seed,
    )
    step_times, collective_times = [], []
    if profile:  # (every collective of a step goes through all_sum)
        _timed(trainer, "_train_step", step_times)
        _timed(DataParallel, "all_sum", collective_times)
    every = steps if profile else None  # (profiles: one record, at the end)
    trainer.fit(data, num_steps=steps, batch_size=1024, progress=False, eval_every=every)
    dp = trainer.data_parallel
    world = 1 if dp is None else dp.world_size
    out = {
        "case": case,
        "seed": seed,
        "processes": world,
        "steps": steps,
        "seconds": trainer.elapsed,
        "steps_per_s": steps / trainer.elapsed,
        "walker_updates_per_s": world * 1024 * MOVES_PER_STEP * steps / trainer.elapsed,
    }
    if profile:
        ms = [1e3 * t for t in step_times[5:]]  # (the first steps warm up)
        out.update(
            step_ms_mean=statistics.fmean(ms),
            step_ms_sd=statistics.stdev(ms),
            collective_s=sum(collective_times),
        )
    elif case == "line4":
        out["mse"] = trainer.history.last["model_mse"]
    else:
        chains = trainer.run_sampler(200)[:, :128]  # (draws, chains, dim) of this process
        out["rhat"] = float(rhat(chains.transpose(0, 1)).max())
    if trainer.is_main_process:
        print("RESULT " + json.dumps(out), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(case: str, seed: int, steps: int, processes: int, profile: bool = False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={_free_port()}",
        os.path.abspath(__file__),
        "--worker",
        case,
        str(seed),
        str(steps),
        *(["profile"] if profile else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"no result from {' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}")


def _profile(steps: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    print(f"\n## line4, {steps} steps: where the time of 2 processes goes\n")
    print("| run | steps/s | step ms (mean, sd) | s in collectives |")
    print("|---|---|---|---|")
    alone = run("line4", 0, steps, 1, profile=True)
    with ThreadPoolExecutor(2) as pool:  # two independent runs at once
        pair = list(pool.map(lambda seed: run("line4", seed, steps, 1, profile=True), (0, 1)))
    together = run("line4", 0, steps, 2, profile=True)
    rows = [("1 process alone", alone)]
    rows += [(f"1 process beside another ({k + 1})", r) for k, r in enumerate(pair)]
    rows += [("2 processes, data parallel (process 0)", together)]
    for name, r in rows:
        print(
            f"| {name} | {r['steps_per_s']:.2f} | {r['step_ms_mean']:.1f}, {r['step_ms_sd']:.1f} "
            f"| {r['collective_s']:.2f} |",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), profile=len(sys.argv) > 5)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["line4"], choices=sorted(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the case's")
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="where 2 processes' time goes")
    args = parser.parse_args()
    if args.profile:
        _profile(args.steps or 100)
        return
    for case in args.cases:
        steps = args.steps or CASES[case]["steps"]
        quality = "mse" if case == "line4" else "rhat"
        print(f"\n## {case}, {steps} steps, seeds {args.seeds}\n", flush=True)
        print(
            f"| processes | steps/s | walker updates/s | {quality} per seed | median {quality} "
            "| s per run |"
        )
        print("|---|---|---|---|---|---|")
        rows = {}
        for n in args.processes:
            results = [run(case, seed, steps, n) for seed in args.seeds]
            rows[n] = {
                k: statistics.median(r[k] for r in results)
                for k in ("steps_per_s", "walker_updates_per_s", quality, "seconds")
            }
            per_seed = ", ".join(f"{r[quality]:.2g}" for r in results)
            row = rows[n]
            print(
                f"| {n} | {row['steps_per_s']:.2f} | {row['walker_updates_per_s']:.0f} | "
                f"{per_seed} | {row[quality]:.2g} | {row['seconds']:.0f} |",
                flush=True,
            )
        if 1 in rows:
            for n in rows:
                if n != 1:
                    ratio = rows[n]["walker_updates_per_s"] / rows[1]["walker_updates_per_s"]
                    print(f"\n{n} processes / 1: walker updates per second x{ratio:.2f}")


if __name__ == "__main__":
    main()
