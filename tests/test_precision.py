"""Mixed precision on the CPU (the arithmetic a GPU runs in fp16 and bf16), non-finite values as errors, and the
memory options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from accelerate.state import AcceleratorState

from reward_server.rewards.jpeg import JpegSize
from tests.support import ServerThread, SlowReward, read_metrics, train_tiny
from trainer.config import load_config
from trainer.policy import Epoch
from trainer.precision import NonFiniteError
from trainer.prompts import load_prompts
from trainer.sampling import SampleBatch, decode_images
from trainer.train import Trainer
from trainer.update import RatioCheckError

PROMPTS = load_prompts("shapes")[:8]
QUIET = ["log.tensorboard=false", "log.images_every=0", "eval.enabled=false"]
# How far the images of a half-precision policy may be from float32's, from the same noise: the mean absolute
# difference in grey levels (measured here: fp16 0.11, bf16 1.9).
IMAGE_TOLERANCE = {"fp16": 1.0, "bf16": 5.0}


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps one mixed-precision setting per process, and these tests build Trainers with several."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread([JpegSize("jpeg_compressibility", sign=-1)]) as running:
        yield running


def make_trainer(server: ServerThread, tmp_path: Path, *overrides: str) -> Trainer:
    address = f"reward.server='{server.address}'"
    return Trainer(load_config("tiny", [f"run_dir='{tmp_path}'", address, *QUIET, *overrides]))


def sample(trainer: Trainer, seed: int = 0) -> list[SampleBatch]:
    return list(trainer.sample([(PROMPTS, torch.Generator().manual_seed(seed))], "test"))


def epoch_data(trainer: Trainer, batches: list[SampleBatch]) -> Epoch:
    return trainer._epoch_data(batches, np.linspace(-1.0, 1.0, sum(len(b.prompts) for b in batches)))


def step_order(data: Epoch, steps: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(steps, generator=generator) for _ in range(len(data))])


@pytest.fixture(scope="module")
def float32_images(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> npt.NDArray[np.uint8]:
    AcceleratorState._reset_state(reset_partial_state=True)
    return sample(make_trainer(server, tmp_path_factory.mktemp("fp32")))[0].images


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sampling_the_tiny_model_in_half_precision(
    server: ServerThread, tmp_path: Path, precision: str, float32_images: npt.NDArray[np.uint8]
) -> None:
    trainer = make_trainer(server, tmp_path, f"mixed_precision='{precision}'")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.conv_in.weight.dtype == trainer.pipeline.vae.dtype == half  # the policy runs in that dtype
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)  # the LoRA adapter
    (batch,) = sample(trainer)
    assert batch.latents.dtype == batch.log_probs.dtype == torch.float32
    assert torch.isfinite(batch.latents).all()
    assert torch.isfinite(batch.log_probs).all()
    assert batch.images.reshape(len(batch.images), -1).std(axis=1).min() > 5  # no image is one colour
    difference = np.abs(batch.images.astype(float) - float32_images.astype(float)).mean()
    assert difference < IMAGE_TOLERANCE[precision]  # the same pictures as float32, from the same noise
    data = epoch_data(trainer, [batch])
    terms = trainer.optimizer_step(data, [torch.arange(len(data))], step_order(data), epoch=1, check_ratio=True)
    assert terms["ratio_check"] <= trainer.config.train.ratio_tolerance  # the default 1e-4


def test_the_ratio_check_fails_on_nan_before_the_weights_change(server: ServerThread, tmp_path: Path) -> None:
    trainer = make_trainer(server, tmp_path, "train.ratio_check='warn'")
    data = epoch_data(trainer, sample(trainer))
    order = step_order(data)
    data.log_probs[2, int(order[2, 0])] = float("nan")
    before = [p.detach().clone() for p in trainer.unet.parameters() if p.requires_grad]
    with pytest.raises(RatioCheckError, match=r"max \|ratio − 1\| = inf > train.ratio_tolerance"):
        # even in warn mode: NaN is never a warning
        trainer.optimizer_step(data, [torch.arange(len(data))], order, epoch=1, check_ratio=True)
    after = [p for p in trainer.unet.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_non_finite_samples_stop_the_run_and_never_reach_the_reward_service(tmp_path: Path) -> None:
    reward = SlowReward("counted", delay=0.0)
    with ServerThread([reward]) as server:
        trainer = make_trainer(server, tmp_path, "mixed_precision='fp16'", "reward.name='counted'")
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        calls = []

        def blow_up_at_the_seventh_step(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return output * float("inf") if len(calls) == 7 else output

        unet.conv_out.register_forward_hook(blow_up_at_the_seventh_step)
        with pytest.raises(
            NonFiniteError,
            match=r"epoch 1, sampling batch 1: these samples were not sent to the reward service: DDIM step 7 of 10 "
            r"\(timestep \d+\) gave non-finite latents with the UNet in float16. Try mixed_precision = 'bf16'",
        ):
            trainer.run()
    assert reward.batch_sizes == []
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_non_finite_loss_stops_the_run_before_the_step(server: ServerThread, tmp_path: Path) -> None:
    trainer = make_trainer(server, tmp_path)
    data = epoch_data(trainer, sample(trainer))
    before = [p.detach().clone() for p in trainer.unet.parameters() if p.requires_grad]
    data.weights[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"epoch 4, optimizer step 1 \(float32\): the loss is not finite"):
        trainer.optimizer_step(data, [torch.arange(len(data))], step_order(data)[:, :2], epoch=4)
    after = [p for p in trainer.unet.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_overflowing_gradient_stops_the_run_or_is_the_loss_scalers(
    server: ServerThread, tmp_path: Path, precision: str
) -> None:
    """bf16 has no loss scaler: an infinite gradient norm stops the run. fp16's scaler skips the step and halves its
    scale, as in any fp16 training; only once the scale is below 1 is the overflow the model's, and the run stops."""
    trainer = make_trainer(server, tmp_path, f"mixed_precision='{precision}'")
    data = epoch_data(trainer, sample(trainer))
    lora = next(p for name, p in trainer.unet.named_parameters() if "lora_B" in name)
    lora.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = lora.detach().clone()
    order, minibatch = step_order(data)[:, :1], [torch.arange(4)]
    if precision == "bf16":
        with pytest.raises(NonFiniteError, match=r"optimizer step 1 \(bfloat16\): the gradient norm is inf"):
            trainer.optimizer_step(data, minibatch, order, epoch=1)
        return
    scaler = trainer.accelerator.scaler
    scale = scaler.get_scale()
    trainer.optimizer_step(data, minibatch, order, epoch=1)
    assert trainer.accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == scale / 2
    assert torch.equal(lora, before)
    scaler.update(0.5)
    with pytest.raises(NonFiniteError, match=r"optimizer step 2 \(float16\): the gradient norm is inf"):
        trainer.optimizer_step(data, minibatch, order, epoch=1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddpo_train_in_half_precision_on_the_cpu(server: ServerThread, tmp_path: Path, precision: str) -> None:
    """A whole run in half precision, with its held-out evaluation before and after training."""
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    held_out = ("eval.enabled=true", "eval.set='from_file'", f"eval.file='{prompts}'", "eval.samples_per_prompt=1")
    done = train_tiny(
        server.address,
        tmp_path / "run",
        *("--epochs", "1", "sample.num_steps=5", f"mixed_precision='{precision}'", *QUIET, *held_out),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evaluations] == [0, 1]
    assert all(e["samples"] == 2 and e["dropped"] == 0 and np.isfinite(e["reward_mean"]) for e in evaluations)
    assert (tmp_path / "run" / "eval" / "epoch_000001" / "report.html").is_file()
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[precision]
    assert f"(policy {dtype} on cpu, 1 process(es))" in done.stderr
    (line,) = read_metrics(tmp_path / "run")
    assert line["policy_dtype"] == dtype
    assert line["processes"] == 1
    assert np.isfinite(line["loss"])
    assert np.isfinite(line["grad_norm"])
    assert line["ratio_check"] <= 1e-4
    assert line["samples"] == 16


def test_rwr_trains_on_the_guided_prediction(server: ServerThread, tmp_path: Path) -> None:
    """train.cfg (the default): the UNet sees the unconditional half, and a step on one high-weight sample lowers
    that sample's guided denoising error, i.e. raises its likelihood bound."""
    trainer = make_trainer(server, tmp_path, "train.algorithm='rwr'")
    data = epoch_data(trainer, sample(trainer))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    seen: list[torch.Tensor] = []
    unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    indices = torch.arange(4)
    embeds = data.prompt_embeds[indices]
    first_step = torch.zeros(4, 1, dtype=torch.long)
    trainer.update.loss(data, indices, first_step)
    (hidden,) = seen
    assert hidden.shape[0] == 8  # the unconditional half, then the conditional one
    assert torch.equal(hidden[:4], trainer.policy.negative_embeds.expand(4, -1, -1))
    assert torch.equal(hidden[4:], embeds)

    generator = trainer.generators["training"]
    state = generator.get_state()  # the same timesteps and noise before and after the step
    data.weights[indices] = torch.tensor([4.0, 0.0, 0.0, 0.0])

    def error_of_the_first_sample() -> float:
        generator.set_state(state)
        with torch.no_grad():
            return float(trainer.update.loss(data, indices, first_step)["loss"])

    before = error_of_the_first_sample()
    generator.set_state(state)
    trainer.update.loss(data, indices, first_step)["loss"].backward()
    trainer.optimizer.step()
    assert error_of_the_first_sample() < before


def test_gradient_checkpointing_gives_the_same_gradients(server: ServerThread, tmp_path: Path) -> None:
    def gradients(trainer: Trainer, data: Epoch) -> list[torch.Tensor]:
        trainer.unet.train()
        indices = torch.arange(len(data))
        trainer.update.loss(data, indices, step_order(data)[:, :1])["loss"].backward()
        return [p.grad.clone() for p in trainer.unet.parameters() if p.requires_grad]

    plain = make_trainer(server, tmp_path / "plain")
    data = epoch_data(plain, sample(plain))
    checkpointed = make_trainer(server, tmp_path / "checkpointed", "train.gradient_checkpointing=true")
    checkpointed.pipeline.scheduler.set_timesteps(10)  # as sampling leaves it
    assert checkpointed.accelerator.unwrap_model(checkpointed.unet).is_gradient_checkpointing
    expected, got = gradients(plain, data), gradients(checkpointed, data)
    assert any(g.abs().sum() > 0 for g in expected)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_vae_slicing_decodes_the_same_images(server: ServerThread, tmp_path: Path) -> None:
    trainer = make_trainer(server, tmp_path, "sample.vae_slicing=true")
    assert trainer.pipeline.vae.use_slicing
    latents = sample(trainer)[0].latents[:, -1]
    sliced = decode_images(trainer.pipeline, latents)
    trainer.pipeline.vae.disable_slicing()
    whole = decode_images(trainer.pipeline, latents)
    assert np.abs(sliced.astype(int) - whole.astype(int)).max() <= 1  # batched kernels may round one level apart
