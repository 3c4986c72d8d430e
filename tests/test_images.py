"""The image configuration (pyro_ebm.energy.images): exact log-determinants, invertibility, the
CIFAR-10 loader on small files written here, and the CIFAR-10 trainer running a few steps on
tiny images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pyro_ebm.energy.images import ConvEnergy, ImageRealNVP, cifar10_trainer, load_cifar10


def _perturbed(flow):
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def test_image_flow_log_det_matches_autograd_jacobian_and_inverts():
    torch.manual_seed(0)
    flow = _perturbed(ImageRealNVP((2, 4, 4), num_layers=3, hidden=8))
    z = torch.randn(32)
    x, ladj = flow.forward(z[None])
    jac = torch.autograd.functional.jacobian(lambda v: flow.forward(v[None])[0][0], z)
    assert torch.allclose(ladj[0], torch.linalg.slogdet(jac)[1], atol=1e-8)
    z_back, ladj_inv = flow.inverse(x)
    assert torch.allclose(z_back[0], z, atol=1e-10)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-10)


def test_image_flow_is_identity_at_init_and_energy_small():
    flow = ImageRealNVP((3, 8, 8), num_layers=2, hidden=4)
    x = torch.randn(5, 192)
    assert torch.allclose(flow.log_prob(x), flow.base_dist.log_prob(x))
    E = ConvEnergy((3, 8, 8), channels=(4, 8))
    assert E(x).abs().max() < 0.05
    with pytest.raises(ValueError, match="shape"):
        ConvEnergy((3, 8))


def test_load_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, f)
    x = load_cifar10(tmp_path)
    assert x.shape == (20, 3072) and x.min() >= -1 and x.max() <= 1
    assert load_cifar10(tmp_path, train=False).shape == (4, 3072)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_cifar10(tmp_path / "missing")


def test_cifar10_trainer_runs_a_few_steps_on_tiny_images():
    torch.manual_seed(0)
    trainer = cifar10_trainer(
        "cpu",
        shape=(3, 8, 8),
        num_walkers=8,
        sampler_kwargs={"num_particles": 4, "num_mala_steps": 1},
    )
    data = torch.rand(64, 192) * 2 - 1
    trainer.fit(data, num_steps=3, batch_size=8, progress=False)
    assert trainer.walkers.shape == (8, 192)
    assert torch.isfinite(trainer.walkers).all()
    assert len(trainer.history) == 3
