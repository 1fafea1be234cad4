"""The DDPO training loop: sample, get rewards from the service, compute advantages, update. Repeat.

Each epoch has three phases, marked by banners below. The maths lives in importable, tested functions:
``trainer.ddim`` (the log-probability step), ``trainer.sampling`` (the guided policy), ``trainer.advantages`` and
``trainer.losses`` (every algorithm's loss). This file wires them together on accelerate, so that
``accelerate launch -m trainer ...`` runs it on several processes or GPUs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from clients import AnyRewardClient
from clients.evaluation import now, write_evaluation
from trainer import advantages as adv
from trainer import losses
from trainer.checkpoint import (
    ProcessRandomState,
    Snapshot,
    TrainingState,
    load_checkpoint,
    resolve_checkpoint,
    restore_snapshot,
    save_checkpoint,
    take_snapshot,
)
from trainer.config import Config, to_dict
from trainer.ddim import DDIMStepOutput
from trainer.distributed import (
    ProcessFailedError,
    any_process,
    check_same_weights,
    fail_together,
    max_over_processes,
    mean_over_processes,
    weights_digest,
)
from trainer.evaluate import EvalResult, evaluation_prompts
from trainer.export import export_final
from trainer.lifecycle import GracefulStop, StopRequested, claim_run_dir
from trainer.precision import ADVICE, NonFiniteError, dtype_name, make_accelerator, policy_dtype
from trainer.prompts import PromptSampler, load_prompts
from trainer.rewards import EpochRewards, RewardError, connect
from trainer.sampling import SampleBatch, encode_prompts, guided_noise_pred, load_pipeline, policy_step, sample_batch
from trainer.tracking import RunLogger, before_after_grid, plot_rewards

logger = get_logger(__name__)  # logs on the main process only


class RatioCheckError(RuntimeError):
    """Log-probabilities recomputed with unchanged weights disagree with those recorded while sampling."""


@contextlib.contextmanager
def failing_together(accelerator: Accelerator) -> Iterator[None]:
    """Run the block on every process; if it raised a reward or non-finite error on any, every process raises.

    Without this, a process that fails alone leaves the others waiting at the next collective (``trainer.distributed``).
    """
    try:
        yield
    except (RewardError, NonFiniteError) as error:
        fail_together(accelerator, error)
        raise
    fail_together(accelerator, None)


@dataclasses.dataclass
class Epoch:
    """One epoch's samples of this process, concatenated over sampling batches.

    An item whose reward failed (``--on-reward-error=drop``) stays, with weight 0: it adds nothing to the loss, and
    every process keeps the same number of minibatches, so none waits at a gradient all-reduce the others skip.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (N, L, D), like every tensor here on the training device
    latents: torch.Tensor  # (N, T+1, C, h, w)
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T)
    rewards: npt.NDArray[np.float64]  # (N_scored,) the scored rewards of every process, for the epoch's statistics
    weights: torch.Tensor  # (N,) advantages (DDPO) or regression weights (RWR); 0 for dropped items
    dropped: int  # items of every process whose reward failed (--on-reward-error=drop)

    def __len__(self) -> int:
        return len(self.prompts)


# What stops a run after it has started: the trainer checkpoints the last finished epoch, then lets it propagate.
STOPS = (StopRequested, RewardError, NonFiniteError, RatioCheckError, ProcessFailedError)


class Trainer:
    def __init__(
        self,
        config: Config,
        resume: str | None = None,
        overwrite: bool = False,
        client: AnyRewardClient | None = None,
    ) -> None:
        """Check the run folder and the reward service (within seconds, before the model loads; ``client``: one
        ``trainer.rewards.connect`` made already), then load the policy and, with ``resume``, a checkpoint.
        ``overwrite`` deletes a previous run in the folder. The trainer closes the client."""
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.accelerator = make_accelerator(config.mixed_precision, str(self.run_dir))
        self.dtype = policy_dtype(config.mixed_precision)  # frozen weights and the UNet's arithmetic
        self.device = self.accelerator.device
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
        self.eval_prompts = []
        if config.eval.enabled:
            held_out = load_prompts(config.eval.set, config.eval.file)
            self.eval_prompts = evaluation_prompts(held_out, config.eval.samples_per_prompt)

        self.pipeline = self._load_policy()
        self.unet = self.pipeline.unet
        trainable = [p for p in self.unet.parameters() if p.requires_grad]
        t = config.train
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        self.unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        self.reference_unet = self._reference_unet()
        self.negative_embeds = encode_prompts(self.pipeline, [""], self.device)  # (1, L, D)

        self._probed_per_call: int | None = None  # train.timesteps_per_call = 'auto' on a GPU, once probed
        self.stat_tracker = adv.PerPromptStatTracker(config.stat_tracking.buffer_size, config.stat_tracking.min_count)
        self.start_epoch, self.global_step = 0, 0
        self.stop = GracefulStop()
        self._unsaved: Snapshot | None = None  # the last finished epoch, when no checkpoint holds it
        if resume:
            self._resume(resolve_checkpoint(resume, self.run_dir))

    # ------------------------------------------------------------------ set-up

    def _load_policy(self) -> StableDiffusionPipeline:
        """The pipeline with frozen VAE and text encoder, and a UNet whose LoRA adapter (or whole self) trains."""
        config = self.config
        pipeline = load_pipeline(config.model, config.revision, dtype=self.dtype)
        if config.sample.vae_slicing:
            pipeline.vae.enable_slicing()
        pipeline.vae.requires_grad_(False).to(self.device)
        pipeline.text_encoder.requires_grad_(False).to(self.device)
        unet = pipeline.unet.to(self.device)
        if config.lora.enabled:
            from peft import LoraConfig

            unet.requires_grad_(False)  # frozen base weights stay in the autocast dtype; the adapter is float32
            unet.add_adapter(
                LoraConfig(
                    r=config.lora.rank,
                    lora_alpha=config.lora.alpha,
                    init_lora_weights="gaussian",
                    target_modules=config.lora.target_modules,
                )
            )
            for param in unet.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            unet.requires_grad_(True)
            unet.to(dtype=torch.float32)  # full fine-tuning keeps float32 master weights under autocast
        if config.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return pipeline

    def _reference_unet(self) -> torch.nn.Module | None:
        """DDPO-IS-KL's frozen pretrained model. With LoRA it is the same UNet with the adapter disabled: no copy."""
        if self.config.train.algorithm != "ddpo_is_kl" or self.config.lora.enabled:
            return None
        reference: torch.nn.Module = copy.deepcopy(self.accelerator.unwrap_model(self.unet))
        return reference.requires_grad_(False).eval()

    @contextlib.contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        unet = self.accelerator.unwrap_model(self.unet)
        unet.disable_adapters()
        try:
            yield self.unet
        finally:
            unet.enable_adapters()

    def _random_state(self) -> ProcessRandomState:
        return ProcessRandomState(self.generators, self.prompts.rng)

    def _resume(self, path: Path) -> None:
        acc = self.accelerator
        unet = acc.unwrap_model(self.unet)
        state = load_checkpoint(path, unet, self.optimizer, self._random_state(), acc.process_index, acc.num_processes)
        self.stat_tracker.load_state_dict(state.stat_tracker)
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
        logger.info(
            "%s on %s (policy %s on %s, %d process(es)), reward %r from %s: %d samples/epoch, %d optimizer "
            "steps/epoch, %d of %d steps trained, epochs %d..%d",
            config.train.algorithm,
            config.model,
            dtype_name(self.dtype),
            self.device.type,
            self.accelerator.num_processes,
            config.reward.name,
            config.reward.server,
            config.samples_per_epoch(self.accelerator.num_processes),
            config.optimizer_steps_per_epoch(),
            config.train_timesteps(),
            config.sample.num_steps,
            self.start_epoch + 1,
            config.num_epochs,
        )
        # logs, images, evaluations and plots are written once, by the main process
        run_logger = None
        if main:
            run_logger = RunLogger(
                self.run_dir,
                to_dict(config),
                config.log.tensorboard,
                config.log.wandb,
                config.log.wandb_project,
                self.start_epoch,
            )
        try:
            with self.stop:
                self._train(run_logger)
        except STOPS:
            self._checkpoint_last_finished_epoch()
            raise
        finally:
            if run_logger is not None:
                run_logger.close()
            self.client.close()
        final = self.run_dir / "final"
        if main:
            logger.info("reward curve: %s", plot_rewards(self.run_dir, config.reward.name))
            if (grid := before_after_grid(self.run_dir)) is not None:
                logger.info("held-out samples before and after training: %s", grid)
            final = export_final(self.pipeline, self.accelerator.unwrap_model(self.unet), config, self.run_dir)
        self.accelerator.wait_for_everyone()
        return final

    def _train(self, run_logger: RunLogger | None) -> None:
        config = self.config
        self._finished(self.start_epoch, saved=self.start_epoch > 0)  # a resumed run starts from a checkpoint
        if self.eval_prompts and self.start_epoch == 0:
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
            logger.info(
                "epoch %d: %s %.4f ± %.4f over %d samples (sampling %.1fs, reward wait %.2fs, training %.1fs)",
                metrics["epoch"],
                config.reward.name,
                metrics["reward_mean"],
                metrics["reward_std"],
                metrics["samples"],
                metrics["sample_s"],
                metrics["reward_wait_s"],
                metrics["train_s"],
            )
            done = epoch + 1
            saved = done % config.save_every == 0 or done == config.num_epochs
            if saved:
                self.save(done)
            self._finished(done, saved)
            if self.eval_prompts and (
                done == config.num_epochs or (config.eval.every and done % config.eval.every == 0)
            ):
                self.run_eval(done, run_logger)

    def _finished(self, epoch: int, saved: bool) -> None:
        """``epoch`` epochs are done: remember their state in memory unless a checkpoint holds it."""
        self._unsaved = None
        if not saved:
            unet = self.accelerator.unwrap_model(self.unet)
            state = self.stat_tracker.state_dict()
            self._unsaved = take_snapshot(epoch, self.global_step, unet, self.optimizer, self._random_state(), state)

    def _checkpoint_last_finished_epoch(self) -> None:
        """Put back the state of the last finished epoch and checkpoint it (on every process, as they all stop)."""
        snapshot = self._unsaved
        if snapshot is None:
            return
        restore_snapshot(snapshot, self.accelerator.unwrap_model(self.unet), self.optimizer, self._random_state())
        self.global_step = snapshot.global_step
        self.stat_tracker.load_state_dict(snapshot.stat_tracker)
        self.save(snapshot.epoch)
        self._unsaved = None

    def run_eval(self, epoch: int, run_logger: RunLogger | None) -> None:
        """Score the held-out prompts with fixed noise (``trainer.evaluate``), on the main process only."""
        with failing_together(self.accelerator):
            if run_logger is not None:
                self._evaluate(epoch, run_logger)

    def _evaluate(self, epoch: int, run_logger: RunLogger) -> None:
        self.unet.eval()
        size, r = self.config.sample.batch_size, self.config.reward
        prompt_batches = [self.eval_prompts[i : i + size] for i in range(0, len(self.eval_prompts), size)]
        generator = torch.Generator().manual_seed(self.config.eval.seed)  # the same noise at every evaluation
        what = f"the held-out evaluation at epoch {epoch}"
        rewards = EpochRewards(self.client, r.name, r.timeout, r.on_error, what)
        batches = rewards.stream(self.sample(prompt_batches, generator, what))
        images = np.concatenate([batch.images for batch in batches])
        scores = rewards.collect()
        result = EvalResult(epoch, self.eval_prompts, images, scores.scores)
        summary = result.summary()
        folder = run_logger.log_eval(summary, result.images, result.prompts)
        records = result.records(r.name, self.config.eval.samples_per_prompt, scores.failures)
        write_evaluation(folder, records, [r.name], self._eval_settings(epoch))
        logger.info(
            "held-out evaluation at epoch %d: %s = %.4f ± %.4f over %d samples",
            epoch,
            r.name,
            summary["reward_mean"],
            summary["reward_std"],
            summary["samples"],
        )

    def _eval_settings(self, epoch: int) -> dict[str, Any]:
        """The settings at the top of a held-out evaluation's summary.json and report.html."""
        c = self.config
        return {
            "command": "ddpo train: held-out evaluation",
            "run_dir": str(self.run_dir),
            "epoch": epoch,
            "model": c.model,
            "trained": ("LoRA adapter" if c.lora.enabled else "full UNet") + f" after {epoch} epoch(s)",
            "prompts": c.eval.file if c.eval.set == "from_file" else c.eval.set,
            "prompt_count": len(self.eval_prompts) // c.eval.samples_per_prompt,
            "samples_per_prompt": c.eval.samples_per_prompt,
            "seed": c.eval.seed,
            "noise": "one generator seeded with eval.seed, drawn batch after batch (the same at every evaluation)",
            "eta": c.sample.eta,
            "steps": c.sample.num_steps,
            "guidance": c.sample.guidance_scale,
            "batch_size": c.sample.batch_size,
            "rewards": [c.reward.name],
            "reward_server": c.reward.server,
            "created": now(),
        }

    def sample(
        self, prompt_batches: Iterable[list[str]], generator: torch.Generator, what: str
    ) -> Iterator[SampleBatch]:
        """One sampled batch per list of prompts, with the configured sampler, yielded as soon as it is decoded.

        Sampling needs no gradient synchronisation, so it runs the unwrapped UNet. A batch with a non-finite latent or
        log-probability raises NonFiniteError before it is yielded: it never reaches the reward service.
        """
        c = self.config.sample
        unet = self.accelerator.unwrap_model(self.unet)
        for n, prompts in enumerate(prompt_batches):
            try:
                with self.accelerator.autocast():
                    batch = sample_batch(
                        self.pipeline,
                        unet,
                        prompts,
                        self.negative_embeds,
                        c.num_steps,
                        c.guidance_scale,
                        c.eta,
                        generator,
                        self.device,
                    )
            except NonFiniteError as error:
                raise NonFiniteError(
                    f"{what}, sampling batch {n + 1}: these samples were not sent to the reward service: {error}"
                ) from None
            yield batch

    def _prompt_batches(self, epoch: int) -> Iterator[list[str]]:
        """The epoch's sampling batches of prompts; before each, a safe point to stop at."""
        config = self.config
        for _ in tqdm(
            range(config.sample.num_batches_per_epoch),
            desc=f"epoch {epoch + 1}/{config.num_epochs}: sampling",
            disable=not self.accelerator.is_local_main_process,
            leave=False,
        ):
            self.stop.check(self.accelerator)
            yield self.prompts.sample(config.sample.batch_size, config.sample.images_per_prompt)

    def run_epoch(self, epoch: int, run_logger: RunLogger | None) -> dict[str, Any]:
        config = self.config
        #################### SAMPLING (rewards stream to the service meanwhile) ####################
        started = time.perf_counter()
        self.unet.eval()
        r = config.reward
        what = f"epoch {epoch + 1}"
        with failing_together(self.accelerator):
            rewards = EpochRewards(self.client, r.name, r.timeout, r.on_error, what, r.stream)
            prompt_batches = self._prompt_batches(epoch)
            batches = rewards.stream(self.sample(prompt_batches, self.generators["sampling"], what))
            sample_s = time.perf_counter() - started

            #################### REWARDS ####################
            scores = rewards.collect()
        data = self._epoch_data(batches, scores.scores)
        if run_logger is not None and config.log.images_every and (epoch + 1) % config.log.images_every == 0:
            count = min(config.log.grid_size, int(scores.kept.sum()))
            images = np.concatenate([b.images for b in batches])[scores.kept][:count]
            kept_prompts = [p for p, keep in zip(data.prompts, scores.kept, strict=True) if keep][:count]
            run_logger.log_images(epoch + 1, images, kept_prompts, scores.scores[scores.kept][:count].tolist())

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
            "reward_wait_s": scores.wait_s,
            "rewards_ready_frac": scores.ready_frac,
            "reward_resent": scores.resent,
            "reward_replicas": scores.replicas,
            "train_s": train_s,
            **self.stat_tracker.stats(),
            "policy_dtype": dtype_name(self.dtype),
            "processes": self.accelerator.num_processes,
        }

    def _epoch_data(self, batches: list[SampleBatch], rewards: npt.NDArray[np.float64]) -> Epoch:
        """Concatenate the batches and turn rewards (NaN: dropped) into advantages or RWR weights (0: dropped).

        Statistics are over every process's samples, as in ddpo-pytorch: each process gathers all rewards and prompt
        ids (tensors, no pickling), computes every weight, and keeps its own slice.
        """
        prompts = [p for b in batches for p in b.prompts]
        all_prompts, all_rewards, mine = self._gather(prompts, rewards)
        scored = ~np.isnan(all_rewards)
        weights = np.zeros(len(all_rewards))
        scored_prompts = [p for p, ok in zip(all_prompts, scored, strict=True) if ok]
        weights[scored] = self._weights(scored_prompts, all_rewards[scored])
        device = self.device  # copied to the device once, not at every UNet call
        return Epoch(
            prompts=prompts,
            prompt_embeds=torch.cat([b.prompt_embeds for b in batches]).to(device),
            latents=torch.cat([b.latents for b in batches]).to(device),
            log_probs=torch.cat([b.log_probs for b in batches]).to(device),
            timesteps=torch.cat([b.timesteps for b in batches]).to(device),
            rewards=all_rewards[scored],
            weights=torch.as_tensor(weights[mine], dtype=torch.float32, device=device),
            dropped=int((~scored).sum()),
        )

    def _gather(
        self, prompts: list[str], rewards: npt.NDArray[np.float64]
    ) -> tuple[list[str], npt.NDArray[np.float64], slice]:
        """Every process's prompts and rewards (NaN: dropped), and the slice that is this process's."""
        if self.accelerator.num_processes == 1:
            return prompts, rewards, slice(0, len(prompts))
        ids = torch.tensor([self.prompt_ids[p] for p in prompts], device=self.device)
        all_ids = self.accelerator.gather(ids).cpu().tolist()
        all_rewards = self.accelerator.gather(torch.as_tensor(rewards, device=self.device)).cpu().numpy()
        start = self.accelerator.process_index * len(prompts)
        return [self.prompts.prompts[i] for i in all_ids], all_rewards, slice(start, start + len(prompts))

    def _weights(self, prompts: list[str], rewards: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per-sample weights of the loss: clipped, normalised advantages for DDPO; regression weights for RWR."""
        t = self.config.train
        if t.algorithm == "rwr":
            return adv.rwr_weights(prompts, rewards, t.rwr_beta)
        if t.algorithm == "sparse_rwr":
            return adv.sparse_rwr_weights(rewards, t.sparse_threshold, t.sparse_percentile)
        if self.config.stat_tracking.per_prompt:
            advantages = self.stat_tracker.normalize(prompts, rewards)
        else:
            advantages = adv.batch_normalize(rewards)
        return adv.clip_advantages(advantages, t.adv_clip_max)

    # ------------------------------------------------------------------ the update

    def train_on(self, data: Epoch, epoch: int) -> dict[str, float | None]:
        """``num_inner_epochs`` passes over the epoch in shuffled minibatches; returns diagnostics averaged over the
        optimizer steps and the processes."""
        config = self.config
        generator = self.generators["training"]
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        ratio_check: float | None = None  # RWR does not use log-probabilities
        skipped = 0
        for inner in range(config.train.num_inner_epochs):
            order = torch.randperm(len(data), generator=generator)
            # each sample visits its own random subset of the T steps, in a random order (timestep_fraction)
            step_order = torch.stack([torch.randperm(config.sample.num_steps, generator=generator) for _ in order])
            step_order = step_order[:, : config.train_timesteps()].to(self.device)  # (N, T_train)
            minibatches = list(torch.split(order.to(self.device), config.train.batch_size))
            groups = [
                minibatches[i : i + config.train.gradient_accumulation_steps]
                for i in range(0, len(minibatches), config.train.gradient_accumulation_steps)
            ]
            for n, group in enumerate(
                tqdm(
                    groups,
                    desc=f"training (inner epoch {inner + 1}/{config.train.num_inner_epochs})",
                    disable=not self.accelerator.is_local_main_process,
                    leave=False,
                )
            ):
                terms = self.optimizer_step(data, group, step_order, epoch, check_ratio=inner == n == 0)
                ratio_check = terms.pop("ratio_check", ratio_check)
                skipped += int(self.accelerator.optimizer_step_was_skipped)
                self.stop.check(self.accelerator)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
        # approx_kl and clipfrac stay None (null in metrics.jsonl) for RWR, which has no importance ratio
        metrics: dict[str, float | None] = {"approx_kl": None, "clipfrac": None}
        metrics.update(mean_over_processes(self.accelerator, {key: sums[key] / counts[key] for key in sums}))
        metrics["ratio_check"] = ratio_check
        metrics["skipped_steps"] = skipped  # fp16 only: steps the loss scaler skipped after an overflow
        return metrics

    def optimizer_step(
        self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor, epoch: int, check_ratio: bool = False
    ) -> dict[str, float]:
        """Accumulate the gradients of the group's minibatches, then take one optimizer step.

        ``check_ratio`` (each epoch's first step): the ratio self-check on the log-probabilities this step recomputed,
        before the weights change (``ratio_check`` in the result). A non-finite loss or gradient norm stops the run
        before the step, on every process; except that in fp16 an overflowing gradient is the loss scaler's to handle
        (it skips the step and lowers the scale), until the scale falls below 1.
        """
        terms = self.accumulate_gradients(data, group, step_order)
        worst_deviation = terms.pop("ratio_deviation", None)  # None for RWR, which has no ratio
        if check_ratio and worst_deviation is not None and self.config.train.ratio_check != "off":
            terms["ratio_check"] = self._check_ratio(worst_deviation)
        grad_norm = float(self.accelerator.clip_grad_norm_(self.unet.parameters(), self.config.train.max_grad_norm))
        where = f"epoch {epoch}, optimizer step {self.global_step + 1} ({dtype_name(self.dtype)})"
        if any_process(self.accelerator, not math.isfinite(terms["loss"])):
            raise NonFiniteError(f"{where}: the loss is not finite on at least one process. {ADVICE}")
        scaler = self.accelerator.scaler
        if not math.isfinite(grad_norm) and (scaler is None or scaler.get_scale() < 1):
            raise NonFiniteError(f"{where}: the gradient norm is {grad_norm}. {ADVICE}")
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        if math.isfinite(grad_norm):
            terms["grad_norm"] = grad_norm
        return terms

    def accumulate_gradients(
        self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor
    ) -> dict[str, float]:
        """Back-propagate the loss of one optimizer step: the mean, over the group's minibatches and their T trained
        steps (``step_order`` (N, T)), of the per-step loss. Returns its mean terms, and DDPO's max |ratio − 1|.

        A minibatch's steps go through the UNet in chunks of k = train.timesteps_per_call (the last may be shorter).
        A chunk's loss is the mean of its k per-step losses, so it is back-propagated with weight k / (minibatches × T):
        the same gradient as one call per step (k = 1, the reference), in fewer calls. Accumulation is explicit
        rather than accelerate's ``accumulate``; ``no_sync`` skips gradient all-reduce until the last backward pass.
        """
        steps = step_order.shape[1]
        per_call = self._timesteps_per_call(data, group[0], step_order)
        calls = [
            (indices, step_order[indices, j : j + per_call]) for indices in group for j in range(0, steps, per_call)
        ]
        totals: dict[str, torch.Tensor] = {}
        worst_deviation: torch.Tensor | None = None
        for n, (indices, chunk) in enumerate(calls):
            share = chunk.shape[1] / (len(group) * steps)
            sync = contextlib.nullcontext() if n == len(calls) - 1 else self.accelerator.no_sync(self.unet)
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

    def _timesteps_per_call(self, data: Epoch, indices: torch.Tensor, step_order: torch.Tensor) -> int:
        """train.timesteps_per_call, with auto resolved: every trained step on a CPU; on a GPU, probed once."""
        per_call = self.config.train.timesteps_per_call
        if per_call != "auto":
            return per_call
        if self.device.type != "cuda":
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
        generator = self.generators["training"]
        random_state = generator.get_state()
        per_call = int(step_order.shape[1])
        while True:
            try:
                with self.accelerator.no_sync(self.unet), self.accelerator.autocast():
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
                generator.set_state(random_state)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return -int(max_over_processes(self.accelerator, -per_call))

    def loss(self, data: Epoch, indices: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The configured algorithm's loss for samples ``indices`` (B) at their recorded steps ``steps`` (B, k): the
        mean of the k per-step losses, all B·k (sample, step) pairs in one UNet call (a UNet call is per-pair, so
        batching changes no term). Pairs are laid out step by step, each a block of B, so that every mean over the
        pairs is the mean over steps of the per-step mean. DDPO also returns ``ratio_deviation``, max |π_θ/π_old − 1|
        (inf for NaN), for the ratio self-check."""
        t = self.config.train
        if t.algorithm in ("rwr", "sparse_rwr"):
            loss = self.rwr_loss(
                data.latents[indices, -1], data.prompt_embeds[indices], data.weights[indices], steps.shape[1]
            )
            return {"loss": loss}
        samples = indices.repeat(steps.shape[1])  # (k·B,)
        step_index = steps.T.reshape(-1)
        step = self.policy(self.unet, data, samples, step_index)
        old_log_prob = data.log_probs[samples, step_index]
        weights = data.weights[samples]
        if t.algorithm == "ddpo_sf":
            terms = losses.ddpo_sf_loss(step.log_prob, old_log_prob, weights)
        else:
            terms = losses.ddpo_is_loss(step.log_prob, old_log_prob, weights, t.clip_range)
        with torch.no_grad():
            deviation = (torch.exp(step.log_prob - old_log_prob) - 1).abs().nan_to_num(torch.inf).max()
        out = {
            "loss": terms.loss,
            "approx_kl": terms.approx_kl,
            "clipfrac": terms.clipfrac,
            "ratio_deviation": deviation,
        }
        if t.algorithm == "ddpo_is_kl":
            with torch.no_grad(), self._reference() as reference:
                ref = self.policy(reference, data, samples, step_index)
            if t.kl_estimator == "exact":
                kl = losses.exact_kl_penalty(step.mean, ref.mean, step.std)
            else:
                kl = losses.logprob_sq_kl_penalty(step.log_prob, ref.log_prob)
            out["kl"] = kl.detach()
            out["policy_loss"] = terms.loss.detach()
            out["loss"] = terms.loss + t.kl_coef * kl
        return out

    def _train_guidance(self) -> float:
        """The guidance weight of the UNet calls in training: the sampler's, unless train.cfg is off."""
        return self.config.sample.guidance_scale if self.config.train.cfg else 1.0

    def policy(
        self, unet: torch.nn.Module, data: Epoch, indices: torch.Tensor, step_index: torch.Tensor
    ) -> DDIMStepOutput:
        """π(x_{t−1} | x_t, c) of the recorded step ``step_index`` (one per sample) of samples ``indices``, with the
        sampling settings (and guidance unless train.cfg is off)."""
        return policy_step(
            unet,
            self.pipeline.scheduler,
            data.latents[indices, step_index],  # x_t
            data.timesteps[indices, step_index],
            data.prompt_embeds[indices],
            self.negative_embeds,
            self._train_guidance(),
            self.config.sample.eta,
            prev_latents=data.latents[indices, step_index + 1],  # x_{t-1}, as sampled
        )

    def rwr_loss(
        self, x0: torch.Tensor, prompt_embeds: torch.Tensor, weights: torch.Tensor, draws: int = 1
    ) -> torch.Tensor:
        """The weighted denoising loss at ``draws`` fresh random training timesteps and noises for each sample, in
        one UNet call: the mean of ``draws`` per-draw losses, drawn in the order of one call per draw.

        With train.cfg (the default, as the replication's Algorithms 1-2 and jannerm/ddpo) the regressed prediction
        is the guided one, ε_u + w (ε_c − ε_u): the call takes twice the batch, so twice the activation memory.
        """
        scheduler = self.pipeline.scheduler
        generator = self.generators["training"]
        timesteps, noise = [], []
        for _ in range(draws):
            timesteps.append(torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator))
            noise.append(torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
        t = torch.cat(timesteps).to(self.device)
        eps = torch.cat(noise).to(self.device)
        x0 = x0.repeat(draws, *[1] * (x0.ndim - 1))
        noisy = scheduler.add_noise(x0, eps, t)
        prediction = guided_noise_pred(
            self.unet, noisy, t, prompt_embeds.repeat(draws, 1, 1), self.negative_embeds, self._train_guidance()
        )
        target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps
        return losses.rwr_loss(prediction, target, weights.repeat(draws))

    def _check_ratio(self, worst: float) -> float:
        """The ratio self-check on this process's max |π_θ/π_old − 1| at unchanged weights: over every process it
        must be ~0, or the update is wrong. A NaN or infinite ratio always fails (unless the check is off)."""
        t = self.config.train
        worst = max_over_processes(self.accelerator, worst)
        if math.isfinite(worst) and worst <= t.ratio_tolerance:
            return worst
        message = (
            f"ratio self-check: with unchanged weights, recomputed log-probabilities differ from the sampled ones "
            f"(max |ratio − 1| = {worst:.3g} > train.ratio_tolerance = {t.ratio_tolerance:g}, policy in "
            f"{dtype_name(self.dtype)}). Sampling and training disagree: check mixed precision, that train.cfg matches "
            "sampling, and that nothing changed the scheduler."
        )
        if t.ratio_check == "fail" or not math.isfinite(worst):
            raise RatioCheckError(message + " Set train.ratio_check='warn' to continue anyway (not if it is inf).")
        logger.warning(message)
        return worst

    def save(self, epoch: int) -> Path:
        """A checkpoint of ``epoch``, after checking that every process holds the same weights."""
        unet = self.accelerator.unwrap_model(self.unet)
        check_same_weights(self.accelerator, weights_digest(unet))
        state = TrainingState(
            epoch=epoch,
            global_step=self.global_step,
            num_processes=self.accelerator.num_processes,
            stat_tracker=self.stat_tracker.state_dict(),
            config=to_dict(self.config),
        )
        keep = self.config.keep_checkpoints
        path = save_checkpoint(self.accelerator, self.run_dir, unet, self.optimizer, self._random_state(), state, keep)
        logger.info("saved checkpoint %s", path)
        return path


def train(
    config: Config, resume: str | None = None, overwrite: bool = False, client: AnyRewardClient | None = None
) -> Path:
    """Run DDPO to ``config.num_epochs``; returns the folder with the final LoRA (or UNet)."""
    return Trainer(config, resume, overwrite, client).run()
