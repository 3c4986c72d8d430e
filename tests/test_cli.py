"""The ``pyro-ebm`` command."""

import pytest

from pyro_ebm.cli import main


def test_demo_prints_weights_of_both_samplers(capsys):
    args = ["demo", "--dim", "2", "--num-walkers", "32", "--warmup-steps", "40"]
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
