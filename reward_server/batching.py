"""One worker per reward: a bounded queue of items from every call and stream, grouped into batches.

The batcher first takes a free instance slot, then collects up to ``max_batch_size`` queued items, waiting at most
``max_queue_delay`` for the batch to fill, and scores it in a thread so the event loop keeps serving. While every
instance is busy, items accumulate, so batches grow under load (as Triton's dynamic batcher does). Items whose caller
has gone (deadline, cancellation) are dropped before scoring.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time

import grpc
import numpy as np
import numpy.typing as npt

from reward_server.metrics import ServerMetrics
from reward_server.rewards import ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.wire import DecodedItem

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """How one reward's items are queued and grouped."""

    max_batch_size: int | None = None
    """Largest batch handed to ``Reward.score``; None: the reward's preference (``Reward.preferred_max_batch_size``)."""
    max_queue_delay_ms: float = 2.0
    """How long the first item of a batch may wait for more items."""
    max_queued_items: int = 4096
    """Items waiting for a batch; beyond this, unary calls get RESOURCE_EXHAUSTED and streams wait. Batches are never
    larger than this."""
    instances: int | None = None
    """Batches scored concurrently (threads), like Triton's instance_group count; None: the reward's preference
    (``Reward.preferred_instances``)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queued_items", "instances"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_batch_size is not None and self.max_queued_items < self.max_batch_size:
            raise ValueError(
                f"max_queued_items ({self.max_queued_items}) must be >= max_batch_size ({self.max_batch_size})"
            )


@dataclasses.dataclass(frozen=True)
class ItemOutcome:
    """What a worker answers for one item: an error, or a score with its components and info."""

    error: ItemError | None
    score: float = float("nan")
    components: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Pending:
    item: DecodedItem
    future: asyncio.Future[ItemOutcome]


class QueueFull(Exception):
    """The reward's queue cannot take these items now."""


class RewardWorker:
    """Queues, batches and scores the items of one reward."""

    def __init__(self, reward: Reward, config: BatchingConfig, metrics: ServerMetrics) -> None:
        self.reward = reward
        self.name = reward.spec.name
        self.config = config
        self._metrics = metrics
        self.instances = config.instances or reward.preferred_instances
        self.max_batch_size = min(config.max_batch_size or reward.preferred_max_batch_size, config.max_queued_items)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._changed = asyncio.Condition()
        self._slots = asyncio.Semaphore(self.instances)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.instances, thread_name_prefix=self.name)
        self._scoring: set[asyncio.Task[None]] = set()
        self._batcher: asyncio.Task[None] | None = None

    @property
    def spec(self) -> RewardSpec:
        return self.reward.spec

    @property
    def capacity(self) -> int:
        """The most items ever queued at once (max_queued_items)."""
        return self.config.max_queued_items

    def start(self) -> None:
        self._batcher = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, reason: str = "the server is shutting down") -> None:
        """Stop batching, finish the batches being scored, and fail what is still queued (UNAVAILABLE, ``reason``)."""
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        await asyncio.gather(*self._scoring, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_result(ItemOutcome(ItemError(grpc.StatusCode.UNAVAILABLE, reason)))
        self._executor.shutdown(wait=True)

    def _enqueue(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]:
        loop = asyncio.get_running_loop()
        pendings = [_Pending(item, loop.create_future()) for item in items]
        self._queue.extend(pendings)
        self._metrics.queued_items.labels(self.name).set(len(self._queue))
        return [p.future for p in pendings]

    async def submit_nowait(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]:
        """Queue all ``items`` at once, or raise QueueFull without queueing any."""
        if len(self._queue) + len(items) > self.config.max_queued_items:
            raise QueueFull(
                f"reward {self.name!r} has {len(self._queue)} items queued (limit "
                f"{self.config.max_queued_items}); cannot take {len(items)} more now. Retry with "
                f"backoff, or send smaller batches"
            )
        futures = self._enqueue(items)
        async with self._changed:
            self._changed.notify_all()
        return futures

    async def submit(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]:
        """Queue ``items``, waiting for room (back-pressure for streams)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self._queue) + len(items) <= max(self.config.max_queued_items, len(items))
            )
            futures = self._enqueue(items)
            self._changed.notify_all()
        return futures

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._queue))
            deadline = loop.time() + self.config.max_queue_delay_ms / 1000
            while len(self._queue) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            size = min(len(self._queue), self.max_batch_size)
            batch = [self._queue.popleft() for _ in range(size)]
            self._metrics.queued_items.labels(self.name).set(len(self._queue))
            self._changed.notify_all()  # wakes streams waiting for room
        return [p for p in batch if not p.future.done()]  # callers that gave up cancelled their futures

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._score(batch))
            self._scoring.add(task)
            task.add_done_callback(self._scoring.discard)

    async def _score(self, batch: list[_Pending]) -> None:
        try:
            started = time.perf_counter()
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._score_in_thread, [p.item for p in batch]
            )
            self._metrics.batch_size.labels(self.name).observe(len(batch))
            self._metrics.batch_latency.labels(self.name).observe(time.perf_counter() - started)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if not pending.future.done():
                    pending.future.set_result(outcome)
        finally:
            self._slots.release()

    def _score_in_thread(self, items: list[DecodedItem]) -> list[ItemOutcome]:
        return score_items(
            self.reward, [i.image for i in items], [i.prompt for i in items], [i.metadata for i in items]
        )


def score_items(
    reward: Reward, images: list[npt.NDArray[np.uint8]], prompts: list[str | None], metadata: list[Metadata]
) -> list[ItemOutcome]:
    """Score validated items in one ``Reward.score`` call; a reward that raises fails every item with INTERNAL."""
    name = reward.spec.name
    try:
        output = reward.score(images, prompts, metadata)
    except Exception as error:
        log.exception("reward failed on a batch", extra={"reward": name, "batch_size": len(images)})
        failure = ItemError(
            grpc.StatusCode.INTERNAL,
            f"reward {name!r} failed on a batch of {len(images)}: {type(error).__name__}: {error}",
        )
        return [ItemOutcome(failure)] * len(images)
    return outcomes_from_output(output, len(images), name)


def outcomes_from_output(output: RewardOutput, batch_size: int, reward: str) -> list[ItemOutcome]:
    """Split a batch output into per-item outcomes, turning a malformed output into INTERNAL errors."""
    errors = output.item_errors(batch_size, reward)
    outcomes = []
    for i, error in enumerate(errors):
        if error is not None:
            outcomes.append(ItemOutcome(error))
            continue
        outcomes.append(
            ItemOutcome(
                None,
                score=float(output.scores[i]),
                components={name: float(values[i]) for name, values in output.components.items()},
                info=dict(output.info[i]) if output.info is not None else {},
            )
        )
    return outcomes
