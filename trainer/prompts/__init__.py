"""Prompt sets: the paper's three, plus any text file with one prompt per line.

- ``simple_animals``: the paper's 45 common animals (aesthetic task).
- ``imagenet_animals``: the 398 animal classes of ImageNet-1k, ids 0-397, each with all its names ("tench, Tinca
  tinca"), as ddpo-pytorch prompts them (compressibility tasks).
- ``nouns_activities``: "a <simple animal> <activity>" for the paper's three activities (alignment task).
- ``shapes``: "<count> <colour> <shape>" for the built-in tiny model, with no background named (54 prompts).
- ``shapes_heldout``: the same for colour/shape pairs left out of ``shapes`` (18 prompts), for evaluation.
- ``from_file``: a UTF-8 text file, one prompt per line; blank lines are skipped.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

PROMPT_SETS = ("simple_animals", "imagenet_animals", "nouns_activities", "shapes", "shapes_heldout", "from_file")
_FILE_SETS = ("simple_animals", "imagenet_animals", "shapes", "shapes_heldout")  # <name>.txt in this package


def _lines(name: str) -> list[str]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def load_prompts(name: str, file: str | None = None) -> list[str]:
    """Every prompt of a set, in a fixed order. Raises ValueError for an unknown set or an unusable file."""
    if name in _FILE_SETS:
        return _lines(f"{name}.txt")
    if name == "nouns_activities":
        return [
            f"{_with_article(noun)} {activity}"
            for noun in _lines("simple_animals.txt")
            for activity in _lines("activities.txt")
        ]
    if name == "from_file":
        if file is None:
            raise ValueError("the from_file prompt set needs a file (prompts.file)")
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"prompt file {file!r} does not exist")
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise ValueError(f"prompt file {file!r} is not UTF-8 text: {error}") from None
        if not prompts:
            raise ValueError(f"prompt file {file!r} has no prompts (one per line expected)")
        return prompts
    raise ValueError(f"unknown prompt set {name!r}: use one of {', '.join(PROMPT_SETS)}")


class PromptSampler:
    """Draws prompts uniformly with its own numpy Generator, whose state is saved in checkpoints."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        self.prompts = prompts
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int, images_per_prompt: int = 1) -> list[str]:
        """``count`` prompts: ``count / images_per_prompt`` draws, each repeated ``images_per_prompt`` times."""
        if count % images_per_prompt:
            raise ValueError(f"images_per_prompt ({images_per_prompt}) must divide the batch size ({count})")
        draws = self.rng.integers(len(self.prompts), size=count // images_per_prompt)
        return [self.prompts[i] for i in draws for _ in range(images_per_prompt)]
