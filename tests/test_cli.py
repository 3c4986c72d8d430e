"""The ``pyro-ebm`` command."""

import os
import re
import subprocess
import sys

import pytest
import torch

from pyro_ebm.cli import main
from pyro_ebm.train import load
from pyro_ebm.train.checkpoint import load_checkpoint


def test_sample_prints_weights_of_both_samplers(capsys):
    args = ["sample", "--dim", "2", "--num-walkers", "32", "--warmup-steps", "40"]
    assert main([*args, "--num-samples", "40", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "truth" in out and "0.200" in out and "0.800" in out
    assert "adaptive flow" in out and "MALA alone" in out
    # MALA alone never crosses the 8·√2 gap between the modes
    mala_row = next(line for line in out.splitlines() if line.startswith("MALA alone"))
    assert "0/32" in mala_row


def test_unknown_command_exits_with_usage_error():
    with pytest.raises(SystemExit) as err:
        main(["nonsense"])
    assert err.value.code == 2


def test_demo_trains_both_samplers_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--steps",
        "6",
        "--num-data",
        "500",
        "--num-walkers",
        "32",
        "--batch-size",
        "32",
        "--hidden",
        "16",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "truth" in text and "adaptive-flow" in text and "ula" in text
    for sampler in ("adaptive-flow", "ula"):
        for name in (
            "history.json",
            "history.csv",
            "model.pt",
            "checkpoint.pt",
            "mode_weights.png",
            "density.png",
            "negatives.png",
        ):
            assert (out / sampler / name).is_file(), (sampler, name)
    assert (out / "comparison.png").is_file()


def test_train_resumes_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "train",
        "--dataset",
        "two_to_one",
        "--num-data",
        "300",
        "--num-walkers",
        "16",
        "--batch-size",
        "16",
        "--hidden",
        "8",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main([*base, "--steps", "4"]) == 0
    summary = capsys.readouterr().out
    assert "adaptive-flow: 4 steps in" in summary and "acceptance at the end: global" in summary
    assert re.search(r"adaptive-flow +0\.\d+ +0\.\d+", summary)  # the mode weights
    import json

    assert json.loads((out / "history.json").read_text())[-1]["step"] == 4
    assert main([*base, "--steps", "8", "--resume"]) == 0
    steps = [r["step"] for r in json.loads((out / "history.json").read_text())]
    assert steps[-1] == 8 and 4 in steps
    with pytest.raises(SystemExit):
        main([*base, "--sampler", "gibbs"])
    # another --seed means other data: refused, naming it, before anything is trained
    capsys.readouterr()
    _usage_error(capsys, [*base, "--steps", "12", "--resume", "--seed", "1"], "data had the same")
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 8
    _usage_error(capsys, [*base, "--steps", "12", "--resume", "--lr", "0.01"], "lr=0.001")
    assert main([*base, "--steps", "12", "--resume", "--seed", "1", "--force"]) == 0
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 12


@pytest.mark.parametrize("suffix", [".csv", ".npy", ".pt", ".txt"])
def test_train_on_the_users_points(tmp_path, capsys, suffix):
    """``--data FILE``: the user's own points (here off-centre, so the trainer standardizes
    them), in each supported format; the model file keeps the standardization, the density
    plot is drawn around the data."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    points = torch.tensor([50.0, -25.0]) + 0.5 * torch.randn(200, 2, generator=gen)
    path = tmp_path / f"points{suffix}"
    if suffix == ".csv":
        np.savetxt(path, points.numpy(), delimiter=",")
    elif suffix == ".txt":
        np.savetxt(path, points.numpy())
    elif suffix == ".npy":
        np.save(path, points.numpy())
    else:
        torch.save(points, path)
    out = tmp_path / "run"
    args = ["train", "--data", str(path), "--steps", "3", "--num-walkers", "16"]
    args += ["--batch-size", "16", "--hidden", "8", "--output", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "200 points in 2 dimensions" in text and "NLL of the training data" in text
    model = load(out / "model.pt")  # the trained model, in the data's coordinates
    loc = model.loc
    assert torch.allclose(loc, points.mean(0).to(loc.dtype), atol=1e-5)
    u = model.energy(points.to(loc.dtype))
    assert torch.isfinite(u).all() and u.shape == (200,)
    assert model.flow.sample(5).shape == (5, 2)
    for name in ("history.json", "negatives.png", "density.png", "checkpoint.pt"):
        assert (out / name).is_file(), name


def _usage_error(capsys, args: list[str], match: str) -> None:
    """``main(args)`` exits with argparse's status 2 and a message matching ``match``."""
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert re.search(match, capsys.readouterr().err), match


def test_train_data_errors_name_the_argument(tmp_path, capsys):
    _usage_error(capsys, ["train", "--data", str(tmp_path / "missing.csv")], "--data: no such file")
    (tmp_path / "points.json").write_text("[]")
    _usage_error(
        capsys,
        ["train", "--data", str(tmp_path / "points.json")],
        r"--data must be a .npy, .pt, .csv or .txt file",
    )
    torch.save(torch.zeros(5), tmp_path / "flat.pt")
    _usage_error(
        capsys, ["train", "--data", str(tmp_path / "flat.pt")], r"--data must hold a real \(n, d\)"
    )
    # found by a new user's probe (each was a Python traceback)
    _usage_error(capsys, ["train", "--hidden", "128,,64"], "--hidden must be positive integers")
    _usage_error(capsys, ["train", "--dataset", "line4", "--dim", "3"], "--dim: the data set")
    _usage_error(capsys, ["train", "--steps", "0"], "--steps must be an integer >= 1")
    if not torch.cuda.is_available():
        _usage_error(capsys, ["train", "--device", "cuda"], "no CUDA device")


def test_every_option_and_path_is_checked_before_training(tmp_path, capsys):
    """Found by a new user's probe: a bad --device was a traceback, and an --output that is a
    file, or under one, failed only after training."""
    (tmp_path / "file").write_text("")
    for args, match in [
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "gpu:x"], "--device must be cpu, cuda or cuda:N"),
        (["--output", str(tmp_path / "file")], "--output .* is a file, not a folder"),
        (["--output", str(tmp_path / "file" / "run")], "--output: .* is a file, not a folder"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--num-particles", "1"], "--num-particles must be an integer >= 2"),
        (["--nproc", "0"], "--nproc must be an integer >= 1"),
        (["--num-data", "1"], "--num-data must be an integer >= 2"),
    ]:
        for command in ("train", "demo") if "--nproc" not in args else ("train",):
            _usage_error(capsys, [command, "--quiet", *args], match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_train_on_two_processes(tmp_path):
    """``--nproc 2`` launches torchrun: two processes train (gloo), process 0 writes the
    outputs and the summary, and the model loads back."""
    out = tmp_path / "run"
    args = ["train", "--nproc", "2", "--steps", "4", "--num-data", "300", "--num-walkers"]
    args += ["16", "--batch-size", "16", "--hidden", "8", "--output", str(out), "--quiet"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, "-m", "pyro_ebm", *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 steps in" in run.stdout and "on 2 processes" in run.stdout
    assert run.stdout.count("mode weights of the trained model") == 1  # process 0 alone
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(
        state["ranks"][0]["sampler"]["walkers"], state["ranks"][1]["sampler"]["walkers"]
    )
    assert load(out / "model.pt").flow.sample(3).shape == (3, 2)


def test_train_on_one_dimensional_points_with_a_header_line(tmp_path, capsys):
    """A CSV with column names first, and 1-D points: the run finishes and writes its plots
    (the negatives plot failed on 1-D points)."""
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(100, generator=gen) - 2, torch.randn(100, generator=gen) + 2])
    path = tmp_path / "points.csv"
    path.write_text("x\n" + "\n".join(f"{v:.6f}" for v in points.tolist()) + "\n")
    out = tmp_path / "run"
    args = ["train", "--data", str(path), "--steps", "3", "--num-walkers", "16"]
    args += ["--batch-size", "16", "--hidden", "8", "--output", str(out), "--quiet"]
    assert main(args) == 0
    assert "200 points in 1 dimensions" in capsys.readouterr().out
    assert (out / "negatives.png").is_file() and (out / "history.json").is_file()
    assert main(args) == 0  # again into the same folder: said, not silent
    assert "holds an earlier run" in capsys.readouterr().out
