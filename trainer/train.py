"""The DDPO training loop: sample, get rewards from the service, compute advantages, update. Repeat.

Each epoch has three phases, marked by banners below. The maths lives in importable, tested functions:
``trainer.ddim`` (the log-probability step), ``trainer.sampling`` (the guided policy), ``trainer.advantages`` and
``trainer.losses`` (every algorithm's weights and loss), tabled by name in ``trainer.algorithms``; ``trainer.update``
takes an optimizer step. This file wires them together on accelerate, so that ``accelerate launch -m trainer ...``
runs it on several processes or GPUs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from clients import AnyRewardClient
from trainer.advantages import PerPromptStatTracker
from trainer.algorithms import ALGORITHMS
from trainer.checkpoint import ProcessRandomState, RunCheckpoints, resolve_checkpoint
from trainer.config import Config, to_dict
from trainer.distributed import ProcessFailedError, failing_together, gather_rewards, mean_over_processes
from trainer.evaluate import evaluate_held_out
from trainer.export import export_final
from trainer.lifecycle import GracefulStop, StopRequested, claim_run_dir
from trainer.policy import Epoch, Policy, frozen_copy, load_policy
from trainer.precision import NonFiniteError, dtype_name, make_accelerator, policy_dtype
from trainer.prompts import PromptSampler, load_prompts
from trainer.rewards import EpochRewards, RewardError, connect
from trainer.sampling import SampleBatch, encode_prompts, sample_batches
from trainer.tracking import RunLogger, describe_epoch, plot_run
from trainer.update import PolicyUpdate, RatioCheckError, make_optimizer, plan_minibatches

logger = get_logger(__name__)  # logs on the main process only

# What one process may fail with alone: every process learns of it at the same point (``failing_together``).
PROCESS_ERRORS = (RewardError, NonFiniteError)
# What stops a run after it has started: the trainer checkpoints the last finished epoch, then lets it propagate.
STOPS = (StopRequested, RewardError, NonFiniteError, RatioCheckError, ProcessFailedError)


class Trainer:
    def __init__(
        self, config: Config, resume: str | None = None, overwrite: bool = False, client: AnyRewardClient | None = None
    ) -> None:
        """Check the run folder and the reward service (within seconds, before the model loads; ``client``: one
        ``trainer.rewards.connect`` made already), then load the policy and, with ``resume``, a checkpoint.
        ``overwrite`` deletes a previous run in the folder. The trainer closes the client."""
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.accelerator = make_accelerator(config.mixed_precision, str(self.run_dir))
        self.dtype = policy_dtype(config.mixed_precision)  # frozen weights and the UNet's arithmetic
        self.device = self.accelerator.device
        self.progress = {"disable": not self.accelerator.is_local_main_process, "leave": False}  # inner tqdm bars
        claim_run_dir(self.accelerator, self.run_dir, resume, overwrite)
        r = config.reward
        self.client = client or connect(r.server, r.name, r.read_token(), r.ca_file, r.timeout, r.outage_timeout)
        try:
            self._set_up(resume)
        except BaseException:
            self.client.close()
            raise

    def _set_up(self, resume: str | None) -> None:
        config = self.config
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        process_seed = config.seed + self.accelerator.process_index
        torch.manual_seed(process_seed)
        self.generators = {
            "sampling": torch.Generator().manual_seed(process_seed),
            "training": torch.Generator().manual_seed(process_seed + 10_000),
        }
        self.prompts = PromptSampler(load_prompts(config.prompts.set, config.prompts.file), seed=process_seed)
        self.prompt_ids = {prompt: i for i, prompt in enumerate(self.prompts.prompts)}
        self.eval_prompts = load_prompts(config.eval.set, config.eval.file) if config.eval.enabled else []

        self.pipeline = load_policy(config, self.dtype, self.device)
        t = config.train
        self.optimizer = make_optimizer(self.pipeline.unet, t)
        self.unet, self.optimizer = self.accelerator.prepare(self.pipeline.unet, self.optimizer)
        base = self.accelerator.unwrap_model(self.unet)
        full_kl = ALGORITHMS[t.algorithm].reference and not config.lora.enabled  # LoRA's reference: adapter off
        self.policy = Policy(
            unet=self.unet,
            base=base,
            scheduler=self.pipeline.scheduler,
            negative_embeds=encode_prompts(self.pipeline, [""], self.device),
            config=config,
            frozen_reference=frozen_copy(base) if full_kl else None,
        )
        self.update = PolicyUpdate(
            self.accelerator, self.policy, self.optimizer, config, self.generators["training"], dtype_name(self.dtype)
        )
        self.stat_tracker = PerPromptStatTracker(config.stat_tracking.buffer_size, config.stat_tracking.min_count)
        self.checkpoints = RunCheckpoints(
            self.accelerator,
            self.run_dir,
            base,
            self.optimizer,
            ProcessRandomState(self.generators, self.prompts.rng),
            self.stat_tracker,
            to_dict(config),
            config.keep_checkpoints,
        )
        self.start_epoch, self.global_step = 0, 0
        self.stop = GracefulStop()
        if resume:
            path = resolve_checkpoint(resume, self.run_dir)
            state = self.checkpoints.load(path)
            self.start_epoch, self.global_step = state.epoch, state.global_step
            logger.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.global_step)

    # ------------------------------------------------------------------ the run

    def run(self) -> Path:
        """Train to ``config.num_epochs``; returns the folder with the final LoRA (or UNet).

        A stop after start-up (SIGINT/SIGTERM, a reward service that stays away, a reward error, a non-finite value,
        a failed ratio check) first puts back the state of the last finished epoch and checkpoints it, so that
        ``--resume latest`` continues as if the run had not stopped; then the error propagates.
        """
        config = self.config
        main = self.accelerator.is_main_process
        self.run_dir.mkdir(parents=True, exist_ok=True)
        policy = f"{dtype_name(self.dtype)} on {self.device.type}"
        logger.info(config.describe(self.accelerator.num_processes, policy, self.start_epoch))
        # logs, images, evaluations and plots are written once, by the main process
        run_logger = RunLogger.of_run(config, self.start_epoch) if main else None
        try:
            with self.stop:
                self._train(run_logger)
        except STOPS:
            if (restored := self.checkpoints.save_last_finished()) is not None:
                self.global_step = restored.global_step
            raise
        finally:
            if run_logger is not None:
                run_logger.close()
            self.client.close()
        final = self.run_dir / "final"
        if main:
            for line in plot_run(config):
                logger.info(line)
            final = export_final(self.pipeline, self.accelerator.unwrap_model(self.unet), config, self.run_dir)
        self.accelerator.wait_for_everyone()
        return final

    def _train(self, run_logger: RunLogger | None) -> None:
        config = self.config
        # a resumed run starts from a checkpoint
        self.checkpoints.finished(self.start_epoch, self.global_step, saved=self.start_epoch > 0)
        if self.start_epoch == 0 and config.eval_due(0):  # a resumed run's start was evaluated before it stopped
            self.run_eval(0, run_logger)
        epochs = tqdm(
            range(self.start_epoch, config.num_epochs),
            desc="DDPO",
            unit="epoch",
            initial=self.start_epoch,
            total=config.num_epochs,
            disable=not self.accelerator.is_local_main_process,
        )
        for epoch in epochs:
            metrics = self.run_epoch(epoch, run_logger)
            if run_logger is not None:
                run_logger.log_epoch(metrics)
            epochs.set_postfix(reward=f"{metrics['reward_mean']:.4g}")
            logger.info(describe_epoch(metrics, config.reward.name))
            done = epoch + 1
            saved = done % config.save_every == 0 or done == config.num_epochs
            if saved:
                self.checkpoints.save(done, self.global_step)
            self.checkpoints.finished(done, self.global_step, saved)
            if config.eval_due(done):
                self.run_eval(done, run_logger)

    def run_eval(self, epoch: int, run_logger: RunLogger | None) -> None:
        """Score the held-out prompts with fixed noise (``trainer.evaluate``), on the main process only."""
        with failing_together(self.accelerator, PROCESS_ERRORS):
            if run_logger is not None:
                self.unet.eval()
                evaluate_held_out(epoch, self.config, self.eval_prompts, self.sample, self.client, run_logger)

    def sample(
        self, batches: Iterable[tuple[list[str], torch.Generator | list[torch.Generator]]], what: str
    ) -> Iterator[SampleBatch]:
        """Each (prompts, generator or one generator per image) pair sampled with the run's model and sampler
        (``trainer.sampling.sample_batches``), lazily."""
        unet = self.accelerator.unwrap_model(self.unet)
        return sample_batches(
            self.pipeline,
            unet,
            batches,
            self.policy.negative_embeds,
            self.config.sample,
            self.device,
            self.accelerator.autocast,
            what,
        )

    def sampling_batches(self, epoch: int) -> Iterator[tuple[list[str], torch.Generator]]:
        """The epoch's batches of prompts, drawing on the sampling generator; before each, a safe point to stop at."""
        s = self.config.sample
        for _ in tqdm(range(s.num_batches_per_epoch), desc=f"epoch {epoch + 1}: sampling", **self.progress):
            self.stop.check(self.accelerator)
            yield self.prompts.sample(s.batch_size, s.images_per_prompt), self.generators["sampling"]

    def run_epoch(self, epoch: int, run_logger: RunLogger | None) -> dict[str, Any]:
        config = self.config
        #################### SAMPLING (rewards stream to the service meanwhile) ####################
        started = time.perf_counter()
        self.unet.eval()
        r = config.reward
        what = f"epoch {epoch + 1}"
        with failing_together(self.accelerator, PROCESS_ERRORS):
            rewards = EpochRewards(self.client, r.name, r.timeout, r.on_error, what, r.stream)
            batches = rewards.stream(self.sample(self.sampling_batches(epoch), what))
            sample_s = time.perf_counter() - started

            #################### REWARDS ####################
            scores = rewards.collect()
        data = self._epoch_data(batches, scores.scores)
        if run_logger is not None:
            run_logger.log_samples(epoch + 1, batches, scores.scores, config.log)

        #################### TRAINING ####################
        started = time.perf_counter()
        self.unet.train()
        train_metrics = self.train_on(data, epoch + 1)
        train_s = time.perf_counter() - started
        return {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "reward_mean": float(data.rewards.mean()),
            "reward_std": float(data.rewards.std()),
            "samples": len(data.rewards),
            "dropped": data.dropped,
            **train_metrics,
            "sample_s": sample_s,
            **scores.metrics(),
            "train_s": train_s,
            **self.stat_tracker.stats(),
            "policy_dtype": dtype_name(self.dtype),
            "processes": self.accelerator.num_processes,
        }

    def _epoch_data(self, batches: list[SampleBatch], rewards: npt.NDArray[np.float64]) -> Epoch:
        """The epoch's samples, with rewards (NaN: dropped) turned into the algorithm's weights (0: dropped).

        Statistics are over every process's samples, as in ddpo-pytorch: each process gathers all rewards and prompt
        ids (tensors, no pickling), computes every weight, and keeps its own slice.
        """
        ids = [self.prompt_ids[p] for b in batches for p in b.prompts]
        all_ids, all_rewards, mine = gather_rewards(self.accelerator, ids, rewards)
        scored = ~np.isnan(all_rewards)
        scored_prompts = [self.prompts.prompts[i] for i, ok in zip(all_ids, scored, strict=True) if ok]
        tracker = self.stat_tracker if self.config.stat_tracking.per_prompt else None
        weights = np.zeros(len(all_rewards))
        weights[scored] = self.update.algorithm.weights(scored_prompts, all_rewards[scored], self.config.train, tracker)
        return Epoch.of(batches, all_rewards[scored], weights[mine], int((~scored).sum()), self.device)

    # ------------------------------------------------------------------ the update

    def train_on(self, data: Epoch, epoch: int) -> dict[str, float | None]:
        """``num_inner_epochs`` passes over the epoch in shuffled minibatches; returns diagnostics averaged over the
        optimizer steps and the processes."""
        config = self.config
        generator = self.generators["training"]
        terms_seen: dict[str, list[float]] = defaultdict(list)
        ratio_check: float | None = None  # RWR does not use log-probabilities
        skipped = 0
        for inner in range(config.train.num_inner_epochs):
            groups, step_order = plan_minibatches(len(data), config, generator, self.device)
            for n, group in enumerate(tqdm(groups, desc=f"training (inner epoch {inner + 1})", **self.progress)):
                terms = self.optimizer_step(data, group, step_order, epoch, check_ratio=inner == n == 0)
                ratio_check = terms.pop("ratio_check", ratio_check)
                skipped += int(self.accelerator.optimizer_step_was_skipped)
                self.stop.check(self.accelerator)
                for key, value in terms.items():
                    terms_seen[key].append(value)
        # approx_kl and clipfrac stay None (null in metrics.jsonl) for RWR, which has no importance ratio
        metrics: dict[str, float | None] = {"approx_kl": None, "clipfrac": None}
        metrics.update(mean_over_processes(self.accelerator, {k: float(np.mean(v)) for k, v in terms_seen.items()}))
        metrics["ratio_check"] = ratio_check
        metrics["skipped_steps"] = skipped  # fp16 only: steps the loss scaler skipped after an overflow
        return metrics

    def optimizer_step(
        self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor, epoch: int, check_ratio: bool = False
    ) -> dict[str, float]:
        """One optimizer step on the group's minibatches (``PolicyUpdate.step``)."""
        where = f"epoch {epoch}, optimizer step {self.global_step + 1}"
        terms = self.update.step(data, group, step_order, where, check_ratio)
        self.global_step += 1
        return terms
