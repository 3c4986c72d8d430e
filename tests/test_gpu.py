"""The GPU paths: each piece a user would move to ``cuda`` runs there and keeps its tensors there.

Skipped where no CUDA device is present (CI, most machines); run on a GPU with
``python -m pytest tests/test_gpu.py``. The eighth session ran them on a lent NVIDIA H200, where
``pyro-ebm train --device cuda`` had first failed in the trainer's grid quadrature (built on the
CPU), and runs of this file failed on ``AdaptiveFlowMCMC`` spreading its walkers on the CPU
and on ``EBMTrainer``'s resume after an interrupt (the GPU's random state not rolled back).
The ninth session merged the two Pyro MCMC set-ups into ``_pyro_mcmc_samples`` and ran the
tests that use it on a CPU (this file with the device switched to ``cpu``), not on a GPU. The
tenth session ran the whole file that way after changing both trainers (Ctrl-C held off during
a step's updates, EBFlow's resume, EBMTrainer's evaluation outside the training stream): 13
passed on the CPU; no GPU was lent. The eleventh session added the vectorized chains of
``pyro_ebm.infer.MCMC`` and ran that test on a CPU the same way (5 passed); no GPU was lent.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def _pyro_mcmc_samples(kernel, num: int) -> torch.Tensor:
    """``num`` draws (after ``num`` warmup steps) of a 2-D kernel through Pyro's MCMC, started at
    the origin on the GPU; checked to be finite and on the GPU."""
    from pyro.infer import MCMC

    mcmc = MCMC(
        kernel,
        num_samples=num,
        warmup_steps=num,
        initial_params={"x": torch.zeros(2, device=CUDA)},
        disable_progbar=True,
    )
    mcmc.run()
    x = mcmc.get_samples()["x"]
    assert x.device.type == "cuda" and x.shape == (num, 2) and torch.isfinite(x).all()
    return x


def test_adaptive_flow_sampler_on_the_gpu():
    from pyro_ebm.datasets import imbalanced_pair
    from pyro_ebm.samplers import AdaptiveFlowSampler

    torch.manual_seed(0)
    target = imbalanced_pair(8)
    sampler = AdaptiveFlowSampler(target.potential, num_particles=16)
    run = sampler.run(2.0 * torch.randn(64, 8, device=CUDA), num_adapt_steps=60, num_samples=60)
    assert run.samples.device.type == "cuda" and torch.isfinite(run.samples).all()
    assert next(sampler.flow.parameters()).device.type == "cuda"
    heavy = float((target.mode_index(run.samples) == 1).float().mean())
    assert 0.6 < heavy < 0.95, heavy  # truth 0.8; a loose check that both modes are held


def test_ebm_trainer_and_its_grid_metrics_on_the_gpu():
    from pyro_ebm import MLPEnergy
    from pyro_ebm.datasets import two_to_one
    from pyro_ebm.metrics import model_mode_weights
    from pyro_ebm.train import EBMTrainer

    ds = two_to_one()
    trainer = EBMTrainer(
        MLPEnergy(2, hidden=(32, 32)),
        num_walkers=64,
        target=ds,
        seed=0,
        device="cuda",
        sampler_kwargs={"num_particles": 8, "num_mala_steps": 2},
    )
    trainer.fit(ds.sample(2000), num_steps=20, batch_size=128, progress=False)
    assert trainer.walkers.device.type == "cuda"
    assert len(trainer.history.last["model_weights"]) == 2
    w = model_mode_weights(trainer.potential, ds)
    assert w.device.type == "cpu" and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))


@pytest.mark.parametrize("objective", ["ml", "ssm", "dsm", "fdssm"])
def test_ebflow_trainer_on_the_gpu(objective):
    from pyro_ebm.ebflow import EBFlowTrainer, fc_ebflow
    from pyro_ebm.ebflow.data import load_digits

    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    x = load_digits()  # uint8 on the CPU: the trainer moves it
    trainer = EBFlowTrainer(fc_ebflow((64,)).to(CUDA), objective=objective)
    trainer.fit(x[:1400], num_steps=20, progress=False, validation=x[1400:1600], eval_every=10)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.history["loss"])
    nll = trainer.nll(x[1600:])
    assert torch.isfinite(torch.tensor(nll))
    missing = torch.zeros(64, dtype=torch.bool)
    missing[:32] = True
    filled = trainer.impute(x[1600:1610], missing, num_steps=5)
    assert filled.device.type == "cuda" and torch.isfinite(filled).all()
    assert trainer.sample(4).device.type == "cuda"


def test_adaptive_flow_mcmc_through_pyro_on_the_gpu():
    import pyro_ebm
    from pyro_ebm.datasets import two_to_one
    from pyro_ebm.infer import AdaptiveFlowMCMC

    torch.manual_seed(0)
    target = two_to_one()
    kernel = AdaptiveFlowMCMC(potential_fn=pyro_ebm.potential_fn(target.potential), num_walkers=16)
    _pyro_mcmc_samples(kernel, 100)


@pytest.mark.parametrize("name", ["MALA", "FlowIMH", "FlowISIR", "FlowHMC"])
def test_kernels_through_pyro_on_the_gpu(name):
    import pyro_ebm
    import pyro_ebm.infer as infer
    from pyro_ebm.flows import RealNVP

    torch.manual_seed(0)
    energy = pyro_ebm.GaussianEnergy(torch.zeros(2), torch.ones(2)).to(CUDA)
    potential = pyro_ebm.potential_fn(energy)
    kwargs = {} if name == "MALA" else {"flow": RealNVP(2, num_layers=2).to(CUDA)}
    if name == "FlowHMC":
        kwargs.update(step_size=0.5, num_steps=4)
    _pyro_mcmc_samples(getattr(infer, name)(potential_fn=potential, **kwargs), 50)


def test_ebm_trainer_resumes_exactly_on_the_gpu(tmp_path):
    """Ten steps in one go against the same run interrupted after six steps and resumed from
    its checkpoint by a fresh trainer: the same parameters and walkers (the checkpoint holds
    the GPU's random state too). On the H200 this failed (parameters off by ~1e-3; two
    uninterrupted runs there are bit-identical): the interrupted step's rollback restored the
    CPU's random state but not the GPU's; with that bug put back it fails again."""
    from pyro_ebm import MLPEnergy
    from pyro_ebm.datasets import two_to_one
    from pyro_ebm.flows import RealNVP
    from pyro_ebm.train import EBMTrainer

    data = two_to_one().sample(300, torch.Generator().manual_seed(0))
    run = dict(num_steps=10, batch_size=32, eval_every=2, progress=False)

    def make():
        torch.manual_seed(0)
        return EBMTrainer(
            MLPEnergy(2, hidden=(16, 16)),
            flow=RealNVP(2, num_layers=2, hidden=(16,)),
            num_walkers=32,
            seed=0,
            device="cuda",
        )

    full = make()
    full.fit(data, **run)
    first = make()
    calls, sample = [], first.sampler.sample

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    first.sampler.sample = interrupted
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        first.fit(data, checkpoint=ckpt, **run)
    assert first.step == 6
    torch.manual_seed(123)
    torch.cuda.manual_seed(123)  # whatever happens in between must not matter
    second = make()
    second.fit(data, checkpoint=ckpt, resume=True, **run)
    for a, b in zip(full.energy.parameters(), second.energy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(full.walkers, second.walkers, atol=1e-5)


def test_ebflow_trainer_resumes_exactly_on_the_gpu(tmp_path):
    """Six steps, a checkpoint, four more; a fresh trainer loaded from the checkpoint and run the
    same way ends with the same weights and losses (SSM's random projections and the
    dequantisation noise are drawn on the GPU, whose random state the checkpoint holds; without
    it saved, the bug this guards against, it fails on the H200)."""
    from pyro_ebm.ebflow import EBFlowTrainer, fc_ebflow

    data = torch.randint(0, 256, (64, 4), dtype=torch.uint8)

    def make():
        torch.manual_seed(0)
        model = fc_ebflow((4,)).to(CUDA)
        return EBFlowTrainer(model, "ssm", lr=1e-3, lr_schedule="constant", seed=0)

    a = make()
    a.fit(data, num_steps=6, batch_size=8, progress=False, checkpoint=tmp_path / "a.pt")
    a.fit(data, num_steps=10, batch_size=8, progress=False)
    torch.cuda.manual_seed(123)
    b = make()
    b.load(tmp_path / "a.pt")
    b.fit(data, num_steps=10, batch_size=8, progress=False)
    for p, q in zip(a.ema_model.parameters(), b.ema_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "name", ["MALA", "FlowISIR", "AdaptiveFlowMCMC", "ChEESHMC", "ChEESHMC-jit"]
)
def test_vectorized_chains_on_the_gpu(name):
    """pyro_ebm.infer.MCMC with 16 vectorized chains of an energy on the GPU (no initial_params:
    the kernels start the chains on the energy's device); draws, statistics and ArviZ data."""
    import pyro_ebm
    from pyro_ebm.flows import RealNVP
    from pyro_ebm.infer import MALA, MCMC, AdaptiveFlowMCMC, ChEESHMC, FlowISIR, to_arviz

    torch.manual_seed(0)
    energy = pyro_ebm.GaussianEnergy(torch.zeros(3)).to(CUDA)
    pot = pyro_ebm.potential_fn(energy)
    kernel = {
        "MALA": lambda: MALA(potential_fn=pot),
        "FlowISIR": lambda: FlowISIR(potential_fn=pot, flow=RealNVP(3).to(CUDA)),
        "AdaptiveFlowMCMC": lambda: AdaptiveFlowMCMC(potential_fn=pot, num_walkers=32),
        "ChEESHMC": lambda: ChEESHMC(potential_fn=pot),
        "ChEESHMC-jit": lambda: ChEESHMC(potential_fn=pot, jit_compile=True),
    }[name]()
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=40, num_chains=16, disable_progbar=True)
    mcmc.run()
    x = mcmc.get_samples(group_by_chain=True)["x"]
    assert x.device.type == "cuda" and x.shape == (16, 40, 3) and torch.isfinite(x).all()
    assert to_arviz(mcmc)["sample_stats"]["accept_prob"].shape == (16, 40)
