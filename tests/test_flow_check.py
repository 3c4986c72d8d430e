"""Tests of the flow-quality diagnostic and the stuck-chain report.

- :func:`pyro_ebm.metrics.flow_importance_diagnostic`: the Pareto k-hat (ArviZ's PSIS) of a flow
  as an importance sampler of its target is small for a flow matched to a Gaussian target and
  large for one much narrower; the importance-sampling ESS follows.
- Every flow kernel checks its frozen flow once per run: ``diagnostics()`` has ``flow k-hat``
  and ``flow IS ESS`` (one value for all chains), ``to_arviz`` puts them in the attributes, and
  k-hat > 0.7 logs a warning that says what it means for that kernel and what to do.
- Walker kernels report each chain's longest run of rejections, and a chain that stopped moving
  (a FlowIMH chain with a flow far too narrow) is flagged, with a warning naming it.
- The funnel: on the centred eight schools, AdaptiveFlowMCMC's flow after a short warmup has
  not learned the funnel, and the k-hat warning fires.

Each part was seen to make tests here fail when broken (monkeypatched, one at a time): the
log weights' sign flipped (``U + log q``), the k-hat warning removed, the keys left out of
``diagnostics()``, the ArviZ attributes not written, the longest run counted as the number of
rejections, no chain ever flagged stuck, AdaptiveFlowMCMC's check skipped, the per-run cache of
the check disabled (Pyro's driver then checks, and warns, once per chain).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC as PyroMCMC

import pyro_ebm
from pyro_ebm.datasets import EIGHT_SCHOOLS_DATA, eight_schools_noncentered
from pyro_ebm.flows import AffineFlow
from pyro_ebm.infer import (
    MALA,
    MCMC,
    AdaptiveFlowMCMC,
    ChEESHMC,
    FlowHMC,
    FlowIMH,
    FlowISIR,
    FlowNUTS,
    to_arviz,
)
from pyro_ebm.infer.stats import longest_rejection_run, stuck_threshold, worst_flow_checks
from pyro_ebm.metrics import (
    MAX_CHECK_DRAWS,
    FlowCheck,
    ScoreCheck,
    flow_importance_diagnostic,
    flow_score_diagnostic,
    pareto_khat,
    sharpened,
)

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 2.0]])


class Gaussian(pyro_ebm.EnergyModel):
    """The correlated Gaussian ``N(MEAN, COV)`` as an energy."""

    def __init__(self) -> None:
        super().__init__(2)
        self.register_buffer("mean", MEAN.to(torch.get_default_dtype()))
        self.register_buffer("prec", torch.linalg.inv(COV.to(torch.get_default_dtype())))

    def energy(self, x):
        d = self.check_input(x) - self.mean
        return 0.5 * ((d @ self.prec) * d).sum(-1)


def potential():
    return Gaussian().energy


def gaussian_flow(factor: float = 1.0, shift: float = 0.0) -> AffineFlow:
    """An AffineFlow equal to ``N(MEAN + (shift, 0), factor^2 COV)``: the target for
    ``factor = 1``, ``shift = 0`` (the target's first coordinate has sd 1)."""
    flow = AffineFlow(2)
    layer = flow.layers[-1]
    chol = torch.linalg.cholesky(COV.to(torch.get_default_dtype())) * factor
    with torch.no_grad():
        layer.loc.copy_(MEAN + torch.tensor([shift, 0.0]))
        layer.log_diag.copy_(chol.diagonal().log())
        layer.off_diag.copy_(chol[1, 0].reshape(1))
    return flow


# --------------------------------------------------------------------------------------------
# the metric


def test_khat_is_small_for_a_flow_matched_to_the_target_and_large_for_a_narrow_one():
    """The k-hat in 2-D of the proposal ``N(m, f^2 C)`` for the target ``N(m, C)`` is
    ``1 - f^2`` (the weights are exactly Pareto): matched (f = 1) -inf (equal weights), f = 1.2
    negative, f = 0.1 0.99; a flow half as wide and 3 sd off the mean misses the target too.
    Near k = 1 the estimate from 4096 draws has an sd of about 0.13 (seeds 0-99: min 0.47 for
    f = 0.1), so the narrow flow is checked with 16384 draws. Seeds 0-99: matched -inf; wider
    max -0.73, IS ESS min 3686 of 4096; narrow (16384 draws) min 0.74, IS ESS max 265;
    misplaced min 0.79, IS ESS max 59."""
    U = potential()
    matched = flow_importance_diagnostic(gaussian_flow(1.0), U)
    wider = flow_importance_diagnostic(gaussian_flow(1.2), U)
    narrow = flow_importance_diagnostic(gaussian_flow(0.1), U, num_draws=16384)
    misplaced = flow_importance_diagnostic(gaussian_flow(0.5, 3.0), U)
    assert isinstance(matched, FlowCheck) and matched.num_draws == 4096
    assert matched.khat < 0.5 and matched.ess == pytest.approx(4096)
    assert wider.khat < 0.5 and wider.ess > 0.8 * 4096
    assert narrow.num_draws == 16384
    assert narrow.khat > 0.7 and narrow.ess < 0.05 * 16384
    assert misplaced.khat > 0.7 and misplaced.ess < 0.05 * 4096


def test_khat_near_the_threshold_is_refined_with_more_draws():
    """With ``max_draws`` (the kernels pass ``MAX_CHECK_DRAWS``, 32768) the check doubles its
    draws while k-hat is within two standard errors of 0.7: the flow ``N(m, 0.3 C)`` for the
    target ``N(m, C)`` has k = 0.7, and its k-hat comes from 32768 draws; flows whose k-hat is
    far below (f = 0.9: k = 0.19; f = 1.2: negative) keep 4096; without ``max_draws`` the check
    keeps 4096. Seeds 0-99 (float64): 94 checks went to 32768 draws (k-hat 0.53-0.88, sd
    0.075); six left the band earlier (0.25-1.05, from 4096-16384 draws); the median
    |k-hat - 0.7| was 0.056 against 0.074 from 4096 draws alone (seeds 1000-1099, 0.42-0.93,
    sd 0.11): eight times the draws make k-hat only somewhat sharper (the Pareto tail is fitted
    to 3 sqrt(S) draws), which is why that is not asserted. The refinement removed
    (``max_draws`` ignored) fails the count of refined checks."""
    U = potential()
    refined, draws = [], []
    for seed in range(100):
        torch.manual_seed(seed)
        check = flow_importance_diagnostic(gaussian_flow(0.3**0.5), U, max_draws=MAX_CHECK_DRAWS)
        draws.append(check.num_draws)
        refined.append(check.khat)
    assert draws.count(32768) >= 85, draws
    far = (abs(k - 0.7) for k, n in zip(refined, draws, strict=True) if n == 32768)
    assert max(far) < 0.25, refined
    torch.manual_seed(0)
    for flow in (gaussian_flow(0.9), gaussian_flow(1.2)):
        assert flow_importance_diagnostic(flow, U, max_draws=MAX_CHECK_DRAWS).num_draws == 4096
    first = flow_importance_diagnostic(gaussian_flow(0.3**0.5), U)
    assert first.num_draws == 4096
    # the kernels' final checks: sharpened, a new check up to 32768 draws near 0.7
    assert sharpened(first, gaussian_flow(0.3**0.5), U).num_draws == 32768


def test_khat_is_arviz_psis_and_nonfinite_weights_count_as_zero():
    """The metric's k-hat is ArviZ's on the same log weights; draws where the potential is
    infinite get weight 0 (and never a nan); none finite: k-hat inf, ESS 0."""
    import numpy as np

    torch.manual_seed(0)
    flow = gaussian_flow(0.5)
    x, log_q = flow.sample_and_log_prob(4096)
    lw = -potential()(x) - log_q
    khat, smoothed = pareto_khat(lw)
    try:
        from arviz import psislw

        reference = psislw(lw.numpy().copy(), reff=1.0)[1]
    except ImportError:
        from arviz_stats.base import array_stats

        reference = array_stats.psislw(-lw.numpy().copy(), r_eff=1.0)[1]
    assert khat == pytest.approx(float(reference))
    assert np.exp(smoothed).sum() == pytest.approx(1.0)

    def half_infinite(x):  # +inf where x_0 < MEAN_0: half the target
        return torch.where(x[:, 0] < 1.0, torch.inf, potential()(x))

    check = flow_importance_diagnostic(gaussian_flow(1.2), half_infinite)
    assert check.khat < 0.5 and 0.3 * 4096 < check.ess < 0.6 * 4096
    none = flow_importance_diagnostic(
        gaussian_flow(1.0), lambda x: torch.full_like(x[:, 0], math.inf)
    )
    assert none[:3] == FlowCheck(math.inf, 0.0, 4096)[:3]
    assert none.log_weights.shape == (4096,) and (none.log_weights == -math.inf).all()


#: the target of the score-check tests: N(0, diag(4, 1, 1/4))
SCALES = torch.tensor([2.0, 1.0, 0.5])


def _score_check(factor: float, n: int = 4000, **kwargs) -> ScoreCheck:
    """The score check of a Gaussian proposal that is the target except for a scale ``factor``
    times the target's in its first coordinate, at ``n`` exact draws of the target."""
    scales = SCALES.to(torch.get_default_dtype())
    flow = AffineFlow(3, full=False)
    with torch.no_grad():
        flow.layers[-1].log_diag.copy_((scales * torch.tensor([factor, 1.0, 1.0])).log())
    x = scales * torch.randn(n, 3)
    return flow_score_diagnostic(flow, lambda x: 0.5 * ((x / scales) ** 2).sum(-1), x, **kwargs)


@pytest.mark.parametrize(
    "factor, expected",
    # narrower: k = 1 - factor^2; wider: sqrt(l) / (1 + sqrt(l)), l = (1 - 1 / factor^2)^2
    [(0.5, 0.75), (0.7, 0.51), (1.0, 0.0), (1.5, 5 / 14), (3.0, 8 / 17)],
)
def test_score_check_equals_the_pareto_k_of_a_gaussian_proposal_off_in_scale(factor, expected):
    """The check's calibration: a Gaussian proposal that is the target except for its scale in
    one coordinate (the target's scales 2, 1 and 1/2, so that the draws' covariance matters)
    gets the tail index :math:`1 - \\text{factor}^2` of its weights when narrower, below 0.5 when
    wider. From 4000 exact draws, the 0.5% largest left out (``TRIM``, which lowers it by about
    0.01), the error over seeds 0-19 of the five cases was at most 0.017. Fails with the flow's
    score added instead of subtracted, with the inverse square root of the covariance instead of its
    square root, or with the mean eigenvalue instead of the largest."""
    check = _score_check(factor)
    assert check.num_draws == 4000
    assert check.khat == pytest.approx(expected, abs=0.03)
    assert check.mismatch == pytest.approx((check.khat / (1 - check.khat)) ** 2)


def test_score_check_leaves_out_rows_that_are_not_finite():
    """Rows where the potential is not finite are left out; under ten left: no check (nan)."""
    check = _score_check(0.5, batch_size=999)  # rows in several batches
    scales = SCALES.to(torch.get_default_dtype())
    flow = AffineFlow(3, full=False)
    with torch.no_grad():
        flow.layers[-1].log_diag.copy_((scales * torch.tensor([0.5, 1.0, 1.0])).log())
    x = scales * torch.randn(4000, 3)

    def half(x):  # +inf where x_1 < 0
        u = 0.5 * ((x / scales) ** 2).sum(-1)
        return torch.where(x[:, 1] < 0, torch.inf, u)

    kept = flow_score_diagnostic(flow, half, x)
    assert kept.num_draws == int((x[:, 1] >= 0).sum())
    assert kept.khat == pytest.approx(check.khat, abs=0.03)
    few = flow_score_diagnostic(flow, half, x[:12].abs() * torch.tensor([1.0, -1.0, 1.0]))
    assert few.num_draws == 0 and math.isnan(few.khat)
    with pytest.raises(ValueError, match="draws"):
        flow_score_diagnostic(flow, half, x[0])


# --------------------------------------------------------------------------------------------
# the kernels

#: kernel factories with a flow, and how they run: (factory, chains, warmup, samples, driver)
FLOW_KERNELS = {
    "FlowIMH": (lambda pot, flow: FlowIMH(potential_fn=pot, flow=flow), 4, 0, 30, MCMC),
    "FlowISIR": (
        lambda pot, flow: FlowISIR(potential_fn=pot, flow=flow, num_particles=4),
        4,
        0,
        30,
        MCMC,
    ),
    "FlowHMC": (
        lambda pot, flow: FlowHMC(potential_fn=pot, flow=flow, num_steps=3),
        2,
        12,  # 2 chains x 5 kept warmup steps: the score check's 10 draws
        10,
        MCMC,
    ),
    "FlowNUTS": (
        lambda pot, flow: FlowNUTS(potential_fn=pot, flow=flow, max_tree_depth=3),
        2,
        12,  # 2 chains x 5 kept warmup steps: the score check's 10 draws
        10,
        MCMC,
    ),
    "ChEESHMC": (lambda pot, flow: ChEESHMC(potential_fn=pot, flow=flow), 4, 10, 10, MCMC),
    "FlowIMH (Pyro's MCMC)": (
        lambda pot, flow: FlowIMH(potential_fn=pot, flow=flow),
        2,
        0,
        10,
        PyroMCMC,
    ),
}

#: what each kernel's warning says it means
MEANING = {
    "FlowIMH": "chain that gets there sticks",
    "FlowISIR": "stick",
    "FlowHMC": "bad geometry",
    "FlowNUTS": "bad geometry",
    "ChEESHMC": "bad geometry",
    "AdaptiveFlowMCMC": "did not learn the target",
}


def test_latent_kernels_say_which_flow_misses_the_target():
    """A user who left ``flow=None`` is told that the kernel fitted the flow (ChEESHMC users may
    not expect one), and ChEESHMC's way to run without it; a given flow is just "the flow"."""
    pot = pyro_ebm.potential_fn(Gaussian())
    chees = ChEESHMC(potential_fn=pot)._flow_khat_meaning
    assert chees.startswith("the flow ChEESHMC fitted at setup (flow=None, the default; ")
    assert "flow=False runs without one" in chees
    nuts = FlowNUTS(potential_fn=pot)._flow_khat_meaning
    assert nuts.startswith("the flow FlowNUTS fitted at setup (flow=None, the default)")
    given = FlowHMC(potential_fn=pot, flow=gaussian_flow(1.0))._flow_khat_meaning
    assert given.startswith("the flow misses part of the target;")
    assert "bad geometry" in chees and "bad geometry" in given


def khat_warnings(caplog) -> list[str]:
    """The k-hat warnings among the captured log records."""
    return [m for m in _base_warnings(caplog) if "as an importance sampler" in m]


def score_warnings(caplog) -> list[str]:
    """The score-check warnings among the captured log records."""
    return [m for m in _base_warnings(caplog) if "the flow's score" in m]


def _base_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pyro_ebm.infer.base"]


def run_flow_kernel(name: str, flow):
    factory, chains, warmup, samples, driver = FLOW_KERNELS[name]
    pot = pyro_ebm.potential_fn(Gaussian())
    kernel = factory(pot, flow)
    options = {"num_chains": chains}
    if driver is PyroMCMC:  # Pyro needs the sites of a bare potential_fn
        options["initial_params"] = {"x": MEAN.repeat(chains, 1).to(torch.get_default_dtype())}
    mcmc = driver(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True, **options)
    mcmc.run()
    return mcmc, chains


@pytest.fixture
def _one_process(monkeypatch):
    """Pyro's driver runs chains in this process (not in workers)."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)


@pytest.mark.filterwarnings("ignore:num_chains=.*sequentially:UserWarning")
@pytest.mark.parametrize("name", list(FLOW_KERNELS))
def test_each_flow_kernel_reports_its_flow_khat_and_warns_when_it_is_large(
    name, caplog, capsys, _one_process
):
    """A matched flow: k-hat < 0.5, no warning; a flow half as wide as the target and 3 sd off its
    mean: k-hat > 0.7 (min 0.91 over 100 checks), one warning (for all chains) naming the kernel,
    what it means and what to do. One value for every chain."""
    kernel_name = name.split(" ")[0]
    warmup, driver = FLOW_KERNELS[name][2], FLOW_KERNELS[name][4]
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
        mcmc, chains = run_flow_kernel(name, gaussian_flow(1.0))
    assert not _base_warnings(caplog)
    diag = mcmc.diagnostics()
    # the score check at the warmup draws, and at the run's draws (under Pyro's driver too:
    # kernel.diagnostics() makes it once the chain has finished, at that chain's draws)
    for key in ("flow k-hat", "flow IS ESS", "flow score k-hat"):
        assert set(diag[key]) == {f"chain {i}" for i in range(chains)}
        if driver is MCMC or key != "flow score k-hat":
            assert len(set(diag[key].values())) == 1  # one check for the run
    assert diag["flow k-hat"]["chain 0"] < 0.5
    assert diag["flow IS ESS"]["chain 0"] > 2000
    assert diag["flow score k-hat"]["chain 0"] < 1e-4  # the flow is the target's score
    if hasattr(mcmc, "_summarize"):  # pyro_ebm's summary prints the checks
        capsys.readouterr()
        mcmc.summary()
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith("Flow checks: flow k-hat ") and "flow IS ESS" in line
        draws = diag["flow IS draws"]["chain 0"]
        assert f" of {draws}" in line and draws >= 4096  # the ESS's denominator
        assert "flow score k-hat" in line
        assert line.endswith(
            "(k-hats at most 0.7: no sign that the flow misses part of the target)"
        )

    caplog.clear()
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
        mcmc, _ = run_flow_kernel(name, gaussian_flow(0.5, 3.0))
    diag = mcmc.diagnostics()
    assert diag["flow k-hat"]["chain 0"] > 0.7
    warnings = khat_warnings(caplog)
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert message.startswith(kernel_name) and MEANING[kernel_name] in message
    assert "What to do" in message and "better flow" in message and "non-centre" in message
    if warmup:  # the score check agrees, and adds its value to the k-hat's warning, once
        assert diag["flow score k-hat"]["chain 0"] > 0.7
        (score,) = score_warnings(caplog)
        assert score.startswith(kernel_name) and "also reads as a Pareto k-hat" in score
    else:  # the check at the (stuck) draws says nothing after the k-hat's warning
        assert not score_warnings(caplog)
    if hasattr(mcmc, "_summarize"):
        capsys.readouterr()
        mcmc.summary()
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.endswith("(a k-hat above 0.7: the flow misses part of the target)")


@pytest.mark.parametrize("kernel", [FlowIMH, FlowISIR])
def test_khat_advice_names_the_defensive_component_given(kernel, caplog):
    """The independence kernels' k-hat warning advises a defensive component, or, when one is
    given, a larger or wider one naming it (a walkthrough's FlowIMH with ``defensive=0.05``
    was told to "add a defensive component (defensive=0.05)")."""
    pot = pyro_ebm.potential_fn(Gaussian())
    for defensive, advice in (
        (0.0, "add a defensive component (defensive=0.05)"),
        (0.05, "larger or wider defensive component (now defensive=0.05"),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
            mcmc = MCMC(
                kernel(potential_fn=pot, flow=gaussian_flow(0.5, 3.0), defensive=defensive),
                num_samples=5,
                num_chains=2,
                disable_progbar=True,
            )
            mcmc.run()
        (message,) = khat_warnings(caplog)
        assert advice in message


def test_score_warning_adds_its_caveat_only_when_the_flow_k_hat_is_good(monkeypatch, caplog):
    """A score check above 0.7 for a flow whose own k-hat is good (at most 0.5) warns with the
    caveat about several modes or a curved ridge (where the draws' overall spread inflates the
    check: AdaptiveFlowMCMC read 0.88-0.90 on a two-ridge posterior it sampled right); the
    check's value is forced here, the flow is the target."""
    import pyro_ebm.infer.base as base

    monkeypatch.setattr(base, "flow_score_diagnostic", lambda *a: ScoreCheck(0.9, 81.0, 100))
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
        mcmc, _ = run_flow_kernel("ChEESHMC", gaussian_flow(1.0))
    assert mcmc.diagnostics()["flow k-hat"]["chain 0"] <= 0.5
    (message,) = score_warnings(caplog)
    assert "k-hat 0.900 > 0.7" in message and "several modes or a thin curved ridge" in message


@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_the_score_check_at_the_draws_warns_when_the_warmup_checks_did_not(
    chain_method, monkeypatch, caplog
):
    """After the run the flow's score is checked again at the draws (every k-th draw of each
    chain, at most SCORE_CHECK_DRAWS rows): ``diagnostics()["flow score k-hat"]`` is the larger
    of the two checks, and a check at the draws above 0.7 warns when neither the k-hat nor the
    check at the warmup draws did, once per run (the chains of a sequential run share the
    flow). The checks' values are forced here (warmup 0.5, draws 0.9); the flow is the target.
    Without the check at the draws no warning fires and the diagnostics read 0.5."""
    import pyro_ebm.infer.base as base

    rows = []

    def forced(flow, potential, draws):
        rows.append(draws.shape[0])
        return ScoreCheck(0.5, 1.0, draws.shape[0]) if len(rows) == 1 else ScoreCheck(0.9, 81.0, 7)

    monkeypatch.setattr(base, "flow_score_diagnostic", forced)
    monkeypatch.setattr(base, "SCORE_CHECK_DRAWS", 8)
    pot = pyro_ebm.potential_fn(Gaussian())
    kernel = FlowHMC(potential_fn=pot, flow=gaussian_flow(1.0), num_steps=3)
    mcmc = MCMC(
        kernel,
        num_samples=10,
        warmup_steps=12,
        num_chains=2,
        chain_method=chain_method,
        disable_progbar=True,
    )
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
        mcmc.run()
    # at most 8 rows: warmup's second half, 2 chains x 6 steps (the last not kept), every
    # second step: 6 rows; the run's 2 x 10 draws, every third: 8 rows (a sequential run: one
    # chain's 5 warmup steps, its 10 draws every second: 5 rows)
    assert rows[:2] == ([6, 8] if chain_method == "vectorized" else [5, 5])
    (message,) = score_warnings(caplog)
    assert message.startswith("FlowHMC: at 7 of the draws the flow's score")
    assert "k-hat 0.900 > 0.7" in message and "at the warmup draws it read 0.50" in message
    assert MEANING["FlowHMC"] in message and "non-centre" in message
    assert mcmc.diagnostics()["flow score k-hat"] == {"chain 0": 0.9, "chain 1": 0.9}
    assert kernel.flow_draws_check.khat == 0.9 and kernel.flow_score_check.khat == 0.5

    caplog.clear()
    monkeypatch.setattr(base.WalkerKernel, "check_flow_at_draws", lambda self, draws: None)
    rows.clear()
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
        mcmc.run()
    assert not score_warnings(caplog)
    assert mcmc.diagnostics()["flow score k-hat"]["chain 0"] == 0.5


def test_khat_warning_says_tail_when_the_is_ess_is_high(monkeypatch, caplog):
    """A k-hat above 0.7 with an importance-sampling ESS of half the draws or more (the flow
    fits the bulk; walkthroughs' half-Cauchy scale and AR(1) coefficient read 0.92-0.96 with an
    ESS of 94-99% of the draws, their draws right) is explained as a heavy tail, with FlowIMH's
    remedy; with a low ESS it is the usual warning (the check's value is forced in the first
    run)."""
    import pyro_ebm.infer.base as base

    tail = "a tail of the target is heavier than the flow's"
    for forced, said in ((FlowCheck(0.92, 3900.0, 4096), True), (None, False)):
        caplog.clear()
        with monkeypatch.context() as patch:
            if forced is not None:
                patch.setattr(base, "flow_importance_diagnostic", lambda *a, c=forced, **k: c)
            with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
                run_flow_kernel("FlowIMH", gaussian_flow(0.5, 3.0))  # low ESS when not forced
        (message,) = khat_warnings(caplog)
        assert (tail in message) == said
        assert "add a defensive component" in message  # FlowIMH's remedy either way
        assert ("funnel" in message) == (not said)  # the usual advice only without the tail


def test_adaptive_checks_its_flow_at_the_end_of_warmup():
    """No check during warmup (the flow is training); at its end the frozen flow's check,
    reported for every chain; without warmup at the first draw."""
    pot = pyro_ebm.potential_fn(Gaussian())
    kernel = AdaptiveFlowMCMC(potential_fn=pot, num_walkers=8, flow_steps=5)
    kernel.setup_chains(4, 8, num_samples=2)
    for _ in range(7):
        kernel.step_chains()
        assert kernel.flow_check is None and "flow k-hat" not in kernel.diagnostics(0)
        assert kernel.flow_score_check is None
    kernel.step_chains()  # the last warmup step freezes the flow
    check = kernel.flow_check
    assert isinstance(check, FlowCheck)
    score = kernel.flow_score_check  # at the walkers after warmup moves 4-6
    assert isinstance(score, ScoreCheck) and score.num_draws == 3 * 8
    kernel.step_chains()
    assert kernel.flow_check is check and kernel.flow_score_check is score
    assert kernel.diagnostics(2)["flow score k-hat"] == score.khat
    assert [kernel.diagnostics(c)["flow k-hat"] for c in range(4)] == [check.khat] * 4
    assert kernel.diagnostics(3)["flow IS ESS"] == check.ess

    kernel = AdaptiveFlowMCMC(potential_fn=pot, flow=gaussian_flow(1.0), standardize=False)
    kernel.setup_chains(2, 0, num_samples=2)
    assert kernel.flow_check is None
    kernel.step_chains()
    assert kernel.flow_check.khat < 0.5


def test_kernels_without_a_flow_report_no_flow_check():
    pot = pyro_ebm.potential_fn(Gaussian())
    for kernel in (MALA(potential_fn=pot), ChEESHMC(potential_fn=pot, flow=False)):
        mcmc = MCMC(kernel, num_samples=10, warmup_steps=10, num_chains=2, disable_progbar=True)
        mcmc.run()
        assert "flow k-hat" not in mcmc.diagnostics()
        assert "longest rejection run" in mcmc.diagnostics()


def _backends():
    import importlib.util

    out = []
    if importlib.util.find_spec("arviz") is not None:
        import arviz

        if arviz.__version__.startswith("0."):
            out.append("arviz")
    if importlib.util.find_spec("arviz_base") is not None:
        out.append("arviz_base")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_to_arviz_puts_the_flow_check_in_the_attributes(backend):
    pot = pyro_ebm.potential_fn(Gaussian())
    mcmc = MCMC(
        FlowIMH(potential_fn=pot, flow=gaussian_flow(0.5, 3.0)),
        num_samples=20,
        warmup_steps=0,
        num_chains=3,
        disable_progbar=True,
    )
    mcmc.run()
    diag = mcmc.diagnostics()
    data = to_arviz(mcmc, backend=backend)
    for group in ("posterior", "sample_stats"):
        attrs = data[group].attrs
        assert attrs["flow_khat"] == diag["flow k-hat"]["chain 0"] > 0.7
        assert attrs["flow_is_ess"] == diag["flow IS ESS"]["chain 0"]
        assert attrs["flow_is_draws"] == diag["flow IS draws"]["chain 0"]
    mala = MCMC(
        MALA(potential_fn=pot), num_samples=10, warmup_steps=5, num_chains=2, disable_progbar=True
    )
    mala.run()
    assert "flow_khat" not in to_arviz(mala, backend=backend)["posterior"].attrs


def test_to_arviz_reports_the_worst_check_of_chains_with_their_own_flows():
    """Pyro's driver: each chain's own check (e.g. AdaptiveFlowMCMC trains one flow per chain):
    the largest k-hat, the smallest ESS with its number of draws."""
    mcmc, _ = run_flow_kernel("FlowIMH", gaussian_flow(1.0))
    one = {"flow k-hat": 0.9, "flow IS ESS": 3.0, "flow IS draws": 8192}
    mcmc._diagnostics[1] = {**mcmc._diagnostics[1], **one}
    attrs = to_arviz(mcmc)["posterior"].attrs
    assert attrs["flow_khat"] == 0.9 and attrs["flow_is_ess"] == 3.0
    assert attrs["flow_is_draws"] == 8192
    assert attrs["flow_score_khat"] < 1e-4  # at the draws (no warmup): the flow is the target
    assert worst_flow_checks(mcmc._diagnostics) == {
        **one,
        "flow score k-hat": attrs["flow_score_khat"],
    }
    for chain, score in zip(range(len(mcmc._diagnostics)), (0.2, 0.8, 0.1, 0.3), strict=True):
        mcmc._diagnostics[chain] = {**mcmc._diagnostics[chain], "flow score k-hat": score}
    assert to_arviz(mcmc)["posterior"].attrs["flow_score_khat"] == 0.8


# --------------------------------------------------------------------------------------------
# stuck chains


def test_longest_rejection_run_and_its_threshold():
    flags = torch.tensor([True, False, False, True, False, False, False, True, False])
    assert longest_rejection_run(flags) == 3
    assert longest_rejection_run(torch.ones(5, dtype=torch.bool)) == 0
    assert longest_rejection_run(torch.zeros(7, dtype=torch.bool)) == 7
    assert longest_rejection_run(torch.zeros(0, dtype=torch.bool)) == 0
    # acceptance 1/2 outside the run, 100 draws: P(run >= L) <= 100 / 2^L < 1e-6 for L > 26.6
    assert stuck_threshold(100, 48, 4) == pytest.approx(math.log(1e-8) / math.log(0.5))
    assert stuck_threshold(1000, 990, 2) == 50.0  # high acceptance: at least 5% of the draws
    assert stuck_threshold(0, 0, 0) == math.inf


def test_the_stuck_warning_does_not_send_the_user_to_a_flow_khat_that_reads_fine(caplog):
    """A chain stuck where the flow under-covers, while the flow's own k-hat reads 0.42 (a
    walkthrough's GP model): the warning says the k-hat need not show it, rather than pointing
    to it as the evidence."""
    pot = pyro_ebm.potential_fn(Gaussian())
    mcmc = MCMC(FlowIMH(potential_fn=pot), num_samples=500, disable_progbar=True)
    mcmc._diagnostics = [
        {"stuck": True, "longest rejection run": 60, "flow k-hat": 0.42},
        {"stuck": False, "longest rejection run": 3, "flow k-hat": 0.42},
    ]
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.mcmc"):
        mcmc._warn_stuck()
    (message,) = [r.getMessage() for r in caplog.records if "stopped moving" in r.getMessage()]
    assert "chain(s) 0 stopped moving" in message and "(60 of 500)" in message
    assert "which the flow's k-hat, 0.42, made from its own draws, need not show" in message


def test_a_flow_imh_chain_with_a_flow_far_too_narrow_is_reported_stuck(caplog):
    """IMH with a flow 5 times too narrow: a chain at a point of large weight stays there for
    hundreds of draws; the warning names the chains. A matched flow: no chain flagged.
    Seeds 0-9: every run flags 7-13 of 16 chains with the narrow flow (runs of 30 draws and
    more), none with a flow 1.2 times as wide as the target."""
    pot = pyro_ebm.potential_fn(Gaussian())
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.mcmc"):
        mcmc = MCMC(
            FlowIMH(potential_fn=pot, flow=gaussian_flow(0.2)),
            num_samples=400,
            warmup_steps=0,
            num_chains=16,
            disable_progbar=True,
        )
        mcmc.run()
    diag = mcmc.diagnostics()
    stuck = [c for c, flag in diag["stuck"].items() if flag]
    assert len(stuck) >= 4
    runs = diag["longest rejection run"]
    assert all(runs[c] > 20 for c in stuck)
    messages = [r.getMessage() for r in caplog.records if "stopped moving" in r.getMessage()]
    assert len(messages) == 1
    named = messages[0].split("chain(s) ")[1].split(" stopped")[0]
    assert named == ", ".join(c.split()[1] for c in stuck)
    assert "better flow" in messages[0] and "(see diagnostics()['flow k-hat'])" in messages[0]

    caplog.clear()
    with caplog.at_level("WARNING", logger="pyro_ebm.infer.mcmc"):
        good = MCMC(
            FlowIMH(potential_fn=pot, flow=gaussian_flow(1.2)),
            num_samples=400,
            warmup_steps=0,
            num_chains=16,
            disable_progbar=True,
        )
        good.run()
    assert not any(good.diagnostics()["stuck"].values())
    assert "stopped moving" not in caplog.text


# --------------------------------------------------------------------------------------------
# the funnel


def eight_schools_centered(J, y, sigma):
    r"""The centred eight schools: :math:`\theta_j \sim \mathcal N(\mu, \tau)` directly, a funnel
    in :math:`(\log\tau, \theta)`."""
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype())
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    theta = pyro.sample(
        "theta", dist.Normal(mu[..., None], tau[..., None]).expand(mu.shape + (J,)).to_event(1)
    )
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def _adaptive_on_eight_schools(caplog, warmup_steps: int) -> dict[str, tuple[dict, list[str]]]:
    """AdaptiveFlowMCMC at its defaults, 16 chains, seed 0, on the centred and the non-centred
    eight schools: ``{name: (diagnostics(), the kernels' warnings)}``."""
    out = {}
    for name, model in (
        ("centred", eight_schools_centered),
        ("non-centred", eight_schools_noncentered),
    ):
        pyro.set_rng_seed(0)
        mcmc = MCMC(
            AdaptiveFlowMCMC(model),
            num_samples=10,
            warmup_steps=warmup_steps,
            num_chains=16,
            disable_progbar=True,
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
            mcmc.run(*EIGHT_SCHOOLS_DATA.values())
        out[name] = (mcmc.diagnostics(), _base_warnings(caplog))
    return out


def test_the_khat_warning_fires_on_the_centred_eight_schools(caplog):
    """AdaptiveFlowMCMC with a short warmup (24 steps: 6 global-local cycles, 16 chains, 64
    walkers): on the centred eight schools its flow has not learned the funnel, k-hat > 0.7 and
    the warning says to non-centre the model; on the non-centred model the same settings give
    a flow with ten times the IS ESS. Seeds 0-9 (with the dense standardization): centred
    k-hat 0.72-1.12 (every run warns), IS ESS 11-88 of 4096; non-centred k-hat 0.06-0.35, IS
    ESS 1130-1856. With 40 warmup steps the centred k-hat was 0.70-1.01 (two seeds at 0.70, no
    warning); with the default 500 the flow learns more of the funnel and the warning does not
    always fire (RESULTS, issue 20 section 2)."""
    checks = {}
    for name, (diag, messages) in _adaptive_on_eight_schools(caplog, 24).items():
        checks[name] = (diag["flow k-hat"]["chain 0"], diag["flow IS ESS"]["chain 0"])
        messages = [m for m in messages if "as an importance sampler" in m]
        if name == "centred":
            assert checks[name][0] > 0.7
            assert len(messages) == 1
            assert "AdaptiveFlowMCMC" in messages[0] and "did not learn the target" in messages[0]
            assert "non-centre the model" in messages[0] and "warm up longer" in messages[0]
    assert checks["non-centred"][0] < checks["centred"][0]
    assert checks["non-centred"][1] > 10 * checks["centred"][1]


def test_the_score_check_warns_on_the_centred_eight_schools_after_a_full_warmup(caplog):
    """AdaptiveFlowMCMC, 16 chains, 200 warmup steps (what Pyro users give NUTS): the flow's
    own k-hat need not see the funnel, the score check at the walkers' warmup draws does, and
    its warning says to non-centre the model; on the non-centred model it stays silent. Seeds
    0-9 (float64): centred score k-hat 0.70-0.78 (seed 2 at 0.697 had PSIS k-hat 0.71: the
    k-hat warning fired instead; PSIS k-hat 0.35-1.04), non-centred 0.50-0.56; with 500
    warmup steps centred 0.72-0.77, non-centred 0.36-0.53 (RESULTS issue 20 section 10). The
    check's arithmetic is tested by the calibration test above (a sign error here reads 0.67
    for a perfect flow of a Gaussian, and this test would not see it)."""
    scores = {}
    for name, (diag, messages) in _adaptive_on_eight_schools(caplog, 200).items():
        scores[name] = diag["flow score k-hat"]["chain 0"]
        messages = [m for m in messages if "the flow's score" in m]
        if name == "centred":
            assert scores[name] > 0.7
            assert len(messages) == 1
            assert "AdaptiveFlowMCMC" in messages[0] and "funnel" in messages[0]
            assert "non-centre the model" in messages[0]
        else:
            assert scores[name] < 0.7 and not messages


def test_the_score_check_at_the_draws_sees_the_funnel_where_warmup_did_not(caplog):
    """FlowIMH at its defaults, 16 chains, 500 warmup steps, 100 draws, on the centred eight
    schools, at the first of seeds 0-4 where the flow's k-hat and the score check at the warmup
    draws both read below 0.7 (the test's premise; seed 0 here: k-hat 0.58, warmup 0.62,
    draws 0.82): the check at the draws warns, with the funnel advice. The check is the
    WalkerKernel's, the same for every flow kernel. This test also ran FlowHMC (slow tier) at
    seed 0; on this project's sandbox on 2026-12-08 FlowHMC's k-hat or warmup check already
    warned on each of seeds 0-9 (seed 0: warmup 0.72; another machine's floating point takes
    the chains down another path, the same at the session's first commit), so the premise
    never arose there and the case was dropped. Seeds 0-9 (float64, RESULTS issue 20 section
    14): a flow-quality warning on 29 of 30 centred runs of FlowIMH, FlowISIR and FlowHMC (26
    without the check at the draws), and on 2 of 45 non-centred runs of the six flow kernels
    (0.715, 0.749). With the check at the draws a no-op this test fails."""
    kernel = FlowIMH
    for seed in range(5):
        pyro.set_rng_seed(seed)
        mcmc = MCMC(
            kernel(eight_schools_centered),
            num_samples=100,
            warmup_steps=500,
            num_chains=16,
            disable_progbar=True,
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="pyro_ebm.infer.base"):
            mcmc.run(*EIGHT_SCHOOLS_DATA.values())
        diag = mcmc.diagnostics()
        warmup = mcmc.kernel.flow_score_check.khat
        if diag["flow k-hat"]["chain 0"] <= 0.7 and warmup <= 0.7:
            break
    else:
        pytest.fail("no seed in 0-4 where the k-hat and the warmup check both missed the neck")
    assert not khat_warnings(caplog)
    assert diag["flow score k-hat"]["chain 0"] > 0.7, seed
    (message,) = score_warnings(caplog)
    assert message.startswith(f"{kernel.__name__}: at ") and "of the draws the flow" in message
    assert "funnel" in message and "non-centre the model" in message


def test_a_high_khat_of_nearly_equal_weights_is_checked_again_with_more_draws():
    """Nearly equal weights (smoothed ESS >= 90% of the draws) with k-hat above 0.7 are a
    Pareto fit to noise, refined like a k-hat near 0.7; a high k-hat with a low ESS, or a low
    k-hat, is not (and k-hat near 0.7 still is)."""
    from pyro_ebm.metrics.psis import _worth_more_draws

    assert _worth_more_draws(FlowCheck(1.3, 4075.0, 4096))
    assert not _worth_more_draws(FlowCheck(1.3, 500.0, 4096))
    assert not _worth_more_draws(FlowCheck(math.inf, 4096.0, 4096))
    assert not _worth_more_draws(FlowCheck(0.2, 4090.0, 4096))
    assert _worth_more_draws(FlowCheck(0.7, 100.0, 4096))
