r"""The ``pyro-ebm`` command.

``pyro-ebm demo`` trains an energy-based model on ``line4`` (four modes of weights 0.1, 0.2, 0.3,
0.4) twice for the same number of steps: with adaptive flow sampling (Grenioux et al. 2023) and
with persistent unadjusted Langevin (ULA-EBM), prints the learnt mode weights of both against the
truth, and writes the histories and plots to an output folder.

``pyro-ebm train`` exposes the trainer's settings (data set, sampler, steps, device, output,
resume); ``--data FILE`` trains on the user's own points instead of a built-in data set (a
``(n, d)`` array in ``.npy``, ``.pt``, ``.csv`` or whitespace-separated ``.txt``; data far from
centred and unit-scaled are standardized by the trainer, see
:func:`pyro_ebm.train.needs_standardization`). It ends with a summary (steps, time,
acceptance, and the mode weights or the NLL measured) and writes ``model.pt``, which
:func:`pyro_ebm.train.load` reads back. ``--nproc N`` trains on N processes (``torchrun``
is launched for you; ``--num-walkers`` and ``--batch-size`` are then per process);
``python -m pyro_ebm train ...`` also runs under a ``torchrun`` of your own. Every option and
path is checked before training starts (a usage error, exit status 2, names the option).

``pyro-ebm sample`` samples the imbalanced two-mode mixture of
:func:`pyro_ebm.datasets.imbalanced_pair` (weights 0.2 / 0.8, modes at -4 and +4 times the
all-ones vector) with the adaptive global-local sampler
(:class:`pyro_ebm.samplers.AdaptiveFlowSampler`: i-SIR with a RealNVP proposal trained online,
plus MALA) and with MALA alone from the same start, and prints the estimated mode weights of both
next to the truth. No files are needed.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


def _cell(w: torch.Tensor, se: torch.Tensor) -> str:
    return f"{w:.3f} (stuck)" if torch.isnan(se) else f"{w:.3f} ± {se:.3f}"


def _switched(draws: torch.Tensor, target) -> str:
    """How many walkers of ``(draws, walkers, dim)`` visited more than one mode."""
    modes = target.mode_index(draws)
    moved = (modes != modes[:1]).any(0)
    return f"{int(moved.sum())}/{moved.numel()}"


def _sample(args: argparse.Namespace) -> int:
    from .datasets import imbalanced_pair
    from .metrics import mode_weights_mcse
    from .samplers import AdaptiveFlowSampler, init_state, mala_step

    torch.manual_seed(args.seed)
    target = imbalanced_pair(args.dim)
    x0 = 2.0 * torch.randn(args.num_walkers, args.dim)  # a broad start: both basins are hit

    start = time.perf_counter()
    sampler = AdaptiveFlowSampler(target.potential)
    run = sampler.run(x0, args.warmup_steps, args.num_samples, progress=not args.quiet)
    t_flow = time.perf_counter() - start
    w_flow, se_flow = mode_weights_mcse(run.samples.transpose(0, 1), target)

    start = time.perf_counter()
    state = init_state(target.potential, x0)
    draws = []
    step = sampler.step_size  # MALA gets the step size the adaptive sampler tuned
    steps = args.warmup_steps + args.num_samples * (1 + sampler.num_local_steps)
    for i in range(steps):
        state, _ = mala_step(state, target.potential, step)
        if i >= args.warmup_steps:
            draws.append(state.x)
    t_mala = time.perf_counter() - start
    w_mala, se_mala = mode_weights_mcse(torch.stack(draws).transpose(0, 1), target)

    truth = target.weights
    print(f"imbalanced_pair(dim={args.dim}): mode weights (light mode at -4, heavy at +4)")
    print(f"{'method':<28}{'light':>16}{'heavy':>16}{'switched':>10}{'seconds':>9}")
    print(f"{'truth':<28}{truth[0]:>16.3f}{truth[1]:>16.3f}")
    for name, w, se, switched, t in [
        ("adaptive flow (i-SIR+MALA)", w_flow, se_flow, _switched(run.samples, target), t_flow),
        ("MALA alone", w_mala, se_mala, _switched(torch.stack(draws), target), t_mala),
    ]:
        cells = [_cell(w[k], se[k]) for k in (0, 1)]
        print(f"{name:<28}{cells[0]:>16}{cells[1]:>16}{switched:>10}{t:>9.1f}")
    print("± : Monte Carlo standard error from the effective sample size. switched: walkers that")
    print("changed mode at least once. Without switches, weights only reflect where walkers began.")
    return 0


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from .train.checkpoint import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), True)
    plt.close(fig)


def _write_outputs(trainer, data, target, out: Path, sampler: str) -> None:
    """History (JSON, CSV), the trained model, and the plots into ``out`` (process 0 only)."""
    if not trainer.is_main_process:
        return
    import matplotlib

    matplotlib.use("Agg")
    from .train.plots import plot_density_2d, plot_mode_weights, plot_negatives

    out.mkdir(parents=True, exist_ok=True)
    trainer.history.to_json(out / "history.json")
    trainer.history.to_csv(out / "history.csv")
    trainer.export(out / "model.pt")
    if getattr(target, "weights", None) is not None:
        ax = plot_mode_weights(
            trainer.history, truth=target.weights, title=f"mode weights ({sampler})"
        )
        _save(ax.figure, out / "mode_weights.png")
    ax = plot_negatives(trainer.walkers, data, title=f"negatives ({sampler}) and data")
    _save(ax.figure, out / "negatives.png")
    if data.shape[1] == 2:
        ax = plot_density_2d(trainer.model, data, title=f"model density ({sampler})")
        _save(ax.figure, out / "density.png")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        hidden = tuple(int(h) for h in text.split(","))
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) < 1:
        raise ValueError(f"--hidden must be positive integers separated by commas, got {text!r}")
    return hidden


def _check_args(args: argparse.Namespace) -> None:
    """Every option and path of ``train`` / ``demo``, before anything is trained."""
    from ._checks import check_int, check_positive
    from .train.checkpoint import check_file_path

    for option, minimum in [
        ("steps", 1),
        ("batch_size", 1),
        ("num_walkers", 1),
        ("num_particles", 2),
        ("num_mala_steps", 0),
        ("num_data", 2),
        ("nproc", 1),
    ]:
        if hasattr(args, option):
            check_int("--" + option.replace("_", "-"), getattr(args, option), minimum)
    check_positive("--lr", args.lr)
    _hidden(args.hidden)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no CUDA device")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    check_file_path("--output", out / "sampler" / "checkpoint.pt")


def _make_trainer(args: argparse.Namespace, sampler: str, target, dim: int):
    from .energy import MLPEnergy
    from .train import EBMTrainer

    hidden = _hidden(args.hidden)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # (under torchrun: a GPU per process)
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    kwargs = None
    if sampler == "adaptive-flow":
        kwargs = {"num_particles": args.num_particles, "num_mala_steps": args.num_mala_steps}
    torch.manual_seed(args.seed)
    return EBMTrainer(
        MLPEnergy(dim, hidden=hidden),
        sampler=sampler,
        num_walkers=args.num_walkers,
        lr=args.lr,
        target=target,
        sampler_kwargs=kwargs,
        seed=args.seed,
        device=device,
    )


def _read_points(path: str | Path) -> torch.Tensor:
    """A ``(n, d)`` float tensor from a ``.npy``, ``.pt``, ``.csv`` or ``.txt`` file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = torch.as_tensor(np.load(path))
    elif suffix == ".pt":
        x = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True))
    elif suffix in (".csv", ".txt"):
        delimiter = "," if suffix == ".csv" else None
        try:
            x = torch.as_tensor(np.loadtxt(path, delimiter=delimiter, ndmin=2))
        except ValueError:  # a header line (column names) first?
            x = torch.as_tensor(np.loadtxt(path, delimiter=delimiter, ndmin=2, skiprows=1))
    else:
        raise ValueError(f"--data must be a .npy, .pt, .csv or .txt file, got {str(path)!r}")
    if x.dim() != 2 or len(x) < 2 or x.is_complex():
        shape = f"{tuple(x.shape)} {x.dtype}"
        raise ValueError(f"--data must hold a real (n, d) array of n >= 2 points, got {shape}")
    return x.to(torch.get_default_dtype())


def _load_data(args: argparse.Namespace):
    from .datasets import load

    if getattr(args, "data", None):
        return None, _read_points(args.data)
    kwargs = {"dim": args.dim} if args.dim is not None else {}
    try:
        target = load(args.dataset, **kwargs)
    except TypeError:
        raise ValueError(f"--dim: the data set {args.dataset!r} has a fixed dimension") from None
    data = target.sample(args.num_data, torch.Generator().manual_seed(10_000 + args.seed))
    return target, data.to(torch.get_default_dtype())


def _weights_header(k: int) -> str:
    modes = "".join(f"{'mode ' + str(i):>8}" for i in range(k))
    return f"{'':<16}{modes}{'MSE':>10}{'seconds':>9}"


def _weights_row(name: str, w, truth, seconds: float | None = None) -> str:
    cells = "".join(f"{v:>8.3f}" for v in w)
    mse = float(((torch.as_tensor(w) - truth) ** 2).mean()) if name != "truth" else None
    tail = f"{mse:>10.1e}{seconds:>9.0f}" if mse is not None else ""
    return f"{name:<16}{cells}{tail}"


def _fit(args, sampler: str, target, data, out: Path):
    trainer = _make_trainer(args, sampler, target, data.shape[1])
    resume = getattr(args, "resume", False)
    if not resume and (out / "checkpoint.pt").is_file() and trainer.is_main_process:
        print(f"{out}/ holds an earlier run: starting afresh (--resume continues it)")
    trainer.fit(
        data,
        num_steps=args.steps,
        batch_size=args.batch_size,
        checkpoint=out / "checkpoint.pt",
        resume=resume,
        progress=not args.quiet,
        force=getattr(args, "force", False),
    )
    _write_outputs(trainer, data, target, out, sampler)
    return trainer


def _summary(trainer, data, target, sampler: str) -> list[str]:
    """What a finished run measured, as lines to print."""
    from .metrics import nll

    rec = trainer.history.last
    dp = trainer.data_parallel
    procs = "" if dp is None else f" on {dp.world_size} processes"
    lines = [f"{sampler}: {trainer.step} steps in {trainer.elapsed:.0f} s{procs}"]
    acc = [f"{k.split('_')[0]} {rec[k]:.2f}" for k in ("global_accept", "local_accept") if k in rec]
    if acc:
        lines.append("acceptance at the end: " + ", ".join(acc))
    if rec.get("nonfinite_negatives"):
        lines.append(
            f"walkers restarted from non-finite points: {rec['nonfinite_negatives']:.1f}"
            " per step at the end"
        )
    if target is not None and "model_weights" in rec:
        truth = target.weights.double()
        lines.append("mode weights of the trained model (grid quadrature or importance sampling)")
        lines.append(_weights_header(len(truth)))
        lines.append(_weights_row("truth", truth.tolist(), truth))
        lines.append(_weights_row(sampler, rec["model_weights"], truth, trainer.elapsed))
    else:
        value, se = nll(trainer.potential, data.to(trainer.dtype), trainer.data_flow, 20_000)
        lines.append(
            f"NLL of the training data: {value:.3f} ± {se:.3f} nats per point (log Z by "
            "importance sampling with the flow)"
        )
    return lines


def _train(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch(args.nproc)
    target, data = _load_data(args)
    out = Path(args.output)
    trainer = _fit(args, args.sampler, target, data, out)
    if not trainer.is_main_process:
        return 0
    if target is None:
        print(f"{args.data}: {len(data)} points in {data.shape[1]} dimensions")
        if trainer.standardization is not None:
            print("trained on the data standardized coordinate-wise (mean and sd saved with it)")
    else:
        print(f"{args.dataset} ({len(data)} points)")
    print("\n".join(_summary(trainer, data, target, args.sampler)))
    print(f"history, model.pt (pyro_ebm.train.load), checkpoint and plots written to {out}/")
    return 0


def _launch(nproc: int) -> int:
    """Run this command again on ``nproc`` processes under ``torchrun``."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={port}", "-m", "pyro_ebm", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env, check=False).returncode


def _demo(args: argparse.Namespace) -> int:
    _check_args(args)
    target, data = _load_data(args)
    out = Path(args.output)
    truth = target.weights.double()
    rows, trainers = [], {}
    for sampler in ("adaptive-flow", "ula"):
        trainer = trainers[sampler] = _fit(args, sampler, target, data, out / sampler)
        rows.append(
            _weights_row(sampler, trainer.history.last["model_weights"], truth, trainer.elapsed)
        )
    from .train.plots import plot_runs

    _save(plot_runs(trainers, data, truth), out / "comparison.png")
    k = len(truth)
    print(f"{args.dataset} ({args.num_data} points), {args.steps} training steps per sampler:")
    print("mode weights of the trained EBM (grid quadrature), MSE against the truth")
    print(_weights_header(k))
    print(_weights_row("truth", truth.tolist(), truth))
    print("\n".join(rows))
    print(f"histories, models and plots written to {out}/ (comparison.png: both samplers)")
    return 0


def _add_training_args(p: argparse.ArgumentParser, steps: int, output: str) -> None:
    from .datasets import available

    p.add_argument("--dataset", default="line4", choices=available())
    p.add_argument("--dim", type=int, default=None, help="dimension (mixture_hd, imbalanced_pair)")
    p.add_argument("--num-data", type=int, default=60_000, help="data points (default 60000)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=1024, help="data points per step")
    p.add_argument("--num-walkers", type=int, default=1024, help="persistent negatives")
    p.add_argument("--num-particles", type=int, default=16, help="i-SIR particles")
    p.add_argument("--num-mala-steps", type=int, default=3, help="MALA steps per i-SIR step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--hidden",
        default="128,128",
        help="hidden widths of the MLP energy, comma-separated (default 128,128)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default=output, help=f"output folder (default {output})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-ebm`` console script."""
    from .train.loop import TrainingError
    from .train.negatives import SAMPLERS

    description = "Train and sample energy-based models with pyro_ebm."
    parser = argparse.ArgumentParser(prog="pyro-ebm", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train an EBM on line4 with adaptive flow vs ULA sampling")
    _add_training_args(demo, steps=2500, output="pyro-ebm-demo")
    train = sub.add_parser("train", help="train an EBM on a built-in data set or your points")
    _add_training_args(train, steps=4000, output="pyro-ebm-run")
    train.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="train on the points of FILE, an (n, d) array (.npy, .pt, .csv, .txt), instead "
        "of --dataset",
    )
    train.add_argument(
        "--sampler",
        default="adaptive-flow",
        choices=sorted(SAMPLERS),
        help="how the negatives are drawn (default adaptive-flow: i-SIR with a flow + MALA)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT/checkpoint.pt if it exists (with the same --steps, exactly "
        "where it stopped; more steps stretch the learning-rate schedule)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="with --resume, continue even when the checkpoint was written with other settings "
        "or data (refused otherwise, naming what differs)",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train on N processes (torchrun is launched; --num-walkers and --batch-size are "
        "per process)",
    )
    sample = sub.add_parser("sample", help="sample an imbalanced mixture with adaptive flow MCMC")
    sample.add_argument("--dim", type=int, default=16, help="dimension of the mixture (default 16)")
    sample.add_argument("--num-walkers", type=int, default=128)
    sample.add_argument("--warmup-steps", type=int, default=100)
    sample.add_argument("--num-samples", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    commands = {"demo": _demo, "train": _train, "sample": _sample}
    try:
        return commands[args.command](args)
    except ValueError as e:  # bad option values: argparse's usage message and exit status 2
        parser.error(str(e))
    except TrainingError as e:  # (the checkpoint holds the run up to there)
        print(f"pyro-ebm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "train":
            print(
                f"\ninterrupted: the checkpoint under {args.output}/ holds the last finished "
                "step; run the same command with --resume to continue",
                file=sys.stderr,
            )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
