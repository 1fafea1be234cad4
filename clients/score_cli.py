"""``ddpo score``: score image files (PNG or JPEG) with a reward server.

Two modes, one or the other:

  ddpo score FILE... --reward NAME [--prompt TEXT] [--json]
      score the files with one reward and print a line per file;
  ddpo score --images DIR --reward A[,B] --out OUTDIR [--prompts-from auto|metadata|sidecar|filename|none]
      score every .png/.jpg/.jpeg file in DIR (sorted, not recursive) with each reward, print a line per file and
      reward, and write OUTDIR/results.jsonl, summary.json and report.html (docs/evaluation.md).

Prompts for --images: metadata.jsonl in DIR (Hugging Face ImageFolder: lines with "file_name" and "prompt" or
"text"), a sidecar <stem>.txt beside each image (kohya's LoRA datasets: its first line), or the file name (the
stem with "_" and "-" as spaces, less a trailing "_<digits>" sample number). auto: metadata.jsonl if DIR has one,
else sidecars if any image has one, else none.

Exit status: 0 when every file was scored, 1 when any file failed (each failure is printed), 2 for bad usage,
3 when the server could not be used at all, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.cli_support import EXIT_FAILED, EXIT_OK, EXIT_SERVICE, Service, add_service_arguments
from clients.connect import check_rewards
from clients.errors import RewardServiceError
from clients.evaluation import ImageRecord, call_error, evaluation_settings, parse_reward_list, write_evaluation
from clients.types import EncodedImage, ItemResult

_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}
PROMPT_SOURCES = ("auto", "metadata", "sidecar", "filename", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA_FILE = "metadata.jsonl"
_CHUNK = 32  # images per Score call in --images mode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpo score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=image_file_argument, metavar="FILE", help="PNG or JPEG images")
    parser.add_argument("--images", type=Path, metavar="DIR", help="score every PNG/JPEG file in DIR instead")
    parser.add_argument("--out", type=Path, metavar="OUTDIR", help="with --images: where the outputs go")
    parser.add_argument(
        "--prompts-from",
        choices=PROMPT_SOURCES,
        help="with --images: where each image's prompt comes from (default auto)",
    )
    parser.add_argument(
        "--reward", required=True, help="reward name (`ddpo rewards` lists them); with --images: A[,B...]"
    )
    parser.add_argument("--prompt", help="prompt sent with every image (for rewards that need one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    add_service_arguments(parser)
    return parser


def image_file_argument(text: str) -> Path:
    """A FILE argument; a folder is refused (exit 2) with the flag that scores one."""
    if Path(text).is_dir():
        folder = shlex.quote(text)
        raise argparse.ArgumentTypeError(
            f"{folder} is a folder; to score every image in it, use --images {folder} --out OUTDIR"
        )
    return Path(text)


def read_image_file(path: Path) -> EncodedImage:
    """Read a PNG or JPEG file as is; raise ValueError for anything else."""
    data = path.read_bytes()
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return EncodedImage(data, kind)  # type: ignore[arg-type]
    raise ValueError("not a PNG or JPEG file")


def _print(file: Path, reward: str, result: ItemResult | None, error: str | None, as_json: bool) -> None:
    if as_json:
        entry: dict[str, object] = {"file": str(file), "reward": reward}
        if result is not None and result.ok:
            entry["score"] = result.score
            if result.components:
                entry["components"] = result.components
            if result.info:
                entry["info"] = result.info
        else:
            entry["error"] = error if error is not None else f"{result.code.name}: {result.message}"  # type: ignore[union-attr]
        print(json.dumps(entry), flush=True)
    elif result is not None and result.ok:
        print(f"{file}\t{reward}\t{result.score:.6g}", flush=True)
    else:
        reason = error if error is not None else f"{result.code.name}: {result.message}"  # type: ignore[union-attr]
        print(f"{file}\t{reward}\terror: {reason}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    service = Service.from_args(parser, args)
    if args.images is not None:
        if args.files:
            parser.error("give image FILEs or --images DIR, not both")
        if args.out is None:
            parser.error("--images needs --out OUTDIR for results.jsonl, summary.json and report.html")
        if args.prompt is not None:
            parser.error("--prompt goes with FILEs; with --images use --prompts-from")
        return score_folder(parser, args, service)
    if not args.files:
        parser.error("give image FILEs, or --images DIR")
    for flag, value in (("--out", args.out), ("--prompts-from", args.prompts_from)):
        if value is not None:
            parser.error(f"{flag} goes with --images DIR")
    images: dict[Path, EncodedImage] = {}
    read_errors: dict[Path, str] = {}
    for path in args.files:
        try:
            images[path] = read_image_file(path)
        except (OSError, ValueError) as error:
            read_errors[path] = f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
    results: dict[Path, ItemResult] = {}
    if images:
        try:
            with service.open() as client:
                batch = client.score(
                    args.reward,
                    list(images.values()),
                    prompts=[args.prompt] * len(images) if args.prompt is not None else None,
                )
        except RewardServiceError as error:
            print(f"ddpo score: {error}", file=sys.stderr)
            return EXIT_SERVICE
        results = dict(zip(images, batch.items, strict=True))
    for path in args.files:
        _print(path, args.reward, results.get(path), read_errors.get(path), args.json)
    failed = len(read_errors) + sum(not r.ok for r in results.values())
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------------- --images DIR


def image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files of ``folder`` (by suffix, any case), sorted by name, not recursive."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def prompt_from_filename(path: Path) -> str:
    """ "a_red-circle_03.png" -> "a red circle": the stem less a trailing _<digits>, with _ and - as spaces."""
    stem = re.sub(r"_\d+$", "", path.stem)
    return " ".join(re.sub(r"[_-]", " ", stem).split())


def read_metadata(folder: Path) -> dict[str, str]:
    """file_name -> prompt from folder/metadata.jsonl ("prompt", else "text"); ValueError naming a bad line."""
    path = folder / METADATA_FILE
    prompts: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise ValueError(f'{path}, line {number}: needs a "file_name" string')
        prompt = entry.get("prompt", entry.get("text"))
        if isinstance(prompt, str):
            prompts[Path(entry["file_name"]).as_posix().removeprefix("./")] = prompt
    return prompts


def resolve_source(folder: Path, files: Sequence[Path], source: str) -> str:
    """``auto`` made concrete: metadata if DIR has metadata.jsonl, else sidecar if any image has a .txt, else none."""
    if source != "auto":
        return source
    if (folder / METADATA_FILE).is_file():
        return "metadata"
    if any(path.with_suffix(".txt").is_file() for path in files):
        return "sidecar"
    return "none"


def folder_prompts(folder: Path, files: Sequence[Path], source: str) -> list[str | None]:
    """Each file's prompt from ``source`` (not auto); ValueError naming the file whose prompt is missing."""
    if source == "none":
        return [None] * len(files)
    if source == "filename":
        return [prompt_from_filename(path) for path in files]
    if source == "metadata":
        if not (folder / METADATA_FILE).is_file():
            raise ValueError(f"--prompts-from metadata: {folder / METADATA_FILE} does not exist")
        table = read_metadata(folder)
        missing = [path.name for path in files if path.name not in table]
        if missing:
            raise ValueError(
                f"{folder / METADATA_FILE} has no prompt for {missing[0]} ({len(missing)} file(s) lack one)"
            )
        return [table[path.name] for path in files]
    prompts: list[str | None] = []
    for path in files:
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            raise ValueError(f"{path} has no sidecar prompt file {sidecar.name}")
        lines = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"sidecar prompt file {sidecar} is empty")
        prompts.append(lines[0])
    return prompts


def folder_records(files: Sequence[Path], prompts: Sequence[str | None], out: Path) -> list[ImageRecord]:
    """One record per file (variant "images", no seed): prompt_index numbers the distinct prompts in order of
    first appearance, sample counts the files of each prompt; both None without a prompt."""
    indices: dict[str, int] = {}
    counts: dict[str, int] = {}
    records = []
    for path, prompt in zip(files, prompts, strict=True):
        index = sample = None
        if prompt is not None:
            index = indices.setdefault(prompt, len(indices))
            sample = counts[prompt] = counts.get(prompt, -1) + 1
        relative = Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()
        records.append(ImageRecord("images", prompt, index, sample, None, relative))
    return records


def score_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, service: Service) -> int:
    """``ddpo score --images DIR``: see the module docstring."""
    folder: Path = args.images
    try:
        rewards = parse_reward_list(args.reward)
        if not folder.is_dir():
            raise ValueError(f"--images {str(folder)!r} is not a folder")
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {str(args.out)!r} exists and is not a folder")
        files = image_files(folder)
        if not files:
            raise ValueError(f"--images {str(folder)!r} holds no .png, .jpg or .jpeg files")
        source = resolve_source(folder, files, args.prompts_from or "auto")
        prompts = folder_prompts(folder, files, source)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    records = folder_records(files, prompts, args.out)
    images: dict[int, EncodedImage] = {}
    for i, path in enumerate(files):
        try:
            images[i] = read_image_file(path)
        except (OSError, ValueError) as error:
            reason = f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
            for reward in rewards:
                records[i].add_error(reward, f"INVALID_ARGUMENT: {reason}")
    results: dict[tuple[int, str], ItemResult] = {}
    failure: RewardServiceError | None = None  # a call that failed as a whole: scoring stops there
    try:
        with service.open() as client:
            check_rewards(client, args.server, rewards, args.timeout)
            order = list(images)
            for start in range(0, len(order), _CHUNK):
                chunk = order[start : start + _CHUNK]
                for reward in rewards:
                    try:
                        batch = client.score(reward, [images[i] for i in chunk], prompts=[prompts[i] for i in chunk])
                    except RewardServiceError as error:
                        failure = error
                        break
                    for i, result in zip(chunk, batch.items, strict=True):
                        results[(i, reward)] = result
                        records[i].add_result(reward, result)
                if failure is not None:
                    break
    except (RewardServiceError, TimeoutError) as error:
        print(f"ddpo score: {error}", file=sys.stderr)
        return EXIT_SERVICE
    if failure is not None:  # the items left unscored carry the call's error
        for record in records:
            for reward in rewards:
                if reward not in record.rewards:
                    record.add_error(reward, call_error(failure))
    settings = evaluation_settings(
        "ddpo score --images", rewards, args.server, images=str(folder), prompts_from=source, seed=None
    )
    write_evaluation(args.out, records, rewards, settings)
    failed = 0
    for i, (path, record) in enumerate(zip(files, records, strict=True)):
        for reward in rewards:
            answer = results.get((i, reward))
            failed += reward in record.errors
            _print(path, reward, answer, None if answer is not None else record.errors[reward], args.json)
    print(f"ddpo score: wrote results.jsonl, summary.json and report.html to {args.out}", file=sys.stderr)
    if failure is not None:
        print(f"ddpo score: the reward service failed, stopped early: {failure}", file=sys.stderr)
        return EXIT_SERVICE
    return EXIT_FAILED if failed else EXIT_OK
