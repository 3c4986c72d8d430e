"""Bad arguments get a clear error naming the argument: a wrong type is a ``TypeError``, a value
out of range a ``ValueError``; NumPy scalars are accepted and bools refused where a number is
wanted; floating tensors of another dtype are converted at the public boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_ebm import MLPEnergy
from pyro_ebm._checks import check_hidden, check_int, check_positive, check_real
from pyro_ebm.flows import (
    AffineFlow,
    RealNVP,
    SplineFlow,
    Standardized,
    fit_forward_kl,
    forward_kl_step,
)
from pyro_ebm.infer import (
    MALA,
    MCMC,
    AdaptiveFlowMCMC,
    ChEESHMC,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
)
from pyro_ebm.samplers import AdaptiveFlowSampler
from pyro_ebm.train import EBMTrainer


def pot(params):
    return (params["x"] ** 2).sum()


def quadratic(x):
    return (x**2).sum(-1)


# what a user might pass by mistake, and what each argument is
WRONG_TYPE = ("0.1", [1], {"a": 1})
NOT_A_NUMBER = (*WRONG_TYPE, True)
#: ``(constructor, argument, kind)``: kind ``int`` (>= 1 unless said), ``pos`` (positive
#: number), ``prob`` (in (0, 1)), ``unit`` (in [0, 1)), ``flag`` (bool), ``widths`` (hidden
#: widths: one int or a sequence); "or None" where ``None`` is a valid value
CASES = [
    (lambda **k: RealNVP(**{"dim": 2, **k}), "dim", "int"),
    (lambda **k: RealNVP(**{"dim": 2, **k}), "num_layers", "int"),
    (lambda **k: RealNVP(**{"dim": 2, **k}), "hidden", "widths"),
    (lambda **k: RealNVP(**{"dim": 2, **k}), "base_scale", "pos"),
    (lambda **k: SplineFlow(**{"dim": 2, **k}), "count_bins", "int"),
    (lambda **k: SplineFlow(**{"dim": 2, **k}), "bound", "pos"),
    (lambda **k: AffineFlow(**{"dim": 2, **k}), "hidden", "widths"),
    (lambda **k: AffineFlow(**{"dim": 2, **k}), "full", "flag"),
    (lambda **k: AffineFlow(**{"dim": 2, **k}), "sinh_arcsinh", "flag"),
    (lambda **k: MLPEnergy(**{"dim": 2, **k}), "hidden", "widths"),
    (lambda **k: MALA(potential_fn=pot, **k), "step_size", "pos"),
    (lambda **k: MALA(potential_fn=pot, **k), "target_accept_prob", "prob"),
    (lambda **k: MALA(potential_fn=pot, **k), "adapt_step_size", "flag"),
    (lambda **k: FlowIMH(potential_fn=pot, **k), "defensive", "unit"),
    (lambda **k: FlowISIR(potential_fn=pot, **k), "num_particles", "int or auto"),
    (lambda **k: FlowISIR(potential_fn=pot, **k), "defensive", "unit"),
    (lambda **k: FlowHMC(potential_fn=pot, **k), "step_size", "pos"),
    (lambda **k: FlowHMC(potential_fn=pot, **k), "num_steps", "int or None"),
    (lambda **k: FlowHMC(potential_fn=pot, **k), "trajectory_length", "pos or None"),
    (lambda **k: FlowHMC(potential_fn=pot, **k), "target_accept_prob", "prob"),
    (lambda **k: FlowHMC(potential_fn=pot, **k), "jit_compile", "flag"),
    (lambda **k: FlowNUTS(potential_fn=pot, **k), "max_tree_depth", "int"),
    (lambda **k: FlowNUTS(potential_fn=pot, **k), "adapt_step_size", "flag"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "num_walkers", "int"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "num_particles", "int"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "step_size", "pos"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "init_scale", "pos"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "defensive", "unit"),
    (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k), "target_accept_prob", "prob or None"),
    (lambda **k: ChEESHMC(potential_fn=pot, **k), "trajectory_length", "pos"),
    (lambda **k: ChEESHMC(potential_fn=pot, **k), "max_num_steps", "int"),
    (lambda **k: MCMC(MALA(potential_fn=pot), **{"num_samples": 5, **k}), "num_samples", "int"),
    (lambda **k: MCMC(MALA(potential_fn=pot), **{"num_samples": 5, **k}), "num_chains", "int"),
    (
        lambda **k: MCMC(MALA(potential_fn=pot), **{"num_samples": 5, **k}),
        "disable_progbar",
        "flag",
    ),  # fmt: skip
    (lambda **k: EBMTrainer(MLPEnergy(2), **k), "num_walkers", "int"),
    (lambda **k: EBMTrainer(MLPEnergy(2), **k), "lr", "pos"),
    (lambda **k: EBMTrainer(MLPEnergy(2), **k), "average_last", "unit"),
    (lambda **k: AdaptiveFlowSampler(quadratic, **k), "flow_lr", "pos"),
    (lambda **k: AdaptiveFlowSampler(quadratic, **k), "flow_steps", "int >= 0"),
]
BAD_VALUES = {
    "int": [(v, TypeError) for v in (*NOT_A_NUMBER, 2.5, None)] + [(0, ValueError)],
    "pos": [(v, TypeError) for v in (*NOT_A_NUMBER, None)]
    + [(v, ValueError) for v in (0.0, -1.0, math.nan, math.inf)],
    "prob": [(v, TypeError) for v in (*NOT_A_NUMBER, None)]
    + [(v, ValueError) for v in (0.0, 1.0, -0.5, math.nan)],
    "unit": [(v, TypeError) for v in (*NOT_A_NUMBER, None)]
    + [(v, ValueError) for v in (1.0, -0.1, math.nan)],
    "flag": [(v, TypeError) for v in (*WRONG_TYPE, 1, None)],
    "widths": [(v, TypeError) for v in ("32", {"a": 1}, True, 2.5, None)]
    + [(0, ValueError), ([8, 0], ValueError)],
}
BAD_VALUES["int >= 0"] = [(v, e) for v, e in BAD_VALUES["int"] if v != 0] + [(-1, ValueError)]
BAD_VALUES["int or auto"] = [(v, TypeError) for v in ([1], True, 2.5, None)] + [
    (1, ValueError),
    ("many", ValueError),
]
for kind in ("int", "pos", "prob"):
    BAD_VALUES[f"{kind} or None"] = [(v, e) for v, e in BAD_VALUES[kind] if v is not None]


@pytest.mark.parametrize(
    "make, name, kind", CASES, ids=[f"{i}-{name}" for i, (_, name, _) in enumerate(CASES)]
)
def test_bad_arguments_name_the_argument(make, name, kind):
    for value, error in BAD_VALUES[kind]:
        with pytest.raises(error, match=name):
            make(**{name: value})


def test_the_issues_examples():
    layer = RealNVP(2, hidden=32).layers[0].net
    assert [m.out_features for m in layer if isinstance(m, torch.nn.Linear)] == [32, 2]
    with pytest.raises(TypeError, match="step_size must be a positive finite number, got '0.1'"):
        MALA(potential_fn=pot, step_size="0.1")
    with pytest.raises(TypeError, match="num_particles must be an integer, got None"):
        FlowISIR(potential_fn=pot, num_particles=None)


def test_numpy_scalars_are_accepted_and_bools_refused():
    flow = RealNVP(np.int64(2), num_layers=np.int32(2), hidden=(np.int64(8),))
    assert flow.dim == 2 and isinstance(flow.dim, int) and len(flow.layers) == 2
    kernel = MALA(potential_fn=pot, step_size=np.float32(0.1), target_accept_prob=np.float64(0.6))
    assert kernel.initial_step_size == pytest.approx(0.1)
    assert MCMC(kernel, num_samples=np.int64(5)).num_samples == 5
    for value in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="num_layers"):
            RealNVP(2, num_layers=value)
        with pytest.raises(TypeError, match="step_size"):
            MALA(potential_fn=pot, step_size=value)


def test_the_helpers():
    assert check_int("n", np.int16(3), 0) == 3 and check_int("n", torch.tensor(4), 0) == 4
    assert check_positive("s", np.float32(0.5)) == 0.5
    assert check_real("p", 0, 0, 1) == 0.0
    with pytest.raises(ValueError, match=r"p must be a finite number in \(0, 1\)"):
        check_real("p", 0, 0, 1, low_open=True, high_open=True)
    assert check_hidden("hidden", (np.int64(4), 5)) == (4, 5)
    with pytest.raises(ValueError, match=r"hidden\[1\]"):
        check_hidden("hidden", [4, 0])
    with pytest.raises(TypeError, match="hidden"):
        check_hidden("hidden", "32")


# -- dtypes at the public boundaries ------------------------------------------------------------
def _float64_data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: MLPEnergy(2).float()(x),
        lambda x: RealNVP(2).float().log_prob(x),
        lambda x: Standardized(RealNVP(2).float()).log_prob(x),
        lambda x: AffineFlow(2).float().log_prob(x),
        lambda x: torch.tensor(fit_forward_kl(RealNVP(2).float(), x, num_steps=2)).float(),
        lambda x: torch.tensor(
            forward_kl_step((f := RealNVP(2).float()), torch.optim.Adam(f.parameters()), x)
        ).float(),
    ],
    ids=[
        "energy",
        "flow.log_prob",
        "standardized.log_prob",
        "affine.log_prob",
        "fit_forward_kl",
        "forward_kl_step",
    ],  # fmt: skip
)
def test_float64_data_meet_a_float32_model(call):
    """float64 data on a float32 model: converted (was torch's raw matmul dtype error); the
    fits' losses are Python floats, finite."""
    out = call(_float64_data())
    assert torch.isfinite(out).all()
    assert out.dtype == torch.float32


def test_progress_and_resume_are_bools():
    data = torch.randn(32, 2)
    with pytest.raises(TypeError, match="progress must be a bool"):
        fit_forward_kl(RealNVP(2), data, num_steps=2, progress="yes")
    with pytest.raises(TypeError, match="progress must be a bool"):
        EBMTrainer(MLPEnergy(2), num_walkers=8).fit(data, num_steps=1, progress="no")
    with pytest.raises(TypeError, match="resume must be a bool"):
        EBMTrainer(MLPEnergy(2), num_walkers=8).fit(data, num_steps=1, resume="yes")


def test_non_floating_data_are_refused_by_name():
    with pytest.raises(TypeError, match="x must be a tensor"):
        RealNVP(2).log_prob([[0.0, 1.0]])
    with pytest.raises(TypeError, match="samples must be a tensor"):
        fit_forward_kl(RealNVP(2), np.zeros((4, 2)))


def _probe() -> None:  # pragma: no cover - a one-off measurement, not a test
    """``python tests/test_checks.py``: try 7 bad values on 65 arguments of 14 constructors and
    count the errors that do not name the argument (or are not a TypeError/ValueError) and the
    values accepted. Values that are valid for some arguments (1.5, None, True for flags, [1]
    for hidden widths) count as accepted without being wrong; the invalid acceptances are
    listed."""
    import warnings

    from pyro_ebm.ebflow import EBFlowTrainer  # noqa: F401 (imported as a user would)

    warnings.simplefilter("ignore")
    probes = {
        "RealNVP": (lambda **k: RealNVP(**{"dim": 2, **k}),
                    ["dim", "num_layers", "hidden", "base_scale", "log_scale_bound"]),
        "SplineFlow": (lambda **k: SplineFlow(**{"dim": 2, **k}),
                       ["num_layers", "hidden", "count_bins", "bound", "base_scale"]),
        "AffineFlow": (lambda **k: AffineFlow(**{"dim": 2, **k}),
                       ["num_coupling_layers", "hidden", "base_scale", "full", "sinh_arcsinh"]),
        "MLPEnergy": (lambda **k: MLPEnergy(**{"dim": 2, **k}), ["dim", "hidden"]),
        "MALA": (lambda **k: MALA(potential_fn=pot, **k),
                 ["step_size", "target_accept_prob", "adapt_step_size", "adapt_mass_matrix",
                  "full_mass", "max_plate_nesting", "jit_compile"]),
        "FlowIMH": (lambda **k: FlowIMH(potential_fn=pot, **k), ["defensive", "max_plate_nesting"]),
        "FlowISIR": (lambda **k: FlowISIR(potential_fn=pot, **k), ["num_particles", "defensive"]),
        "FlowHMC": (lambda **k: FlowHMC(potential_fn=pot, **k),
                    ["step_size", "num_steps", "trajectory_length", "target_accept_prob",
                     "jit_compile", "adapt_step_size"]),
        "FlowNUTS": (lambda **k: FlowNUTS(potential_fn=pot, **k),
                     ["step_size", "max_tree_depth", "target_accept_prob"]),
        "AdaptiveFlowMCMC": (lambda **k: AdaptiveFlowMCMC(potential_fn=pot, **k),
                             ["num_walkers", "init_scale", "num_particles", "num_local_steps",
                              "production_local_steps", "min_global_accept", "step_size",
                              "defensive", "target_accept_prob", "num_steps", "adapt_step_size"]),
        "ChEESHMC": (lambda **k: ChEESHMC(potential_fn=pot, **k),
                     ["step_size", "trajectory_length", "target_accept_prob", "max_num_steps",
                      "full_mass", "jit_compile"]),
        "MCMC": (lambda **k: MCMC(MALA(potential_fn=pot), **{"num_samples": 5, **k}),
                 ["num_samples", "warmup_steps", "num_chains", "disable_progbar"]),
        "EBMTrainer": (lambda **k: EBMTrainer(MLPEnergy(2), **k),
                       ["num_walkers", "lr", "flow_lr", "regularization", "max_grad_norm",
                        "average_last", "flow_pretrain_steps"]),
        "AdaptiveFlowSampler": (lambda **k: AdaptiveFlowSampler(quadratic, **k),
                                ["num_particles", "num_local_steps", "step_size", "flow_lr",
                                 "flow_steps", "flow_batch_size", "history", "block_size"]),
    }  # fmt: skip
    unclear, accepted, wrong = 0, 0, []
    for owner, (make, names) in probes.items():
        for name in names:
            for value in ("0.1", None, True, [1], -1, 1.5, math.nan):
                try:
                    make(**{name: value})
                except (TypeError, ValueError) as err:
                    unclear += name not in str(err)
                except Exception:  # noqa: BLE001 (a raw error is what is counted)
                    unclear += 1
                else:
                    accepted += 1
                    if not (value in (1.5, None, True) or (value == [1] and name == "hidden")):
                        wrong.append(f"{owner}({name}={value!r})")
    tries = 7 * sum(len(n) for _, n in probes.values())
    print(f"{tries} tries: {unclear} raw or unclear errors, {accepted} accepted, of which "
          f"{len(wrong)} invalid: {wrong}")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    _probe()
