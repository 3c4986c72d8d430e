"""MCMC convergence diagnostics (pyro_ebm.metrics.convergence, .summary): agreement with ArviZ's
``ess`` and ``rhat``, the summary table against numpy and Pyro's layout, bad inputs, and peak
memory linear in the number of draws (measured in a subprocess, not timed)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_ebm.metrics import convergence, effective_sample_size, format_summary, rhat, summarize

az = pytest.importorskip("arviz")
logging.getLogger("arviz").setLevel(logging.ERROR)  # "Shape validation failed" for one chain

ROOT = Path(__file__).resolve().parents[1]
PHIS = (-0.6, 0.0, 0.5, 0.95, 0.999)


def _ar1(num_chains: int, num_draws: int, seed: int) -> np.ndarray:
    """``(num_chains, num_draws, 7)``: AR(1) chains with the correlations ``PHIS``, a column
    rounded to integers (ties in the ranks) and a skewed one (exp of an AR(0.5) chain)."""
    gen = np.random.default_rng(seed)
    phi = np.array([*PHIS, 0.5, 0.5])
    e = gen.standard_normal((num_chains, num_draws, len(phi)))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0] / np.sqrt(1 - phi**2)
    for t in range(1, num_draws):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    x[..., 5] = np.round(x[..., 5])
    x[..., 6] = np.exp(x[..., 6])
    return x


# (chains, draws): one chain, odd and even draws, the fewest draws (4) and 5 (split halves of 2)
SHAPES = [(1, 1001), (1, 200), (2, 8), (2, 201), (4, 4), (4, 5), (4, 100), (7, 57), (3, 1000)]


@pytest.mark.parametrize("method", ["bulk", "tail", "mean"])
def test_ess_matches_arviz(method):
    worst = 0.0
    for i, (c, n) in enumerate(SHAPES):
        x = _ar1(c, n, seed=i)
        ours = effective_sample_size(torch.from_numpy(x), method=method)
        assert ours.dtype == torch.float64 and ours.shape == (x.shape[-1],)
        ref = np.array([az.ess(x[..., j], method=method) for j in range(x.shape[-1])])
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, err_msg=f"{(c, n)}")
        worst = max(worst, float(np.max(np.abs(ours.numpy() / ref - 1))))
    assert worst < 1e-9  # about 1e-14 with ArviZ 0.23 and torch 2.13


def test_ess_float32_and_two_dim_input():
    x = _ar1(4, 301, seed=11)[..., 3].astype(np.float32)  # (chains, draws)
    for method in ("bulk", "tail", "mean"):
        ours = effective_sample_size(torch.from_numpy(x), method)
        assert ours.shape == (1,)
        ref = az.ess(x.astype(np.float64), method=method)
        assert float(ours[0]) == pytest.approx(ref, rel=1e-9)


def test_rhat_matches_arviz():
    for i, (c, n) in enumerate(SHAPES):
        if c == 1:  # ArviZ returns nan for one chain; rhat() splits it (see the summary test)
            continue
        x = _ar1(c, n, seed=100 + i)
        x[: c // 2, :, 2] += 0.7  # chains shifted
        ours = rhat(torch.from_numpy(x)).numpy()
        ref = np.array([az.rhat(x[..., j], method="rank") for j in range(x.shape[-1])])
        # the folding median is numpy's (a + b) / 2, so that the two middle draws tie as in
        # ArviZ (torch.quantile's b - (b - a) / 2 left them apart: 5% off at 2 x 8 draws)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, err_msg=f"{(c, n)}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ArviZ's 0 / 0
def test_constant_and_discrete_series_match_arviz():
    gen = np.random.default_rng(3)
    x = np.stack(
        [
            np.full((4, 50), 2.5),  # constant: ESS = all split draws, R-hat nan
            (gen.random((4, 50)) < 0.97).astype(float),  # mostly ones: tail indicator constant
            gen.integers(0, 3, (4, 50)).astype(float),  # three values: many ties
        ],
        axis=-1,
    )
    for method in ("bulk", "tail", "mean"):
        ref = np.array([az.ess(x[..., j], method=method) for j in range(3)])
        ours = effective_sample_size(torch.from_numpy(x), method).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-9)
    assert effective_sample_size(torch.from_numpy(x))[0] == 200
    ours = rhat(torch.from_numpy(x)).numpy()
    ref = np.array([az.rhat(x[..., j], method="rank") for j in range(3)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert np.isnan(ours[0])


def test_chunking_does_not_change_results(monkeypatch):
    x = torch.from_numpy(_ar1(3, 151, seed=5))
    full = {m: effective_sample_size(x, m) for m in ("bulk", "tail", "mean")}
    full_rhat = rhat(x)
    full_summary = summarize({"x": x})["x"]
    for elements in (1, 3 * 151 * 2, 3 * 151 * 4 + 1):  # 1, 2 and 4 parameters per chunk
        monkeypatch.setattr(convergence, "_CHUNK_ELEMENTS", elements)
        for m, ref in full.items():
            torch.testing.assert_close(effective_sample_size(x, m), ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(rhat(x), full_rhat, rtol=1e-12, atol=0)
        chunked = summarize({"x": x})["x"]
        for key, ref in full_summary.items():
            torch.testing.assert_close(chunked[key], ref, rtol=1e-12, atol=0)


def test_next_fast_len_is_scipy_fftpack():
    fftpack = pytest.importorskip("scipy.fftpack")
    assert all(convergence._next_fast_len(n) == fftpack.next_fast_len(n) for n in range(1, 5000))


@pytest.mark.parametrize("num_draws", [400, 401])
def test_summarize_matches_numpy_and_arviz(num_draws):
    gen = np.random.default_rng(num_draws)
    theta = _ar1(4, num_draws, seed=num_draws)[..., :6].reshape(4, num_draws, 2, 3)
    tau = np.exp(gen.standard_normal((4, num_draws)))
    s = summarize({"theta": torch.from_numpy(theta), "tau": torch.from_numpy(tau)}, prob=0.8)
    assert list(s) == ["theta", "tau"]
    assert list(s["theta"]) == ["mean", "std", "median", "10.0%", "90.0%", "n_eff", "r_hat"]
    for name, value in (("theta", theta), ("tau", tau)):
        flat = value.reshape(-1, *value.shape[2:])
        cols = value.reshape(4, num_draws, -1)
        expected = {
            "mean": flat.mean(0),
            "std": flat.std(0, ddof=1),
            "median": np.median(flat, 0),
            "10.0%": np.quantile(flat, 0.1, axis=0),
            "90.0%": np.quantile(flat, 0.9, axis=0),
            "n_eff": np.array([az.ess(cols[..., j]) for j in range(cols.shape[-1])]),
            "r_hat": np.array([az.rhat(cols[..., j]) for j in range(cols.shape[-1])]),
        }
        for key, ref in expected.items():
            got = s[name][key]
            assert got.dtype == torch.float64 and got.shape == value.shape[2:], (name, key)
            np.testing.assert_allclose(got.numpy(), np.reshape(ref, value.shape[2:]), rtol=1e-9)


def test_summarize_one_chain_has_nan_r_hat_as_arviz():
    x = torch.from_numpy(_ar1(1, 500, seed=2))
    s = summarize({"x": x})["x"]
    assert torch.isnan(s["r_hat"]).all()
    assert np.isnan(az.rhat(x[..., 0].numpy()))
    assert np.isnan(az.summary(az.from_dict(posterior={"x": x[..., 0].numpy()}))["r_hat"].iloc[0])
    ref = np.array([az.ess(x[..., j].numpy()) for j in range(x.shape[-1])])
    np.testing.assert_allclose(s["n_eff"].numpy(), ref, rtol=1e-9)
    assert torch.isfinite(rhat(x)).all()  # rhat() itself splits the one chain in two halves


def test_format_summary_has_pyro_layout(capsys):
    from pyro.infer.mcmc.util import print_summary

    gen = torch.Generator().manual_seed(0)
    samples = {
        "a_longer_name": torch.randn(2, 100, generator=gen),
        "theta": torch.randn(2, 100, 12, generator=gen),
        "w": torch.randn(2, 100, 2, 3, generator=gen),
    }
    table = format_summary(summarize(samples))
    print_summary(samples, prob=0.9)
    pyro_lines = capsys.readouterr().out.strip("\n").split("\n")
    lines = table.split("\n")
    assert lines[0] == pyro_lines[0]  # header: the same columns and widths
    assert len(lines) == len(pyro_lines) == 1 + 1 + 12 + 6
    width = len("a_longer_name[]")
    assert [line[:width] for line in lines] == [line[:width] for line in pyro_lines]
    assert [len(line) for line in lines] == [len(line) for line in pyro_lines]
    assert lines[1].split()[0] == "a_longer_name" and lines[-1].split()[0] == "w[1,2]"
    row = dict(zip(lines[0].split(), lines[3].split()[1:], strict=True))  # theta[1]
    stats = summarize(samples)["theta"]
    assert row == {k: f"{float(v[1]):.2f}" for k, v in stats.items()}
    assert format_summary({}) == ""


def test_bad_inputs():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="samples must be finite"):
        effective_sample_size(torch.where(x > 2, float("nan"), x))
    with pytest.raises(ValueError, match="samples must be finite"):
        rhat(torch.where(x > 2, float("inf"), x))
    for bad in (torch.randn(2, 3, 3), torch.randn(10), torch.randn(2, 10, 3, 1), torch.randn(0, 9)):
        with pytest.raises(ValueError, match="samples must have shape"):
            effective_sample_size(bad)
        with pytest.raises(ValueError, match="samples must have shape"):
            rhat(bad)
    with pytest.raises(ValueError, match="method must be one of"):
        effective_sample_size(x, method="median")
    with pytest.raises(ValueError, match=r"samples\['theta'\] must be finite"):
        summarize({"ok": x, "theta": x.log()})
    with pytest.raises(ValueError, match=r"samples\['theta'\] must have shape"):
        summarize({"theta": torch.randn(10)})
    with pytest.raises(ValueError, match=r"samples\['theta'\] must have shape"):
        summarize({"theta": torch.randn(2, 3)})
    for prob in (0, 1, 1.5, "0.9"):
        with pytest.raises(ValueError, match="prob must be"):
            summarize({"theta": x}, prob=prob)


# Peak memory, in a subprocess: the growth of the peak resident set size (VmHWM, reset before
# each call) over the RSS just before the call, with the input already allocated. A quadratic
# implementation holds an (n/2, n/2) matrix per parameter at least (Pyro's
# ``effective_sample_size`` builds an (n/2, n/2, dim) mask for Geyer's monotone sequence: 3.4 GiB
# for (4, 30000, 2), 12 GiB for (64, 10000, 100)); the subprocess checks that it sees such a
# matrix of (n/2)^2 float32.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, resource, sys, torch

    torch.set_num_threads(1)
    from pyro_ebm.metrics import effective_sample_size, rhat, summarize

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    try:  # glibc keeps freed memory resident; release it before each measurement
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = lambda pad: None

    def peak_growth(fn):
        trim(0)
        try:  # reset the peak to the current RSS (Linux >= 4.0); else it may overstate
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = rss()
        fn()
        return (peak() - base) / 2**20

    c, n, d, calls = json.loads(sys.argv[1])
    x = torch.randn(c, n, d)  # float32
    for m in ("bulk", "tail", "mean"):  # warm-up (FFT plans, lazy imports)
        effective_sample_size(torch.randn(2, 8, 2), m)
    summarize({"x": torch.randn(2, 8, 2)})
    fns = {
        "bulk": lambda: effective_sample_size(x, "bulk"),
        "tail": lambda: effective_sample_size(x, "tail"),
        "mean": lambda: effective_sample_size(x, "mean"),
        "rhat": lambda: rhat(x),
        "summarize": lambda: summarize({"x": x}),
        "quadratic": lambda: torch.ones(n // 2, n // 2).sum(),
    }
    print(json.dumps({name: peak_growth(fns[name]) for name in calls}))
    """
)


def _peak_growth_mib(shape: tuple[int, int, int], calls: list[str]) -> dict[str, float]:
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc/self/statm (Linux) to read the resident set size")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps([*shape, calls])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_linear_in_draws():
    """(4, 30000, 2) float32: 8 to 20 MiB for each diagnostic (Pyro's ESS: 3.4 GiB)."""
    bound = 128
    calls = ["bulk", "tail", "mean", "rhat", "summarize", "quadratic"]
    growth = _peak_growth_mib((4, 30000, 2), calls)
    quadratic = growth.pop("quadratic")
    assert all(g < bound for g in growth.values()), growth
    # the measurement sees a quadratic temporary: one (15000, 15000) float32 matrix, 858 MiB
    assert quadratic > 800 > bound, quadratic


@pytest.mark.slow
def test_peak_memory_many_chains_and_parameters():
    """(64, 10000, 100) float32 (an input of 244 MiB): 55 to 85 MiB for each diagnostic, 125
    MiB for the summary; about a minute on one thread (Pyro's ESS: 12 GiB)."""
    growth = _peak_growth_mib((64, 10000, 100), ["bulk", "summarize"])
    assert all(g < 512 for g in growth.values()), growth
