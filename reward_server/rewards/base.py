"""The reward contract shared by every front end: the gRPC server, Triton models and in-process callers.

A reward is a plain object. It receives a batch of decoded items, already validated against its ``ImageSpec``:

    images    list of (H, W, C) uint8 arrays, read-only; sizes may differ within a batch
    prompts   list of str | None, one per image
    metadata  list of dicts (JSON-like), one per image

and returns one ``RewardOutput`` for the whole batch: a float score per item, optional named components, optional
info strings, and optional per-item errors. A reward signals a failure of one item with ``ItemError``; it never
hides one behind a default score.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

Metadata = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Which images a reward accepts. Sizes are inclusive (height, width) bounds in pixels."""

    channels: tuple[int, ...] = (3,)
    min_size: tuple[int, int] = (1, 1)
    max_size: tuple[int, int] = (4096, 4096)

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"ImageSpec.channels must be a non-empty tuple of positive ints, got {self.channels}")
        if min(self.min_size) < 1 or any(lo > hi for lo, hi in zip(self.min_size, self.max_size, strict=True)):
            raise ValueError(
                f"ImageSpec sizes must satisfy 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )

    def check(self, height: int, width: int, channels: int) -> str | None:
        """Return why an image of this shape is not accepted, or None when it is."""
        if height < 1 or width < 1 or channels < 1:
            return f"shape {height}x{width}x{channels} has a zero dimension; height, width and channels must be > 0"
        if channels not in self.channels:
            accepted = " or ".join(str(c) for c in self.channels)
            return f"has {channels} channels; this reward accepts {accepted} (HWC layout, RGB)"
        (min_h, min_w), (max_h, max_w) = self.min_size, self.max_size
        if not (min_h <= height <= max_h and min_w <= width <= max_w):
            return f"size {height}x{width} (HxW) is outside the accepted range {min_h}x{min_w} to {max_h}x{max_w}"
        return None


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """What a reward is, as listed by ``ListRewards``."""

    name: str
    description: str
    version: str
    units: str
    higher_is_better: bool = True
    requires_prompt: bool = False
    image_spec: ImageSpec = dataclasses.field(default_factory=ImageSpec)
    component_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ItemError:
    """Why one item of a batch could not be scored."""

    code: grpc.StatusCode
    message: str


@dataclasses.dataclass
class RewardOutput:
    """Scores for one batch. ``scores[i]`` is meaningful only where ``errors[i]`` is None."""

    scores: npt.NDArray[np.float64]  # (B,)
    components: dict[str, npt.NDArray[np.float64]] = dataclasses.field(default_factory=dict)  # name -> (B,)
    info: list[dict[str, str]] | None = None  # B dicts
    errors: list[ItemError | None] | None = None  # B entries

    def item_errors(self, batch_size: int, reward: str) -> list[ItemError | None]:
        """Check the output against the batch and return one error (or None) per item.

        A malformed output is the reward's bug: every affected item gets INTERNAL, never a made-up score.
        """
        scores = np.asarray(self.scores)
        problem = None
        if scores.shape != (batch_size,):
            problem = f"returned scores of shape {scores.shape} for a batch of {batch_size}"
        elif self.errors is not None and len(self.errors) != batch_size:
            problem = f"returned {len(self.errors)} errors for a batch of {batch_size}"
        elif self.info is not None and len(self.info) != batch_size:
            problem = f"returned {len(self.info)} info entries for a batch of {batch_size}"
        else:
            for name, values in self.components.items():
                if np.shape(values) != (batch_size,):
                    problem = f"returned component {name!r} of shape {np.shape(values)} for a batch of {batch_size}"
        if problem is not None:
            return [ItemError(grpc.StatusCode.INTERNAL, f"reward {reward!r} {problem}")] * batch_size
        errors: list[ItemError | None] = list(self.errors) if self.errors is not None else [None] * batch_size
        for i, score in enumerate(scores):
            if errors[i] is None and not np.isfinite(score):
                errors[i] = ItemError(
                    grpc.StatusCode.INTERNAL,
                    f"reward {reward!r} returned a non-finite score ({score}) without reporting an error",
                )
        return errors


class Reward(abc.ABC):
    """Base class of every reward. Subclasses set ``spec`` and implement ``score``.

    ``load`` does the slow part (model weights); servers call it once, off the event loop, before serving, and
    ``close`` once they stop serving it.
    ``score`` may be called from several worker threads at once, one batch per instance. Unless configured
    otherwise, a server runs ``preferred_instances`` of them (more than 1 only pays when ``score`` releases the GIL)
    and hands at most ``preferred_max_batch_size`` items to one call.
    """

    spec: RewardSpec
    preferred_instances: int = 1
    preferred_max_batch_size: int = 32

    def load(self) -> None:  # noqa: B027 - optional hook: rewards without weights have nothing to load
        """Load weights or other expensive state. The default does nothing."""

    def close(self) -> None:  # noqa: B027 - optional hook: most rewards hold nothing to release
        """Release connections or other resources when the server stops serving the reward. The default does nothing."""

    @abc.abstractmethod
    def score(
        self,
        images: Sequence[npt.NDArray[np.uint8]],
        prompts: Sequence[str | None],
        metadata: Sequence[Metadata],
    ) -> RewardOutput:
        """Score one batch; the three sequences have the same length."""


MODEL_DTYPES = ("float32", "float16", "bfloat16")


def check_placement(device: str, dtype: str) -> None:
    """Validate a model reward's ``device`` and ``dtype`` options before anything loads."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and device == "cpu":
        raise ValueError("dtype float16 needs a GPU device (cuda:N); use float32 or bfloat16 on the CPU")
