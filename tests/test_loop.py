"""Tests of the training loop both trainers run on (pyro_ebm.train.loop): the schedule, the
averaging, skipped steps, checkpoint checks (fingerprints, checksums, non-finite weights) and
argument checks. Exact resume and Ctrl-C are tested per trainer in test_train.py and
test_ebflow.py, where each trainer's own state (walkers, whitening, best weights) is at stake."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_ebm import MLPEnergy
from pyro_ebm.datasets import two_to_one
from pyro_ebm.ebflow import EBFlowTrainer, fc_ebflow
from pyro_ebm.flows import RealNVP
from pyro_ebm.train import EBMTrainer
from pyro_ebm.train.averaging import Averager
from pyro_ebm.train.checkpoint import atomic_save, load_checkpoint
from pyro_ebm.train.loop import cosine_factor


def _ebm(**kwargs) -> EBMTrainer:
    torch.manual_seed(0)
    options = dict(num_walkers=16, seed=0)
    options.update(kwargs)
    return EBMTrainer(
        MLPEnergy(2, hidden=(8,)), flow=RealNVP(2, num_layers=1, hidden=(8,)), **options
    )


def _data(seed: int = 0) -> torch.Tensor:
    return two_to_one().sample(200, torch.Generator().manual_seed(seed))


def test_the_recorded_learning_rate_follows_the_cosine_over_the_total_steps():
    trainer = _ebm(lr=1e-2)
    trainer.fit(_data(), num_steps=5, batch_size=16, progress=False, eval_every=1)
    trainer.fit(_data(), num_steps=8, batch_size=16, progress=False, eval_every=1)
    expected = [1e-2 * cosine_factor(k, 5) for k in range(5)]
    expected += [1e-2 * cosine_factor(k, 8) for k in range(5, 8)]
    assert trainer.history["lr"] == pytest.approx(expected, rel=1e-12)
    assert trainer.history["step"] == list(range(1, 9))


def test_the_ema_has_its_warm_up_and_the_polyak_mean_replaces_the_weights():
    net = torch.nn.Linear(1, 1, bias=False)
    ema = Averager(net, ema=0.9)
    mean = Averager(net, ema=None, last=0.5)
    values, expected = [1.0, 3.0, 7.0, 2.0], None
    for t, v in enumerate(values, start=1):
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update(net, step=t, num_steps=4)
        expected = v if t == 1 else expected + (1 - min(0.9, (1 + t) / (10 + t))) * (v - expected)
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
        mean.update(net, step=t, num_steps=4)
    # the mean of the iterates after steps 3 and 4, copied into the trained weights at the end
    assert net.weight.item() == pytest.approx(4.5) and mean.module.weight.item() == 4.5


def test_a_resume_with_other_settings_or_data_is_refused_and_names_what_differs(tmp_path):
    ckpt = tmp_path / "c.pt"
    _ebm().fit(_data(), num_steps=3, batch_size=16, checkpoint=ckpt, progress=False)
    resume = dict(num_steps=6, checkpoint=ckpt, resume=True, progress=False)
    with pytest.raises(
        ValueError,
        match="written with flow_lr=0.001, lr=0.001, this trainer has flow_lr=0.002, lr=0.002",
    ):
        _ebm(lr=2e-3).fit(_data(), batch_size=16, **resume)
    with pytest.raises(ValueError, match="written with batch_size=16, this fit.. has batch_size=8"):
        _ebm().fit(_data(), batch_size=8, **resume)
    with pytest.raises(ValueError, match="data had the same shape but other values"):
        _ebm().fit(_data(seed=1), batch_size=16, **resume)
    with pytest.raises(ValueError, match=r"shape \(200, 2\).*these \(100, 2\)"):
        _ebm().fit(_data()[:100], batch_size=16, **resume)
    with pytest.raises(ValueError, match="with sampler.num_mala_steps=5, this trainer has sampler"):
        _ebm(sampler_kwargs={"num_mala_steps": 2}).fit(_data(), batch_size=16, **resume)
    forced = _ebm(lr=2e-3)
    forced.fit(_data(seed=1), batch_size=16, force=True, **resume)
    assert forced.step == 6
    ebflow = tmp_path / "e.pt"
    EBFlowTrainer(fc_ebflow((2,)), "ssm").fit(_data(), 2, 16, checkpoint=ebflow, progress=False)
    with pytest.raises(ValueError, match="written with objective='ssm', this trainer has"):
        EBFlowTrainer(fc_ebflow((2,)), "dsm").load(ebflow)
    with pytest.raises(ValueError, match="written by EBFlowTrainer, not EBMTrainer"):
        _ebm().fit(_data(), 6, 16, checkpoint=ebflow, resume=True, progress=False)


def test_damaged_non_finite_and_old_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "c.pt"
    trainer = _ebm()
    trainer.fit(_data(), num_steps=2, batch_size=16, checkpoint=ckpt, progress=False)
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte (torch.load alone reads it without an error)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged.pt is damaged"):
        trainer.load(damaged)
    state = load_checkpoint(ckpt)
    state["weights"]["energy"]["net.0.weight"][0, 0] = math.nan
    atomic_save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"not finite \(weights.energy.net.0.weight\)"):
        _ebm().fit(_data(), 4, 16, checkpoint=tmp_path / "nan.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"not finite"):  # force does not override it
        trainer.load(tmp_path / "nan.pt", force=True)
    del state["format"]
    atomic_save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"another version of pyro_ebm \(format 1"):
        trainer.load(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        trainer.load(tmp_path / "junk.pt")


def test_skipping_most_steps_warns_then_stops_and_keeps_a_checkpoint(tmp_path):
    """The loss is nan at two steps of every three (never more than 2 in a row): a warning at
    the first, and an error once 20 of the call's steps, more than half, were skipped (at step
    30). The checkpoint holds step 30."""
    trainer = EBFlowTrainer(fc_ebflow((2,)), "ml", seed=0)
    loss_fn = trainer.loss_fn

    def two_in_three(model, x):
        return loss_fn(model, x) * (1 if trainer.step % 3 == 0 else math.nan)

    trainer.loss_fn = two_in_three
    with pytest.warns(RuntimeWarning, match="step 2: the loss is not finite; the step is skipped"):
        with pytest.raises(RuntimeError, match=r"20 of the 30 steps .* \(2 in a row"):
            trainer.fit(
                torch.randn(50, 2),
                100,
                10,
                eval_every=1,
                checkpoint=tmp_path / "c.pt",
                progress=False,
            )
    assert trainer.step == 30 and load_checkpoint(tmp_path / "c.pt")["step"] == 30
    assert sum(r["skipped"] for r in trainer.history) == pytest.approx(20.0)


def test_paths_and_arguments_are_checked_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    trainer = _ebm()
    for path, message in [
        (tmp_path / "file" / "c.pt", "is a file, not a folder"),
        (tmp_path, "must be a file path, got the folder"),
    ]:
        with pytest.raises(ValueError, match=f"checkpoint: .*{message}|checkpoint {message}"):
            trainer.fit(_data(), 3, 16, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        trainer.fit(_data(), 3, 16, resume=True, progress=False)
    for name in ("num_steps", "batch_size", "eval_every", "checkpoint_every"):
        args = {"num_steps": 3, "batch_size": 16, "progress": False, name: 0}
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            trainer.fit(_data(), **args)
    assert trainer.step == 0 and not list(tmp_path.glob("**/*.tmp"))


def test_load_gives_back_the_trained_model_of_either_trainer(tmp_path):
    """``pyro_ebm.train.load`` on an export or a checkpoint, without building a trainer: the
    EBM's model in the data's coordinates (standardized here) with its flow, and the EBFlow's
    data model (EMA weights, through its whitening) with an exact log_prob."""
    from pyro_ebm.train import load

    data = _data() * 0.01 + torch.tensor([30.0, -10.0])  # far from centred: standardized
    ebm = EBMTrainer(MLPEnergy(2, hidden=(8,)), num_walkers=16, seed=0)  # the default flow
    ebm.fit(data, num_steps=3, batch_size=16, checkpoint=tmp_path / "ebm.pt", progress=False)
    assert ebm.standardization is not None
    for path in (ebm.export(tmp_path / "model.pt"), tmp_path / "ebm.pt"):
        model = load(path)
        assert torch.allclose(model.energy(data), ebm.model.energy(data))
        x = model.flow.sample(4)
        assert torch.allclose(model.flow.log_prob(x), ebm.data_flow.log_prob(x))
    ebflow = EBFlowTrainer(fc_ebflow((2,)), "ssm", seed=0)
    wide = torch.randn(200, 2) * torch.tensor([1.0, 30.0])  # ill-conditioned: whitened
    ebflow.fit(wide, 5, 20, checkpoint=tmp_path / "f.pt", progress=False)
    assert ebflow.whitening is not None
    for path in (ebflow.export(tmp_path / "f_model.pt"), tmp_path / "f.pt"):
        model = load(path)
        assert torch.allclose(model.log_prob(wide), ebflow.data_model.log_prob(wide))
    with pytest.raises(ValueError, match="holds no trained model"):
        atomic_save({"step": 1}, tmp_path / "other.pt")
        load(tmp_path / "other.pt")
