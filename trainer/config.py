"""The trainer's configuration: one typed tree of dataclasses, every field documented, loaded from TOML or YAML.

Presets live in ``trainer/configs/*.toml`` and hold only what differs from the defaults below, which are
kvablack/ddpo-pytorch's ``config/base.py``. ``ddpo train --config compressibility train.learning_rate=1e-4``
loads a preset (or a file path) and applies ``key=value`` overrides; values are parsed as TOML literals.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from clients.cli_support import read_token_file
from clients.typed_config import ConfigError as ConfigError  # re-exported: callers catch trainer.config.ConfigError
from clients.typed_config import build, config_format, parse_config_text
from trainer.prompts import PROMPT_SETS

ALGORITHMS = ("ddpo_is", "ddpo_sf", "rwr", "sparse_rwr", "ddpo_is_kl")
Algorithm = Literal["ddpo_is", "ddpo_sf", "rwr", "sparse_rwr", "ddpo_is_kl"]


@dataclasses.dataclass
class SampleConfig:
    num_steps: int = 50
    """DDIM steps per trajectory (T). Each is one action of the MDP."""
    eta: float = 1.0
    """DDIM η: 1 samples like DDPM. Training needs η > 0, or the steps have no log-probability."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w, used when sampling and when recomputing log-probabilities."""
    batch_size: int = 1
    """Images per sampling batch, per process. Each decoded batch goes to the reward service at once."""
    num_batches_per_epoch: int = 2
    """Sampling batches per epoch. Samples per epoch = batch_size × num_batches_per_epoch × processes."""
    images_per_prompt: int = 1
    """Group sampling: each prompt drawn is sampled k times in the same batch (must divide batch_size)."""
    vae_slicing: bool = False
    """Decode the sampled latents one image at a time (diffusers' VAE slicing): the VAE decoder's peak memory stops
    growing with batch_size, at the cost of speed. The images are the same."""


@dataclasses.dataclass
class TrainConfig:
    algorithm: Algorithm = "ddpo_is"
    """ddpo_is (clipped importance sampling, the default), ddpo_sf (score function), rwr, sparse_rwr, ddpo_is_kl."""
    batch_size: int = 1
    """Trajectories per training minibatch, per process."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step. Optimizer steps per epoch = samples / (batch_size × this) × inner epochs."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples (reshuffled each time)."""
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each optimizer step."""
    timestep_fraction: float = 1.0
    """Fraction of the T steps trained on, a different random subset for each sample (DDPO/RWR alike)."""
    cfg: bool = True
    """Train on the guided prediction ε_u + w (ε_c − ε_u), as sampled: DDPO recomputes log-probabilities with it and
    RWR regresses it (the replication's Algorithms 1-2). Each UNet call then takes twice the batch, and twice the
    activation memory. Off: the conditional prediction only (for DDPO this disagrees with sampling)."""
    timesteps_per_call: int | Literal["auto"] = "auto"
    """Trained timesteps of a minibatch that go through the UNet together: its (sample, timestep) pairs make one
    forward and backward call per chunk of this many timesteps. 1 is one call per timestep, as ddpo-pytorch does;
    larger chunks make fewer, larger calls, which is faster while a minibatch alone does not fill the device. The
    gradients are the same. Activation memory grows linearly with it: each call holds train.batch_size × this (× 2
    with train.cfg) UNet activations (train.gradient_checkpointing cuts them). auto: all the trained timesteps on a
    CPU; on a GPU the largest chunk whose forward and backward fit, found once per run by halving on out-of-memory."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them: much less activation memory
    for about a third more training time. The gradients are the same."""
    clip_range: float = 1e-4
    """DDPO-IS trust region ε: ratios are clipped to [1 − ε, 1 + ε]."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""
    kl_coef: float = 0.01
    """DDPO-IS-KL: weight of the KL penalty to the pretrained model."""
    kl_estimator: Literal["exact", "logprob_sq"] = "exact"
    """exact: ‖μθ − μref‖² / (2σ²) per step. logprob_sq: the replication write-up's ½(log πθ − log πref)²."""
    rwr_beta: float = 1.0
    """RWR inverse temperature β in exp(β r)/Z."""
    sparse_threshold: float | None = None
    """Sparse RWR: keep samples with r ≥ this value. Exactly one of this and sparse_percentile."""
    sparse_percentile: float | None = None
    """Sparse RWR: keep samples at or above this percentile (0-100) of the epoch's rewards."""
    ratio_check: Literal["fail", "warn", "off"] = "fail"
    """At each epoch's first optimizer step, before the weights change, the log-probs it recomputes must match the
    sampled ones: fail (or warn) if max |ratio − 1| is above ratio_tolerance, which means sampling and training
    disagree (dtype, batch layout, a scheduler change). It costs no extra UNet call."""
    ratio_tolerance: float = 1e-4
    """Largest acceptable max |ratio − 1| with unchanged weights (float32 on CPU gives 0 or about 1e-6)."""


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter on the UNet (the default). Off: full fine-tuning of the UNet."""
    rank: int = 4
    alpha: float = 4.0
    """LoRA scale is alpha / rank."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get an adapter: the attention projections, as diffusers' LoRA training scripts."""


@dataclasses.dataclass
class RewardConfig:
    server: str = "127.0.0.1:50051"
    """Reward service address: host:port, grpc(s)://host:port or triton://host:port; several replicas as a
    comma-separated list (a:50051,b:50051) or dns:///name:port, balanced by outstanding work with failover."""
    name: str = "jpeg_compressibility"
    """The reward to maximise, as the service lists it (``ddpo rewards --server ADDR``)."""
    timeout: float = 600.0
    """Progress timeout in seconds: the stream counts as broken when items are outstanding and no answer has come for
    this long (slow sampling never trips it). Also how long start-up waits for a reward that is still loading."""
    outage_timeout: float = 900.0
    """How long the service may stay away in the middle of a run, while the trainer reconnects with backoff and
    re-sends the unanswered items; then the run checkpoints its finished epochs and stops."""
    stream: bool = True
    """Send each batch to the service as soon as it is decoded, so scoring overlaps sampling. False holds them until
    sampling ends (the baseline that bench/epoch.py measures against)."""
    on_error: Literal["fail", "drop"] = "fail"
    """A failed item fails the epoch with the reward's message (fail) or is left out and counted (drop)."""
    token_file: str | None = None
    """File holding the bearer token the service requires (``ddpo train --auth-token-file``). The token itself is
    never part of the config, so it never reaches the run's files."""
    token_env: str | None = None
    """Name of an environment variable holding that token (instead of token_file)."""
    ca_file: str | None = None
    """PEM file of the CA that signed the service's certificate (grpcs://)."""

    def read_token(self) -> str | None:
        """The bearer token from token_file or token_env; ConfigError if it is missing, unreadable or empty."""
        if self.token_file is not None:
            try:
                return read_token_file(self.token_file, "reward.token_file")
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.token_env is None:
            return None
        token = os.environ.get(self.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"reward.token_env: the environment variable {self.token_env} is empty; it must hold the bearer token"
            )
        return token


@dataclasses.dataclass
class PromptConfig:
    set: str = "imagenet_animals"
    """simple_animals, imagenet_animals, nouns_activities, shapes, shapes_heldout, or from_file (then ``file``)."""
    file: str | None = None
    """A text file with one prompt per line, for set = "from_file"."""


@dataclasses.dataclass
class EvalConfig:
    enabled: bool = False
    """Score a held-out prompt set before the first epoch, every ``every`` epochs and after the last, with fixed
    noise. Rewards go to eval.jsonl, images to eval/, and a before/after grid to eval_before_after.png."""
    set: str = "from_file"
    """The held-out prompt set, as prompts.set (the tiny model's is shapes_heldout)."""
    file: str | None = None
    """A text file with one prompt per line, for set = "from_file"."""
    samples_per_prompt: int = 2
    seed: int = 2023
    """Image i of every evaluation has its own generator, seeded seed + i (as ``ddpo eval --seed``): every evaluation
    sees the same noise, and training never touches it."""
    every: int = 0
    """Also evaluate every N epochs (0: only before and after training)."""


@dataclasses.dataclass
class StatTrackingConfig:
    per_prompt: bool = True
    """Normalise rewards per prompt (with a warm-up on batch statistics); off: over the epoch's batch."""
    buffer_size: int = 16
    """Rewards kept per prompt."""
    min_count: int = 16
    """Rewards a prompt needs before its own statistics replace the batch's."""


@dataclasses.dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (needs ``pip install wandb`` and a login)."""
    wandb_project: str = "ddpo"
    images_every: int = 1
    """Write an image grid captioned "prompt | reward" every N epochs (0: never)."""
    grid_size: int = 16
    """Images in each grid."""


@dataclasses.dataclass
class Config:
    model: str = "CompVis/stable-diffusion-v1-4"
    """A Stable-Diffusion-style model: a hub id, a local folder, or "tiny" (the built-in model)."""
    revision: str | None = None
    seed: int = 42
    num_epochs: int = 100
    run_dir: str = "runs/ddpo"
    """Where metrics.jsonl, TensorBoard logs, image grids, checkpoints and the final LoRA go."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    """The policy's dtype: fp16 or bf16 load the frozen weights in that dtype and run the UNet under autocast (fp16
    also scales the loss); trainable weights and the DDIM arithmetic stay float32. The same on a CPU (slowly) as on
    a GPU. bf16 needs an Ampere or newer GPU; no: float32 throughout."""
    allow_tf32: bool = True
    save_every: int = 20
    """Save a resumable checkpoint every N epochs (and after the last one)."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints (0: all)."""
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    stat_tracking: StatTrackingConfig = dataclasses.field(default_factory=StatTrackingConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def samples_per_epoch(self, num_processes: int = 1) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch * num_processes

    def optimizer_steps_per_epoch(self) -> int:
        minibatches = self.samples_per_epoch() // self.train.batch_size
        return minibatches // self.train.gradient_accumulation_steps * self.train.num_inner_epochs

    def train_timesteps(self) -> int:
        return max(1, int(self.sample.num_steps * self.train.timestep_fraction))

    def eval_due(self, epoch: int) -> bool:
        """Whether the held-out evaluation runs once ``epoch`` epochs are done: before training, every
        ``eval.every`` epochs, and after the last."""
        e = self.eval
        return e.enabled and (epoch in (0, self.num_epochs) or bool(e.every and epoch % e.every == 0))

    def describe(self, num_processes: int, policy: str, start_epoch: int) -> str:
        """The first line of a run's log: what trains (``policy``: "float16 on cuda"), on how many processes, against
        which reward, how much."""
        return (
            f"{self.train.algorithm} on {self.model} (policy {policy}, {num_processes} process(es)), reward "
            f"{self.reward.name!r} from {self.reward.server}: {self.samples_per_epoch(num_processes)} samples/epoch, "
            f"{self.optimizer_steps_per_epoch()} optimizer steps/epoch, {self.train_timesteps()} of "
            f"{self.sample.num_steps} steps trained, epochs {start_epoch + 1}..{self.num_epochs}"
        )


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml") for p in resources.files("trainer.configs").iterdir() if p.name.endswith(".toml")
    )


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> Config:
    """A preset name or a .toml/.yaml file, then ``key=value`` overrides, then validation."""
    data: dict[str, Any] = {}
    if name_or_path:
        data = _read_source(name_or_path)
    for override in overrides or []:
        key, value = _parse_override(override)
        _set_dotted(data, key, value)
    config = build(Config, data)
    validate(config)
    return config


def _read_source(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of a preset or file; ``extends = "preset or path"`` inside one merges it over that base."""
    if name_or_path in seen:
        raise ConfigError(f"config {name_or_path!r} extends itself: {' -> '.join((*seen, name_or_path))}")
    data = _read_one(name_or_path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"extends in {name_or_path!r} must be a preset name or a file path, got {base!r}")
    return _merge(_read_source(base, (*seen, name_or_path)), data)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_one(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        if name_or_path not in preset_names():
            raise ConfigError(f"unknown config {name_or_path!r}: use a file path or one of {', '.join(preset_names())}")
        text = resources.files("trainer.configs").joinpath(f"{name_or_path}.toml").read_text()
        return tomllib.loads(text)
    if not path.is_file():
        raise ConfigError(f"config file {name_or_path!r} does not exist")
    form = config_format(path)
    if form is None:
        raise ConfigError(f"config file {name_or_path!r}: use a .toml, .yaml or .yml file")
    try:
        loaded = parse_config_text(path.read_text(), form)
    except ConfigError as error:
        raise ConfigError(f"config file {name_or_path!r} is not valid: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {name_or_path!r} must hold a table of settings")
    return loaded


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (for example train.learning_rate=1e-4)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word, such as model=tiny
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def validate(config: Config) -> None:
    """Check values and how they interact; each error names the keys and the fix."""
    sample, train = config.sample, config.train
    positive = {
        "num_epochs": config.num_epochs,
        "save_every": config.save_every,
        "sample.num_steps": sample.num_steps,
        "sample.batch_size": sample.batch_size,
        "sample.num_batches_per_epoch": sample.num_batches_per_epoch,
        "sample.images_per_prompt": sample.images_per_prompt,
        "train.batch_size": train.batch_size,
        "train.gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train.num_inner_epochs": train.num_inner_epochs,
        "train.learning_rate": train.learning_rate,
        "train.max_grad_norm": train.max_grad_norm,
        "train.clip_range": train.clip_range,
        "train.adv_clip_max": train.adv_clip_max,
        "lora.rank": config.lora.rank,
        "lora.alpha": config.lora.alpha,
        "reward.timeout": config.reward.timeout,
        "reward.outage_timeout": config.reward.outage_timeout,
        "stat_tracking.buffer_size": config.stat_tracking.buffer_size,
        "stat_tracking.min_count": config.stat_tracking.min_count,
        "eval.samples_per_prompt": config.eval.samples_per_prompt,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if sample.eta <= 0:
        raise ConfigError(
            f"sample.eta must be > 0 to train (got {sample.eta}): a deterministic step has no log-probability"
        )
    if not 0 < train.timestep_fraction <= 1:
        raise ConfigError(f"train.timestep_fraction must be in (0, 1], got {train.timestep_fraction}")
    per_call = train.timesteps_per_call
    if per_call != "auto" and not 0 < per_call <= config.train_timesteps():
        raise ConfigError(
            f"train.timesteps_per_call must be 'auto' or in [1, {config.train_timesteps()}] (the trained timesteps "
            f"per sample: sample.num_steps × train.timestep_fraction), got {per_call}"
        )
    if sample.batch_size % sample.images_per_prompt:
        raise ConfigError(
            f"sample.images_per_prompt ({sample.images_per_prompt}) must divide sample.batch_size ({sample.batch_size})"
        )
    samples = config.samples_per_epoch()
    if samples % train.batch_size:
        raise ConfigError(
            f"samples per epoch (sample.batch_size × sample.num_batches_per_epoch = {samples}) must be divisible by "
            f"train.batch_size ({train.batch_size})"
        )
    minibatches = samples // train.batch_size
    if minibatches % train.gradient_accumulation_steps:
        raise ConfigError(
            f"the {minibatches} minibatches per epoch ({samples} samples / train.batch_size {train.batch_size}) must "
            f"be divisible by train.gradient_accumulation_steps ({train.gradient_accumulation_steps}), so that no "
            "optimizer step is left half-accumulated"
        )
    if config.stat_tracking.min_count > config.stat_tracking.buffer_size:
        raise ConfigError(
            f"stat_tracking.min_count ({config.stat_tracking.min_count}) cannot exceed stat_tracking.buffer_size "
            f"({config.stat_tracking.buffer_size}): per-prompt statistics would never be used"
        )
    if train.algorithm == "sparse_rwr" and (train.sparse_threshold is None) == (train.sparse_percentile is None):
        raise ConfigError(
            "train.algorithm = 'sparse_rwr' needs exactly one of train.sparse_threshold and train.sparse_percentile"
        )
    if train.sparse_percentile is not None and not 0 <= train.sparse_percentile <= 100:
        raise ConfigError(f"train.sparse_percentile must be in [0, 100], got {train.sparse_percentile}")
    if train.kl_coef < 0:
        raise ConfigError(f"train.kl_coef must be >= 0, got {train.kl_coef}")
    if config.reward.token_file is not None and config.reward.token_env is not None:
        raise ConfigError("set one of reward.token_file and reward.token_env, not both")
    if config.keep_checkpoints < 0 or config.log.images_every < 0 or config.eval.every < 0:
        raise ConfigError("keep_checkpoints, log.images_every and eval.every must be >= 0")
    for key, prompt_set, file in (
        ("prompts", config.prompts.set, config.prompts.file),
        ("eval", config.eval.set if config.eval.enabled else None, config.eval.file),
    ):
        if prompt_set is not None and prompt_set not in PROMPT_SETS:
            raise ConfigError(f"{key}.set = {prompt_set!r} is not a prompt set; use one of {', '.join(PROMPT_SETS)}")
        if prompt_set == "from_file" and not file:
            raise ConfigError(f"{key}.set = 'from_file' needs {key}.file (a text file with one prompt per line)")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
