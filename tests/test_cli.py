"""The ``pyro-ebm`` command."""

import pytest

from pyro_ebm.cli import main


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
    import json

    assert json.loads((out / "history.json").read_text())[-1]["step"] == 4
    assert main([*base, "--steps", "8", "--resume"]) == 0
    steps = [r["step"] for r in json.loads((out / "history.json").read_text())]
    assert steps[-1] == 8 and 4 in steps
    with pytest.raises(SystemExit):
        main([*base, "--sampler", "gibbs"])
