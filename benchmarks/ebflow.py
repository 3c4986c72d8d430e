"""EBFlow benchmarks (Chao et al. 2023, arXiv 2305.15267).

1. Time per training step (loss + backward + Adam) of the FC EBFlow (Dense, smooth leaky ReLU,
   Dense) for each objective at D = 784 and D = 3072, batch 100, synthetic data, one thread; the
   ratios ml / objective are measured in one run (medians over repeats, objectives interleaved).
   ``ssm`` is the variance-reduced form the trainer uses; ``ssm, no VR`` the plain one.

2. Test NLL (nats per image, [0, 256) scale) of the FC EBFlow (``--model cnn``: the CNN one)
   after the same number of steps
   for each objective, with MaP, plus SSM without MaP: on scikit-learn's digits (1400 train /
   397 test) and, with ``--mnist DIR`` (a folder with ``t10k-images-idx3-ubyte[.gz]``), on the
   10k MNIST test images split 8k train / 2k test. With ``--validation F`` the last fraction F
   of the training examples is held out and each run keeps the EMA weights of its best
   validation NLL (evaluated every ``--eval-every`` steps), the paper's protocol (its code
   reports the test NLL of the best-validation checkpoint).

3. ``--only from-ml``: does score matching keep the maximum-likelihood solution? The EBFlow
   (``--model``) is trained by ml (with validation), then each score-matching objective
   (``--objectives``) continues from the ml EMA weights at a small constant rate; the validation
   NLL along the way shows whether the objective's own optimum in this model family has the ML
   solution's likelihood (MNIST only).

5. ``--only diagnose``: why score matching stays behind ml on MNIST (``--mnist``,
   ``--validation``). (a) Each objective is trained to the end on the training split; on the
   held-out split the table gives each model's NLL and the values of the SSM-VR and DSM
   (sigma 1) objectives, so one sees which model each objective prefers. (b) A well-specified
   control: the ml model of (a) is the teacher; ml and ssm are trained on ``--teacher-sizes``
   samples from it (its logit space, no whitening; 1000 validation samples, best weights kept)
   and compared with the teacher's own NLL on 2000 test samples.
   ``--only quantised-control``: the same teacher (trained again, the same seed), its samples
   taken to pixels and quantised to ``uint8`` images like MNIST's, then ml and ssm trained on
   them as on MNIST (dequantisation, logit): the teacher's smooth density plus the edges that
   quantisation and uniform dequantisation give each pixel in the logit space.

4. ``--only tabular``: the FC EBFlow on float vectors a user might bring (scikit-learn's
   breast cancer, 30-D, and wine, 13-D, raw and standardised, 80/20 split; an 8-D Gaussian with
   standard deviations 0.01-3.2 along random axes), each objective with the trainer's default
   whitening rule and with ``whiten=False``, 2000 steps; the Gaussian fit's test NLL for scale.

Run from the repository root::

    python benchmarks/ebflow.py --only timing --dims 784 3072 --repeats 5
    python benchmarks/ebflow.py --only timing --device cuda --timing-steps 50  # on a GPU
    python benchmarks/ebflow.py --only nll --steps 6000 --mnist ../shared/data/mnist
    python benchmarks/ebflow.py --only nll --steps 20000 --mnist ../shared/data/mnist \
        --no-digits --objectives ml ssm
    python benchmarks/ebflow.py --only nll --steps 6000 --mnist ../shared/data/mnist \
        --validation 0.125
    python benchmarks/ebflow.py --only from-ml --steps 6000 --mnist ../shared/data/mnist \
        --validation 0.125
    python benchmarks/ebflow.py --only nll --steps 3000 --model cnn --validation 0.125 \
        --objectives ml ssm dsm
    python benchmarks/ebflow.py --only tabular
    python benchmarks/ebflow.py --only diagnose --steps 6000 --mnist ../shared/data/mnist \
        --validation 0.125 --objectives ml ssm dsm
    python benchmarks/ebflow.py --only quantised-control --steps 6000 \
        --mnist ../shared/data/mnist --validation 0.125 --teacher-sizes 7000
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import torch

from pyro_ebm.ebflow import EBFlowTrainer, cnn_ebflow, fc_ebflow
from pyro_ebm.ebflow.data import load_digits, read_idx
from pyro_ebm.ebflow.objectives import OBJECTIVES
from pyro_ebm.ebflow.trainer import make_adam

PAPER_MNIST_FC = {"ml": 1092.4, "ssm": 1092.8, "dsm": 1099.2, "fdssm": 1104.1, "ssm, no MaP": 1757}

CPU_REFERENCE = {
    784: {"ssm": 1.5, "dsm": 3.2, "fdssm": 3.2},
    3072: {"ssm": 5.4, "dsm": 9.0, "fdssm": 11.0},
}


#: the paper's speed-ups over ml (MNIST-FC, D = 784, on a GPU), as quoted in issue 5
PAPER_GPU_784 = {"ssm": 4.1, "dsm": 8.3, "fdssm": 16.3}


def step_time(model, opt, loss_fn, x, steps: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps


def bench_timing(dims, repeats: int, steps: int, device: str = "cpu") -> None:
    gpu = torch.device(device).type == "cuda"
    ref_name = "paper (GPU) ratio" if gpu else "CPU reference ratio"
    print("\n## 1. Time per training step, FC EBFlow, batch 100 (ratio: ml time / objective)\n")
    print(f"| D | objective | median ms/step | ratio to ml | {ref_name} |")
    print("|---|---|---|---|---|")
    for dim in dims:
        torch.manual_seed(0)
        model = fc_ebflow((dim,)).to(device)
        opt = make_adam(model.parameters(), lr=1e-4)  # the trainer's optimizer
        x = torch.randn(100, dim, device=device)
        losses = dict(OBJECTIVES)
        losses["ssm, no VR"] = partial(OBJECTIVES["ssm"], variance_reduction=False)
        times = {n: [] for n in losses}
        for loss in losses.values():  # warm-up
            step_time(model, opt, loss, x, 1)
        for _ in range(repeats):
            for n, loss in losses.items():
                times[n].append(step_time(model, opt, loss, x, steps))
        ml = statistics.median(times["ml"])
        for n in losses:
            t = statistics.median(times[n])
            refs = ({784: PAPER_GPU_784} if gpu else CPU_REFERENCE).get(dim, {})
            ref = refs.get(n, "-")
            print(f"| {dim} | {n} | {1e3 * t:.1f} | {ml / t:.2f} | {ref} |", flush=True)


def _mnist(folder: str) -> torch.Tensor:
    from pathlib import Path

    for name in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"):
        if (Path(folder) / name).is_file():
            return read_idx(Path(folder) / name).reshape(10_000, -1)
    raise FileNotFoundError(f"no t10k-images-idx3-ubyte[.gz] in {folder}")


def _model(kind: str, dim: int):
    """The FC EBFlow, or the CNN one on square one-channel images of ``dim`` pixels."""
    if kind == "fc":
        return fc_ebflow((dim,))
    side = math.isqrt(dim)
    return cnn_ebflow((side, side))


def bench_nll(
    datasets: dict,
    steps: int,
    seed: int,
    objectives,
    trainer_kwargs: dict,
    eval_every: int,
    model: str = "fc",
) -> None:
    print(f"\n## 2. Test NLL (nats per image) after {steps} steps, {model} EBFlow, batch 100\n")
    print("| data | objective | test NLL | bits/dim | ratio to ml | best step | s | paper |")
    print("|---|---|---|---|---|---|---|---|")
    runs = {
        "ml": ("ml", True),
        "ssm": ("ssm", True),
        "dsm": ("dsm", True),
        "fdssm": ("fdssm", True),
        "ssm-nomap": ("ssm", False),
    }
    runs = [runs[name] for name in objectives]
    for name, (train, val, test) in datasets.items():
        ml = None
        for objective, use_map in runs:
            label = objective if use_map else f"{objective}, no MaP"
            trainer = EBFlowTrainer(
                _model(model, train.shape[1]),
                objective=objective,
                map=use_map,
                seed=seed,
                **trainer_kwargs,
            )
            start = time.perf_counter()
            trainer.fit(train, steps, 100, progress=False, validation=val, eval_every=eval_every)
            t = time.perf_counter() - start
            best = min(trainer.validation_nll, key=lambda r: r[1])[0] if val is not None else steps
            torch.manual_seed(1234)  # the same dequantisation noise for every model
            nll = trainer.nll(test)
            ml = nll if objective == "ml" else ml
            paper = PAPER_MNIST_FC.get(label, "-") if name == "mnist" else "-"
            bpd = nll / (test.shape[1] * math.log(2.0))
            ratio = "-" if ml is None else f"{nll / ml:.3f}"
            cells = [name, label, f"{nll:.1f}", f"{bpd:.3f}", ratio, best, f"{t:.0f}", paper]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def bench_from_ml(
    train,
    val,
    test,
    steps: int,
    sm_steps: int,
    sm_lr: float,
    seed: int,
    model: str = "fc",
    objectives=("ssm", "dsm", "fdssm"),
) -> None:
    import copy

    print(f"\n## 3. Score matching continued from the ML solution ({sm_steps} steps, lr {sm_lr})\n")
    ml = EBFlowTrainer(_model(model, train.shape[1]), objective="ml", seed=seed)
    ml.fit(train, steps, 100, progress=False, validation=val, eval_every=steps // 6)
    best = min(v for _, v in ml.validation_nll)
    torch.manual_seed(1234)
    print(f"ml, {steps} steps: best validation NLL {best:.1f}, test NLL {ml.nll(test):.1f}\n")
    print(
        "| objective | validation NLL every",
        sm_steps // 6,
        "steps | mean training loss over each stretch | test NLL at the end |",
    )
    print("|---|---|---|---|")
    for objective in objectives:
        sm = EBFlowTrainer(
            copy.deepcopy(ml.ema_model), objective, lr=sm_lr, lr_schedule="constant", seed=seed
        )
        trajectory, losses, stretch = [], [], sm_steps // 6
        for k in range(1, 7):  # constant rate: six fits in a row are one run
            sm.fit(train, k * stretch, 100, progress=False, eval_every=stretch)
            losses.append(f"{sm.history.last['loss']:.4g}")  # (the mean over the stretch)
            with torch.random.fork_rng():
                torch.manual_seed(0)  # the dequantisation draw of the trainer's validation
                trajectory.append(f"{sm.nll(val):.1f}")
        trajectory, losses = " ".join(trajectory), " ".join(losses)
        torch.manual_seed(1234)
        print(f"| {objective} | {trajectory} | {losses} | {sm.nll(test):.1f} |", flush=True)


def _heldout_objectives(trainer: EBFlowTrainer, data: torch.Tensor, draws: int = 4) -> dict:
    """Mean SSM-VR and DSM (sigma 1) objective values of the trainer's EMA model on ``data``,
    pre-processed as in training, over ``draws`` draws of the dequantisation and the noise
    (a fixed random stream, so every model sees the same draws)."""
    model, totals = trainer.ema_model, {"ssm": 0.0, "dsm": 0.0}
    fns = {"ssm": OBJECTIVES["ssm"], "dsm": partial(OBJECTIVES["dsm"], sigma=1.0)}
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for _ in range(draws):
            for chunk in data.split(250):
                x = trainer._prepare(chunk)
                for name, fn in fns.items():
                    totals[name] += float(fn(model, x).detach()) * len(chunk)
    return {k: v / (draws * len(data)) for k, v in totals.items()}


def _fit(train, objective: str, steps: int, seed: int) -> EBFlowTrainer:
    """The FC EBFlow trained by ``objective`` for ``steps`` steps, no selection (the same seed
    gives the same weights on a CPU: section 5c's teacher is 5a's ml model)."""
    trainer = EBFlowTrainer(fc_ebflow((train.shape[1],)), objective=objective, seed=seed)
    trainer.fit(train, steps, 100, progress=False)
    return trainer


def _teacher_samples(teacher: EBFlowTrainer, n: int) -> torch.Tensor:
    """``n`` samples of the teacher's EMA model in its (logit) space, a fixed stream."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(99)
        return teacher.ema_model.eval().sample(n)


def _ml_and_ssm(data, steps: int, seed: int, **trainer_kwargs) -> list[tuple]:
    """``(objective, test NLL, best step, seconds)`` of ml and ssm trained on ``data[3000:]``,
    with ``data[2000:3000]`` held out (best weights kept) and ``data[:2000]`` as the test set."""
    test, held_out, samples = data[:2000], data[2000:3000], data[3000:]
    rows = []
    for objective in ("ml", "ssm"):
        trainer = EBFlowTrainer(
            fc_ebflow((data.shape[1],)), objective=objective, seed=seed, **trainer_kwargs
        )
        start = time.perf_counter()
        trainer.fit(samples, steps, 100, progress=False, validation=held_out, eval_every=500)
        t = time.perf_counter() - start
        best = min(trainer.validation_nll, key=lambda r: r[1])[0]
        torch.manual_seed(1234)  # the dequantisation draw (images)
        rows.append((objective, trainer.nll(test), best, t))
    return rows


def bench_diagnose(train, val, steps: int, seed: int, objectives, teacher_sizes) -> None:
    print(f"\n## 5a. Held-out NLL and objective values after {steps} steps (no selection)\n")
    print("| trained by | train NLL (first 1000) | held-out NLL | held-out SSM-VR | held-out DSM |")
    print("|---|---|---|---|---|")
    trainers = {}
    for objective in objectives:
        trainer = trainers[objective] = _fit(train, objective, steps, seed)
        nlls = []
        for data in (train[:1000], val):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                nlls.append(trainer.nll(data))
        values = _heldout_objectives(trainer, val)
        cells = [objective, *(f"{v:.1f}" for v in nlls), f"{values['ssm']:.2f}"]
        print("| " + " | ".join(cells) + f" | {values['dsm']:.2f} |", flush=True)
    if "ml" not in trainers:
        return
    teacher = trainers["ml"]
    print(f"\n## 5b. Well-specified control: samples of the ml model, {steps} steps\n")
    print(
        "| training samples | objective | test NLL | teacher's NLL | ratio to teacher "
        "| ratio to ml | best step | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in teacher_sizes:
        y = _teacher_samples(teacher, n + 3000)
        with torch.no_grad():
            truth = float(-teacher.ema_model.log_prob(y[:2000]).mean())
        rows = _ml_and_ssm(y, steps, seed, whiten=False)
        for objective, nll, best, t in rows:
            cells = [n, objective, f"{nll:.1f}", f"{truth:.1f}", f"{nll / truth:.3f}"]
            cells += [f"{nll / rows[0][1]:.3f}", best, f"{t:.0f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def bench_quantised_control(train, steps: int, seed: int, teacher_sizes) -> None:
    teacher = _fit(train, "ml", steps, seed)
    print(f"\n## 5c. The teacher's samples as uint8 images, {steps} steps\n")
    print("| training images | objective | test NLL | ratio to ml | best step | s |")
    print("|---|---|---|---|---|---|")
    for n in teacher_sizes:
        y = _teacher_samples(teacher, n + 3000)
        images = (256.0 * teacher._logit.inverse(y)).floor().clamp(0, 255).to(torch.uint8)
        rows = _ml_and_ssm(images, steps, seed)
        for objective, nll, best, t in rows:
            cells = [n, objective, f"{nll:.1f}", f"{nll / rows[0][1]:.3f}", best, f"{t:.0f}"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def _tabular_sets() -> dict:
    from sklearn.datasets import load_breast_cancer, load_wine

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    a = q * torch.logspace(-2, 0.5, 8)
    sets = {
        "gaussian 8-D": (
            torch.randn(4000, 8, generator=g) @ a.T + 1.0,
            torch.randn(2000, 8, generator=g) @ a.T + 1.0,
        )
    }
    for name, loader in (("breast cancer", load_breast_cancer), ("wine", load_wine)):
        for standardise in (False, True):
            x = torch.tensor(loader().data, dtype=torch.float32)
            if standardise:
                x = (x - x.mean(0)) / x.std(0)
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
            n = int(0.8 * len(x))
            label = f"{name} ({'standardised' if standardise else 'raw'})"
            sets[label] = (x[perm[:n]], x[perm[n:]])
    return sets


def bench_tabular(steps: int, seed: int) -> None:
    print(f"\n## 4. Test NLL on float vectors, FC EBFlow, {steps} steps: default / whiten=False\n")
    objectives = ("ml", "ssm", "dsm", "fdssm")
    print(
        "| data | condition number | whitened by default | Gaussian fit | "
        + " | ".join(objectives)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(objectives))
    for name, (train, test) in _tabular_sets().items():
        cov = torch.cov(train.double().T)
        lam = torch.linalg.eigvalsh(cov)
        gauss = torch.distributions.MultivariateNormal(train.double().mean(0), cov)
        cells, whitened = [], None
        for objective in objectives:
            pair = []
            for whiten in (None, False):
                trainer = EBFlowTrainer(
                    fc_ebflow((train.shape[1],)), objective, whiten=whiten, seed=seed
                )
                trainer.fit(train, steps, 100, progress=False)
                whitened = trainer._whitening is not None if whiten is None else whitened
                pair.append(f"{trainer.nll(test):.1f}")
            cells.append(" / ".join(pair))
        gauss_nll = float(-gauss.log_prob(test.double()).mean())
        head = [name, f"{float(lam[-1] / lam[0]):.1e}", "yes" if whitened else "no"]
        print("| " + " | ".join(head + [f"{gauss_nll:.1f}"] + cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["timing", "nll"])
    parser.add_argument("--dims", nargs="*", type=int, default=[784, 3072])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="timing only: cpu or cuda")
    parser.add_argument("--steps", type=int, default=2000, help="training steps for the NLL runs")
    parser.add_argument("--mnist", default=None, help="folder with the MNIST t10k IDX images")
    parser.add_argument(
        "--objectives",
        nargs="*",
        default=["ml", "ssm", "dsm", "fdssm", "ssm-nomap"],
        help="NLL runs, in this order (the ratios are to ml, when it runs first)",
    )
    parser.add_argument("--no-digits", action="store_true", help="MNIST only")
    # trainer settings of the NLL runs (defaults: the trainer's)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    parser.add_argument("--sigma", type=float, default=None, help="DSM noise (default: trainer's)")
    parser.add_argument("--xi", type=float, default=1e-2, help="FDSSM step")
    parser.add_argument("--plain-ssm", action="store_true", help="SSM without variance reduction")
    parser.add_argument("--num-slices", type=int, default=1, help="SSM projections per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--validation",
        type=float,
        default=0.0,
        help="hold out this fraction of the training examples; keep each run's best weights",
    )
    parser.add_argument("--eval-every", type=int, default=250, help="validation interval")
    parser.add_argument("--model", default="fc", choices=["fc", "cnn"], help="NLL runs' model")
    parser.add_argument("--sm-steps", type=int, default=3000, help="from-ml: score-matching steps")
    parser.add_argument("--sm-lr", type=float, default=1e-4, help="from-ml: its constant rate")
    parser.add_argument(
        "--teacher-sizes", nargs="*", type=int, default=[7000, 60000], help="diagnose (b)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "timing" in args.only:
        bench_timing(args.dims, args.repeats, args.timing_steps, args.device)
    if "nll" in args.only:
        digits = load_digits()
        perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
        splits = {} if args.no_digits else {"digits": (digits[perm[:1400]], digits[perm[1400:]])}
        if args.mnist:
            mnist = _mnist(args.mnist)
            splits["mnist"] = (mnist[:8000], mnist[8000:])
        datasets = {}
        for name, (train, test) in splits.items():
            n = len(train) - round(args.validation * len(train))
            datasets[name] = (train[:n], train[n:] if n < len(train) else None, test)
        trainer_kwargs = {"lr": args.lr, "lr_schedule": args.lr_schedule, "xi": args.xi}
        trainer_kwargs["variance_reduction"] = not args.plain_ssm
        trainer_kwargs["num_slices"] = args.num_slices
        if args.sigma is not None:
            trainer_kwargs["sigma"] = args.sigma
        bench_nll(
            datasets,
            args.steps,
            args.seed,
            args.objectives,
            trainer_kwargs,
            args.eval_every,
            args.model,
        )
    if "tabular" in args.only:
        bench_tabular(args.steps, args.seed)
    if {"from-ml", "diagnose", "quantised-control"} & set(args.only):
        if not args.mnist or not args.validation:
            parser.error(f"--only {' '.join(args.only)} needs --mnist DIR and --validation F")
        mnist = _mnist(args.mnist)
        n = 8000 - round(args.validation * 8000)
        train, val, test = mnist[:n], mnist[n:8000], mnist[8000:]
    if "diagnose" in args.only:
        bench_diagnose(train, val, args.steps, args.seed, args.objectives, args.teacher_sizes)
    if "quantised-control" in args.only:
        bench_quantised_control(train, args.steps, args.seed, args.teacher_sizes)
    if "from-ml" in args.only:
        sm_objectives = [o for o in args.objectives if o in ("ssm", "dsm", "fdssm")]
        bench_from_ml(
            train,
            val,
            test,
            args.steps,
            args.sm_steps,
            args.sm_lr,
            args.seed,
            args.model,
            sm_objectives or ("ssm", "dsm", "fdssm"),
        )


if __name__ == "__main__":
    main()
