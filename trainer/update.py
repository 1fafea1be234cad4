"""One optimizer step of the policy: the configured algorithm's loss over a group of minibatches, back-propagated in
few UNet calls, checked, clipped and applied.

A minibatch's trained steps go through the UNet in chunks of k = train.timesteps_per_call (the last may be
shorter). A chunk's loss is the mean of its k per-step losses, so it is back-propagated with weight
k / (minibatches × T): the same gradient as one call per step (k = 1, the reference), in fewer calls.
"""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from trainer.algorithms import ALGORITHMS, Algorithm, Terms
from trainer.config import Config, TrainConfig
from trainer.distributed import any_process, max_over_processes
from trainer.policy import Epoch, Policy
from trainer.precision import ADVICE, NonFiniteError

logger = get_logger(__name__)


class RatioCheckError(RuntimeError):
    """Log-probabilities recomputed with unchanged weights disagree with those recorded while sampling."""


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (the LoRA adapter, or every UNet weight)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def plan_minibatches(
    samples: int, config: Config, generator: torch.Generator, device: torch.device
) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """One inner epoch's plan: the samples shuffled into minibatches, grouped by optimizer step, and the trained
    steps of each sample (N, T_train): its own random subset of the T steps, in a random order (timestep_fraction)."""
    t = config.train
    order = torch.randperm(samples, generator=generator)
    step_order = torch.stack([torch.randperm(config.sample.num_steps, generator=generator) for _ in order])
    minibatches = list(torch.split(order.to(device), t.batch_size))
    steps_per_group = t.gradient_accumulation_steps
    groups = [minibatches[i : i + steps_per_group] for i in range(0, len(minibatches), steps_per_group)]
    return groups, step_order[:, : config.train_timesteps()].to(device)


class PolicyUpdate:
    def __init__(
        self,
        accelerator: Accelerator,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        config: Config,  # read at every call, so that a change of config.train takes effect
        generator: torch.Generator,  # RWR's draws of timesteps and noise
        dtype_name: str,  # the policy's, for messages
    ) -> None:
        self.accelerator, self.policy, self.optimizer, self.run_config = accelerator, policy, optimizer, config
        self.generator = generator
        self.dtype_name = dtype_name
        self._probed_per_call: int | None = None  # timesteps_per_call = 'auto' on a GPU, once probed

    @property
    def config(self) -> TrainConfig:
        return self.run_config.train

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.config.algorithm]

    def loss(self, data: Epoch, indices: torch.Tensor, steps: torch.Tensor) -> Terms:
        """The algorithm's loss terms for samples ``indices`` (B) at their recorded steps ``steps`` (B, k)."""
        return self.algorithm.loss(self.policy, data, indices, steps, self.config, self.generator)

    def step(
        self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor, where: str, check_ratio: bool = False
    ) -> dict[str, float]:
        """Accumulate the gradients of the group's minibatches, then take one optimizer step; returns the loss terms.

        ``check_ratio`` (each epoch's first step): the ratio self-check on the log-probabilities this step recomputed,
        before the weights change (``ratio_check`` in the result). A non-finite loss or gradient norm stops the run
        before the step, on every process; except that in fp16 an overflowing gradient is the loss scaler's to handle
        (it skips the step and lowers the scale), until the scale falls below 1. ``where`` names the step in errors.
        """
        terms = self.accumulate_gradients(data, group, step_order)
        worst_deviation = terms.pop("ratio_deviation", None)  # None for RWR, which has no ratio
        if check_ratio and worst_deviation is not None and self.config.ratio_check != "off":
            terms["ratio_check"] = self.check_ratio(worst_deviation)
        unet = self.policy.unet
        grad_norm = float(self.accelerator.clip_grad_norm_(unet.parameters(), self.config.max_grad_norm))
        where = f"{where} ({self.dtype_name})"
        if any_process(self.accelerator, not math.isfinite(terms["loss"])):
            raise NonFiniteError(f"{where}: the loss is not finite on at least one process. {ADVICE}")
        scaler = self.accelerator.scaler
        if not math.isfinite(grad_norm) and (scaler is None or scaler.get_scale() < 1):
            raise NonFiniteError(f"{where}: the gradient norm is {grad_norm}. {ADVICE}")
        self.optimizer.step()
        self.optimizer.zero_grad()
        if math.isfinite(grad_norm):
            terms["grad_norm"] = grad_norm
        return terms

    def accumulate_gradients(
        self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor
    ) -> dict[str, float]:
        """Back-propagate the loss of one optimizer step: the mean, over the group's minibatches and their T trained
        steps (``step_order`` (N, T)), of the per-step loss. Returns its mean terms, and DDPO's max |ratio − 1|.
        Accumulation is explicit rather than accelerate's ``accumulate``; ``no_sync`` skips the gradient all-reduce
        until the last backward pass."""
        steps = step_order.shape[1]
        per_call = self.timesteps_per_call(data, group[0], step_order)
        calls = [
            (indices, step_order[indices, j : j + per_call]) for indices in group for j in range(0, steps, per_call)
        ]
        totals: dict[str, torch.Tensor] = {}
        worst_deviation: torch.Tensor | None = None
        for n, (indices, chunk) in enumerate(calls):
            share = chunk.shape[1] / (len(group) * steps)
            sync = contextlib.nullcontext() if n == len(calls) - 1 else self.accelerator.no_sync(self.policy.unet)
            with sync, self.accelerator.autocast():
                terms = self.loss(data, indices, chunk)
                self.accelerator.backward(terms["loss"] * share)
            if (deviation := terms.pop("ratio_deviation", None)) is not None:
                worst_deviation = deviation if worst_deviation is None else torch.maximum(worst_deviation, deviation)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach() * share
        if worst_deviation is not None:
            totals["ratio_deviation"] = worst_deviation
        return {key: float(value) for key, value in totals.items()}

    def timesteps_per_call(self, data: Epoch, indices: torch.Tensor, step_order: torch.Tensor) -> int:
        """train.timesteps_per_call, with auto resolved: every trained step on a CPU; on a GPU, probed once."""
        per_call = self.config.timesteps_per_call
        if per_call != "auto":
            return per_call
        if self.accelerator.device.type != "cuda":
            return int(step_order.shape[1])
        if self._probed_per_call is None:
            self._probed_per_call = self.probe_timesteps_per_call(data, indices, step_order)
            logger.info("train.timesteps_per_call = 'auto': %d per UNet call fit(s) in memory", self._probed_per_call)
        return self._probed_per_call

    def probe_timesteps_per_call(self, data: Epoch, indices: torch.Tensor, step_order: torch.Tensor) -> int:
        """The largest chunk of minibatch ``indices``'s trained steps whose forward and backward fit in memory:
        all of them, halved on each out-of-memory error. Nothing changes: the gradients are zeroed and the training
        generator (RWR's noise) is put back. Each process probes alone (no gradient all-reduce: an out-of-memory
        on one process must not leave the others waiting), then all take the smallest."""
        random_state = self.generator.get_state()
        per_call = int(step_order.shape[1])
        while True:
            try:
                with self.accelerator.no_sync(self.policy.unet), self.accelerator.autocast():
                    self.accelerator.backward(self.loss(data, indices, step_order[indices, :per_call])["loss"])
                break
            except torch.cuda.OutOfMemoryError as error:
                if per_call == 1:
                    error.add_note(
                        "One trained timestep of a minibatch does not fit: lower train.batch_size, or set "
                        "train.gradient_checkpointing = true."
                    )
                    raise
                per_call //= 2
            finally:
                self.optimizer.zero_grad()
                self.generator.set_state(random_state)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return -int(max_over_processes(self.accelerator, -per_call))

    def check_ratio(self, worst: float) -> float:
        """The ratio self-check on this process's max |π_θ/π_old − 1| at unchanged weights: over every process it
        must be ~0, or the update is wrong. A NaN or infinite ratio always fails (unless the check is off)."""
        t = self.config
        worst = max_over_processes(self.accelerator, worst)
        if math.isfinite(worst) and worst <= t.ratio_tolerance:
            return worst
        message = (
            f"ratio self-check: with unchanged weights, recomputed log-probabilities differ from the sampled ones "
            f"(max |ratio − 1| = {worst:.3g} > train.ratio_tolerance = {t.ratio_tolerance:g}, policy in "
            f"{self.dtype_name}). Sampling and training disagree: check mixed precision, that train.cfg matches "
            "sampling, and that nothing changed the scheduler."
        )
        if t.ratio_check == "fail" or not math.isfinite(worst):
            raise RatioCheckError(message + " Set train.ratio_check='warn' to continue anyway (not if it is inf).")
        logger.warning(message)
        return worst
