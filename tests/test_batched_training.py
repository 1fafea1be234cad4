"""Timestep-batched training (train.timesteps_per_call): the gradients and diagnostics of chunked UNet calls equal
those of one call per trained timestep, the reference, for every algorithm; ``auto`` and its memory probe."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from reward_server.rewards.jpeg import JpegSize
from tests.support import ServerThread
from trainer.config import load_config
from trainer.policy import Epoch
from trainer.prompts import load_prompts
from trainer.train import Trainer

STEPS, TRAINED = 10, 6  # timestep_fraction 0.6: each sample trains on its own 6 of the 10 steps
CHUNKS = [4, TRAINED]  # uneven (4 + 2) and all at once, against 1
RELATIVE = 1e-5  # float32 on the CPU: max |g_batched − g_reference| ≤ 1e-5 · max |g_reference|, per tensor


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    AcceleratorState._reset_state(reset_partial_state=True)
    with ServerThread([JpegSize("jpeg_compressibility", sign=-1)]) as server:
        run_dir = tmp_path_factory.mktemp("batched")
        overrides = [f"run_dir='{run_dir}'", f"reward.server='{server.address}'", "eval.enabled=false"]
        overrides += [
            "log.tensorboard=false",
            f"sample.num_steps={STEPS}",
            f"train.timestep_fraction={TRAINED / STEPS}",
        ]
        yield Trainer(load_config("tiny", overrides))
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def data(trainer: Trainer) -> Epoch:
    """An epoch of 8 samples, then the LoRA moved off its zero init so that ratios differ from 1 and clip."""
    prompts = load_prompts("shapes")[:8]
    batches = list(trainer.sample([(prompts, torch.Generator().manual_seed(0))], "test"))
    epoch = trainer._epoch_data(batches, np.linspace(-1.0, 1.0, 8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in trainer.unet.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return epoch


def gradients(
    trainer: Trainer, data: Epoch, per_call: int, **train: object
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One optimizer step's loss terms and gradients over two minibatches of 4, with ``per_call`` timesteps a call."""
    trainer.config.train = dataclasses.replace(trainer.config.train, timesteps_per_call=per_call, **train)
    generator = torch.Generator().manual_seed(1)
    step_order = torch.stack([torch.randperm(STEPS, generator=generator)[:TRAINED] for _ in range(len(data))])
    trainer.generators["training"].manual_seed(7)  # RWR's timesteps and noise
    trainer.optimizer.zero_grad()
    trainer.unet.train()
    terms = trainer.update.accumulate_gradients(data, [torch.arange(4), torch.arange(4, 8)], step_order)
    grads = [p.grad.clone() for p in trainer.unet.parameters() if p.requires_grad]
    trainer.optimizer.zero_grad()
    return terms, grads


@pytest.mark.parametrize("cfg", [True, False], ids=["guided", "conditional"])
@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf", "ddpo_is_kl", "rwr"])
def test_batched_timesteps_give_the_per_timestep_gradients(
    trainer: Trainer, data: Epoch, algorithm: str, cfg: bool
) -> None:
    reference_terms, reference = gradients(trainer, data, 1, algorithm=algorithm, cfg=cfg)
    # the configured algorithm is the one that ran (its own loss terms)
    assert ("kl" in reference_terms) == (algorithm == "ddpo_is_kl")
    assert ("clipfrac" in reference_terms) == (algorithm != "rwr")
    assert all(torch.isfinite(g).all() for g in reference)
    assert sum(float(g.abs().max()) for g in reference) > 0
    if algorithm == "ddpo_is":
        assert 0 < reference_terms["clipfrac"] < 1  # the clipped and unclipped branches both count
    for per_call in CHUNKS:
        terms, batched = gradients(trainer, data, per_call, algorithm=algorithm, cfg=cfg)
        for expected, got in zip(reference, batched, strict=True):
            assert float((got - expected).abs().max()) <= RELATIVE * float(expected.abs().max()), per_call
        assert terms.keys() == reference_terms.keys()
        for key, value in reference_terms.items():
            # the loss is a mean of O(1) terms of both signs (advantages) that nearly cancel: float32 rounding of
            # 48 of them is ~1e-7 absolute, however small the mean
            assert terms[key] == pytest.approx(value, rel=RELATIVE, abs=1e-6), (per_call, key)


def test_auto_is_every_trained_timestep_on_a_cpu(trainer: Trainer, data: Epoch) -> None:
    trainer.config.train = dataclasses.replace(trainer.config.train, timesteps_per_call="auto")
    step_order = torch.stack([torch.randperm(STEPS)[:TRAINED] for _ in range(len(data))])
    assert trainer.update.timesteps_per_call(data, torch.arange(4), step_order) == TRAINED


def test_the_auto_probe_halves_until_a_chunk_fits_and_leaves_no_trace(
    trainer: Trainer, data: Epoch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, auto probes once: out-of-memory at 10 and 5 timesteps per call, so 2 (faked here: no GPU)."""
    trainer.config.train = dataclasses.replace(trainer.config.train, algorithm="rwr", timesteps_per_call="auto")
    real_loss, tried = trainer.update.loss, []

    def loss_that_fits_two(data: Epoch, indices: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        tried.append(steps.shape[1])
        terms = real_loss(data, indices, steps)  # draws RWR's noise, and holds the activations...
        if steps.shape[1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")  # ...then runs out of memory
        return terms

    monkeypatch.setattr(trainer.update, "loss", loss_that_fits_two)
    step_order = torch.stack([torch.randperm(STEPS) for _ in range(len(data))])
    random_state = trainer.generators["training"].get_state()
    assert trainer.update.probe_timesteps_per_call(data, torch.arange(4), step_order) == 2
    assert tried == [10, 5, 2]
    assert torch.equal(trainer.generators["training"].get_state(), random_state)  # RWR's draws are not consumed
    assert all(p.grad is None for p in trainer.unet.parameters())  # nothing accumulated

    monkeypatch.setattr(
        trainer.update, "loss", lambda *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("faked"))
    )
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        trainer.update.probe_timesteps_per_call(data, torch.arange(4), step_order)
    assert "lower train.batch_size, or set train.gradient_checkpointing = true" in "".join(raised.value.__notes__)


def test_timesteps_per_call_is_validated(tmp_path: Path) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.timesteps_per_call must be 'auto' or in \[1, 5\].*got 6"):
        load_config("tiny", ["train.timestep_fraction=0.5", "train.timesteps_per_call=6"])
    with pytest.raises(ConfigError, match=r"train\.timesteps_per_call must be int or 'auto', got 'all'"):
        load_config("tiny", ["train.timesteps_per_call='all'"])
