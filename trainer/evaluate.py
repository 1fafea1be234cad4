"""Evaluation from fixed per-image seeds, then scored: ``sample_and_score`` is ``ddpo eval``'s and the trainer's
held-out evaluation's one path from prompts to results.jsonl records.

Image i of an evaluation (each prompt ``samples_per_prompt`` times in a row) has its own generator, seeded
``seed + i`` (``seeded_images``, ``sample_seeded``): its initial latents and every DDIM step's noise come from it
alone, so an image depends on its prompt and seed only, not on the batch it was sampled in or the model being
evaluated. The images of one prompt and seed before training and after it, or with and without a LoRA, differ only
by what training changed. The held-out evaluation never touches the training generators: a run trains the same with
evaluation on or off. Scoring streams each batch while the next one samples, as in training, and rides out reward
servers that restart and replicas that die (``trainer.rewards.EpochRewards``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients import AnyRewardClient, RewardServiceError
from clients.evaluation import (
    RESULTS_FILE,
    ImageRecord,
    call_error,
    evaluation_settings,
    read_results,
    write_evaluation,
)
from trainer.config import Config, SampleConfig
from trainer.rewards import EpochRewards, EpochScores

if TYPE_CHECKING:
    import torch

    from trainer.sampling import SampleBatch
    from trainer.tracking import RunLogger

logger = logging.getLogger(__name__)
# ((prompts, per-image generators) batches, what is sampling for errors) -> the sampled batches, lazily
Sampler = Callable[[Iterable[tuple[list[str], list["torch.Generator"]]], str], Iterator["SampleBatch"]]


@dataclasses.dataclass(frozen=True)
class SeededImage:
    prompt_index: int
    sample: int  # which sample of its prompt
    seed: int  # of the image's own generator


def seeded_images(prompt_count: int, samples_per_prompt: int, seed: int) -> list[SeededImage]:
    """Every prompt ``samples_per_prompt`` times in a row; image i is seeded ``seed + i``."""
    order = [(p, k) for p in range(prompt_count) for k in range(samples_per_prompt)]
    return [SeededImage(p, k, seed + i) for i, (p, k) in enumerate(order)]


def sample_seeded(
    images: Sequence[SeededImage], prompts: Sequence[str], batch_size: int, sample: Sampler, what: str
) -> Iterator[tuple[list[SeededImage], SampleBatch]]:
    """Sample ``images`` in batches of ``batch_size``, each image from its own generator; yields each batch with its
    images as soon as it is decoded (so that scoring can overlap the next batch's sampling)."""
    import torch

    chunks = [list(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    batches = (
        (
            [prompts[image.prompt_index] for image in chunk],
            [torch.Generator().manual_seed(image.seed) for image in chunk],
        )
        for chunk in chunks
    )
    return zip(chunks, sample(batches, what), strict=True)


def seeded_settings(
    model: str, prompts: str, prompt_count: int, samples_per_prompt: int, seed: int, sample: SampleConfig
) -> dict[str, Any]:
    """How an evaluation sampled, as the settings of summary.json and report.html say it (``ddpo eval`` and the
    held-out evaluation alike)."""
    return {
        "model": model,
        "prompts": prompts,
        "prompt_count": prompt_count,
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
        "noise": "a generator per image, seeded seed + image index (prompt by prompt, samples in a row)",
        "eta": sample.eta,
        "steps": sample.num_steps,
        "guidance": sample.guidance_scale,
        "batch_size": sample.batch_size,
    }


def sample_and_score(
    seeded: Sequence[SeededImage],
    prompts: Sequence[str],
    sample: Sampler,
    batch_size: int,
    *,
    client: AnyRewardClient,
    rewards: Sequence[str],
    timeout: float,
    on_error: str | None,
    variant: str,
    out: Path,
    image_path: Callable[[int, SeededImage], str],
    what: str,
) -> tuple[list[ImageRecord], Exception | None]:
    """Sample ``seeded`` from their own seeds, save image i as ``out / image_path(i, image)``, and stream each
    decoded batch to every reward while the next one samples (``trainer.rewards.EpochRewards``: through restarts
    and lost replicas). Returns the results.jsonl records of ``variant``, in ``seeded``'s order, and the error of a
    reward stream that failed (the first), if any.

    ``on_error`` None records every failure on its items and never raises: an item the service failed keeps its
    "CODE: message", and the items a failed stream left unanswered get the stream's error (``ddpo eval``).
    "fail" or "drop" apply the training run's policy instead (``EpochRewards.check``: RewardError).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    streams = [EpochRewards(client, reward, timeout, on_error or "drop", what) for reward in rewards]
    records = [
        ImageRecord(variant, prompts[im.prompt_index], im.prompt_index, im.sample, im.seed, image_path(i, im))
        for i, im in enumerate(seeded)
    ]
    batches = sample_seeded(seeded, prompts, batch_size, sample, what)
    saved = 0
    try:
        for chunk, batch in tqdm(batches, desc=what, unit="batch", total=-(-len(seeded) // batch_size), leave=False):
            for pixels, record in zip(batch.images, records[saved : saved + len(chunk)], strict=True):
                (out / record.image).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(out / record.image)
            saved += len(chunk)
            for stream in streams:
                stream.submit(batch.images, batch.prompts)
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    answers = [stream.finish() for stream in streams]  # every stream closed before any policy raises
    for reward, stream, scores in zip(rewards, streams, answers, strict=True):
        if on_error is not None:
            stream.check(scores)
        record_scores(records, reward, scores)
    return records, next((scores.error for scores in answers if scores.error is not None), None)


def record_scores(records: Sequence[ImageRecord], reward: str, scores: EpochScores) -> None:
    """Each record's answer from ``reward``: its score, the service's error for it, or the error of the stream
    that left it unanswered."""
    failed = {int(result.id): result for result in scores.failures}
    unanswered = "UNKNOWN: no answer was recorded for this item"
    if isinstance(scores.error, RewardServiceError):
        unanswered = call_error(scores.error)
    elif scores.error is not None:
        unanswered = f"UNKNOWN: {scores.error}"
    for i, (record, score) in enumerate(zip(records, scores.scores, strict=True)):
        if i in failed:
            record.add_result(reward, failed[i])
        elif np.isnan(score):
            record.add_error(reward, unanswered)
        else:
            record.rewards[reward] = float(score)


# Below this many epochs, a held-out change is mostly the noise of a few evaluations; the figure is the main job's.
FEW_EPOCHS = 10
FEW_EPOCHS_NOTE = (
    "held-out changes over {epochs} epoch(s) are mostly noise: on the built-in tiny model, 30 epochs raised the "
    "held-out JPEG compressibility by about 12 % (docs/benchmarks.md, 'Learning efficacy')"
)


def evaluate_held_out(
    epoch: int,
    config: Config,
    prompts: list[str],  # the held-out prompts, each once
    sample: Sampler,
    client: AnyRewardClient,
    run_logger: RunLogger,
) -> None:
    """Sample the held-out prompts from their fixed seeds, score them with the run's reward, and log the result:
    a line of eval.jsonl, the images, and results.jsonl, summary.json and report.html in eval/epoch_N/."""
    e, r = config.eval, config.reward
    folder = run_logger.run_dir / "eval" / f"epoch_{epoch:06d}"
    records, _ = sample_and_score(  # on_error given: a stream's failure raises
        seeded_images(len(prompts), e.samples_per_prompt, e.seed),
        prompts,
        sample,
        config.sample.batch_size,
        client=client,
        rewards=[r.name],
        timeout=r.timeout,
        on_error=r.on_error,
        variant=f"epoch_{epoch}",
        out=folder,
        image_path=lambda i, _: f"{i:03d}.png",
        what=f"the held-out evaluation at epoch {epoch}",
    )
    before = baseline(folder.parent, epoch)  # the report compares with epoch 0, as `ddpo eval --compare-lora` does
    settings = held_out_settings(config, epoch, run_logger.run_dir, prompts)
    summary = write_evaluation(folder, before + records, [r.name], settings)
    stats = run_logger.log_eval(epoch, records, summary, r.name, folder)
    logger.info(
        "held-out evaluation at epoch %d: %s = %.4f ± %.4f over %d samples",
        epoch,
        r.name,
        stats["reward_mean"],
        stats["reward_std"],
        stats["samples"],
    )


def baseline(eval_dir: Path, epoch: int) -> list[ImageRecord]:
    """The records of the evaluation before training (eval/epoch_000000/), their images addressed from the folder of
    epoch ``epoch``'s; none at epoch 0, or when a run resumed elsewhere has no such folder."""
    results = eval_dir / "epoch_000000" / RESULTS_FILE
    if epoch == 0 or not results.is_file():
        return []
    records = [ImageRecord.from_json(line) for line in read_results(results)]
    for record in records:
        record.image = f"../epoch_000000/{record.image}"
    return records


def held_out_settings(config: Config, epoch: int, run_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """The settings at the top of a held-out evaluation's summary.json and report.html."""
    c = config
    return evaluation_settings(
        "ddpo train: held-out evaluation",
        [c.reward.name],
        c.reward.server,
        run_dir=str(run_dir),
        epoch=epoch,
        trained=("LoRA adapter" if c.lora.enabled else "full UNet") + f" after {epoch} epoch(s)",
        **seeded_settings(
            c.model,
            str(c.eval.file) if c.eval.set == "from_file" else c.eval.set,
            len(prompts),
            c.eval.samples_per_prompt,
            c.eval.seed,
            c.sample,
        ),
    )
