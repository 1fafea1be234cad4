"""Composite rewards: a weighted sum of served rewards, total = Σ wᵢ · rᵢ, computed concurrently.

A composite is not a reward object: it hands every item to each component's worker at once (each batches it with
that reward's other traffic, on its own threads), waits for all answers, and adds them up. Each result carries the
total as its score and every component's score under the component's name; the components' own components and
info are kept as ``"<component>.<key>"``. If any component fails an item, the item fails, and the message says which
component failed and why.

Composites are named in the config (``[rewards.NAME] type = "composite"``, ``weights = {...}``) or asked for per
request (``ScoreRequest.weights``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from reward_server.batching import ItemOutcome, QueueFull, RewardWorker
from reward_server.rewards import ImageSpec, ItemError, RewardSpec
from reward_server.wire import DecodedItem

COMPOSITE = "composite"  # the reward type of a named composite in the config


def check_weights(weights: Any, what: str) -> dict[str, float]:
    """A composite's weights as {reward: weight}; ValueError naming ``what`` unless they are usable."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{what} must be a non-empty table of reward = weight, e.g. {{aesthetic = 1.0}}")
    checked = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: reward names must be non-empty strings, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"{what}: the weight of {name!r} must be a finite number, got {weight!r}")
        checked[name] = float(weight)
    return checked


def composite_description(weights: Mapping[str, float]) -> str:
    """ "1 × aesthetic + 0.5 × llava_bertscore" """
    return " + ".join(f"{weight:g} × {component}" for component, weight in weights.items())


def composite_spec(name: str, weights: Mapping[str, float], specs: Mapping[str, RewardSpec]) -> RewardSpec:
    """The spec of a weighted sum: it needs a prompt if any component does, and takes the images all of them take.

    ValueError if the components accept no image in common, or if one of them is lower-is-better (a weighted sum
    would then mix directions; serve a negated version of it)."""
    parts = [specs[component] for component in weights]
    lower = [spec.name for spec in parts if not spec.higher_is_better]
    if lower:
        raise ValueError(f"composite {name!r}: {', '.join(lower)} is lower-is-better; combine higher-is-better rewards")
    channels = tuple(c for c in parts[0].image_spec.channels if all(c in s.image_spec.channels for s in parts))
    if not channels:
        raise ValueError(f"composite {name!r}: its rewards accept no channel count in common")
    try:
        image_spec = ImageSpec(
            channels=channels,
            min_size=(max(s.image_spec.min_size[0] for s in parts), max(s.image_spec.min_size[1] for s in parts)),
            max_size=(min(s.image_spec.max_size[0] for s in parts), min(s.image_spec.max_size[1] for s in parts)),
        )
    except ValueError:
        raise ValueError(f"composite {name!r}: its rewards accept no image size in common") from None
    return RewardSpec(
        name=name,
        description=composite_description(weights),
        version="1",
        units="weighted sum",
        requires_prompt=any(spec.requires_prompt for spec in parts),
        image_spec=image_spec,
        component_names=tuple(weights),
    )


@dataclasses.dataclass(frozen=True)
class _Part:
    name: str
    weight: float
    worker: RewardWorker


class CompositeScorer:
    """Scores items with a weighted sum of workers; has the worker interface the servicer uses."""

    def __init__(self, name: str, weights: Mapping[str, float], workers: Mapping[str, RewardWorker]) -> None:
        """``workers`` holds at least every component; ValueError from ``composite_spec``."""
        self.name = name
        self.spec = composite_spec(name, weights, {component: workers[component].spec for component in weights})
        self._weights = dict(weights)
        self._parts = [_Part(component, weight, workers[component]) for component, weight in weights.items()]

    @property
    def capacity(self) -> int:
        """The most items ever queued at once: every item waits on every component."""
        return min(part.worker.capacity for part in self._parts)

    async def submit(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]:
        """Queue ``items`` on every component (waiting for room); one future per item for the total."""
        return self._combine_all([await part.worker.submit(items) for part in self._parts])

    async def submit_nowait(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]:
        """Queue ``items`` on every component, or raise QueueFull and queue none of them."""
        queued: list[list[asyncio.Future[ItemOutcome]]] = []
        try:
            for part in self._parts:
                queued.append(await part.worker.submit_nowait(items))
        except QueueFull:
            for futures in queued:
                for future in futures:
                    future.cancel()  # the worker drops cancelled items before scoring
            raise
        return self._combine_all(queued)

    def _combine_all(self, queued: Sequence[list[asyncio.Future[ItemOutcome]]]) -> list[asyncio.Future[ItemOutcome]]:
        return [asyncio.ensure_future(self._combine([futures[i] for futures in queued])) for i in range(len(queued[0]))]

    async def _combine(self, futures: list[asyncio.Future[ItemOutcome]]) -> ItemOutcome:
        """Wait for one item's answer from every component (cancelling this cancels them) and add them up."""
        outcomes = await asyncio.gather(*futures)
        for part, outcome in zip(self._parts, outcomes, strict=True):
            if outcome.error is not None:
                return ItemOutcome(
                    ItemError(
                        outcome.error.code,
                        f"component {part.name!r} of {self.name!r} failed: {outcome.error.message}",
                    )
                )
        components = {part.name: outcome.score for part, outcome in zip(self._parts, outcomes, strict=True)}
        info: dict[str, str] = {}
        for part, outcome in zip(self._parts, outcomes, strict=True):
            components |= {f"{part.name}.{key}": value for key, value in outcome.components.items()}
            info |= {f"{part.name}.{key}": value for key, value in outcome.info.items()}
        try:
            total = math.fsum(part.weight * outcome.score for part, outcome in zip(self._parts, outcomes, strict=True))
        except (OverflowError, ValueError):  # ValueError: inf - inf
            total = math.nan
        if not math.isfinite(total):
            return ItemOutcome(
                ItemError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"weights: the weighted sum of {self.name!r} overflows ({composite_description(self._weights)}); "
                    "use smaller weights",
                )
            )
        return ItemOutcome(None, score=total, components=components, info=info)
