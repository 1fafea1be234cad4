"""``ddpo eval``: sample a model from fixed per-image seeds and score every image with the reward service.

ddpo serve --rewards jpeg_compressibility,jpeg_incompressibility --port 50051 &
ddpo eval --model tiny --lora runs/tiny/final --compare-lora base --prompts shapes_heldout --samples-per-prompt 2 \\
    --seed 0 --rewards jpeg_compressibility,jpeg_incompressibility --reward-server 127.0.0.1:50051 --out eval/tiny

Image i of the prompt × sample list (prompt 0's samples first) has its own generator, seeded S + i: its initial
latents and every DDIM step's noise come from it alone, so an image does not depend on the batch it was sampled in
(up to float rounding in batched kernels, a pixel level here and there), and every variant (the model with --lora,
the --compare-lora one) is sampled from the same seeds. --eta 0 is deterministic: the same images every time. The
outputs in --out (images/, results.jsonl, summary.json, report.html) are described in docs/evaluation.md.

Exit status, as ddpo score: 0 when every image was scored with every reward, 1 when some items failed (each failure
is printed; the outputs are still written), 2 for bad usage, 3 when the reward service could not be used, 130 on
Ctrl-C. Each batch is scored while the next one samples; a server that restarts, or a replica that dies, mid-run
loses nothing (its unanswered images go again). One that stays away longer than --outage-timeout ends the run with
status 3 after the variant being evaluated: its images are saved, those left unscored are recorded with the error,
and the outputs are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.cli_support import EXIT_FAILED, EXIT_OK, EXIT_SERVICE, EXIT_USAGE, read_token_file
from clients.connect import AnyRewardClient, check_address, check_rewards, open_client
from clients.errors import RewardServiceError
from clients.evaluation import ImageRecord, evaluation_settings, parse_reward_list, write_evaluation
from clients.replicas import ADDRESS_FORMS
from trainer.config import SampleConfig
from trainer.evaluate import SeededImage, sample_and_score, seeded_images, seeded_settings
from trainer.prompts import PROMPT_SETS, load_prompts

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from trainer.sampling import SampleBatch

logger = logging.getLogger("ddpo.eval")
BASE = "base"
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model to evaluate: the base model (``lora`` None) or the base model with one LoRA file."""

    name: str
    lora: Path | None


def lora_file(path: str) -> Path:
    """The .safetensors file of a LoRA given as the file itself or a folder holding pytorch_lora_weights.safetensors
    (a run's final/ folder); ValueError naming the path otherwise."""
    given = Path(path)
    if given.is_dir():
        if (given / LORA_FILE).is_file():
            return given / LORA_FILE
        raise ValueError(
            f"LoRA folder {path!r} has no {LORA_FILE}: pass a run's final/ folder (written by ddpo train with "
            "lora.enabled) or the .safetensors file itself"
        )
    if given.is_file():
        if given.suffix != ".safetensors":
            raise ValueError(f"LoRA file {path!r} is not a .safetensors file")
        return given
    raise ValueError(f"LoRA {path!r} does not exist")


def _label(file: Path) -> str:
    """A short name for a LoRA: its folder's name (the run's name for a run's final/ folder), or the file's stem."""
    folder = file.parent.resolve()
    if file.name != LORA_FILE:
        name = file.stem
    elif folder.name == "final" and folder.parent.name:
        name = folder.parent.name
    else:
        name = folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lora"


def plan_variants(lora: str | None, compare: str | None) -> list[Variant]:
    """The variants in report order: the --compare-lora one first (the reference), then the model with --lora (or
    the base model). ``"base"`` as --compare-lora means no adapter. Names are unique ("base" only for no adapter)."""
    specs = [] if compare is None else [None if compare == BASE else lora_file(compare)]
    specs.append(None if lora is None else lora_file(lora))
    variants: list[Variant] = []
    taken: set[str] = set()
    for spec in specs:
        name = BASE if spec is None else _label(spec)
        if spec is not None and name == BASE:
            name = "base-lora"
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(unique)
        variants.append(Variant(unique, spec))
    return variants


def resolve_prompts(spec: str) -> list[str]:
    """A prompt set's prompts (any of trainer.prompts.PROMPT_SETS but from_file) or a text file's lines."""
    if spec in PROMPT_SETS and spec != "from_file":
        return load_prompts(spec)
    if Path(spec).is_file():
        return load_prompts("from_file", spec)
    sets = ", ".join(s for s in PROMPT_SETS if s != "from_file")
    raise ValueError(f"--prompts {spec!r} is neither a prompt set ({sets}) nor an existing file")


def sampling_defaults(model: str) -> dict[str, Any]:
    """num_steps, guidance_scale and batch_size as training samples: the tiny preset's for the built-in model,
    the base config's (ddpo-pytorch's) otherwise."""
    from trainer.config import Config, load_config

    sample = load_config("tiny").sample if model == "tiny" else Config().sample
    return {"num_steps": sample.num_steps, "guidance_scale": sample.guidance_scale, "batch_size": sample.batch_size}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="'tiny' (the built-in model), a hub id or a local folder")
    parser.add_argument("--lora", help="a LoRA: a run's final/ folder, a folder with " + LORA_FILE + ", or the file")
    parser.add_argument(
        "--compare-lora", metavar="OTHER", help="also evaluate OTHER (another LoRA, or 'base' for no adapter)"
    )
    parser.add_argument("--prompts", required=True, help="a prompt set name or a UTF-8 text file, one prompt a line")
    parser.add_argument("--samples-per-prompt", type=int, required=True, metavar="K", help="images per prompt")
    parser.add_argument("--seed", type=int, required=True, help="image i (over prompts × samples) uses seed S + i")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0, as training; 0: no noise)")
    parser.add_argument("--num-steps", type=int, help="DDIM steps (default: the training preset's)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="images per sampling batch (default: the preset's)")
    parser.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. a,b")
    parser.add_argument("--reward-server", required=True, help=ADDRESS_FORMS)
    parser.add_argument("--auth-token-file", type=Path, help="file holding the service's bearer token")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the service to serve, and for each answer"
    )
    parser.add_argument(
        "--outage-timeout",
        type=float,
        default=120.0,
        help="seconds the service may stay away mid-run (a restart, lost replicas) before eval gives up (default 120)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


@dataclasses.dataclass
class Settings:
    """The checked command line."""

    model: str
    variants: list[Variant]
    prompts: list[str]
    samples_per_prompt: int
    seed: int
    eta: float
    num_steps: int
    guidance_scale: float
    batch_size: int
    rewards: list[str]
    server: str
    token: str | None
    timeout: float
    outage_timeout: float
    out: Path

    @property
    def sampling(self) -> SampleConfig:
        return SampleConfig(
            num_steps=self.num_steps, eta=self.eta, guidance_scale=self.guidance_scale, batch_size=self.batch_size
        )

    def to_json(self, prompt_spec: str) -> dict[str, Any]:
        loras = {v.name: None if v.lora is None else str(v.lora) for v in self.variants}
        sampling = seeded_settings(
            self.model, prompt_spec, len(self.prompts), self.samples_per_prompt, self.seed, self.sampling
        )
        return evaluation_settings("ddpo eval", self.rewards, self.server, loras=loras, **sampling)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Every usage check that needs neither the service nor torch; parser.error (exit 2) on the first problem."""
    try:
        if args.samples_per_prompt < 1:
            raise ValueError(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.eta < 0:
            raise ValueError(f"--eta must be >= 0, got {args.eta}")
        for flag in ("num_steps", "batch_size"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        for flag in ("timeout", "outage_timeout"):
            if getattr(args, flag) <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
        rewards = parse_reward_list(args.rewards)
        prompts = resolve_prompts(args.prompts)
        variants = plan_variants(args.lora, args.compare_lora)
        check_address(args.reward_server)
        token = read_token_file(args.auth_token_file, "--auth-token-file") if args.auth_token_file else None
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {str(args.out)!r} exists and is not a folder")
    except (OSError, ValueError) as error:
        parser.error(str(error))
    defaults = sampling_defaults(args.model)
    return Settings(
        model=args.model,
        variants=variants,
        prompts=prompts,
        samples_per_prompt=args.samples_per_prompt,
        seed=args.seed,
        eta=args.eta,
        num_steps=args.num_steps or defaults["num_steps"],
        guidance_scale=defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
        batch_size=args.batch_size or defaults["batch_size"],
        rewards=rewards,
        server=args.reward_server,
        token=token,
        timeout=args.timeout,
        outage_timeout=args.outage_timeout,
        out=args.out,
    )


def load_variants(settings: Settings) -> StableDiffusionPipeline:
    """The pipeline, with every LoRA of ``settings.variants`` loaded as an adapter named after its variant."""
    from trainer.sampling import load_pipeline

    pipeline = load_pipeline(settings.model)
    for variant in settings.variants:
        if variant.lora is not None:
            try:
                pipeline.load_lora_weights(
                    str(variant.lora.parent), weight_name=variant.lora.name, adapter_name=variant.name
                )
            except Exception as error:  # diffusers and safetensors raise many types for a bad file
                raise ValueError(f"cannot load the LoRA {str(variant.lora)!r}: {error}") from error
    return pipeline


def select_variant(pipeline: StableDiffusionPipeline, variant: Variant) -> None:
    """Make ``variant`` the pipeline's model: its adapter alone, or none for the base model."""
    if not pipeline.get_list_adapters():
        return
    if variant.lora is None:
        pipeline.disable_lora()
    else:
        pipeline.enable_lora()
        pipeline.set_adapters([variant.name])


def image_path(variant: str, _: int, image: SeededImage) -> str:
    """Where ``ddpo eval`` saves a variant's image: images/<variant>/<prompt_index:03d>_<sample:02d>.png."""
    return f"images/{variant}/{image.prompt_index:03d}_{image.sample:02d}.png"


def evaluate(
    settings: Settings, pipeline: StableDiffusionPipeline, client: AnyRewardClient, device: torch.device
) -> tuple[list[ImageRecord], Exception | None]:
    """Every variant sampled from the same per-image seeds and scored with every reward
    (``trainer.evaluate.sample_and_score``); returns the records and a reward stream's failure, if any: its items
    are recorded with it, and the variants after it are not sampled."""
    import contextlib

    from trainer.sampling import encode_prompts, sample_batches

    images = seeded_images(len(settings.prompts), settings.samples_per_prompt, settings.seed)
    negative_embeds = encode_prompts(pipeline, [""], device)  # (1, L, D)

    def sample(batches: Iterable[tuple[list[str], list[torch.Generator]]], what: str) -> Iterator[SampleBatch]:
        """The pipeline's model, whichever adapter is selected, without autocast; eta = 0 allowed."""
        config, autocast = settings.sampling, contextlib.nullcontext
        return sample_batches(pipeline, pipeline.unet, batches, negative_embeds, config, device, autocast, what, True)

    records: list[ImageRecord] = []
    for variant in settings.variants:
        select_variant(pipeline, variant)
        logger.info("sampling and scoring %s: %d images", variant.name, len(images))
        scored, error = sample_and_score(
            images,
            settings.prompts,
            sample,
            settings.batch_size,
            client=client,
            rewards=settings.rewards,
            timeout=settings.timeout,
            on_error=None,  # record every failure on its items
            variant=variant.name,
            out=settings.out,
            image_path=functools.partial(image_path, variant.name),
            what=f"ddpo eval: {variant.name}",
        )
        records.extend(scored)
        if error is not None:  # the service stayed away for --outage-timeout: the next variant would wait as long
            return records, error
    return records, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    settings = check_args(parser, args)
    # each reward stream's progress timeout is --timeout (``sample_and_score``)
    client = open_client(
        settings.server, timeout=settings.timeout, outage_timeout=settings.outage_timeout, auth_token=settings.token
    )
    with client:
        try:
            check_rewards(client, settings.server, settings.rewards, settings.timeout)
        except (RewardServiceError, TimeoutError) as error:  # the message names the server
            print(f"ddpo eval: {error}", file=sys.stderr)  # the message names the server
            return EXIT_SERVICE
        import torch  # only once the command line and the service are known to be usable

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            pipeline = load_variants(settings)
        except (OSError, ValueError) as error:
            print(f"ddpo eval: {error}", file=sys.stderr)
            return EXIT_USAGE
        pipeline.to(device)
        logger.info(
            "%s: %d prompts × %d samples, seeds %d.., %d steps, guidance %g, eta %g, variants %s",
            settings.model,
            len(settings.prompts),
            settings.samples_per_prompt,
            settings.seed,
            settings.num_steps,
            settings.guidance_scale,
            settings.eta,
            ", ".join(v.name for v in settings.variants),
        )
        records, failure = evaluate(settings, pipeline, client, device)
    summary = write_evaluation(settings.out, records, settings.rewards, settings.to_json(args.prompts))
    failed = 0
    for record in records:
        for reward, message in record.errors.items():
            failed += 1
            print(f"ddpo eval: {settings.out / record.image}\t{reward}\terror: {message}", file=sys.stderr)
    for reward, by_variant in summary["rewards"].items():
        for variant, values in by_variant.items():
            mean = "–" if values["mean"] is None else f"{values['mean']:.6g} ± {values['std']:.3g}"
            print(f"{reward}\t{variant}\t{mean}\t({values['count']} scored, {values['failed']} failed)")
    print(f"ddpo eval: wrote {len(records)} images, results.jsonl, summary.json and report.html to {settings.out}")
    if failure is not None:
        print(f"ddpo eval: the reward service failed: {failure}", file=sys.stderr)
        return EXIT_SERVICE
    return EXIT_FAILED if failed else EXIT_OK
