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
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from clients import AnyRewardClient
from clients.evaluation import now, write_evaluation
from trainer import advantages as adv
from trainer import losses
from trainer.checkpoint import (
    TrainingState,
    load_checkpoint,
    numpy_rng_state,
    resolve_checkpoint,
    save_checkpoint,
    set_numpy_rng_state,
)
from trainer.config import Config, to_dict
from trainer.ddim import DDIMStepOutput
from trainer.evaluate import EvalResult, evaluation_prompts
from trainer.export import export_final
from trainer.prompts import PromptSampler, load_prompts
from trainer.rewards import EpochRewards, connect
from trainer.sampling import SampleBatch, encode_prompts, load_pipeline, policy_step, sample_batch
from trainer.tracking import RunLogger, before_after_grid, plot_rewards

logger = logging.getLogger(__name__)


class RatioCheckError(RuntimeError):
    """Log-probabilities recomputed with unchanged weights disagree with those recorded while sampling."""


@dataclasses.dataclass
class Epoch:
    """One epoch's samples, concatenated over sampling batches and restricted to the items that got a reward."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (N, L, D)
    latents: torch.Tensor  # (N, T+1, C, h, w)
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T)
    rewards: npt.NDArray[np.float64]  # (N_all,) the scored rewards of every process, for the epoch's statistics
    weights: torch.Tensor  # (N,) advantages (DDPO) or regression weights (RWR)
    dropped: int  # items of every process left out after a reward error (--on-reward-error=drop)

    def __len__(self) -> int:
        return len(self.prompts)


class Trainer:
    def __init__(self, config: Config, resume: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision if torch.cuda.is_available() else "no",
            project_dir=str(self.run_dir),
        )
        self.device = self.accelerator.device
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

        self.stat_tracker = adv.PerPromptStatTracker(config.stat_tracking.buffer_size, config.stat_tracking.min_count)
        self.start_epoch, self.global_step = 0, 0
        if resume:
            self._resume(resolve_checkpoint(resume, self.run_dir))

    # ------------------------------------------------------------------ set-up

    def _load_policy(self) -> StableDiffusionPipeline:
        """The pipeline with frozen VAE and text encoder, and a UNet whose LoRA adapter (or whole self) trains."""
        config = self.config
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
        pipeline = load_pipeline(config.model, config.revision, dtype=half)
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
            if half is not torch.float32:
                unet.to(dtype=torch.float32)  # full fine-tuning keeps float32 master weights under autocast
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

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.accelerator.unwrap_model(self.unet), self.optimizer, self.generators)
        self.stat_tracker.load_state_dict(state.stat_tracker)
        set_numpy_rng_state(self.prompts.rng, state.prompt_rng)
        self.start_epoch, self.global_step = state.epoch, state.global_step
        logger.info("resumed from %s: epoch %d, step %d", path, state.epoch, state.global_step)

    # ------------------------------------------------------------------ the run

    def run(self) -> Path:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        samples = config.samples_per_epoch(self.accelerator.num_processes)
        logger.info(
            "%s on %s, reward %r from %s: %d samples/epoch, %d optimizer steps/epoch, %d of %d steps trained, "
            "epochs %d..%d",
            config.train.algorithm,
            config.model,
            config.reward.name,
            config.reward.server,
            samples,
            config.optimizer_steps_per_epoch(),
            config.train_timesteps(),
            config.sample.num_steps,
            self.start_epoch + 1,
            config.num_epochs,
        )
        client = connect(
            config.reward.server, config.reward.name, config.reward.token, config.reward.ca_file, config.reward.timeout
        )
        run_logger = RunLogger(
            self.run_dir,
            to_dict(config),
            config.log.tensorboard,
            config.log.wandb,
            config.log.wandb_project,
            self.start_epoch,
        )
        try:
            if self.eval_prompts and self.start_epoch == 0:
                self.run_eval(0, client, run_logger)
            epochs = tqdm(
                range(self.start_epoch, config.num_epochs),
                desc="DDPO",
                unit="epoch",
                initial=self.start_epoch,
                total=config.num_epochs,
                disable=not self.accelerator.is_local_main_process,
            )
            for epoch in epochs:
                metrics = self.run_epoch(epoch, client, run_logger)
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
                if done % config.save_every == 0 or done == config.num_epochs:
                    self.save(done)
                if self.eval_prompts and (
                    done == config.num_epochs or (config.eval.every and done % config.eval.every == 0)
                ):
                    self.run_eval(done, client, run_logger)
        finally:
            run_logger.close()
            client.close()
        if self.accelerator.is_main_process:
            logger.info("reward curve: %s", plot_rewards(self.run_dir, config.reward.name))
            if (grid := before_after_grid(self.run_dir)) is not None:
                logger.info("held-out samples before and after training: %s", grid)
        return export_final(self.pipeline, self.accelerator.unwrap_model(self.unet), config, self.run_dir)

    def run_eval(self, epoch: int, client: AnyRewardClient, run_logger: RunLogger) -> None:
        """Score the held-out prompts with fixed noise (``trainer.evaluate``), on the main process only."""
        if self.accelerator.is_main_process:
            self.unet.eval()
            size, r = self.config.sample.batch_size, self.config.reward
            prompt_batches = [self.eval_prompts[i : i + size] for i in range(0, len(self.eval_prompts), size)]
            generator = torch.Generator().manual_seed(self.config.eval.seed)  # the same noise at every evaluation
            what = f"the held-out evaluation at epoch {epoch}"
            rewards = EpochRewards(client, r.name, r.timeout, r.on_error, what)
            batches = rewards.stream(self.sample(self.accelerator.unwrap_model(self.unet), prompt_batches, generator))
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
        self.accelerator.wait_for_everyone()

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
        self, unet: torch.nn.Module, prompt_batches: Iterable[list[str]], generator: torch.Generator
    ) -> Iterator[SampleBatch]:
        """One sampled batch per list of prompts, with the configured sampler, yielded as soon as it is decoded."""
        c = self.config.sample
        for prompts in prompt_batches:
            with self.accelerator.autocast():
                yield sample_batch(
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

    def run_epoch(self, epoch: int, client: AnyRewardClient, run_logger: RunLogger) -> dict[str, Any]:
        config = self.config
        #################### SAMPLING (rewards stream to the service meanwhile) ####################
        started = time.perf_counter()
        self.unet.eval()
        r = config.reward
        rewards = EpochRewards(client, r.name, r.timeout, r.on_error, f"epoch {epoch + 1}", r.stream)
        prompt_batches = (
            self.prompts.sample(config.sample.batch_size, config.sample.images_per_prompt)
            for _ in tqdm(
                range(config.sample.num_batches_per_epoch),
                desc=f"epoch {epoch + 1}/{config.num_epochs}: sampling",
                disable=not self.accelerator.is_local_main_process,
                leave=False,
            )
        )
        batches = rewards.stream(self.sample(self.unet, prompt_batches, self.generators["sampling"]))
        sample_s = time.perf_counter() - started

        #################### REWARDS ####################
        scores = rewards.collect()
        data = self._epoch_data(batches, scores.scores, scores.kept)
        if config.log.images_every and (epoch + 1) % config.log.images_every == 0:
            count = min(config.log.grid_size, len(data))
            images = np.concatenate([b.images for b in batches])[scores.kept][:count]
            kept_rewards = scores.scores[scores.kept][:count]
            run_logger.log_images(epoch + 1, images, data.prompts[:count], kept_rewards.tolist())

        #################### TRAINING ####################
        started = time.perf_counter()
        self.unet.train()
        train_metrics = self.train_on(data)
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
            "train_s": train_s,
            **self.stat_tracker.stats(),
        }

    def _epoch_data(
        self, batches: list[SampleBatch], rewards: npt.NDArray[np.float64], kept: npt.NDArray[np.bool_]
    ) -> Epoch:
        """Concatenate the batches, drop failed items, and turn rewards into advantages or RWR weights.

        Statistics are over every process's samples, as in ddpo-pytorch: each process gathers all rewards and prompt
        ids (tensors, no pickling), computes every weight, and keeps its own slice.
        """
        prompts = [p for b in batches for p in b.prompts]
        all_prompts, all_rewards, mine = self._gather(prompts, rewards)
        all_kept = ~np.isnan(all_rewards)
        weights = np.full(len(all_rewards), np.nan)
        weights[all_kept] = self._weights(
            [p for p, k in zip(all_prompts, all_kept, strict=True) if k], all_rewards[all_kept]
        )
        mask = torch.from_numpy(kept)
        return Epoch(
            prompts=[p for p, keep in zip(prompts, kept, strict=True) if keep],
            prompt_embeds=torch.cat([b.prompt_embeds for b in batches])[mask],
            latents=torch.cat([b.latents for b in batches])[mask],
            log_probs=torch.cat([b.log_probs for b in batches])[mask],
            timesteps=torch.cat([b.timesteps for b in batches])[mask],
            rewards=all_rewards[all_kept],
            weights=torch.as_tensor(weights[mine][kept], dtype=torch.float32),
            dropped=int((~all_kept).sum()),
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

    def train_on(self, data: Epoch) -> dict[str, float | None]:
        """``num_inner_epochs`` passes over the epoch in shuffled minibatches; returns averaged diagnostics."""
        config = self.config
        generator = self.generators["training"]
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        ratio_check: float | None = None  # RWR does not use log-probabilities
        for inner in range(config.train.num_inner_epochs):
            order = torch.randperm(len(data), generator=generator)
            # each sample visits its own random subset of the T steps, in a random order (timestep_fraction)
            step_order = torch.stack([torch.randperm(config.sample.num_steps, generator=generator) for _ in order])
            step_order = step_order[:, : config.train_timesteps()]  # (N, T_train)
            minibatches = list(torch.split(order, config.train.batch_size))
            if inner == 0 and config.train.algorithm not in ("rwr", "sparse_rwr"):
                ratio_check = self.check_ratio(data, minibatches[0], step_order)
            groups = [
                minibatches[i : i + config.train.gradient_accumulation_steps]
                for i in range(0, len(minibatches), config.train.gradient_accumulation_steps)
            ]
            for group in tqdm(
                groups,
                desc=f"training (inner epoch {inner + 1}/{config.train.num_inner_epochs})",
                disable=not self.accelerator.is_local_main_process,
                leave=False,
            ):
                for key, value in self.optimizer_step(data, group, step_order).items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
        # approx_kl and clipfrac stay None (null in metrics.jsonl) for RWR, which has no importance ratio
        metrics: dict[str, float | None] = {"approx_kl": None, "clipfrac": None}
        metrics.update({key: sums[key] / counts[key] for key in sums})
        metrics["ratio_check"] = ratio_check
        return metrics

    def optimizer_step(self, data: Epoch, group: list[torch.Tensor], step_order: torch.Tensor) -> dict[str, float]:
        """Accumulate gradients over the group's minibatches and trained steps, then take one optimizer step.

        Accumulation is explicit rather than accelerate's ``accumulate``, so that a short last group (after
        ``--on-reward-error=drop``) still averages correctly; ``no_sync`` skips gradient all-reduce until the last
        backward pass of the step.
        """
        micro_steps = [(indices, j) for indices in group for j in range(step_order.shape[1])]
        totals: dict[str, float] = {}
        for n, (indices, j) in enumerate(micro_steps):
            last = n == len(micro_steps) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet)
            with sync, self.accelerator.autocast():
                terms = self.loss(data, indices, step_order[indices, j])
                self.accelerator.backward(terms["loss"] / len(micro_steps))
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micro_steps)
        self.accelerator.clip_grad_norm_(self.unet.parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        return totals

    def loss(self, data: Epoch, indices: torch.Tensor, step_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The configured algorithm's loss for samples ``indices`` at their step ``step_index`` (one per sample)."""
        t = self.config.train
        weights = data.weights[indices].to(self.device)
        prompt_embeds = data.prompt_embeds[indices].to(self.device)
        if t.algorithm in ("rwr", "sparse_rwr"):
            return {"loss": self.rwr_loss(data.latents[indices, -1].to(self.device), prompt_embeds, weights)}
        step = self.policy(self.unet, data, indices, step_index)
        old_log_prob = data.log_probs[indices, step_index].to(self.device)
        if t.algorithm == "ddpo_sf":
            terms = losses.ddpo_sf_loss(step.log_prob, old_log_prob, weights)
        else:
            terms = losses.ddpo_is_loss(step.log_prob, old_log_prob, weights, t.clip_range)
        out = {"loss": terms.loss, "approx_kl": terms.approx_kl, "clipfrac": terms.clipfrac}
        if t.algorithm == "ddpo_is_kl":
            with torch.no_grad(), self._reference() as reference:
                ref = self.policy(reference, data, indices, step_index)
            if t.kl_estimator == "exact":
                kl = losses.exact_kl_penalty(step.mean, ref.mean, step.std)
            else:
                kl = losses.logprob_sq_kl_penalty(step.log_prob, ref.log_prob)
            out["kl"] = kl.detach()
            out["policy_loss"] = terms.loss.detach()
            out["loss"] = terms.loss + t.kl_coef * kl
        return out

    def policy(
        self, unet: torch.nn.Module, data: Epoch, indices: torch.Tensor, step_index: torch.Tensor
    ) -> DDIMStepOutput:
        """π(x_{t−1} | x_t, c) of the recorded step ``step_index`` (one per sample) of samples ``indices``, with the
        sampling settings (and guidance unless train.cfg is off)."""
        c = self.config
        return policy_step(
            unet,
            self.pipeline.scheduler,
            data.latents[indices, step_index].to(self.device),  # x_t
            data.timesteps[indices, step_index].to(self.device),
            data.prompt_embeds[indices].to(self.device),
            self.negative_embeds,
            c.sample.guidance_scale if c.train.cfg else 1.0,
            c.sample.eta,
            prev_latents=data.latents[indices, step_index + 1].to(self.device),  # x_{t-1}, as sampled
        )

    def rwr_loss(self, x0: torch.Tensor, prompt_embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted denoising loss at a fresh random training timestep and noise for each sample."""
        scheduler = self.pipeline.scheduler
        generator = self.generators["training"]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(self.device)
        noisy = scheduler.add_noise(x0, noise, timesteps.to(self.device))
        prediction = self.unet(noisy, timesteps.to(self.device), encoder_hidden_states=prompt_embeds).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps.to(self.device))
        else:
            target = noise
        return losses.rwr_loss(prediction, target, weights)

    @torch.no_grad()
    def check_ratio(self, data: Epoch, indices: torch.Tensor, step_order: torch.Tensor) -> float:
        """max |π_θ/π_old − 1| on a minibatch before the epoch's first update: it must be ~0, or the update is wrong."""
        worst = 0.0
        with self.accelerator.autocast():
            for j in range(step_order.shape[1]):
                step_index = step_order[indices, j]
                step = self.policy(self.unet, data, indices, step_index)
                ratio = torch.exp(step.log_prob - data.log_probs[indices, step_index].to(self.device))
                worst = max(worst, float((ratio - 1).abs().max()))
        t = self.config.train
        if worst > t.ratio_tolerance and t.ratio_check != "off":
            message = (
                f"ratio self-check: with unchanged weights, recomputed log-probabilities differ from the sampled ones "
                f"(max |ratio − 1| = {worst:.3g} > train.ratio_tolerance = {t.ratio_tolerance:g}). Sampling and "
                "training disagree: check mixed precision, that train.cfg matches sampling, and that nothing changed "
                "the scheduler. Set train.ratio_check='warn' to continue anyway."
            )
            if t.ratio_check == "fail":
                raise RatioCheckError(message)
            logger.warning(message)
        return worst

    def save(self, epoch: int) -> Path:
        state = TrainingState(
            epoch=epoch,
            global_step=self.global_step,
            stat_tracker=self.stat_tracker.state_dict(),
            prompt_rng=numpy_rng_state(self.prompts.rng),
            config=to_dict(self.config),
        )
        path = save_checkpoint(
            self.run_dir,
            self.accelerator.unwrap_model(self.unet),
            self.optimizer,
            self.generators,
            state,
            self.config.keep_checkpoints,
        )
        logger.info("saved checkpoint %s", path)
        return path


def train(config: Config, resume: str | None = None) -> Path:
    """Run DDPO to ``config.num_epochs``; returns the folder with the final LoRA (or UNet)."""
    return Trainer(config, resume).run()
